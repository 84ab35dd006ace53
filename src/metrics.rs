//! Process-wide metrics, kept with `prometheus-client` and rendered in the Prometheus text
//! format on the metrics endpoint: plain counters and gauges (atomics, cheap on the hot path),
//! and labelled families and histograms for what is per source, per sink or a latency. Nothing
//! here can hold a secret: labels are fixed names (sources, sinks, routes, event kinds), never
//! payload or credential values.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of events a source delivered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `synaptask` or `jobs`.
    pub source: &'static str,
    /// The event kind (`diff`, `snapshot_page`, `history`, `job_frame`, `malformed`, ...).
    pub kind: &'static str,
}

/// Labels of a sink's messages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// The sink (`kafka`, `nats`, `stdout`).
    pub sink: String,
    /// The topic family (`nodes`, `links`, `status`, `history`, `dlq`, `jobs`).
    pub route: &'static str,
}

/// Labels of a per-sink figure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkName {
    /// The sink (`kafka`, `nats`, `stdout`).
    pub sink: String,
}

/// Labels of a read's figures.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadLabels {
    /// The read event (`graph:get`, `branch:get`, `history:page`, `trash:page`).
    pub event: &'static str,
}

/// A latency histogram: 0.25 ms to about 8 s in doubling buckets.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $kind:ident $name:ident ),* $(,)?) => {
        /// Every metric of the process.
        #[derive(Debug)]
        pub struct Metrics {
            $( $(#[doc = $doc])* pub $name: metrics!(@ty $kind), )*
            /// Source events received, per source and kind.
            pub events_received: Family<EventLabels, Counter>,
            /// Messages handed to each sink, per sink and route.
            pub sink_sent: Family<SinkLabels, Counter>,
            /// Messages each sink's broker acknowledged, per sink and route.
            pub sink_acked: Family<SinkLabels, Counter>,
            /// Seconds from handing a message to a sink to its broker's acknowledgement.
            pub publish_latency: Family<SinkName, Histogram, fn() -> Histogram>,
            /// Seconds from sending a read to its answer, per read event. The read budget counts
            /// a read from its answer, so every window of a long catch-up costs one of these.
            pub read_duration: Family<ReadLabels, Histogram, fn() -> Histogram>,
            /// Whether each sink's last probe reached its broker (1) or not (0).
            pub sink_up: Family<SinkName, Gauge>,
            /// Seconds the oldest message not yet acknowledged in order has waited.
            pub checkpoint_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
            /// When the oldest message not yet acknowledged in order was submitted (ms since
            /// the process-wide epoch, 0 = none); the lag gauge is computed from it.
            oldest_pending_ms: std::sync::atomic::AtomicU64,
            registry: Registry,
        }

        impl Default for Metrics {
            fn default() -> Self {
                let mut m = Self {
                    $( $name: Default::default(), )*
                    events_received: Family::default(),
                    sink_sent: Family::default(),
                    sink_acked: Family::default(),
                    publish_latency: Family::new_with_constructor(latency_histogram),
                    read_duration: Family::new_with_constructor(latency_histogram),
                    sink_up: Family::default(),
                    checkpoint_lag_seconds: Gauge::default(),
                    oldest_pending_ms: Default::default(),
                    registry: Registry::with_prefix("taskstream"),
                };
                $(
                    let help = concat!($($doc),*).trim();
                    // prometheus-client adds the `_total` of a counter itself.
                    let name = stringify!($name);
                    let name = name.strip_suffix("_total").unwrap_or(name);
                    m.registry.register(name, help, m.$name.clone());
                )*
                m.registry.register(
                    "events_received",
                    "Source events received, per source and kind.",
                    m.events_received.clone(),
                );
                m.registry.register(
                    "sink_messages_sent",
                    "Messages handed to each sink, per sink and route.",
                    m.sink_sent.clone(),
                );
                m.registry.register(
                    "sink_messages_acked",
                    "Messages each sink's broker acknowledged, per sink and route.",
                    m.sink_acked.clone(),
                );
                m.registry.register_with_unit(
                    "publish_latency",
                    "Time from handing a message to a sink to its broker's acknowledgement.",
                    prometheus_client::registry::Unit::Seconds,
                    m.publish_latency.clone(),
                );
                m.registry.register_with_unit(
                    "read_duration",
                    "Time from sending a read to its answer, per read event.",
                    prometheus_client::registry::Unit::Seconds,
                    m.read_duration.clone(),
                );
                m.registry.register_with_unit(
                    "checkpoint_lag",
                    "Age of the oldest message not yet acknowledged in order (what the checkpoint waits for).",
                    prometheus_client::registry::Unit::Seconds,
                    m.checkpoint_lag_seconds.clone(),
                );
                m.registry.register(
                    "sink_up",
                    "Whether each sink's last probe reached its broker (1) or not (0).",
                    m.sink_up.clone(),
                );
                m
            }
        }
    };
    (@ty counter) => { Counter };
    (@ty gauge) => { Gauge };
    (@ty seconds) => { Counter<f64, std::sync::atomic::AtomicU64> };
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
    /// Pushed Socket.IO events the connector does not consume (notifications such as
    /// `node:ai_subtasks_done`), counted here and otherwise ignored.
    counter socket_events_ignored_total,
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
    /// Snapshot pages read again because removals shifted the listing past the overlap.
    counter snapshot_rereads_total,
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
    seconds connect_budget_wait_seconds_total,
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
    /// Messages submitted and not yet acknowledged in order: what the checkpoint lags behind.
    gauge checkpoint_lag_records,
    /// Objects read by the running snapshot (0 when none runs).
    gauge snapshot_objects,
    /// Pages read by the running snapshot (0 when none runs).
    gauge snapshot_pages,
    /// Whether the SynapTask session is up (1) or not (0).
    gauge source_up,
    /// Whether the job API connection is up (1) or not (0; also when no job API is configured).
    gauge jobs_up,
    /// Seconds reads spent waiting for the read budget.
    seconds read_budget_wait_seconds_total,
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

/// The instant the oldest-pending times count from.
fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// Records when the oldest message not yet acknowledged in order was submitted (`None`: none
/// waits) and refreshes the lag gauge.
pub fn set_oldest_pending(since: Option<std::time::Instant>) {
    let ms = since.map_or(0, |t| {
        // +1 so that a message submitted at the epoch itself is not taken for "none".
        u64::try_from(t.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX) + 1
    });
    metrics()
        .oldest_pending_ms
        .store(ms, std::sync::atomic::Ordering::Relaxed);
    refresh_lag();
}

/// Recomputes the checkpoint lag in seconds (called on every change and by the health monitor,
/// so a stalled broker shows a growing lag).
pub fn refresh_lag() {
    let m = metrics();
    let ms = m
        .oldest_pending_ms
        .load(std::sync::atomic::Ordering::Relaxed);
    let lag = if ms == 0 {
        0.0
    } else {
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(ms - 1) as f64 / 1000.0
    };
    m.checkpoint_lag_seconds.set(lag);
}

/// Adds one to a counter.
pub fn inc(c: &Counter) {
    c.inc();
}

/// Counts a source event.
pub fn event(source: &'static str, kind: &'static str) {
    metrics()
        .events_received
        .get_or_create(&EventLabels { source, kind })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        inc(&m.records_total);
        m.publish_latency
            .get_or_create(&SinkName {
                sink: "kafka".into(),
            })
            .observe(0.002);
        let text = m.render();
        assert!(text.contains("# TYPE taskstream_records counter"), "{text}");
        assert!(text.contains("taskstream_records_total 1"), "{text}");
        assert!(text.contains("# HELP taskstream_in_flight Messages in flight"));
        assert!(
            text.contains(
                "taskstream_publish_latency_seconds_bucket{le=\"0.004\",sink=\"kafka\"} 1"
            ) || text.contains(
                "taskstream_publish_latency_seconds_bucket{sink=\"kafka\",le=\"0.004\"} 1"
            ),
            "{text}"
        );
    }
}
