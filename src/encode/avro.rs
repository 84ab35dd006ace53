//! The Avro body format: each record as Avro binary in the Confluent wire format (magic byte 0,
//! the 4-byte big-endian schema id, the datum), against the schemas in `schemas/*.avsc`.
//!
//! A record is converted from its JSON document (`Record::to_json`), guided by the schema, so
//! the two formats carry the same field names and values. The API's payloads are free-form, so
//! the conversion never fails on their content: a field the schema does not define, or a value
//! that does not fit its field's type (a status of 7, a time that is no RFC 3339 time), goes to
//! the record's `extra` map as JSON text, and the typed field stays null. Free-form objects in
//! string fields (history patches) are written as JSON text; RFC 3339 times become
//! `timestamp-millis`; status codes become the `TaskStatus` enum.

use std::collections::HashMap;

use apache_avro::schema::Name;
use apache_avro::Schema;
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};

use super::{EncodeError, Encoder};
use crate::record::{Body, EntityKind, Record};
use crate::sink::Route;

/// A record schema of `schemas/`, by the record kinds it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `NodeChange`.
    NodeChange,
    /// `LinkChange`.
    LinkChange,
    /// `TaskStatusChanged`.
    TaskStatusChanged,
    /// `HistoryBatch`.
    HistoryBatch,
    /// `Gap`.
    Gap,
    /// `DeadLetter`.
    DeadLetter,
    /// `JobEvent`.
    JobEvent,
}

/// Every schema file, as shipped in `schemas/` (and registered under these record names).
pub const SCHEMA_FILES: [(Kind, &str, &str); 7] = [
    (
        Kind::NodeChange,
        "node_change.avsc",
        include_str!("../../schemas/node_change.avsc"),
    ),
    (
        Kind::LinkChange,
        "link_change.avsc",
        include_str!("../../schemas/link_change.avsc"),
    ),
    (
        Kind::TaskStatusChanged,
        "task_status_changed.avsc",
        include_str!("../../schemas/task_status_changed.avsc"),
    ),
    (
        Kind::HistoryBatch,
        "history_batch.avsc",
        include_str!("../../schemas/history_batch.avsc"),
    ),
    (
        Kind::Gap,
        "gap.avsc",
        include_str!("../../schemas/gap.avsc"),
    ),
    (
        Kind::DeadLetter,
        "dead_letter.avsc",
        include_str!("../../schemas/dead_letter.avsc"),
    ),
    (
        Kind::JobEvent,
        "job_event.avsc",
        include_str!("../../schemas/job_event.avsc"),
    ),
];

impl Kind {
    /// The schema kind of a record.
    pub fn of(record: &Record) -> Kind {
        match &record.body {
            Body::Entity {
                kind: EntityKind::Node,
                ..
            } => Kind::NodeChange,
            Body::Entity {
                kind: EntityKind::Link,
                ..
            } => Kind::LinkChange,
            Body::StatusChanged { .. } => Kind::TaskStatusChanged,
            Body::HistoryBatch { .. } => Kind::HistoryBatch,
            Body::Gap { .. } => Kind::Gap,
            Body::DeadLetter { .. } => Kind::DeadLetter,
            Body::Job { .. } => Kind::JobEvent,
        }
    }

    /// The kinds a route (a topic) carries, in the order of the topic's union schema.
    pub fn of_route(route: Route) -> &'static [Kind] {
        match route {
            Route::Nodes => &[Kind::NodeChange],
            Route::Links => &[Kind::LinkChange],
            Route::Status => &[Kind::TaskStatusChanged],
            Route::History => &[Kind::HistoryBatch, Kind::Gap],
            Route::DeadLetter => &[Kind::DeadLetter],
            Route::Jobs => &[Kind::JobEvent],
        }
    }

    /// The schema's JSON text.
    pub fn text(self) -> &'static str {
        SCHEMA_FILES
            .iter()
            .find(|(k, _, _)| *k == self)
            .map_or("", |(_, _, text)| text)
    }
}

/// Every route, for registering one schema per topic.
pub const ROUTES: [Route; 6] = [
    Route::Nodes,
    Route::Links,
    Route::Status,
    Route::History,
    Route::DeadLetter,
    Route::Jobs,
];

/// Which schema a message is written with, as the registry subject strategy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Writer {
    /// The topic's schema (`TopicNameStrategy`): a union where a topic carries two kinds.
    Topic(Route),
    /// The record's own schema (`RecordNameStrategy`).
    Record(Kind),
    /// Message keys as Avro strings (`<topic>-key`).
    Key,
}

impl Writer {
    /// The writer schema's JSON text: the record schema, or the topic's union of them.
    pub fn text(self) -> String {
        match self {
            Writer::Record(kind) => kind.text().to_string(),
            Writer::Key => "\"string\"".to_string(),
            Writer::Topic(route) => {
                let kinds = Kind::of_route(route);
                if kinds.len() == 1 {
                    kinds[0].text().to_string()
                } else {
                    let parts: Vec<&str> = kinds.iter().map(|k| k.text().trim()).collect();
                    format!("[{}]", parts.join(","))
                }
            }
        }
    }
}

