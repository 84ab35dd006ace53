//! taskstream: streams a live SynapTask task graph into message brokers.
//!
//! - [`sim`]: the SynapTask API simulator used by the demo, the tests and the benchmarks.
//! - [`telemetry`]: logging setup shared by the binaries.
pub mod sim;
pub mod telemetry;
