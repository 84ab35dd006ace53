//! taskstream: streams a live SynapTask task graph into message brokers as versioned change
//! records, at least once.
//!
//! The flow: [`source`] (Socket.IO session, snapshot, live diffs; job-event WebSocket) →
//! [`normalize`] (pure: payload + working view → [`record`]s) → [`encode`] (JSON) →
//! [`delivery`] (in-flight window; advances the [`state`] checkpoint over acknowledged
//! records) → [`sink`] (Kafka, NATS, stdout). [`app`] wires it, [`config`] loads it,
//! [`demo`] and [`check`] are the other subcommands, and [`sim`] is the SynapTask simulator
//! the tests, the demo and the benchmarks run against.
pub mod app;
pub mod check;
pub mod config;
pub mod delivery;
pub mod demo;
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
