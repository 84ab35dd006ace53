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

use std::borrow::Cow;
use std::collections::HashMap;

use apache_avro::schema::Name;
use apache_avro::types::Value as Avro;
use apache_avro::writer::datum::GenericDatumWriter;
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

/// One writer schema with its registry id and its resolved writer.
struct Registered {
    converter: Converter,
    writer: GenericDatumWriter<'static>,
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
            // No second validation pass: the converter builds every value from the schema's own
            // types (a misfit goes to `extra`), and the e2e test decodes every record with two
            // independent readers.
            let datum_writer = GenericDatumWriter::builder(schema)
                .validate(false)
                .build()
                .map_err(|e| format!("schema {writer:?}: {e}"))?;
            writers.insert(
                writer,
                Registered {
                    converter: Converter::new(schema),
                    writer: datum_writer,
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
        // A string value of a "string" schema always fits it.
        reg.writer
            .write_value(&mut out, Avro::String(key.to_string()))
            .ok()?;
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
        reg.converter
            .write_record(&reg.writer, record, &mut out)
            .map_err(err)?;
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

/// A value fitted to its schema, borrowing the record's strings: what apache-avro's
/// schema-aware serializer writes (no `types::Value` tree with copied strings, and no field
/// lookup table per record, which made Avro cost several times JSON).
#[derive(Debug, Clone, PartialEq)]
pub enum Out<'r> {
    /// A scalar (`null`, `boolean`, `int`, `long`, `double`, `string`, an enum symbol).
    Scalar(Scalar<'r>),
    /// `bytes`.
    Bytes(Vec<u8>),
    /// A union branch by position.
    Union(u32, Box<Out<'r>>),
    /// A union's scalar branch by position, unboxed (most nullable fields: no allocation).
    Branch(u32, Scalar<'r>),
    /// `array`.
    Array(Vec<Out<'r>>),
    /// `map` (string keys).
    Map(Vec<(Cow<'r, str>, Out<'r>)>),
    /// A record's fields in schema order.
    Record(Vec<(&'static str, Out<'r>)>),
}

/// A scalar value.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'r> {
    /// `null`.
    Null,
    /// `boolean`.
    Bool(bool),
    /// `int`.
    Int(i32),
    /// `long` and `timestamp-millis`.
    Long(i64),
    /// `double`.
    Double(f64),
    /// `string`.
    Str(Cow<'r, str>),
    /// An enum symbol by position.
    Enum(u32, &'static str),
}

impl serde::Serialize for Scalar<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scalar::Null => s.serialize_unit(),
            Scalar::Bool(b) => s.serialize_bool(*b),
            Scalar::Int(n) => s.serialize_i32(*n),
            Scalar::Long(n) => s.serialize_i64(*n),
            Scalar::Double(x) => s.serialize_f64(*x),
            Scalar::Str(v) => s.serialize_str(v),
            Scalar::Enum(i, symbol) => s.serialize_unit_variant("", *i, symbol),
        }
    }
}

/// A union branch: scalars unboxed.
fn branch(i: u32, v: Out<'_>) -> Out<'_> {
    match v {
        Out::Scalar(x) => Out::Branch(i, x),
        other => Out::Union(i, Box::new(other)),
    }
}

impl serde::Serialize for Out<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
        match self {
            Out::Scalar(x) => x.serialize(s),
            Out::Bytes(b) => s.serialize_bytes(b),
            // The branch is chosen here, not guessed by the serializer from the value's type.
            Out::Union(i, v) => s.serialize_newtype_variant("", *i, "", v.as_ref()),
            Out::Branch(i, v) => s.serialize_newtype_variant("", *i, "", v),
            Out::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for x in items {
                    seq.serialize_element(x)?;
                }
                seq.end()
            }
            Out::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
            // Every field, in schema order: written as a tuple, which the serializer takes
            // field by field without looking names up or buffering.
            Out::Record(fields) if fields.len() > 1 => {
                use serde::ser::SerializeTuple;
                let mut rec = s.serialize_tuple(fields.len())?;
                for (_, v) in fields {
                    rec.serialize_element(v)?;
                }
                rec.end()
            }
            Out::Record(fields) => {
                let mut rec = s.serialize_struct("", fields.len())?;
                for (name, v) in fields {
                    rec.serialize_field(name, v)?;
                }
                rec.end()
            }
        }
    }
}

/// Converts records for one writer schema; built once per schema, since finding the named
/// types walks the whole schema.
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

    /// A record's JSON document fitted to the schema; `kind` picks a union's branch.
    pub fn convert<'r>(&self, doc: &'r Value, kind: Kind) -> Result<Out<'r>, String> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let obj = doc
            .as_object()
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new));
        self.convert_parts(Doc::Map(obj), &[], kind)
    }

    /// A record fitted to the schema and written in the Avro binary encoding (no wire-format
    /// header). The same bytes as converting `record.to_json()`, without copying the entity
    /// states into a JSON document first: `before` and `after` are read from the record's maps.
    pub fn write_record(
        &self,
        writer: &GenericDatumWriter<'static>,
        record: &Record,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let lent: [LentMap<'_>; 2] = match &record.body {
            Body::Entity { before, after, .. } => {
                [("before", before.as_deref()), ("after", after.as_deref())]
            }
            Body::StatusChanged { after, .. } => [("after", Some(after)), ("", None)],
            _ => {
                let doc = record.to_json();
                let fitted = self.convert(&doc, Kind::of(record))?;
                return write(writer, &fitted, out);
            }
        };
        let Some(pairs) = envelope_pairs(record) else {
            return Err("no envelope for this record kind".into());
        };
        let lent: Vec<_> = lent.into_iter().filter(|(n, _)| !n.is_empty()).collect();
        let fitted = self.convert_parts(Doc::Pairs(&pairs), &lent, Kind::of(record))?;
        write(writer, &fitted, out)
    }

    fn convert_parts<'r>(
        &self,
        obj: Doc<'r>,
        lent: &Lent<'r>,
        kind: Kind,
    ) -> Result<Out<'r>, String> {
        match self.schema {
            Schema::Union(u) => {
                let i = self
                    .branches
                    .get(&kind)
                    .copied()
                    .ok_or_else(|| format!("the topic schema has no {}", record_name(kind)))?;
                let variant = &u.variants()[i];
                Ok(Out::Union(
                    i as u32,
                    Box::new(self.record(obj, lent, variant)?),
                ))
            }
            other => self.record(obj, lent, other),
        }
    }
}

