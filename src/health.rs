//! Liveness and readiness: `/health/live` answers while the process serves requests;
//! `/health/ready` answers 200 only while the SynapTask session (and the job API connection,
//! when configured) is up and every sink's broker answers its probe, 503 otherwise, with the
//! reason per component. A monitor task probes the sinks every [`PROBE_INTERVAL`] (the same
//! [`Sink::probe`] that `taskstream check` uses) and refreshes the checkpoint-lag gauge.
//!
//! It also carries the one operator request a running connector takes: a snapshot reconcile
//! without a restart (`POST /control/resnapshot`, `taskstream resnapshot`, or SIGUSR1).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::{metrics, SinkName};
use crate::sink::Sink;

/// How often the sinks are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a probe may take before its broker counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// One component's state as `/health/ready` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Component {
    /// `source`, `jobs` or `sink <name>`.
    pub name: String,
    /// Whether it is up.
    pub up: bool,
    /// Why not, or what it is.
    pub detail: String,
}

/// What readiness is made of, process-wide (like the metrics).
#[derive(Debug, Default)]
pub struct Health {
    sinks: Mutex<Vec<Component>>,
    jobs_required: std::sync::atomic::AtomicBool,
}

/// The process-wide health state.
pub fn health() -> &'static Health {
    static H: OnceLock<Health> = OnceLock::new();
    H.get_or_init(Health::default)
}

/// Marks the SynapTask session up or down.
pub fn set_source_up(up: bool) {
    metrics().source_up.set(i64::from(up));
}

/// Marks the job API connection up or down.
pub fn set_jobs_up(up: bool) {
    metrics().jobs_up.set(i64::from(up));
}

impl Health {
    /// Every component and whether all are up.
    pub fn report(&self) -> (bool, Vec<Component>) {
        let mut out = vec![Component {
            name: "source".into(),
            up: metrics().source_up.get() == 1,
            detail: if metrics().source_up.get() == 1 {
                "session up".into()
            } else {
                "no session".into()
            },
        }];
        if self
            .jobs_required
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let up = metrics().jobs_up.get() == 1;
            out.push(Component {
                name: "jobs".into(),
                up,
                detail: if up { "connected" } else { "not connected" }.into(),
            });
        }
        out.extend(self.sinks.lock().unwrap_or_else(|e| e.into_inner()).clone());
        (out.iter().all(|c| c.up), out)
    }
}

/// Probes one sink with the shared timeout.
pub async fn probe(sink: &dyn Sink) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, sink.probe()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// Probes the sinks every [`PROBE_INTERVAL`] until `shutdown`. Until the first round, each
/// sink counts as down (`not probed yet`).
pub fn monitor(sinks: Vec<Arc<dyn Sink>>, jobs: bool, shutdown: CancellationToken) {
    let h = health();
    h.jobs_required
        .store(jobs, std::sync::atomic::Ordering::Relaxed);
    *h.sinks.lock().unwrap_or_else(|e| e.into_inner()) = sinks
        .iter()
        .map(|s| Component {
            name: format!("sink {}", s.name()),
            up: false,
            detail: "not probed yet".into(),
        })
        .collect();
    tokio::spawn(async move {
        loop {
            let mut round = Vec::with_capacity(sinks.len());
            for s in &sinks {
                let r = probe(s.as_ref()).await;
                metrics()
                    .sink_up
                    .get_or_create(&SinkName {
                        sink: s.name().to_string(),
                    })
                    .set(i64::from(r.is_ok()));
                round.push(Component {
                    name: format!("sink {}", s.name()),
                    up: r.is_ok(),
                    detail: r.err().unwrap_or_else(|| "reachable".into()),
                });
            }
            *health().sinks.lock().unwrap_or_else(|e| e.into_inner()) = round;
            crate::metrics::refresh_lag();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
        }
    });
}

/// Asks the running pipeline for a snapshot reconcile (it picks the request up at once).
pub fn request_resnapshot() {
    resnapshot_signal().notify_one();
}

/// Where resnapshot requests wait for the pipeline; a request made while one is pending
/// merges with it.
pub fn resnapshot_signal() -> &'static tokio::sync::Notify {
    static N: OnceLock<tokio::sync::Notify> = OnceLock::new();
    N.get_or_init(tokio::sync::Notify::new)
}