/// Parses a writer schema; the shipped schemas are checked by the tests, so an error here is a
/// build defect, reported as such.
pub fn parse(writer: Writer) -> Result<Schema, String> {
    Schema::parse_str(&writer.text()).map_err(|e| format!("schema {writer:?}: {e}"))
}

/// The record-name subject of a kind (`io.taskstream.synaptask.NodeChange`). Read once from the
/// schema texts: a topic's union schema looks it up for every record it converts.
pub fn record_name(kind: Kind) -> String {
    static NAMES: std::sync::OnceLock<HashMap<Kind, String>> = std::sync::OnceLock::new();
    NAMES
        .get_or_init(|| {
            SCHEMA_FILES
                .iter()
                .map(|(k, _, text)| {
                    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                    let name = format!(
                        "{}.{}",
                        v["namespace"].as_str().unwrap_or_default(),
                        v["name"].as_str().unwrap_or_default()
                    );
                    (*k, name)
                })
                .collect()
        })
        .get(&kind)
        .cloned()
        .unwrap_or_default()
}

/// One writer schema with its registry id and its converter.
struct Registered {
    converter: Converter,
    id: u32,
}

/// Encodes records as Avro in the Confluent wire format, with schema ids from the registry.
pub struct AvroEncoder {
    by_topic: bool,
    writers: HashMap<Writer, Registered>,
}

impl std::fmt::Debug for AvroEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: HashMap<&Writer, u32> = self.writers.iter().map(|(w, r)| (w, r.id)).collect();
        f.debug_struct("AvroEncoder")
            .field("by_topic", &self.by_topic)
            .field("ids", &ids)
            .finish()
    }
}

impl AvroEncoder {
    /// An encoder over writer schemas and the ids the registry gave them. `by_topic` picks
    /// the topic's schema for each message, otherwise the record's.
    pub fn new(by_topic: bool, ids: HashMap<Writer, u32>) -> Result<Self, String> {
        let mut writers = HashMap::new();
        for (writer, id) in ids {
            // Leaked on purpose: a handful of schemas live as long as the process, and a
            // 'static schema lets the writer keep its resolved form instead of resolving it
            // again for every record.
            let schema: &'static Schema = Box::leak(Box::new(parse(writer)?));
            writers.insert(
                writer,
                Registered {
                    converter: Converter::new(schema),
                    id,
                },
            );
        }
        Ok(Self { by_topic, writers })
    }

    /// A message key as an Avro string in the wire format, when keys are Avro (a `Key` writer
    /// was registered); `None` otherwise.
    pub fn encode_key(&self, key: &str) -> Option<Vec<u8>> {
        let reg = self.writers.get(&Writer::Key)?;
        let mut out = Vec::with_capacity(key.len() + 10);
        out.push(0);
        out.extend_from_slice(&reg.id.to_be_bytes());
        binary::string(key, &mut out);
        Some(out)
    }

    /// The writer a record is encoded with.
    pub fn writer_of(&self, record: &Record) -> Writer {
        if self.by_topic {
            Writer::Topic(super::route_of(record))
        } else {
            Writer::Record(Kind::of(record))
        }
    }

    /// Encodes one record; returns the wire bytes and the schema id.
    pub fn encode_with_id(&self, record: &Record) -> Result<(Vec<u8>, u32), EncodeError> {
        let err = |message: String| EncodeError {
            id: record.id.clone(),
            message,
        };
        let writer = self.writer_of(record);
        let reg = self
            .writers
            .get(&writer)
            .ok_or_else(|| err(format!("no registered schema for {writer:?}")))?;
        let mut out = Vec::with_capacity(512);
        out.push(0);
        out.extend_from_slice(&reg.id.to_be_bytes());
        reg.converter.write_record(record, &mut out).map_err(err)?;
        Ok((out, reg.id))
    }
}

impl Encoder for AvroEncoder {
    fn content_type(&self) -> &str {
        "application/avro"
    }

    fn encode(&self, record: &Record) -> Result<Vec<u8>, EncodeError> {
        self.encode_with_id(record).map(|(bytes, _)| bytes)
    }
}

fn collect_named(schema: &'static Schema, out: &mut HashMap<&'static Name, &'static Schema>) {
    match schema {
        Schema::Record(r) => {
            out.insert(&r.name, schema);
            for f in &r.fields {
                collect_named(&f.schema, out);
            }
        }
        Schema::Enum(e) => {
            out.insert(&e.name, schema);
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_named(v, out)),
        Schema::Array(a) => collect_named(&a.items, out),
        Schema::Map(m) => collect_named(&m.types, out),
        _ => {}
    }
}

