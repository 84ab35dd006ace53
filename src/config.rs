//! Configuration: one TOML file (`config/taskstream.toml` documents every key) overridden by
//! environment variables `TASKSTREAM__SECTION__KEY` (e.g. `TASKSTREAM__SINKS__KAFKA__BROKERS`),
//! loaded with figment. Every section rejects unknown keys, naming them. Secrets are not config
//! values: the config names the variable or file that holds each one (see [`crate::secret`]).

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format as _, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::delivery::DeliverySection;
use crate::sink::kafka::KafkaConfig;
use crate::sink::nats::NatsConfig;
use crate::sink::stdout::StdoutConfig;
use crate::sink::SinkConfig;
use crate::source::jobs::JobsConfig;
use crate::source::synaptask::SynapTaskConfig;
use crate::state::StateConfig;

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[source]`: the SynapTask Socket.IO API.
    pub source: SynapTaskConfig,
    /// `[jobs]`: the job-event WebSocket API (off by default).
    pub jobs: JobsConfig,
    /// `[state]`: where the delivered checkpoint lives.
    pub state: StateConfig,
    /// `[delivery]`: the in-flight window.
    pub delivery: DeliverySection,
    /// `[encoding]`: the record body format.
    pub encoding: EncodingConfig,
    /// `[sinks.*]`: where records go; several may be on at once.
    pub sinks: SinksConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[schema_registry]`: where Avro schemas are registered (used by Avro sinks only).
    pub schema_registry: crate::encode::registry::RegistryConfig,
    /// `[telemetry]`: logs and OpenTelemetry traces.
    pub telemetry: crate::telemetry::TelemetryConfig,
}

pub use crate::encode::Format as BodyFormat;

/// `[encoding]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncodingConfig {
    /// The broker sinks' body format where `sinks.<name>.format` is not set: `json` or `avro`.
    /// The stdout / file sink always writes JSON lines.
    pub format: BodyFormat,
}

/// `[sinks]`: each sink has its own table and an `enabled` flag.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinksConfig {
    /// `[sinks.stdout]`: JSON lines to stdout or a file (on by default).
    pub stdout: StdoutConfig,
    /// `[sinks.kafka]`.
    pub kafka: KafkaConfig,
    /// `[sinks.nats]`: core NATS or JetStream.
    pub nats: NatsConfig,
}

impl SinksConfig {
    /// Every sink section, enabled or not, in publish order.
    pub fn all(&self) -> [&dyn SinkConfig; 3] {
        [&self.stdout, &self.kafka, &self.nats]
    }

    /// The enabled ones.
    pub fn enabled(&self) -> impl Iterator<Item = &dyn SinkConfig> {
        self.all().into_iter().filter(|s| s.enabled())
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address for `GET /metrics` (Prometheus text) and `GET /health`, e.g. `0.0.0.0:9464`; unset = off.
    pub listen: Option<String>,
}

/// Why the configuration is unusable; messages name the key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing.
    #[error("config file {0} not found")]
    Missing(String),
    /// Parsing or an unknown / mistyped key.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads `path` (if given) and then the `TASKSTREAM__*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError::Missing(p.display().to_string()));
            }
            fig = fig.merge(Toml::file_exact(p));
        }
        Self::from_figment(fig.merge(Env::prefixed("TASKSTREAM__").split("__")))
    }

    /// Extracts and validates a config from any figment (tests use strings).
    pub fn from_figment(fig: Figment) -> Result<Self, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| {
            // figment's messages name the key path and, for unknown keys, the accepted ones.
            let all: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            ConfigError::Invalid(all.join("; "))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.source.validate().map_err(ConfigError::Invalid)?;
        if self.sinks.enabled().next().is_none() {
            let names: Vec<String> = self
                .sinks
                .all()
                .iter()
                .map(|s| format!("sinks.{}", s.name()))
                .collect();
            return Err(ConfigError::Invalid(format!(
                "no sink enabled: enable one of {}",
                names.join(", ")
            )));
        }
        if self.delivery.max_in_flight == 0 || self.delivery.max_batch == 0 {
            return Err(ConfigError::Invalid(
                "delivery.max_in_flight and delivery.max_batch must be at least 1".into(),
            ));
        }
        if self.avro_needed() && self.schema_registry.url.is_none() {
            return Err(ConfigError::Invalid(
                "a sink has format = \"avro\" but schema_registry.url is not set".into(),
            ));
        }
        Ok(())
    }

    /// A sink's body format: its own, else `[encoding] format`.
    pub fn format_of(&self, sink: &dyn SinkConfig) -> BodyFormat {
        sink.format().unwrap_or(self.encoding.format)
    }

    /// Whether an enabled sink writes Avro.
    pub fn avro_needed(&self) -> bool {
        self.sinks
            .enabled()
            .any(|s| self.format_of(s) == BodyFormat::Avro)
    }

    /// Whether an enabled sink writes JSON (records are encoded as JSON only then).
    pub fn json_needed(&self) -> bool {
        self.sinks
            .enabled()
            .any(|s| self.format_of(s) == BodyFormat::Json)
    }

    /// The path of the state store, if persistent.
    pub fn state_path(&self) -> Option<&PathBuf> {
        self.state.path.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    #[test]
    fn the_shipped_config_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/taskstream.toml");
        let cfg = Config::load(Some(&path)).unwrap();
        assert!(cfg.sinks.kafka.enabled);
        assert_eq!(cfg.source.page_limit, 5000);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = parse("[source]\nurl = \"http://x\"\npage_limt = 10\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("page_limt"), "{err}");
        let err = parse("[sinks.kafka]\nbrokerz = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("brokerz"), "{err}");
        // A token is not a config key: secrets come from the environment or a file.
        let err = parse("[source]\ntoken = \"st_x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("token"), "{err}");
        assert!(!err.contains("st_x"), "the value is not echoed: {err}");
    }

    #[test]
    // figment's Jail closure must return figment's own (large) error type.
    #[allow(clippy::result_large_err)]
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[source]\nurl = \"http://from-file:1\"\n")?;
            jail.set_env("TASKSTREAM__SOURCE__URL", "http://from-env:2");
            jail.set_env("TASKSTREAM__SINKS__KAFKA__ENABLED", "true");
            jail.set_env("TASKSTREAM__DELIVERY__MAX_IN_FLIGHT", "77");
            let cfg = Config::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(cfg.source.url, "http://from-env:2");
            assert!(cfg.sinks.kafka.enabled);
            assert_eq!(cfg.delivery.max_in_flight, 77);
            Ok(())
        });
    }

    #[test]
    fn validation_errors_name_the_key() {
        let err = parse("[source]\npage_limit = 9000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("source.page_limit"), "{err}");
        let err = parse("[sinks.stdout]\nenabled = false\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no sink enabled"), "{err}");
    }
}
