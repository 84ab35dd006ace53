//! Recovery after a retryable delivery failure (see the module docs of `kafka`): a new
//! producer, topics checked, the backlog resent in order, then the newest record of each key
//! that a resend overtook sent again; and the worker that runs recoveries and the stall watchdog.

use super::*;

impl Shared {
    /// Runs one recovery until the backlog is resent (see the module docs).
    pub(super) async fn recover(self: &Arc<Self>) {
        let mut backoff = Backoff::new(RECOVERY_BACKOFF_MIN, RECOVERY_BACKOFF_MAX);
        let mut attempts = 0u32;
        loop {
            if !self.lock().recovering {
                return;
            }
            tokio::time::sleep(backoff.next_delay()).await;
            attempts += 1;
            match self.recover_once().await {
                Ok(resent) => {
                    tracing::info!(sink = NAME, resent, attempts, "recovered; backlog resent");
                    return;
                }
                Err(reason) => {
                    tracing::warn!(sink = NAME, attempts, "recovery not done yet: {reason}");
                }
            }
        }
    }

    pub(super) async fn recover_once(self: &Arc<Self>) -> Result<usize, String> {
        // A producer that failed for a reason no resend can fix ends every pending message.
        let current = self.lock().producer.clone();
        if let Some((code, reason)) = current.as_ref().and_then(|p| p.client().fatal_error()) {
            if is_fatal_code(code) {
                self.fail_everything(&format!("producer failed: {code}: {reason}"));
                return Ok(0);
            }
        }
        drop(current);
        // Checked before replacing the producer, so a long outage does not churn producers.
        let missing = self.missing_topics().await?;

        let generation = self.lock().generation + 1;
        let fresh = Arc::new(self.new_producer(generation).map_err(|e| e.to_string())?);
        let old = {
            let mut books = self.lock();
            books.generation = generation;
            books.restart = false;
            books.producer.replace(fresh)
        };
        // Dropping purges and flushes (blocking up to 500 ms); its reports land in the backlog.
        if let Some(old) = old {
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        }
        {
            let mut books = self.lock();
            let stragglers = std::mem::take(&mut books.sent);
            books
                .backlog
                .extend(stragglers.into_iter().map(|(seq, (_, p))| (seq, p)));
        }

        if !missing.is_empty() {
            if !self.create_topics {
                return Err(format!(
                    "missing topics {} and create_topics is off",
                    missing.join(", ")
                ));
            }
            self.create_missing(&missing).await?;
        }

        let mut resent = 0usize;
        // Per (route, key): the highest sequence number this recovery resent.
        let mut resent_keys: HashMap<(Route, String), usize> = HashMap::new();
        let mut wait = Backoff::new(QUEUE_FULL_WAIT_MIN, QUEUE_FULL_WAIT_MAX);
        loop {
            // The guard must not live across the sleep, hence the block.
            let queue_full = {
                let mut books = self.lock();
                if books.restart {
                    return Err("a resent message failed again".into());
                }
                if books.backlog.is_empty() {
                    let again = reasserts(&mut books.superseded, &resent_keys);
                    if again.is_empty() {
                        books.recovering = false;
                        // The stall clock restarts with the resent messages.
                        self.mark_progress();
                        return Ok(resent);
                    }
                    tracing::info!(
                        sink = NAME,
                        keys = again.len(),
                        "older records were resent after newer ones of the same keys; sending the newer ones again"
                    );
                    for msg in again {
                        let seq = books.next_seq;
                        books.next_seq += 1;
                        // Nobody waits for this ack: the original was acknowledged already.
                        let (tx, _) = oneshot::channel();
                        books.backlog.insert(seq, Pending { msg, tx });
                    }
                }
                let Some((seq, pending)) = books.backlog.pop_first() else {
                    continue;
                };
                let key = (pending.msg.route, pending.msg.key.clone());
                match Self::send_locked(&mut books, &self.topics, self.format, seq, pending) {
                    Ok(()) => {
                        resent += 1;
                        let top = resent_keys.entry(key).or_default();
                        *top = (*top).max(seq);
                        false
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), pending)) => {
                        books.backlog.insert(seq, pending);
                        true
                    }
                    Err((e, pending)) => match classify(&e) {
                        Class::Fatal(reason) => {
                            pending.resolve(Err(fatal(reason)));
                            false
                        }
                        Class::Retry => {
                            books.backlog.insert(seq, pending);
                            return Err(format!("resend failed: {e}"));
                        }
                    },
                }
            };
            if queue_full {
                tokio::time::sleep(wait.next_delay()).await;
            } else {
                wait.reset();
            }
        }
    }

    /// Resolves every pending message with a fatal error and ends the recovery.
    pub(super) fn fail_everything(&self, reason: &str) {
        let (sent, backlog) = {
            let mut books = self.lock();
            books.recovering = false;
            (
                std::mem::take(&mut books.sent),
                std::mem::take(&mut books.backlog),
            )
        };
        tracing::error!(sink = NAME, "{reason}");
        for (_, (_, pending)) in sent {
            pending.resolve(Err(fatal(reason)));
        }
        for (_, pending) in backlog {
            pending.resolve(Err(fatal(reason)));
        }
    }

    /// How long deliveries have been outstanding without progress (outside a recovery).
    pub(super) fn stalled_for(&self) -> Option<Duration> {
        let books = self.lock();
        (!books.recovering && !books.sent.is_empty()).then(|| self.since_progress())
    }
}

/// The messages to send again at the end of a recovery: for each key, the newest message
/// delivered while the recovery was pending, when the recovery resent an older message of that
/// key after it. Clears `superseded`.
pub(super) fn reasserts(
    superseded: &mut HashMap<(Route, String), (usize, Arc<Message>)>,
    resent: &HashMap<(Route, String), usize>,
) -> Vec<Arc<Message>> {
    let mut again: Vec<(usize, Arc<Message>)> = superseded
        .drain()
        .filter(|(key, (seq, _))| resent.get(key).is_some_and(|r| r < seq))
        .map(|(_, v)| v)
        .collect();
    again.sort_by_key(|(seq, _)| *seq);
    again.into_iter().map(|(_, m)| m).collect()
}

/// Runs recoveries when asked, and the stall watchdog in between.
pub(super) async fn worker(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(WATCHDOG_INTERVAL) => {
                let Some(stalled) = shared.stalled_for().filter(|d| *d >= STALL_AFTER) else {
                    continue;
                };
                let why = match shared.missing_topics().await {
                    Ok(missing) if !missing.is_empty() => {
                        format!("deliveries stalled and topics are missing: {}", missing.join(", "))
                    }
                    Ok(_) if stalled >= STALL_RESET_AFTER => {
                        format!("deliveries stalled for {stalled:?} although the broker answers")
                    }
                    // An unreachable broker: librdkafka keeps reconnecting and retrying.
                    _ => continue,
                };
                let mut books = shared.lock();
                shared.start_recovery(&mut books, &why);
            }
        }
        shared.recover().await;
    }
}