/// Avro's binary encoding of the primitive types (the specification's "Binary Encoding":
/// zig-zag varints, length-prefixed bytes, little-endian doubles). The converter used
/// apache-avro's datum writer for each primitive first; its per-value entry point cost 29 % of
/// the Avro encoding time in the profile of `cargo bench --bench encode`, and the crate keeps its
/// varint encoder private. The unit tests check every function here against apache-avro's own
/// `encode`, and the e2e tests decode the records with apache-avro, confluent-kafka and
/// fastavro.
mod binary {
    /// `long` (and `timestamp-millis`, union branch indexes, block counts).
    pub fn long(n: i64, out: &mut Vec<u8>) {
        // Zig-zag: the sign moves to the lowest bit, so small magnitudes take few bytes.
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    /// `int` (and enum symbol indexes): the same varint as a long of the same value.
    pub fn int(n: i32, out: &mut Vec<u8>) {
        long(i64::from(n), out);
    }

    /// `bytes`.
    pub fn bytes(b: &[u8], out: &mut Vec<u8>) {
        long(b.len() as i64, out);
        out.extend_from_slice(b);
    }

    /// `string`.
    pub fn string(s: &str, out: &mut Vec<u8>) {
        bytes(s.as_bytes(), out);
    }

    /// `double`.
    pub fn double(x: f64, out: &mut Vec<u8>) {
        out.extend_from_slice(&x.to_le_bytes());
    }

    /// `boolean`.
    pub fn boolean(b: bool, out: &mut Vec<u8>) {
        out.push(u8::from(b));
    }
}

/// Converts records for one writer schema and writes them as Avro binary; built once per
/// schema, since finding the named types walks the whole schema.
///
/// The record is written while its JSON is walked: no intermediate value tree, no copied
/// strings and no field lookups by name per record (each of which made Avro cost several
/// times JSON).
pub struct Converter {
    schema: &'static Schema,
    named: HashMap<&'static Name, &'static Schema>,
    /// The union branch of each kind, for a topic schema that is a union.
    branches: HashMap<Kind, usize>,
    /// Per record schema (by address): where each field name sits.
    plans: FxHashMap<usize, Plan>,
}

/// A record schema's field positions, so that a document's keys are placed with one fast hash
/// each instead of a name search per field.
struct Plan {
    index: FxHashMap<&'static str, usize>,
    /// The position of the `extra` map, where the schema has one.
    extra_at: Option<usize>,
}

fn collect_plans(schema: &'static Schema, out: &mut FxHashMap<usize, Plan>) {
    match schema {
        Schema::Record(r) => {
            let addr = std::ptr::from_ref(r) as usize;
            if out.contains_key(&addr) {
                return;
            }
            let index = r
                .fields
                .iter()
                .enumerate()
                .map(|(i, f)| (f.name.as_str(), i))
                .collect();
            let extra_at = r.fields.iter().position(|f| f.name == "extra");
            out.insert(addr, Plan { index, extra_at });
            for f in &r.fields {
                collect_plans(&f.schema, out);
            }
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_plans(v, out)),
        Schema::Array(a) => collect_plans(&a.items, out),
        Schema::Map(m) => collect_plans(&m.types, out),
        _ => {}
    }
}

/// The entity maps of a record, lent to the conversion instead of copied into its document.
type Lent<'m> = [LentMap<'m>];

/// One lent entity map: the field it stands for, and the map (none: null).
type LentMap<'m> = (&'static str, Option<&'m Map<String, Value>>);

/// Records with at most this many fields place their document's values in a stack array.
const STACK_FIELDS: usize = 48;

impl Converter {
    /// A converter for `schema` (a record schema, or a union of them).
    pub fn new(schema: &'static Schema) -> Self {
        let mut named = HashMap::new();
        collect_named(schema, &mut named);
        let mut plans = FxHashMap::default();
        collect_plans(schema, &mut plans);
        let mut branches = HashMap::new();
        if let Schema::Union(u) = schema {
            for (kind, _, _) in SCHEMA_FILES {
                let want = record_name(kind);
                let at = u
                    .variants()
                    .iter()
                    .position(|v| matches!(v, Schema::Record(r) if r.name.fullname(None) == want));
                if let Some(i) = at {
                    branches.insert(kind, i);
                }
            }
        }
        Self {
            schema,
            named,
            branches,
            plans,
        }
    }

    /// A record's JSON document fitted to the schema and written as Avro binary (no
    /// wire-format header); `kind` picks a union's branch.
    pub fn write_document(&self, doc: &Value, kind: Kind, out: &mut Vec<u8>) -> Result<(), String> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let obj = doc
            .as_object()
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new));
        self.write_parts(Doc::Map(obj), &[], kind, out)
    }

    /// A record fitted to the schema and written in the Avro binary encoding (no wire-format
    /// header). The same bytes as [`Converter::write_document`] of `record.to_json()`, without
    /// copying the entity states into a JSON document first: `before` and `after` are read
    /// from the record's maps.
    pub fn write_record(&self, record: &Record, out: &mut Vec<u8>) -> Result<(), String> {
        let lent: [LentMap<'_>; 2] = match &record.body {
            Body::Entity { before, after, .. } => {
                [("before", before.as_deref()), ("after", after.as_deref())]
            }
            Body::StatusChanged { after, .. } => [("after", Some(after)), ("", None)],
            _ => {
                let doc = record.to_json();
                return self.write_document(&doc, Kind::of(record), out);
            }
        };
        let Some(pairs) = envelope_pairs(record) else {
            return Err("no envelope for this record kind".into());
        };
        // A status change lends one map; the unused slot is not a field.
        let n = if lent[1].0.is_empty() { 1 } else { 2 };
        self.write_parts(Doc::Pairs(&pairs), &lent[..n], Kind::of(record), out)
    }

    fn write_parts(
        &self,
        obj: Doc<'_>,
        lent: &Lent<'_>,
        kind: Kind,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        match self.schema {
            Schema::Union(u) => {
                let i = self
                    .branches
                    .get(&kind)
                    .copied()
                    .ok_or_else(|| format!("the topic schema has no {}", record_name(kind)))?;
                binary::long(i as i64, out);
                self.record(obj, lent, &u.variants()[i], out)
            }
            other => self.record(obj, lent, other, out),
        }
    }
}

