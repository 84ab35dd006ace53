//! Fuzz targets and their input generators (proptest strategies), shared by the property
//! tests (`tests/fuzz.rs`, a few thousand cases per target in every CI run) and the fuzz
//! benchmark (`benches/fuzz.rs`, millions of executions per target, panics counted).
//!
//! `cargo fuzz` needs a nightly toolchain, which this machine cannot fetch, hence proptest.
//! The generators are biased towards the API's shapes (the field names, ids, versions and
//! nesting of `graph:diff`, `graph:get`, `history:page` acks and job frames) with hostile
//! values mixed in: CR/LF and control characters in ids, huge strings, `u64::MAX` versions,
//! negative and fractional numbers, wrong types, deep nesting, non-object payloads.
#![allow(dead_code)]

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use taskstream::encode::json::JsonEncoder;
use taskstream::encode::to_messages;
use taskstream::normalize::history::RecentIds;
use taskstream::normalize::{self, Ctx, Outcome, View};
use taskstream::record::{EntityKind, Origin, TraceContext};

/// Field names of the API, so generated objects hit the normaliser's branches.
const KEYS: &[&str] = &[
    "id",
    "version",
    "title",
    "status",
    "createdTime",
    "lastEditedTime",
    "inTrash",
    "deleted",
    "tags",
    "source",
    "target",
    "type",
    "wasBlocker",
    "after",
    "before",
    "op",
    "nodes",
    "links",
    "batchId",
    "ops",
    "opId",
    "code",
    "entityType",
    "entityId",
    "forward",
    "inverse",
    "actor",
    "ts",
    "undone",
    "undoOf",
    "guardVersion",
    "shareRoots",
    "jobId",
    "fileId",
    "progress",
    "trace_id",
    "traceId",
    "data",
    "items",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        2400 => "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        1200 => "[a-z_]{0,12}",
        600 => "\\PC{0,40}",
        600 => "[a-z]{1,6}[\r\n\t\u{0}\u{7f} ][a-z]{0,6}",
        300 => Just(String::new()),
        300 => Just("2026-12-01T00:00:00Z".to_string()),
        // Rare (a few percent of the cases have one), or the run would be all memcpy: a
        // string of about a megabyte.
        1 => (1usize..3).prop_map(|k| "x".repeat(k * 400_000)),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..20).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => Just(Value::from(u64::MAX - 1)),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| json!(f)),
        1 => Just(json!(1.5)),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ]
}

/// Any JSON, objects keyed mostly by API field names, up to a few levels deep (and now and
/// then a single chain as deep as a parsed payload can be: serde_json, which parses every
/// frame of both APIs, refuses nesting past 128 levels, so deeper values never reach the
/// connector; `job_frame_text` sends deeper text to check that refusal).
pub fn json_value() -> impl Strategy<Value = Value> {
    let nested = leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    });
    prop_oneof![
        9 => nested,
        1 => (1usize..126).prop_map(deep),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => "[a-zA-Z]{1,8}",
    ]
}

/// `[[[...{}...]]]` `depth` levels deep.
fn deep(depth: usize) -> Value {
    let mut v = json!({"id": "a", "version": 1});
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

/// An entity-like object: an id and a version most of the time, then anything.
pub fn entity() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::option::weighted(0.9, text()),
        prop::option::weighted(0.9, number()),
        prop::collection::vec((key(), json_value()), 0..8),
    )
        .prop_map(|(id, version, rest)| {
            let mut m: Map<String, Value> = rest.into_iter().collect();
            if let Some(id) = id {
                m.insert("id".into(), Value::String(id));
            }
            if let Some(v) = version {
                m.insert("version".into(), v);
            }
            m
        })
}

/// A `graph:diff` payload: mostly `{nodes: [...], links: [...]}`, sometimes anything.
pub fn diff_payload() -> impl Strategy<Value = Value> {
    let entries = prop::collection::vec(
        prop_oneof![
            6 => entity().prop_map(Value::Object),
            1 => entity().prop_map(|e| json!({"op": "update", "after": e})),
            1 => json_value(),
        ],
        0..6,
    );
    prop_oneof![
        8 => (entries.clone(), entries).prop_map(|(n, l)| json!({"nodes": n, "links": l})),
        1 => json_value(),
    ]
}

/// A history batch: mostly shaped like the API's, with ops of every code.
pub fn history_batch() -> impl Strategy<Value = Value> {
    let op = (
        0u64..1_000_000,
        prop::sample::select(&[0i64, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 99][..]),
        prop::sample::select(&["NODE", "LINK", "node", "?"][..]),
        text(),
        json_value(),
        json_value(),
        number(),
    )
        .prop_map(|(op_id, code, kind, id, forward, inverse, guard)| {
            json!({"opId": op_id, "code": code, "entityType": kind, "entityId": id,
                   "forward": forward, "inverse": inverse, "guardVersion": guard,
                   "createdTime": "2026-12-01T00:00:00Z"})
        });
    prop_oneof![
        8 => (text(), prop::collection::vec(op, 0..6), any::<bool>(), json_value())
            .prop_map(|(batch_id, ops, undone, undo_of)| {
                json!({"batchId": batch_id, "ops": ops, "undone": undone, "undoOf": undo_of,
                       "actor": "u", "ts": "2026-12-01T00:00:00Z"})
            }),
        1 => json_value(),
    ]
}

