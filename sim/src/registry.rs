//! A small schema registry for the tests and the demo: the part of the Confluent Schema Registry
//! REST API that the connector and the Confluent clients use, with a real BACKWARD check
//! (apache-avro's `SchemaCompatibility`). No Confluent registry runs on the machines the tests
//! run on; `docker/compose.yaml` uses the real one.
//!
//! Routes: `POST /subjects/{s}/versions` (register; refused with 409 when not backward
//! compatible with the subject's latest), `POST /subjects/{s}` (look up), `GET /subjects`,
//! `GET /subjects/{s}/versions/latest` and `/versions/{n}`, `GET /schemas/ids/{id}`,
//! `POST /compatibility/subjects/{s}/versions/latest`, `GET /health`. One id per distinct
//! schema (by canonical form) across subjects, as the real registry does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// `taskstream registry`.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryOptions {
    /// Port to listen on (127.0.0.1); 0 picks a free one, printed in the ready line.
    #[arg(long, default_value_t = 8081)]
    pub port: u16,
}

#[derive(Default)]
struct Store {
    /// id -> schema text, ids from 1.
    schemas: Vec<String>,
    /// canonical form -> id.
    by_canonical: BTreeMap<String, u32>,
    /// subject -> ids of its versions, oldest first.
    subjects: BTreeMap<String, Vec<u32>>,
}

type Shared = Arc<Mutex<Store>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Store> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn error(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": message.into()})),
    )
        .into_response()
}

fn parse_body(body: &Value) -> Result<(Schema, String), Box<Response>> {
    let Some(text) = body.get("schema").and_then(Value::as_str) else {
        return Err(Box::new(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "body needs a schema",
        )));
    };
    if body
        .get("schemaType")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "AVRO")
    {
        return Err(Box::new(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "only AVRO schemas",
        )));
    }
    Schema::parse_str(text)
        .map(|s| (s, text.to_string()))
        .map_err(|e| {
            Box::new(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                format!("invalid schema: {e}"),
            ))
        })
}

/// Whether data written with `old` can be read with `new` (BACKWARD).
fn backward(old: &str, new: &Schema) -> Result<(), String> {
    let old = Schema::parse_str(old).map_err(|e| e.to_string())?;
    // apache-avro's message prints both schemas whole; the start says what differs.
    SchemaCompatibility::can_read(&old, new)
        .map(|_| ())
        .map_err(|e| e.to_string().chars().take(300).collect())
}

async fn register(
    State(st): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let (schema, text) = match parse_body(&body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let canonical = schema.canonical_form();
    let mut s = lock(&st);
    let known = s.by_canonical.get(&canonical).copied();
    let versions = s.subjects.get(&subject).cloned().unwrap_or_default();
    if let Some(id) = known.filter(|id| versions.contains(id)) {
        return Json(json!({"id": id})).into_response();
    }
    if let Some(latest) = versions.last() {
        let old = s.schemas[*latest as usize - 1].clone();
        if let Err(why) = backward(&old, &schema) {
            return error(
                StatusCode::CONFLICT,
                409,
                format!("schema is not BACKWARD compatible with the latest of {subject}: {why}"),
            );
        }
    }
    let id = match known {
        Some(id) => id,
        None => {
            s.schemas.push(text);
            let id = s.schemas.len() as u32;
            s.by_canonical.insert(canonical, id);
            id
        }
    };
    s.subjects.entry(subject).or_default().push(id);
    Json(json!({"id": id})).into_response()
}

fn version_json(s: &Store, subject: &str, index: usize) -> Value {
    let id = s.subjects[subject][index];
    json!({"subject": subject, "id": id, "version": index + 1,
           "schema": s.schemas[id as usize - 1]})
}

async fn lookup(
    State(st): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let (schema, _) = match parse_body(&body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let s = lock(&st);
    let Some(versions) = s.subjects.get(&subject) else {
        return error(StatusCode::NOT_FOUND, 40401, "subject not found");
    };
    let id = s.by_canonical.get(&schema.canonical_form());
    match id.and_then(|id| versions.iter().position(|v| v == id)) {
        Some(i) => Json(version_json(&s, &subject, i)).into_response(),
        None => error(StatusCode::NOT_FOUND, 40403, "schema not found"),
    }
}

async fn version(
    State(st): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Response {
    let s = lock(&st);
    let Some(versions) = s.subjects.get(&subject) else {
        return error(StatusCode::NOT_FOUND, 40401, "subject not found");
    };
    let index = match version.as_str() {
        "latest" => versions.len().checked_sub(1),
        n => n
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_sub(1))
            .filter(|i| *i < versions.len()),
    };
    match index {
        Some(i) => Json(version_json(&s, &subject, i)).into_response(),
        None => error(StatusCode::NOT_FOUND, 40402, "version not found"),
    }
}

async fn by_id(State(st): State<Shared>, Path(id): Path<u32>) -> Response {
    let s = lock(&st);
    match id.checked_sub(1).and_then(|i| s.schemas.get(i as usize)) {
        Some(text) => Json(json!({"schema": text})).into_response(),
        None => error(StatusCode::NOT_FOUND, 40403, "schema not found"),
    }
}

async fn subjects(State(st): State<Shared>) -> Response {
    let s = lock(&st);
    Json(json!(s.subjects.keys().collect::<Vec<_>>())).into_response()
}

async fn compatibility(
    State(st): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let (schema, _) = match parse_body(&body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let s = lock(&st);
    let Some(latest) = s.subjects.get(&subject).and_then(|v| v.last()) else {
        return error(StatusCode::NOT_FOUND, 40401, "subject not found");
    };
    match backward(&s.schemas[*latest as usize - 1], &schema) {
        Ok(()) => Json(json!({"is_compatible": true})).into_response(),
        Err(why) => Json(json!({"is_compatible": false, "messages": [why]})).into_response(),
    }
}

/// The registry's routes over an empty store.
pub fn router() -> Router {
    Router::new()
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup))
        .route("/subjects/{subject}/versions", post(register))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route("/schemas/ids/{id}", get(by_id))
        .route(
            "/compatibility/subjects/{subject}/versions/latest",
            post(compatibility),
        )
        .route("/health", get(|| async { "ok" }))
        .with_state(Shared::default())
}

/// Serves until `shutdown`; prints `{"ready":true,"port":N,"url":...}` once listening.
pub async fn run(opts: RegistryOptions, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], opts.port))).await?;
    let port = listener.local_addr()?.port();
    println!(
        "{}",
        json!({"ready": true, "port": port, "url": format!("http://127.0.0.1:{port}")})
    );
    axum::serve(listener, router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