/// The fields of a record's envelope (what `Envelope` serialises) as pairs, without building
/// a JSON map: for the bodies whose states are lent (entity changes, status changes).
fn envelope_pairs(record: &Record) -> Option<Vec<(&'static str, Value)>> {
    let mut out: Vec<(&'static str, Value)> = vec![
        ("id", Value::String(record.id.clone())),
        ("type", Value::String(record.event_type())),
        ("source", Value::String(record.source.clone())),
        ("subject", Value::String(record.subject.clone())),
        ("time", Value::String(record.time.clone())),
        ("sequence", Value::from(record.sequence)),
        ("traceId", Value::String(record.trace.trace_id.clone())),
        ("origin", Value::String(record.origin.as_str().to_string())),
    ];
    let code = |c: i64| {
        let mut m = Map::new();
        m.insert("code".into(), Value::from(c));
        m.insert(
            "name".into(),
            Value::String(crate::record::status_name(c).to_string()),
        );
        Value::Object(m)
    };
    match &record.body {
        Body::Entity { changed, .. } => {
            out.push(("before", Value::Null));
            out.push(("after", Value::Null));
            out.push((
                "changed",
                Value::Array(changed.iter().cloned().map(Value::String).collect()),
            ));
        }
        Body::StatusChanged {
            from,
            to,
            actor,
            batch_id,
            undo_of,
            ..
        } => {
            out.push(("from", code(*from)));
            out.push(("to", code(*to)));
            out.push(("after", Value::Null));
            out.push((
                "changed",
                Value::Array(vec![Value::String("status".into())]),
            ));
            if let Some(actor) = actor {
                out.push(("actor", actor.clone()));
            }
            if let Some(b) = batch_id {
                out.push(("batchId", Value::String(b.clone())));
            }
            if let Some(u) = undo_of {
                out.push(("undoOf", Value::String(u.clone())));
            }
        }
        _ => return None,
    }
    Some(out)
}

/// A JSON object to convert: a map, or a record's envelope as pairs.
#[derive(Clone, Copy)]
enum Doc<'r> {
    Map(&'r Map<String, Value>),
    Pairs(&'r [(&'static str, Value)]),
}

impl<'r> Doc<'r> {
    fn for_each(self, mut f: impl FnMut(&'r str, &'r Value)) {
        match self {
            Doc::Map(m) => m.iter().for_each(|(k, v)| f(k.as_str(), v)),
            Doc::Pairs(p) => p.iter().for_each(|(k, v)| f(k, v)),
        }
    }
}

/// A value that does not fit its field: kept in `extra`.
struct Misfit;

