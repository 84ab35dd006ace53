//! taskstream: streams a live SynapTask task graph into message brokers.
//!
//! - [`sim`]: the SynapTask API simulator used by the demo, the tests and the benchmarks.
//! - [`sink`]: the `Sink` seam and the broker sinks.
//! - [`state`]: the delivered checkpoint and its store.
//! - [`metrics`]: process counters.
//! - [`telemetry`]: logging setup shared by the binaries.
pub mod delivery;
pub mod encode;
pub mod metrics;
pub mod normalize;
pub mod ratelimit;
pub mod record;
pub mod secret;
pub mod sim;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
