//! `[sinks.kafka]`: the Kafka sink's configuration, its topics, and how it builds the sink.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::{KafkaSink, NAME};
use crate::sink::{Format, Route, Sink, SinkConfig, SinkError};

/// `[sinks.kafka]`: an idempotent Kafka producer.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Whether this sink is on.
    pub enabled: bool,
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// Topic per record family.
    pub topics: KafkaTopics,
    /// Body format, `json` or `avro` (Confluent wire format, `[schema_registry]`); unset takes
    /// `[encoding] format`.
    pub format: Option<crate::encode::Format>,
    /// Create missing topics at `prepare()` and after a broker lost them: entity topics
    /// (nodes, links) with `cleanup.policy=compact`, the others with `delete`.
    pub create_topics: bool,
    /// Partitions of topics this sink creates.
    pub partitions: i32,
    /// Replication factor of topics this sink creates.
    pub replication_factor: i32,
    /// Any librdkafka property, applied after taskstream's defaults so it can override them
    /// (e.g. `compression.type`, `security.protocol`, `sasl.username`).
    pub properties: BTreeMap<String, String>,
    /// Environment variable whose value becomes `sasl.password`. The value is never logged.
    pub password_env: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            brokers: "127.0.0.1:9092".into(),
            topics: KafkaTopics::default(),
            format: None,
            create_topics: true,
            partitions: 3,
            replication_factor: 1,
            properties: BTreeMap::new(),
            password_env: None,
        }
    }
}

// By hand so that a secret someone put into `properties` is not printed.
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_sensitive_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("enabled", &self.enabled)
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("properties", &properties)
            .field("password_env", &self.password_env)
            .finish()
    }
}

fn is_sensitive_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "ssl.key.pem", "token"]
        .iter()
        .any(|s| k.contains(s))
}

/// `[sinks.kafka.topics]`: the topic of each record family.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTopics {
    /// Node change records, keyed by node id; compacted.
    pub nodes: String,
    /// Link change records, keyed by link id; compacted.
    pub links: String,
    /// Derived task status changes.
    pub status: String,
    /// Dead letters (input that could not be parsed).
    pub dlq: String,
    /// Job-event records.
    pub jobs: String,
    /// History batches (`synaptask.history.batch`) and gap notices (`synaptask.gap`), keyed by scope.
    pub history: String,
}

impl Default for KafkaTopics {
    fn default() -> Self {
        Self {
            nodes: "synaptask.nodes".into(),
            links: "synaptask.links".into(),
            status: "synaptask.status".into(),
            dlq: "synaptask.dlq".into(),
            jobs: "synaptask.jobs".into(),
            history: "synaptask.history".into(),
        }
    }
}

impl KafkaTopics {
    /// The topic a route publishes to.
    pub fn topic(&self, route: Route) -> &str {
        match route {
            Route::Nodes => &self.nodes,
            Route::Links => &self.links,
            Route::Status => &self.status,
            Route::DeadLetter => &self.dlq,
            Route::Jobs => &self.jobs,
            Route::History => &self.history,
        }
    }

    /// Distinct topic names with whether each is compacted (a name shared by an entity family
    /// and another family is compacted, since entity records need their latest value kept).
    pub(super) fn distinct(&self) -> BTreeMap<String, bool> {
        let mut out = BTreeMap::new();
        for (name, compact) in [
            (&self.nodes, true),
            (&self.links, true),
            (&self.status, false),
            (&self.dlq, false),
            (&self.jobs, false),
            (&self.history, false),
        ] {
            *out.entry(name.clone()).or_insert(false) |= compact;
        }
        out
    }
}

impl SinkConfig for KafkaConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn format(&self) -> Option<Format> {
        self.format
    }

    fn keyed(&self) -> bool {
        true
    }

    fn route_name(&self, route: Route) -> Option<String> {
        Some(self.topics.topic(route).to_string())
    }

    fn build(&self, format: Format) -> Result<Arc<dyn Sink>, SinkError> {
        let cfg = KafkaConfig {
            format: Some(format),
            ..self.clone()
        };
        Ok(Arc::new(KafkaSink::new(&cfg)?))
    }
}