impl Converter {
    fn resolve(&self, schema: &'static Schema) -> &'static Schema {
        match schema {
            Schema::Ref { name } => self.named.get(name).copied().unwrap_or(schema),
            other => other,
        }
    }

    /// A JSON object as a record: known fields converted, the rest (and misfits) in `extra`.
    /// Fields named in `lent` are taken from those maps rather than from `obj`.
    fn record<'r>(
        &self,
        obj: Doc<'r>,
        lent: &Lent<'r>,
        schema: &'static Schema,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let Schema::Record(r) = self.resolve(schema) else {
            return Err("not a record schema".into());
        };
        let plan = self
            .plans
            .get(&(std::ptr::from_ref(r) as usize))
            .ok_or("a record schema without a plan")?;
        // Each key of the document to its field, or to `extra`.
        let mut on_stack: [Option<&'r Value>; STACK_FIELDS] = [None; STACK_FIELDS];
        let mut on_heap: Vec<Option<&'r Value>>;
        let slots: &mut [Option<&'r Value>] = if r.fields.len() <= STACK_FIELDS {
            &mut on_stack[..r.fields.len()]
        } else {
            on_heap = vec![None; r.fields.len()];
            &mut on_heap
        };
        // Misfits and unknown keys, as JSON text; empty (no allocation) for most records.
        let mut extra: Vec<(&'r str, String)> = Vec::new();
        obj.for_each(|k, v| match plan.index.get(k) {
            Some(&i) => slots[i] = Some(v),
            None => extra.push((k, v.to_string())),
        });
        // Where `extra` is not the last field, the fields after it are written aside and
        // appended once `extra` is known.
        let mut extra_mark = None;
        for (i, f) in r.fields.iter().enumerate() {
            let name: &'static str = f.name.as_str();
            if Some(i) == plan.extra_at {
                extra_mark = Some(out.len());
                continue;
            }
            let mark = out.len();
            let lent_map = if lent.is_empty() {
                None
            } else {
                lent.iter().find(|(n, _)| *n == name)
            };
            if let Some((_, map)) = lent_map {
                let fitted = match map {
                    Some(m) => self.object(m, &f.schema, out),
                    None => Err(Misfit),
                };
                if fitted.is_err() {
                    out.truncate(mark);
                    // As for a field of the document: a state that does not fit is kept as
                    // JSON text in `extra`.
                    if let Some(m) = map {
                        extra.push((name, serde_json::to_string(m).unwrap_or_default()));
                    }
                    self.empty(&f.schema, out).map_err(|_| {
                        format!(
                            "{}.{name}: the entity state does not fit and the field has no empty value",
                            r.name.fullname(None),
                        )
                    })?;
                }
                continue;
            }
            let got = slots[i];
            if self.value(got, &f.schema, out).is_err() {
                out.truncate(mark);
                if let Some(v) = got {
                    extra.push((name, v.to_string()));
                }
                self.empty(&f.schema, out).map_err(|_| {
                    format!(
                        "{}.{name}: {} does not fit and the field has no empty value",
                        r.name.fullname(None),
                        got.map_or("nothing".to_string(), |v| v.to_string())
                    )
                })?;
            }
        }
        if let Some(at) = extra_mark {
            let after = out.split_off(at);
            if !extra.is_empty() {
                binary::long(extra.len() as i64, out);
                for (k, v) in &extra {
                    binary::string(k, out);
                    binary::string(v, out);
                }
            }
            binary::long(0, out);
            out.extend_from_slice(&after);
        }
        Ok(())
    }

    /// A JSON object as a value of `schema`: a record, or the first record branch of a union.
    fn object(
        &self,
        m: &Map<String, Value>,
        schema: &'static Schema,
        out: &mut Vec<u8>,
    ) -> Result<(), Misfit> {
        match self.resolve(schema) {
            Schema::Union(u) => {
                for (i, variant) in u.variants().iter().enumerate() {
                    if matches!(self.resolve(variant), Schema::Record(_)) {
                        let mark = out.len();
                        binary::long(i as i64, out);
                        if self.record(Doc::Map(m), &[], variant, out).is_ok() {
                            return Ok(());
                        }
                        out.truncate(mark);
                    }
                }
                Err(Misfit)
            }
            Schema::Record(_) => self
                .record(Doc::Map(m), &[], schema, out)
                .map_err(|_| Misfit),
            _ => Err(Misfit),
        }
    }

    /// The value a field takes when its JSON is missing or misfit: null for a nullable field,
    /// an empty array or map; a misfit for a required scalar.
    fn empty(&self, schema: &'static Schema, out: &mut Vec<u8>) -> Result<(), Misfit> {
        match self.resolve(schema) {
            Schema::Union(u) => {
                let i = u
                    .variants()
                    .iter()
                    .position(|v| matches!(v, Schema::Null))
                    .ok_or(Misfit)?;
                binary::long(i as i64, out);
                Ok(())
            }
            // An empty block list: the count 0 that ends it.
            Schema::Array(_) | Schema::Map(_) => {
                binary::long(0, out);
                Ok(())
            }
            _ => Err(Misfit),
        }
    }

    /// One JSON value as a value of `schema`, written to `out`. On a misfit `out` may hold a
    /// part of it: the caller truncates.
    fn value(
        &self,
        got: Option<&Value>,
        schema: &'static Schema,
        out: &mut Vec<u8>,
    ) -> Result<(), Misfit> {
        let schema = self.resolve(schema);
        let Some(v) = got.filter(|v| !v.is_null()) else {
            return match schema {
                Schema::Null => Ok(()),
                _ => self.empty(schema, out),
            };
        };
        match schema {
            Schema::Union(u) => {
                for (i, variant) in u.variants().iter().enumerate() {
                    if matches!(variant, Schema::Null) {
                        continue;
                    }
                    let mark = out.len();
                    binary::long(i as i64, out);
                    if self.value(Some(v), variant, out).is_ok() {
                        return Ok(());
                    }
                    out.truncate(mark);
                }
                return Err(Misfit);
            }
            Schema::Boolean => binary::boolean(v.as_bool().ok_or(Misfit)?, out),
            Schema::Int => {
                let n = v
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or(Misfit)?;
                binary::int(n, out);
            }
            Schema::Long => binary::long(v.as_i64().ok_or(Misfit)?, out),
            Schema::Double => binary::double(v.as_f64().ok_or(Misfit)?, out),
            Schema::String => match v {
                Value::String(s) => binary::string(s, out),
                // Free-form objects (history patches) travel as JSON text.
                Value::Object(_) | Value::Array(_) => binary::string(&v.to_string(), out),
                _ => return Err(Misfit),
            },
            Schema::Bytes => {
                use base64::Engine;
                let s = v.as_str().ok_or(Misfit)?;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| Misfit)?;
                binary::bytes(&raw, out);
            }
            Schema::TimestampMillis => {
                binary::long(timestamp_millis(v.as_str().ok_or(Misfit)?)?, out)
            }
            Schema::Enum(e) => {
                let index = match v {
                    Value::String(s) => e.symbols.iter().position(|x| x == s),
                    // The API's codes are the symbols' positions (status 0..3); "Unknown",
                    // the last symbol, is no code.
                    Value::Number(n) => n
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .filter(|n| *n + 1 < e.symbols.len()),
                    _ => None,
                };
                let index = index.and_then(|i| i32::try_from(i).ok()).ok_or(Misfit)?;
                binary::int(index, out);
            }
            Schema::Array(a) => {
                let items = v.as_array().ok_or(Misfit)?;
                if !items.is_empty() {
                    binary::long(items.len() as i64, out);
                    for x in items {
                        self.value(Some(x), &a.items, out)?;
                    }
                }
                binary::long(0, out);
            }
            Schema::Map(m) => {
                let obj = v.as_object().ok_or(Misfit)?;
                if !obj.is_empty() {
                    binary::long(obj.len() as i64, out);
                    for (k, x) in obj {
                        binary::string(k, out);
                        self.value(Some(x), &m.types, out)?;
                    }
                }
                binary::long(0, out);
            }
            Schema::Record(_) => {
                let m = v.as_object().ok_or(Misfit)?;
                self.record(Doc::Map(m), &[], schema, out)
                    .map_err(|_| Misfit)?;
            }
            _ => return Err(Misfit),
        }
        Ok(())
    }
}