/// Job frame text: mostly JSON objects with a type, sometimes broken JSON or other bytes.
pub fn job_frame_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (prop::sample::select(&["job_progress", "job_complete", "file_uploaded", "error", "x y", "a\r\nb", ""][..]), json_value())
            .prop_map(|(t, data)| json!({"type": t, "jobId": "job_1", "data": data}).to_string()),
        2 => json_value().prop_map(|v| v.to_string()),
        1 => json_value().prop_map(|v| {
            let s = v.to_string();
            s.chars().take(s.chars().count() / 2).collect()
        }),
        1 => "\\PC{0,60}",
        1 => (100usize..100_000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
    ]
}

/// A config file: mostly valid TOML of the right sections with odd values.
pub fn config_text() -> impl Strategy<Value = String> {
    let section = prop::sample::select(
        &[
            "source",
            "jobs",
            "state",
            "delivery",
            "sinks.stdout",
            "sinks.kafka",
            "sinks.nats",
            "metrics",
            "encoding",
            "nope",
        ][..],
    );
    let field = prop::sample::select(
        &[
            "url",
            "enabled",
            "max_in_flight",
            "drain_timeout_secs",
            "path",
            "brokers",
            "mode",
            "fsync",
            "history",
            "read_budget",
            "connects_per_minute",
            "token_env",
            "partitions",
            "listen",
            "format",
            "x",
        ][..],
    );
    let value = prop_oneof![
        Just("true".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("\"ws://127.0.0.1:1\"".to_string()),
        Just("\"always\"".to_string()),
        Just("[1, 2]".to_string()),
        "\"\\PC{0,20}\"",
        "\\PC{0,10}",
    ];
    prop::collection::vec((section, prop::collection::vec((field, value), 0..4)), 0..5).prop_map(
        |sections| {
            let mut out = String::new();
            for (name, fields) in sections {
                out.push_str(&format!("[{name}]\n"));
                for (f, v) in fields {
                    out.push_str(&format!("{f} = {v}\n"));
                }
            }
            out
        },
    )
}

fn ctx() -> Ctx {
    Ctx {
        source: "synaptask://fuzz/users/u".into(),
        now: "2026-12-01T00:00:00Z".into(),
    }
}

/// Publishing what a change produced: encoding and headers must hold too.
fn publish(o: Outcome) {
    if let Outcome::Changed(g) = o {
        let msgs = to_messages(&g, &JsonEncoder).expect("a record always encodes");
        for m in msgs {
            assert!(!m.id.contains(['\r', '\n']), "message id {:?}", m.id);
            for (k, v) in &m.headers {
                assert!(!v.contains(['\r', '\n']), "header {k} = {v:?}");
            }
        }
    }
}

/// Target: a `graph:diff` payload through the normaliser, twice (the second pass hits the
/// known-entity branches), then encoded.
pub fn target_diff(payload: &Value) {
    let mut view = View::default();
    let trace = TraceContext::new_root();
    for _ in 0..2 {
        if let Ok((entries, _bad)) = normalize::diff_entries(payload) {
            for (kind, entity) in entries {
                let _ = normalize::skips_versions(&view, kind, &entity);
                publish(normalize::apply_entity(
                    &mut view,
                    &ctx(),
                    kind,
                    &entity,
                    Origin::Diff,
                    &trace,
                ));
            }
        }
    }
}

/// Target: snapshot page items, then the end-of-snapshot disappearance pass.
pub fn target_page(items: &[Map<String, Value>]) {
    let mut view = View::default();
    let trace = TraceContext::new_root();
    let mut seen = normalize::SeenKeys::default();
    for (i, item) in items.iter().enumerate() {
        let kind = if i % 2 == 0 {
            EntityKind::Node
        } else {
            EntityKind::Link
        };
        publish(normalize::apply_entity(
            &mut view,
            &ctx(),
            kind,
            item,
            Origin::Snapshot,
            &trace,
        ));
        if i % 3 == 0 {
            if let Some(id) = item.get("id").and_then(Value::as_str) {
                seen.insert(&kind.key(id));
            }
        }
    }
    let d = normalize::missing_after_snapshot(&mut view, &ctx(), &seen, None, false, &trace);
    for g in d.groups {
        publish(Outcome::Changed(g));
    }
}

/// Target: an ack unwrapped, read as a history page, each batch applied.
pub fn target_ack(ack: &Value, batches: &[Value]) {
    let _ = taskstream::source::synaptask::session::unwrap_ack(ack.clone());
    let mut view = View::default();
    let mut recent = RecentIds::new(64);
    let trace = TraceContext::new_root();
    for b in batches {
        if let Value::Object(batch) = b {
            if let Ok((groups, _)) = normalize::history::apply_batch(
                &mut view,
                &ctx(),
                "USER:u",
                batch,
                &mut recent,
                &trace,
            ) {
                for g in groups {
                    publish(Outcome::Changed(g));
                }
            }
        }
    }
}

/// Target: a job frame's text parsed and, when it is a frame, turned into a record.
pub fn target_job(text: &str) {
    if let Ok(frame) = taskstream::source::jobs::parse_frame(text) {
        let g = normalize::job_frame(&ctx(), "fuzz", 1, 1, frame, &TraceContext::new_root());
        publish(Outcome::Changed(g));
    }
}

/// Target: a config file parsed and validated.
pub fn target_config(text: &str) {
    use figment::providers::{Format, Toml};
    let _ = taskstream::config::Config::from_figment(figment::Figment::from(Toml::string(text)));
}
