//! `taskstream check --config FILE`: validates the configuration, connects once to each source
//! and sink, opens the checkpoint store, and reports what it found, one line each. Nothing is
//! published and no checkpoint is written.

use std::time::Duration;

use serde_json::json;

use crate::app::{self, AppError};
use crate::config::Config;
use crate::source::synaptask::{establish, Attempt};
use crate::source::SourceError;

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What was checked.
    pub what: String,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// Runs every check; the error is the first fatal one (a refused token gives exit code 2).
pub async fn check(cfg: &Config) -> (Vec<Finding>, Option<AppError>) {
    let mut out = Vec::new();
    let mut first_error = None;
    let mut note = |what: &str, r: Result<String, AppError>, out: &mut Vec<Finding>| match r {
        Ok(detail) => out.push(Finding {
            what: what.into(),
            ok: true,
            detail,
        }),
        Err(e) => {
            out.push(Finding {
                what: what.into(),
                ok: false,
                detail: e.to_string(),
            });
            if first_error.is_none() {
                first_error = Some(e);
            }
        }
    };
    note("config", Ok("valid".into()), &mut out);
    note("source", check_source(cfg).await, &mut out);
    let store = app::open_store(cfg).and_then(|s| Ok((s.load()?, s.reader().count()?)));
    let state = match (store, cfg.state_path()) {
        (Ok((cp, entities)), Some(p)) => Ok(format!(
            "{}: {entities} entities delivered, snapshot complete: {}",
            p.display(),
            cp.snapshot_complete
        )),
        (Ok(_), None) => Ok("in memory (state.path unset): every start is a first start".into()),
        (Err(e), _) => Err(e.into()),
    };
    note("state", state, &mut out);
    if cfg.avro_needed() {
        note("schema registry", check_registry(cfg).await, &mut out);
    }
    match app::build_sinks(cfg) {
        Ok(sinks) => {
            for s in sinks {
                let r = tokio::time::timeout(Duration::from_secs(15), s.prepare()).await;
                let r = match r {
                    Ok(r) => r.map_err(AppError::from),
                    Err(_) => Err(AppError::Sink(crate::sink::SinkError::Retryable {
                        sink: s.name().into(),
                        message: "no answer within 15 s".into(),
                    })),
                };
                // The probe `/health/ready` runs, so check and readiness agree.
                let r = match r {
                    Ok(desc) => match crate::health::probe(s.as_ref()).await {
                        Ok(()) => Ok(desc),
                        Err(message) => Err(AppError::Sink(crate::sink::SinkError::Retryable {
                            sink: s.name().into(),
                            message,
                        })),
                    },
                    Err(e) => Err(e),
                };
                note(&format!("sink {}", s.name()), r, &mut out);
            }
        }
        Err(e) => note("sinks", Err(e.into()), &mut out),
    }
    (out, first_error)
}

/// Looks the schemas up without registering anything: a missing one is fine when the run will
/// register it, an error otherwise.
async fn check_registry(cfg: &Config) -> Result<String, AppError> {
    use crate::encode::registry::{Registry, RegistryError};
    let registry = Registry::new(&cfg.schema_registry)?;
    let needs = app::avro_needs(cfg);
    let mut missing = Vec::new();
    for need in &needs {
        if registry
            .lookup(&need.subject, &need.writer.text())
            .await?
            .is_none()
        {
            missing.push(need.subject.clone());
        }
    }
    if missing.is_empty() {
        return Ok(format!(
            "{}: all {} subjects have the schemas",
            registry.url(),
            needs.len()
        ));
    }
    if cfg.schema_registry.auto_register {
        return Ok(format!(
            "{}: {} of {} subjects will be registered at start: {}",
            registry.url(),
            missing.len(),
            needs.len(),
            missing.join(", ")
        ));
    }
    Err(RegistryError::Missing(missing).into())
}

async fn check_source(cfg: &Config) -> Result<String, AppError> {
    let token = cfg.source.token()?;
    let (session, uid) = match establish(
        &cfg.source,
        &token,
        crate::source::synaptask::session::DiffBuffer {
            count: 16,
            bytes: 1 << 20,
        },
    )
    .await
    {
        Ok(established) => established,
        Err(Attempt::Refused(e)) => return Err(e.into()),
        Err(Attempt::Failed(reason)) => {
            return Err(SourceError::Config(format!(
                "{}: session not established: {reason}",
                cfg.source.url
            ))
            .into())
        }
    };
    let probe = session
        .call("graph:get", json!({"limit": 1, "offset": 0}))
        .await;
    session.close().await;
    let graph = match probe {
        Ok(ack) if ack["ok"] == true => format!(
            "graph:get answers (trace_id {})",
            ack["trace_id"].as_str().unwrap_or("-")
        ),
        Ok(ack) => format!("graph:get answered {}", ack["error"]),
        Err(e) => format!("graph:get: {e}"),
    };
    Ok(format!(
        "{} connected as user {uid}; {graph}",
        cfg.source.url
    ))
}
