//! Encoding cost per record, in one process: the same normalised groups (a one-field update of
//! a full node and its status change, as the e2e benchmark's load produces) encoded as JSON,
//! as Avro, and with both, reported as records/s and as the Avro/JSON ratio. No broker and no
//! network: this isolates what `format = "avro"` adds to the pipeline task.
//!
//! Run: `cargo bench --bench encode` (`BENCH_RECORDS`, default 200000; `BENCH_ONLY=avro` or
//! `json` runs one encoding alone, for a profiler).

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{json, Map, Value};
use taskstream::encode::avro::{AvroEncoder, Writer, ROUTES};
use taskstream::encode::json::JsonEncoder;
use taskstream::encode::{to_messages_with, Encoder};
use taskstream::normalize::{self, Ctx, Outcome, View};
use taskstream::record::{EntityKind, Origin, TraceContext};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn node(i: usize, version: u64, status: u64) -> Map<String, Value> {
    let v = json!({
        "id": format!("6f1c2b1e-0000-4000-8000-{i:012}"),
        "title": format!("Task number {i} with a realistic title"),
        "description": "Some description text that a user wrote, a sentence or two long.",
        "status": status, "dueDate": "2026-12-24T12:00:00Z", "type": 0,
        "tags": ["backend", "q4"], "priority": 2, "independent": false, "volume": 3,
        "version": version, "assignee": "a.user@example.com",
        "createdTime": "2026-11-01T09:00:00Z", "lastEditedTime": "2026-12-01T10:00:00Z",
        "ownerUsername": "owner", "ownerEmail": "owner@example.com", "publicToken": null,
        "publicDue": null, "x": 10.5, "y": -3.25, "z": 0.0, "pinned": false,
        "collapsed": false, "access": 0, "shareRoots": []
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn main() {
    let n: usize = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let ctx = Ctx {
        source: "synaptask://h/users/u".into(),
        now: "2026-12-01T10:00:00Z".into(),
    };
    let trace = TraceContext::new_root();
    let mut view = View::default();
    let entities = 2_000;
    for i in 0..entities {
        let _ = normalize::apply_entity(
            &mut view,
            &ctx,
            EntityKind::Node,
            &node(i, 1, 0),
            Origin::Snapshot,
            &trace,
        );
    }
    // Groups of a status change each: an update record and a status record.
    let mut groups = Vec::new();
    let mut records = 0;
    let mut i = 0;
    while records < n {
        let e = i % entities;
        let version = 2 + (i / entities) as u64;
        let mut diff = Map::new();
        diff.insert("id".into(), node(e, 0, 0)["id"].clone());
        diff.insert("version".into(), json!(version));
        diff.insert("status".into(), json!(version % 4));
        if let Outcome::Changed(g) = normalize::apply_entity(
            &mut view,
            &ctx,
            EntityKind::Node,
            &diff,
            Origin::Diff,
            &trace,
        ) {
            records += g.records.len();
            groups.push(g);
        }
        i += 1;
    }
    let ids: HashMap<Writer, u32> = ROUTES
        .iter()
        .enumerate()
        .map(|(k, r)| (Writer::Topic(*r), k as u32 + 1))
        .collect();
    let avro = AvroEncoder::new(true, ids).expect("schemas");
    let json = JsonEncoder;
    let run = |name: &str, json: Option<&dyn Encoder>, avro: Option<&AvroEncoder>| {
        let started = Instant::now();
        let mut bytes = 0usize;
        for g in &groups {
            let msgs = to_messages_with(g, json, avro, &[]).expect("encode");
            bytes += msgs
                .iter()
                .map(|m| {
                    m.payload.as_ref().map_or(0, Vec::len)
                        + m.avro.as_ref().map_or(0, |a| a.0.len())
                })
                .sum::<usize>();
        }
        let secs = started.elapsed().as_secs_f64();
        let rate = records as f64 / secs;
        println!(
            "{name:<12} {records} records in {secs:.3} s = {rate:>10.0} records/s, {:.0} bytes/record",
            bytes as f64 / records as f64
        );
        rate
    };
    // `BENCH_ONLY=avro` (or `json`) runs that encoding alone, for a profiler.
    match std::env::var("BENCH_ONLY").as_deref() {
        Ok("avro") => {
            run("avro", None, Some(&avro));
            return;
        }
        Ok("json") => {
            run("json", Some(&json), None);
            return;
        }
        _ => {}
    }
    // Warm-up, then the measured runs.
    run("warm-up", Some(&json), Some(&avro));
    let j = run("json", Some(&json), None);
    let a = run("avro", None, Some(&avro));
    let both = run("json+avro", Some(&json), Some(&avro));
    println!(
        "avro / json encoding rate: {:.2}; both / json: {:.2}",
        a / j,
        both / j
    );
}
