//! taskstream: streams a live SynapTask task graph into message brokers as versioned change
//! records, at least once.
//!
//! The flow: [`source`] (Socket.IO session, snapshot, live diffs; job-event WebSocket) →
//! [`normalize`] (pure: payload + working view → [`record`]s) → [`encode`] (JSON, Avro) →
//! [`delivery`] (in-flight window; advances the [`state`] checkpoint over acknowledged
//! records) → [`sink`] (Kafka, NATS, stdout). [`app`] wires it, [`config`] loads it, and
//! [`check`] is `taskstream check`. The SynapTask simulator the tests, the demo and the
//! benchmarks run against is its own crate (`sim/`, `taskstream-sim`); the binary's `sim`,
//! `registry` and `demo` subcommands use it, this library does not.
pub mod app;
pub(crate) mod backoff;
pub mod check;
pub mod config;
pub mod delivery;
pub mod encode;
pub mod health;
pub mod metrics;
pub mod normalize;
pub mod offsets;
pub mod progress;
pub(crate) mod ratelimit;
pub mod record;
pub mod secret;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
