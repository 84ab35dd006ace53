//! PLACEHOLDER written by the lead so the crate compiles while the NATS sink is being written:
//! only the config struct as specified. The sink helper replaces this whole file.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::SinkError;

/// `[sinks.nats]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Whether this sink is on.
    pub enabled: bool,
    /// Server URL.
    pub url: String,
    /// bootstrap.servers.
    pub brokers: String,
    /// Create missing topics.
    pub create_topics: bool,
    /// Partitions of created topics.
    pub partitions: i32,
    /// Replication factor of created topics.
    pub replication_factor: i32,
    /// librdkafka properties.
    pub properties: BTreeMap<String, String>,
    /// Env var holding sasl.password.
    pub password_env: Option<String>,
}

/// Placeholder.
pub struct NatsSink;

impl NatsSink {
    /// Placeholder.
    pub fn new(_cfg: &NatsConfig) -> Result<Self, SinkError> {
        Err(SinkError::Fatal {
            sink: "nats".into(),
            message: "not built yet".into(),
        })
    }
}

impl super::Sink for NatsSink {
    fn name(&self) -> &str {
        "nats"
    }
    fn enqueue(
        &self,
        _msg: std::sync::Arc<super::Message>,
    ) -> futures_util::future::BoxFuture<'_, Result<super::AckFuture, SinkError>> {
        unimplemented!("placeholder")
    }
    fn prepare(&self) -> futures_util::future::BoxFuture<'_, Result<String, SinkError>> {
        unimplemented!("placeholder")
    }
    fn flush(&self) -> futures_util::future::BoxFuture<'_, Result<(), SinkError>> {
        unimplemented!("placeholder")
    }
}