/// An RFC 3339 time as Unix milliseconds. The last few parsed are remembered per thread: an
/// entity's `createdTime` and the like repeat in its `before` and `after`, record after record.
fn timestamp_millis(s: &str) -> Result<i64, Misfit> {
    use std::cell::RefCell;
    const KEPT: usize = 8;
    thread_local! {
        static RECENT: RefCell<(usize, [(String, i64); KEPT])> = RefCell::new(Default::default());
    }
    RECENT.with(|recent| {
        let mut recent = recent.borrow_mut();
        if let Some((_, ms)) = recent.1.iter().find(|(t, _)| t == s) {
            return Ok(*ms);
        }
        let ms = chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|_| Misfit)?
            .timestamp_millis();
        let at = recent.0 % KEPT;
        recent.1[at].0.clear();
        recent.1[at].0.push_str(s);
        recent.1[at].1 = ms;
        recent.0 = recent.0.wrapping_add(1);
        Ok(ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value as Avro;

    /// A schema for the life of the test process (converters keep `'static` schemas).
    fn leaked(writer: Writer) -> &'static Schema {
        Box::leak(Box::new(parse(writer).unwrap()))
    }

    /// One datum read back by apache-avro's reader, which must take every byte.
    fn read_back(schema: &Schema, bytes: &[u8]) -> Avro {
        let mut rest = bytes;
        let back = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .unwrap()
            .read_value(&mut rest)
            .unwrap();
        assert!(rest.is_empty(), "bytes left after the datum");
        back
    }

    /// A JSON document written with the converter and read back by apache-avro's reader.
    fn round_trip(doc: &Value, writer: Writer, kind: Kind) -> Avro {
        let schema = leaked(writer);
        let mut bytes = Vec::new();
        Converter::new(schema)
            .write_document(doc, kind, &mut bytes)
            .unwrap();
        read_back(schema, &bytes)
    }

    proptest::proptest! {
        /// Each primitive is encoded exactly as apache-avro encodes it.
        #[test]
        fn primitives_are_encoded_as_apache_avro_encodes_them(
            n in proptest::num::i64::ANY,
            i in proptest::num::i32::ANY,
            x in proptest::num::f64::ANY,
            b in proptest::bool::ANY,
            s in ".{0,200}",
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let avro = |v: Avro, schema: Schema| apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().unwrap().write_value_to_vec(v).unwrap();
            let ours = |f: &dyn Fn(&mut Vec<u8>)| {
                let mut out = Vec::new();
                f(&mut out);
                out
            };
            proptest::prop_assert_eq!(ours(&|o| binary::long(n, o)), avro(Avro::Long(n), Schema::Long));
            proptest::prop_assert_eq!(ours(&|o| binary::int(i, o)), avro(Avro::Int(i), Schema::Int));
            proptest::prop_assert_eq!(ours(&|o| binary::double(x, o)), avro(Avro::Double(x), Schema::Double));
            proptest::prop_assert_eq!(ours(&|o| binary::boolean(b, o)), avro(Avro::Boolean(b), Schema::Boolean));
            proptest::prop_assert_eq!(ours(&|o| binary::string(&s, o)), avro(Avro::String(s.clone()), Schema::String));
            proptest::prop_assert_eq!(ours(&|o| binary::bytes(&raw, o)), avro(Avro::Bytes(raw.clone()), Schema::Bytes));
        }
    }

    /// The converter's bytes are apache-avro's encoding of what apache-avro reads back from
    /// them: byte for byte, for records with misfits and unknown fields. (At most one `extra`
    /// entry per record: apache-avro reads maps into a hash map, which loses their order.)
    #[test]
    fn written_records_are_what_apache_avro_writes_for_the_same_values() {
        let docs = [
            (
                Kind::NodeChange,
                serde_json::json!({
                    "id": "node:a:2", "type": "synaptask.node.updated", "source": "s", "subject": "a",
                    "time": "2026-12-01T10:00:00.123Z", "sequence": 2, "traceId": "abcdefabcdef",
                    "origin": "diff", "before": {"id": "a", "version": 1, "x": -1.5},
                    "after": {"id": "a", "version": 2, "status": 2, "title": "t", "tags": ["a", "b"],
                              "newField": {"x": 1}, "createdTime": "2026-11-01T09:00:00Z"},
                    "changed": ["status", "title"], "unknown": [1, 2]
                }),
            ),
            (
                Kind::DeadLetter,
                serde_json::json!({
                    "id": "dlq:x:1", "type": "synaptask.dead_letter", "source": "s", "subject": "x",
                    "time": "2026-12-01T10:00:00Z", "sequence": 0, "traceId": "abcdefabcdef",
                    "origin": "diff", "event": "graph:diff", "reason": "r", "raw": "/3s="
                }),
            ),
            (
                Kind::HistoryBatch,
                serde_json::json!({
                    "id": "history:b:1", "type": "synaptask.history.batch", "source": "s",
                    "subject": "b", "time": "2026-12-01T10:00:00Z", "sequence": 1,
                    "traceId": "abcdefabcdef", "origin": "history", "scope": "USER:u",
                    "batchId": "b", "actor": {"username": "u", "role": 3}, "undone": false,
                    "ops": [
                        {"id": 1, "code": 2, "name": "NODE_UPDATE", "entityType": "node",
                         "forwardPatch": {"Title": "x"}, "createdTime": "2026-12-01T10:00:00Z"},
                        {"id": 2, "code": 99, "name": "UNKNOWN", "entityType": "unknown",
                         "guardVersion": "seven"}
                    ]
                }),
            ),
        ];
        for (kind, doc) in docs {
            let schema = leaked(Writer::Record(kind));
            let mut ours = Vec::new();
            Converter::new(schema)
                .write_document(&doc, kind, &mut ours)
                .unwrap();
            let back = read_back(schema, &ours);
            assert_eq!(
                ours,
                apache_avro::writer::datum::GenericDatumWriter::builder(schema)
                    .build()
                    .unwrap()
                    .write_value_to_vec(back)
                    .unwrap(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn every_shipped_schema_parses_and_names_its_record() {
        for (kind, file, _) in SCHEMA_FILES {
            parse(Writer::Record(kind)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(record_name(kind).starts_with("io.taskstream."), "{file}");
        }
        for route in ROUTES {
            parse(Writer::Topic(route)).unwrap();
        }
    }

    #[test]
    fn misfits_and_unknown_fields_go_to_extra_never_lost() {
        let doc = serde_json::json!({
            "id": "node:a:2", "type": "synaptask.node.updated", "source": "synaptask://h/users/u",
            "subject": "a", "time": "2026-12-01T10:00:00Z", "sequence": 2, "traceId": "abcdefabcdef",
            "origin": "diff", "before": null,
            "after": {"id": "a", "version": 2, "status": 7, "title": "t", "newField": {"x": 1},
                      "createdTime": "not a time", "tags": ["a", 1]},
            "changed": ["status"]
        });
        let back = round_trip(&doc, Writer::Record(Kind::NodeChange), Kind::NodeChange);
        let Avro::Record(fields) = back else { panic!() };
        let after = &fields.iter().find(|(n, _)| n == "after").unwrap().1;
        let Avro::Union(1, after) = after else {
            panic!("{after:?}")
        };
        let Avro::Record(after) = after.as_ref() else {
            panic!()
        };
        let get = |n: &str| after.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(
            get("title"),
            Avro::Union(1, Box::new(Avro::String("t".into())))
        );
        assert_eq!(get("status"), Avro::Union(0, Box::new(Avro::Null)));
        let Avro::Map(extra) = get("extra") else {
            panic!()
        };
        assert_eq!(extra["status"], Avro::String("7".into()));
        assert_eq!(extra["newField"], Avro::String("{\"x\":1}".into()));
        assert_eq!(extra["createdTime"], Avro::String("\"not a time\"".into()));
        assert_eq!(extra["tags"], Avro::String("[\"a\",1]".into()));
    }

    #[test]
    fn converting_a_record_equals_converting_its_json_document() {
        use crate::record::{Change, Origin, TraceContext};
        let after: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "id": "a", "version": 2, "status": 7, "title": "t", "newField": {"x": 1},
            "createdTime": "not a time", "tags": ["a", 1]
        }))
        .unwrap();
        let before: Map<String, Value> =
            serde_json::from_value(serde_json::json!({"id": "a", "version": 1, "status": 1}))
                .unwrap();
        let envelope = |body| Record {
            id: "node:a:2".into(),
            source: "synaptask://h/users/u".into(),
            subject: "a".into(),
            time: "2026-12-01T10:00:00Z".into(),
            sequence: 2,
            trace: TraceContext::from_source("abcdefabcdef"),
            origin: Origin::Diff,
            body,
        };
        let records = [
            envelope(Body::Entity {
                kind: EntityKind::Node,
                change: Change::Updated,
                before: Some(before.clone().into()),
                after: Some(after.clone().into()),
                changed: vec!["status".into()],
            }),
            envelope(Body::Entity {
                kind: EntityKind::Link,
                change: Change::Created,
                before: None,
                after: Some(before.clone().into()),
                changed: vec![],
            }),
            envelope(Body::StatusChanged {
                from: 1,
                to: 3,
                after: after.into(),
                actor: Some(serde_json::json!({"username": "u"})),
                batch_id: Some("b".into()),
                undo_of: None,
            }),
        ];
        for by_topic in [false, true] {
            for record in &records {
                let kind = Kind::of(record);
                let writer = if by_topic {
                    Writer::Topic(crate::encode::route_of(record))
                } else {
                    Writer::Record(kind)
                };
                let schema = leaked(writer);
                let c = Converter::new(schema);
                let mut direct = Vec::new();
                c.write_record(record, &mut direct).unwrap();
                let doc = record.to_json();
                let mut via_json = Vec::new();
                c.write_document(&doc, kind, &mut via_json).unwrap();
                assert_eq!(direct, via_json, "{writer:?}");
                // apache-avro's reader takes every byte back.
                read_back(schema, &direct);
            }
        }
    }

    #[test]
    fn envelope_pairs_are_the_envelope_document() {
        use crate::record::{Change, Envelope, Origin, TraceContext};
        let envelope = |body| Record {
            id: "status:a:3".into(),
            source: "s".into(),
            subject: "a".into(),
            time: "2026-12-01T10:00:00Z".into(),
            sequence: 3,
            trace: TraceContext::from_source("abcdefabcdef"),
            origin: Origin::History,
            body,
        };
        for record in [
            envelope(Body::Entity {
                kind: EntityKind::Node,
                change: Change::Trashed,
                before: Some(Map::new().into()),
                after: None,
                changed: vec!["inTrash".into(), "title".into()],
            }),
            envelope(Body::StatusChanged {
                from: 2,
                to: 9,
                after: Map::new().into(),
                actor: Some(serde_json::json!({"username": "u", "email": "e"})),
                batch_id: Some("b".into()),
                undo_of: Some("c".into()),
            }),
            envelope(Body::StatusChanged {
                from: 0,
                to: 1,
                after: Map::new().into(),
                actor: None,
                batch_id: None,
                undo_of: None,
            }),
        ] {
            let pairs = envelope_pairs(&record).unwrap();
            let map: Map<String, Value> =
                pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            assert_eq!(
                Value::Object(map),
                serde_json::to_value(Envelope(&record)).unwrap()
            );
        }
    }

    #[test]
    fn statuses_times_and_raw_bytes_take_their_avro_types() {
        let doc = serde_json::json!({
            "id": "dlq:x:1", "type": "synaptask.dead_letter", "source": "s", "subject": "x",
            "time": "2026-12-01T10:00:00.250Z", "sequence": 0, "traceId": "abcdefabcdef",
            "origin": "diff", "event": "graph:diff", "reason": "r", "raw": "/3s="
        });
        let v = round_trip(&doc, Writer::Record(Kind::DeadLetter), Kind::DeadLetter);
        let Avro::Record(fields) = v else { panic!() };
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(get("raw"), Avro::Bytes(vec![0xff, 0x7b]));
        assert_eq!(
            get("time"),
            Avro::Union(
                1,
                Box::new(Avro::TimestampMillis(
                    chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00.250Z")
                        .unwrap()
                        .timestamp_millis()
                ))
            )
        );
        let doc = serde_json::json!({
            "id": "status:a:3", "type": "synaptask.task.status_changed", "source": "s",
            "subject": "a", "time": null, "sequence": 3, "traceId": "abcdefabcdef", "origin": "diff",
            "from": {"code": 1, "name": "InProgress"}, "to": {"code": 3, "name": "Completed"},
            "after": {"id": "a", "status": 3}, "changed": ["status"]
        });
        let v = round_trip(
            &doc,
            Writer::Record(Kind::TaskStatusChanged),
            Kind::TaskStatusChanged,
        );
        let Avro::Record(fields) = v else { panic!() };
        let to = &fields.iter().find(|(k, _)| k == "to").unwrap().1;
        assert!(format!("{to:?}").contains("Completed"), "{to:?}");
    }
}
