//! The schema registry: `[schema_registry]` and a client for the part of the Confluent REST API
//! the connector needs. At start every writer schema is registered (or, with
//! `auto_register = false`, looked up) under each subject the Avro sinks publish to; the ids are
//! then fixed for the run, so a registry that goes down later never stops the stream, while one
//! that is down at start is a clear error within `timeout_ms`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::avro::{record_name, Kind, Writer};
use crate::secret::Secret;
use crate::sink::Route;

/// How subjects are named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubjectStrategy {
    /// `<topic>-value`, one schema per topic (a union where a topic carries two record kinds).
    #[default]
    Topic,
    /// The record's full name (`io.taskstream.synaptask.NodeChange`), one schema per record kind.
    Record,
}

/// How Kafka message keys are written when the body is Avro.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyFormat {
    /// The entity id (or scope) as raw UTF-8 bytes.
    #[default]
    String,
    /// An Avro `"string"` in the wire format, registered under `<topic>-key`.
    Avro,
}

/// `[schema_registry]`: used when a sink's `format` is `avro`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL of a Confluent-compatible schema registry, e.g. `http://registry:8081`.
    pub url: Option<String>,
    /// `topic` (subject `<topic>-value`, the default) or `record` (the record's full name).
    pub subject_strategy: SubjectStrategy,
    /// Register the schemas at start; with `false`, check that they are registered and name
    /// the missing ones.
    pub auto_register: bool,
    /// Basic-auth user name, if the registry needs one.
    pub username: Option<String>,
    /// Environment variable holding the basic-auth password (never a config value).
    pub password_env: Option<String>,
    /// File holding the basic-auth password, when no variable is set.
    pub password_file: Option<PathBuf>,
    /// Timeout of each registry request, in milliseconds (connecting included).
    pub timeout_ms: u64,
    /// Kafka keys of Avro sinks: `string` (raw, the default) or `avro`.
    pub key_format: KeyFormat,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: None,
            subject_strategy: SubjectStrategy::Topic,
            auto_register: true,
            username: None,
            password_env: None,
            password_file: None,
            timeout_ms: 10_000,
            key_format: KeyFormat::String,
        }
    }
}

/// Why the registry could not give the schema ids.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `[schema_registry] url` is not set although a sink uses Avro.
    #[error("a sink has format = \"avro\" but [schema_registry] url is not set")]
    NotConfigured,
    /// The registry could not be reached or did not answer in time.
    #[error("schema registry {url} unreachable: {message}")]
    Unreachable {
        /// The registry URL.
        url: String,
        /// The cause.
        message: String,
    },
    /// The registry refused a request (incompatible schema, bad credentials, ...).
    #[error("schema registry refused {what}: HTTP {status}: {message}")]
    Refused {
        /// What was asked.
        what: String,
        /// HTTP status.
        status: u16,
        /// The registry's message.
        message: String,
    },
    /// With `auto_register = false`: subjects that lack our schema.
    #[error("schemas not registered (auto_register = false): {0:?}")]
    Missing(Vec<String>),
    /// The password could not be read.
    #[error("schema registry password: {0}")]
    Secret(String),
}

/// One subject the connector writes to, and the writer schema it uses there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// Registry subject.
    pub subject: String,
    /// The writer schema.
    pub writer: Writer,
}

/// The subjects a sink's topics need: `topic(route)` names each route's topic or subject base.
pub fn needs(strategy: SubjectStrategy, topic: impl Fn(Route) -> String) -> Vec<Need> {
    let mut out = Vec::new();
    for route in super::avro::ROUTES {
        match strategy {
            SubjectStrategy::Topic => out.push(Need {
                subject: format!("{}-value", topic(route)),
                writer: Writer::Topic(route),
            }),
            SubjectStrategy::Record => {
                for kind in Kind::of_route(route) {
                    let need = Need {
                        subject: record_name(*kind),
                        writer: Writer::Record(*kind),
                    };
                    if !out.contains(&need) {
                        out.push(need);
                    }
                }
            }
        }
    }
    out
}

/// A registry client.
#[derive(Debug, Clone)]
pub struct Registry {
    url: String,
    http: reqwest::Client,
    auth: Option<(String, Secret)>,
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl Registry {
    /// A client from the config; no request yet.
    pub fn new(cfg: &RegistryConfig) -> Result<Self, RegistryError> {
        let url = cfg
            .url
            .clone()
            .ok_or(RegistryError::NotConfigured)?
            .trim_end_matches('/')
            .to_string();
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| RegistryError::Unreachable {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let auth = match &cfg.username {
            Some(user) => {
                let password =
                    Secret::load(cfg.password_env.as_deref(), cfg.password_file.as_deref())
                        .map_err(|e| RegistryError::Secret(e.to_string()))?
                        .unwrap_or_else(|| Secret::new(""));
                Some((user.clone(), password))
            }
            None => None,
        };
        Ok(Self { url, http, auth })
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn post(
        &self,
        path: &str,
        body: Value,
        what: &str,
    ) -> Result<(u16, Value), RegistryError> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("Content-Type", CONTENT_TYPE)
            .body(body.to_string());
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, Some(password.expose()));
        }
        let resp = req.send().await.map_err(|e| RegistryError::Unreachable {
            url: self.url.clone(),
            // reqwest's message names the URL and the cause, never the credentials.
            message: format!("{what}: {}", e.without_url()),
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| RegistryError::Unreachable {
            url: self.url.clone(),
            message: e.to_string(),
        })?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Registers `schema` under `subject`; the registry's id for it.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let what = format!("registering {subject}");
        let (status, body) = self
            .post(
                &format!("/subjects/{subject}/versions"),
                json!({"schema": schema}),
                &what,
            )
            .await?;
        id_of(status, &body, what)
    }

    /// The id of `schema` under `subject`, or `None` when the subject does not have it.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, RegistryError> {
        let what = format!("looking up {subject}");
        let (status, body) = self
            .post(
                &format!("/subjects/{subject}"),
                json!({"schema": schema}),
                &what,
            )
            .await?;
        if status == 404 {
            return Ok(None);
        }
        id_of(status, &body, what).map(Some)
    }

    /// Registers (or looks up) every needed schema; the id of each writer schema. A registry
    /// gives one id per schema whatever the subject, which the encoder relies on: a writer
    /// with two ids is refused.
    pub async fn prepare(
        &self,
        needs: &[Need],
        auto_register: bool,
    ) -> Result<HashMap<Writer, u32>, RegistryError> {
        let mut ids: HashMap<Writer, u32> = HashMap::new();
        let mut missing = Vec::new();
        for need in needs {
            let text = need.writer.text();
            let id = if auto_register {
                Some(self.register(&need.subject, &text).await?)
            } else {
                self.lookup(&need.subject, &text).await?
            };
            match id {
                None => missing.push(need.subject.clone()),
                Some(id) => {
                    if let Some(old) = ids.insert(need.writer, id) {
                        if old != id {
                            return Err(RegistryError::Refused {
                                what: need.subject.clone(),
                                status: 200,
                                message: format!(
                                    "the same schema has ids {old} and {id} under different subjects"
                                ),
                            });
                        }
                    }
                }
            }
        }
        if !missing.is_empty() {
            return Err(RegistryError::Missing(missing));
        }
        Ok(ids)
    }
}

fn id_of(status: u16, body: &Value, what: String) -> Result<u32, RegistryError> {
    if (200..300).contains(&status) {
        if let Some(id) = body
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
        {
            return Ok(id);
        }
    }
    Err(RegistryError::Refused {
        what,
        status,
        message: body
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| body.to_string(), str::to_string),
    })
}
