//! Topic administration: which configured topics the broker lacks, and creating them
//! (entity topics compacted) when `create_topics` is on.

use super::*;

impl Shared {
    /// Names of configured topics the broker does not have; `Err` when it does not answer.
    pub(super) async fn missing_topics(&self) -> Result<Vec<String>, String> {
        let Some(producer) = self.lock().producer.clone() else {
            return Err("no producer".into());
        };
        let wanted: Vec<String> = self.topics.distinct().into_keys().collect();
        // fetch_metadata blocks on librdkafka's reply.
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(None, METADATA_TIMEOUT)
                .map_err(|e| format!("broker unreachable: {e}"))?;
            let present: BTreeSet<&str> = metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.name())
                .collect();
            Ok(wanted
                .into_iter()
                .filter(|t| !present.contains(t.as_str()))
                .collect())
        })
        .await
        .map_err(|e| format!("metadata task failed: {e}"))?
    }

    /// Creates `names` (compacted or not per family) and waits until metadata lists them.
    pub(super) async fn create_missing(&self, names: &[String]) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .create()
            .map_err(|e| describe_client_error(&e))?;
        let compacted = self.topics.distinct();
        let new_topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| {
                let policy = if compacted.get(name).copied().unwrap_or(false) {
                    "compact"
                } else {
                    "delete"
                };
                NewTopic::new(
                    name,
                    self.partitions,
                    TopicReplication::Fixed(self.replication_factor),
                )
                .set("cleanup.policy", policy)
            })
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(ADMIN_TIMEOUT))
            .request_timeout(Some(ADMIN_TIMEOUT));
        let results = admin
            .create_topics(new_topics.iter(), &options)
            .await
            .map_err(|e| format!("create topics: {e}"))?;
        for result in results {
            match result {
                Ok(name) => tracing::info!(sink = NAME, topic = %name, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(format!("create topic {name}: {code}")),
            }
        }
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            let missing = self.missing_topics().await?;
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "created topics not visible in metadata: {}",
                    missing.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes sure every topic exists: creates missing ones when allowed.
    pub(super) async fn ensure_topics(&self) -> Result<usize, SinkError> {
        let missing = self.missing_topics().await.map_err(retryable)?;
        if !missing.is_empty() {
            if !self.create_topics {
                return Err(fatal(format!(
                    "missing topics {} and create_topics is off",
                    missing.join(", ")
                )));
            }
            self.create_missing(&missing).await.map_err(retryable)?;
        }
        Ok(self.topics.distinct().len())
    }
}
