//! Core mode: bounded publishes, and the one flusher task whose flushes stand in for acks
//! (core NATS is at-most-once).

use super::*;

impl Inner {
    /// One core publish, bounded like [`Inner::send_js`].
    pub(super) async fn send_core(&self, conn: &Conn, publish: Outgoing) -> Result<(), SinkError> {
        let sent =
            conn.client
                .publish_with_headers(publish.subject, publish.headers, publish.payload);
        match tokio::time::timeout(self.ack_timeout, sent).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match e.kind() {
                async_nats::client::PublishErrorKind::Send => retryable(e.to_string()),
                _ => fatal(e.to_string()),
            }),
            Err(_) => Err(retryable("publish timed out (server unreachable?)")),
        }
    }

    /// Core mode's "ack": one flush of the client's buffer covers every message published
    /// before it, so a single task flushes for all of them (a flush per message floods the
    /// client's command channel and starves the publisher). Retries until a flush succeeds;
    /// a message lost with a dead connection is not resent (core NATS is at-most-once).
    pub(super) async fn run_core_flusher(self: Arc<Self>, client: Client) {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            let target = self.core_published.load(Ordering::SeqCst);
            if *self.core_flushed.borrow() >= target {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = self.core_wake.notified() => continue,
                }
            }
            let failure = match tokio::time::timeout(self.ack_timeout, client.flush()).await {
                Ok(Ok(())) => {
                    self.core_flushed.send_replace(target);
                    backoff.reset();
                    continue;
                }
                Ok(Err(e)) => retryable(format!("flush: {e}")),
                Err(_) => retryable("flush timed out (server unreachable?)"),
            };
            metrics::inc(&metrics::metrics().sink_retries_total);
            self.warn_throttled("core NATS flush failed", &failure);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}
