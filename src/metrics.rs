//! Process-wide counters and gauges, rendered in the Prometheus text format on the metrics
//! endpoint. Plain atomics: cheap enough for the hot path, and nothing here can hold a secret
//! (labels are fixed names, never payload or config values).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $kind:ident $name:ident ),* $(,)?) => {
        /// Every metric of the process.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $doc])* pub $name: metrics!(@ty $kind), )*
        }

        impl Metrics {
            /// The Prometheus text exposition of every metric.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let help = concat!($($doc),*).trim();
                    let _ = writeln!(out, "# HELP taskstream_{} {}", stringify!($name), help);
                    let _ = writeln!(out, "# TYPE taskstream_{} {}", stringify!($name), metrics!(@kind $kind));
                    let _ = writeln!(out, "taskstream_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
    (@ty counter) => { AtomicU64 };
    (@ty gauge) => { AtomicI64 };
    (@kind counter) => { "counter" };
    (@kind gauge) => { "gauge" };
}

metrics! {
    /// Source events received (diff payloads, snapshot pages, job frames).
    counter source_events_total,
    /// graph:diff payloads received.
    counter diffs_received_total,
    /// graph:diff payloads dropped because the pipeline was full (a reconcile follows).
    counter diffs_dropped_total,
    /// Session control events (pongs, rate_limited events) dropped because the session loop
    /// had 256 waiting; a server flooding them cannot grow memory.
    counter control_events_dropped_total,
    /// Inputs that could not be parsed and went to the dead-letter route.
    counter dead_letters_total,
    /// Entity changes skipped because a newer or equal version was already known.
    counter stale_changes_total,
    /// Records produced by the normaliser.
    counter records_total,
    /// Messages handed to sinks.
    counter messages_enqueued_total,
    /// Messages acknowledged by every sink.
    counter messages_acked_total,
    /// Sink sends that failed and were retried.
    counter sink_retries_total,
    /// Checkpoint transactions written.
    counter checkpoint_commits_total,
    /// Messages in flight (enqueued, not yet acknowledged).
    gauge in_flight,
    /// Socket.IO connect attempts.
    counter connect_attempts_total,
    /// Socket.IO sessions established.
    counter connects_total,
    /// Read calls (graph:get, branch:get, history:page) sent.
    counter reads_total,
    /// Read calls answered rate_limited and retried.
    counter reads_rate_limited_total,
    /// Read calls that got no ack in time.
    counter reads_timed_out_total,
    /// Snapshots completed.
    counter snapshots_total,
    /// Reconciles started after live diffs were lost.
    counter reconciles_total,
    /// Job-event frames received.
    counter job_frames_total,
    /// Job-event frames dropped because the pipeline was blocked and the buffer was full.
    counter job_frames_dropped_total,
    /// Job-event frames kept at shutdown for the next run (the job API replays nothing).
    counter job_frames_spooled_total,
    /// Seconds spent waiting before connecting because recent attempts (this run's and, from
    /// the state store, earlier runs') used the connect budget.
    counter connect_budget_wait_seconds_total,
    /// History batches fetched by catch-ups and polls.
    counter history_batches_total,
    /// History catch-ups and polls run.
    counter history_catchups_total,
    /// Windows of history that could not be replayed, only reconciled with a snapshot.
    counter gaps_total,
    /// Changes a snapshot found that no diff or history batch had published (anti-entropy).
    counter snapshot_changes_total,
    /// Live diffs held for an entity not known yet, waiting for a catch-up or snapshot.
    gauge pending_diffs,
    /// Held diffs dropped because the pending buffer was full (history brings them back).
    counter pending_diffs_dropped_total,
    /// Status transitions published from history that no live diff had shown.
    counter status_from_history_total,
    /// Live diff entries ignored because they are outside the source's branch (`source.root`).
    counter outside_scope_total,
    /// Reads waiting for the read budget right now (the read scheduler's queue).
    gauge reads_waiting,
    /// Milliseconds reads spent waiting for the read budget.
    counter read_budget_wait_ms_total,
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        inc(&m.records_total);
        let text = m.render();
        assert!(text.contains("# TYPE taskstream_records_total counter"));
        assert!(text.contains("taskstream_records_total 1"));
        assert!(text.contains("# HELP taskstream_in_flight Messages in flight"));
    }
}