/// Writes a fitted value with the writer's schema.
fn write(
    writer: &GenericDatumWriter<'static>,
    v: &Out<'_>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    writer
        .write_ser(out, v)
        .map(|_| ())
        .map_err(|e| e.to_string())
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
    ) -> Result<Out<'r>, String> {
        let Schema::Record(r) = self.resolve(schema) else {
            return Err("not a record schema".into());
        };
        let plan = self
            .plans
            .get(&(std::ptr::from_ref(r) as usize))
            .ok_or("a record schema without a plan")?;
        // Each key of the document to its field, or to `extra`.
        let mut slots: Vec<Option<&'r Value>> = vec![None; r.fields.len()];
        let mut extra: Vec<(Cow<'r, str>, Out<'r>)> = Vec::new();
        obj.for_each(|k, v| match plan.index.get(k) {
            Some(&i) => slots[i] = Some(v),
            None => extra.push((
                Cow::Borrowed(k),
                Out::Scalar(Scalar::Str(Cow::Owned(v.to_string()))),
            )),
        });
        let mut fields: Vec<(&'static str, Out<'r>)> = Vec::with_capacity(r.fields.len());
        for (i, f) in r.fields.iter().enumerate() {
            let name: &'static str = f.name.as_str();
            if Some(i) == plan.extra_at {
                continue;
            }
            let lent_map = if lent.is_empty() {
                None
            } else {
                lent.iter().find(|(n, _)| *n == name)
            };
            if let Some((_, map)) = lent_map {
                let fitted = match map {
                    Some(m) => self.object(m, &f.schema),
                    None => Err(Misfit),
                };
                let value = match fitted {
                    Ok(v) => v,
                    Err(Misfit) => {
                        // As for a field of the document: a state that does not fit is kept
                        // as JSON text in `extra`.
                        if let Some(m) = map {
                            let text = serde_json::to_string(m).unwrap_or_default();
                            extra.push((
                                Cow::Borrowed(name),
                                Out::Scalar(Scalar::Str(Cow::Owned(text))),
                            ));
                        }
                        self.empty(&f.schema).ok_or_else(|| {
                            format!(
                                "{}.{name}: the entity state does not fit and the field has no empty value",
                                r.name.fullname(None),
                            )
                        })?
                    }
                };
                fields.push((name, value));
                continue;
            }
            let got = slots[i];
            let value = match self.value(got, &f.schema) {
                Ok(v) => v,
                Err(Misfit) => {
                    if let Some(v) = got {
                        extra.push((
                            Cow::Borrowed(name),
                            Out::Scalar(Scalar::Str(Cow::Owned(v.to_string()))),
                        ));
                    }
                    self.empty(&f.schema).ok_or_else(|| {
                        format!(
                            "{}.{name}: {} does not fit and the field has no empty value",
                            r.name.fullname(None),
                            got.map_or("nothing".to_string(), |v| v.to_string())
                        )
                    })?
                }
            };
            fields.push((name, value));
        }
        if let Some(at) = plan.extra_at {
            fields.insert(at.min(fields.len()), ("extra", Out::Map(extra)));
        }
        Ok(Out::Record(fields))
    }

    /// A JSON object as a value of `schema`: a record, or the first record branch of a union.
    fn object<'r>(
        &self,
        m: &'r Map<String, Value>,
        schema: &'static Schema,
    ) -> Result<Out<'r>, Misfit> {
        match self.resolve(schema) {
            Schema::Union(u) => {
                for (i, variant) in u.variants().iter().enumerate() {
                    if matches!(self.resolve(variant), Schema::Record(_)) {
                        if let Ok(x) = self.record(Doc::Map(m), &[], variant) {
                            return Ok(Out::Union(i as u32, Box::new(x)));
                        }
                    }
                }
                Err(Misfit)
            }
            Schema::Record(_) => self.record(Doc::Map(m), &[], schema).map_err(|_| Misfit),
            _ => Err(Misfit),
        }
    }

    /// The value a field takes when its JSON is missing or misfit: null for a nullable field,
    /// an empty array or map; `None` for a required scalar.
    fn empty<'r>(&self, schema: &'static Schema) -> Option<Out<'r>> {
        match self.resolve(schema) {
            Schema::Union(u) => u
                .variants()
                .iter()
                .position(|v| matches!(v, Schema::Null))
                .map(|i| Out::Branch(i as u32, Scalar::Null)),
            Schema::Array(_) => Some(Out::Array(Vec::new())),
            Schema::Map(_) => Some(Out::Map(Vec::new())),
            _ => None,
        }
    }

    fn value<'r>(
        &self,
        got: Option<&'r Value>,
        schema: &'static Schema,
    ) -> Result<Out<'r>, Misfit> {
        let schema = self.resolve(schema);
        let Some(v) = got.filter(|v| !v.is_null()) else {
            return match schema {
                Schema::Null => Ok(Out::Scalar(Scalar::Null)),
                _ => self.empty(schema).ok_or(Misfit),
            };
        };
        match schema {
            Schema::Union(u) => {
                for (i, variant) in u.variants().iter().enumerate() {
                    if matches!(variant, Schema::Null) {
                        continue;
                    }
                    if let Ok(x) = self.value(Some(v), variant) {
                        return Ok(branch(i as u32, x));
                    }
                }
                Err(Misfit)
            }
            Schema::Boolean => v
                .as_bool()
                .map(|b| Out::Scalar(Scalar::Bool(b)))
                .ok_or(Misfit),
            Schema::Int => v
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .map(|n| Out::Scalar(Scalar::Int(n)))
                .ok_or(Misfit),
            Schema::Long => v
                .as_i64()
                .map(|n| Out::Scalar(Scalar::Long(n)))
                .ok_or(Misfit),
            Schema::Double => v
                .as_f64()
                .map(|x| Out::Scalar(Scalar::Double(x)))
                .ok_or(Misfit),
            Schema::String => match v {
                Value::String(s) => Ok(Out::Scalar(Scalar::Str(Cow::Borrowed(s)))),
                // Free-form objects (history patches) travel as JSON text.
                Value::Object(_) | Value::Array(_) => {
                    Ok(Out::Scalar(Scalar::Str(Cow::Owned(v.to_string()))))
                }
                _ => Err(Misfit),
            },
            Schema::Bytes => {
                use base64::Engine;
                let s = v.as_str().ok_or(Misfit)?;
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map(Out::Bytes)
                    .map_err(|_| Misfit)
            }
            Schema::TimestampMillis => {
                let s = v.as_str().ok_or(Misfit)?;
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| Out::Scalar(Scalar::Long(t.timestamp_millis())))
                    .map_err(|_| Misfit)
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
                index
                    .map(|i| Out::Scalar(Scalar::Enum(i as u32, e.symbols[i].as_str())))
                    .ok_or(Misfit)
            }
            Schema::Array(a) => {
                let items = v.as_array().ok_or(Misfit)?;
                items
                    .iter()
                    .map(|x| self.value(Some(x), &a.items))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Out::Array)
            }
            Schema::Map(m) => {
                let obj = v.as_object().ok_or(Misfit)?;
                obj.iter()
                    .map(|(k, x)| {
                        self.value(Some(x), &m.types)
                            .map(|x| (Cow::Borrowed(k.as_str()), x))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Out::Map)
            }
            Schema::Record(_) => {
                let m = v.as_object().ok_or(Misfit)?;
                self.record(Doc::Map(m), &[], schema).map_err(|_| Misfit)
            }
            _ => Err(Misfit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schema for the life of the test process (converters keep `'static` schemas).
    fn leaked(writer: Writer) -> &'static Schema {
        Box::leak(Box::new(parse(writer).unwrap()))
    }

    /// A JSON document written with the converter and read back by apache-avro's reader.
    fn round_trip(doc: &Value, writer: Writer, kind: Kind) -> Avro {
        let schema = leaked(writer);
        let c = Converter::new(schema);
        let w = GenericDatumWriter::builder(schema).build().unwrap();
        let mut bytes = Vec::new();
        write(&w, &c.convert(doc, kind).unwrap(), &mut bytes).unwrap();
        let mut slice = bytes.as_slice();
        let back = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .unwrap()
            .read_value(&mut slice)
            .unwrap();
        assert!(slice.is_empty(), "bytes left after the datum");
        back
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
                let w = GenericDatumWriter::builder(schema).build().unwrap();
                let mut direct = Vec::new();
                c.write_record(&w, record, &mut direct).unwrap();
                let doc = record.to_json();
                let mut via_json = Vec::new();
                write(&w, &c.convert(&doc, kind).unwrap(), &mut via_json).unwrap();
                assert_eq!(direct, via_json, "{writer:?}");
                // apache-avro's reader takes every byte back.
                let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
                    .build()
                    .unwrap();
                let mut rest = direct.as_slice();
                reader.read_value(&mut rest).unwrap();
                assert!(rest.is_empty(), "{writer:?}");
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
