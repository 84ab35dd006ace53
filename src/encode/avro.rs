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

use apache_avro::types::Value as Avro;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
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
    converter: Converter<'static>,
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
        let value = reg.converter.convert_record(record).map_err(err)?;
        let mut out = Vec::with_capacity(256);
        out.push(0);
        out.extend_from_slice(&reg.id.to_be_bytes());
        reg.writer
            .write_value(&mut out, value)
            .map_err(|e| err(e.to_string()))?;
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

/// A record's JSON document as an Avro value of `schema` (a record schema, or a union of them
/// where `kind` picks the branch).
pub fn to_avro(doc: &Value, schema: &Schema, kind: Kind) -> Result<Avro, String> {
    Converter::new(schema).convert(doc, kind)
}

fn collect_named<'a>(schema: &'a Schema, out: &mut HashMap<String, &'a Schema>) {
    match schema {
        Schema::Record(r) => {
            out.insert(r.name.fullname(None), schema);
            for f in &r.fields {
                collect_named(&f.schema, out);
            }
        }
        Schema::Enum(e) => {
            out.insert(e.name.fullname(None), schema);
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_named(v, out)),
        Schema::Array(a) => collect_named(&a.items, out),
        Schema::Map(m) => collect_named(&m.types, out),
        _ => {}
    }
}

/// Converts JSON documents for one writer schema; built once per schema, since finding the
/// named types walks the whole schema.
pub struct Converter<'a> {
    schema: &'a Schema,
    named: HashMap<String, &'a Schema>,
    /// The union branch of each kind, for a topic schema that is a union.
    branches: HashMap<Kind, usize>,
}

/// The entity maps of a record, lent to the conversion instead of copied into its document.
type Lent<'m> = [LentMap<'m>];

/// One lent entity map: the field it stands for, and the map (none: null).
type LentMap<'m> = (&'static str, Option<&'m Map<String, Value>>);

impl<'a> Converter<'a> {
    /// A converter for `schema` (a record schema, or a union of them).
    pub fn new(schema: &'a Schema) -> Self {
        let mut named = HashMap::new();
        collect_named(schema, &mut named);
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
        }
    }

    /// A record's JSON document as an Avro value of the schema; `kind` picks a union's branch.
    pub fn convert(&self, doc: &Value, kind: Kind) -> Result<Avro, String> {
        let empty = Map::new();
        self.convert_parts(doc.as_object().unwrap_or(&empty), &[], kind)
    }

    /// A record as an Avro value of the schema. The same values as converting
    /// `record.to_json()`, without copying the entity states into a JSON document first:
    /// `before` and `after` are read from the record's own maps.
    pub fn convert_record(&self, record: &Record) -> Result<Avro, String> {
        let (envelope, lent): (Record, [LentMap<'_>; 2]) =
            match &record.body {
                Body::Entity {
                    kind,
                    change,
                    before,
                    after,
                    changed,
                } => (
                    with_body(
                        record,
                        Body::Entity {
                            kind: *kind,
                            change: *change,
                            before: None,
                            after: None,
                            changed: changed.clone(),
                        },
                    ),
                    [("before", before.as_deref()), ("after", after.as_deref())],
                ),
                Body::StatusChanged {
                    from,
                    to,
                    after,
                    actor,
                    batch_id,
                    undo_of,
                } => (
                    with_body(
                        record,
                        Body::StatusChanged {
                            from: *from,
                            to: *to,
                            after: std::sync::Arc::default(),
                            actor: actor.clone(),
                            batch_id: batch_id.clone(),
                            undo_of: undo_of.clone(),
                        },
                    ),
                    [("after", Some(after)), ("", None)],
                ),
                _ => {
                    return self.convert(&record.to_json(), Kind::of(record));
                }
            };
        let doc = envelope.to_json();
        let empty = Map::new();
        let obj = doc.as_object().unwrap_or(&empty);
        let lent: Vec<_> = lent.into_iter().filter(|(n, _)| !n.is_empty()).collect();
        self.convert_parts(obj, &lent, Kind::of(record))
    }

    fn convert_parts(
        &self,
        obj: &Map<String, Value>,
        lent: &Lent<'_>,
        kind: Kind,
    ) -> Result<Avro, String> {
        match self.schema {
            Schema::Union(u) => {
                let i = self
                    .branches
                    .get(&kind)
                    .copied()
                    .ok_or_else(|| format!("the topic schema has no {}", record_name(kind)))?;
                let variant = &u.variants()[i];
                Ok(Avro::Union(
                    i as u32,
                    Box::new(self.record(obj, lent, variant)?),
                ))
            }
            other => self.record(obj, lent, other),
        }
    }
}

/// A record's envelope with another body.
fn with_body(record: &Record, body: Body) -> Record {
    Record {
        id: record.id.clone(),
        source: record.source.clone(),
        subject: record.subject.clone(),
        time: record.time.clone(),
        sequence: record.sequence,
        trace: record.trace.clone(),
        origin: record.origin,
        body,
    }
}

/// A value that does not fit its field: kept in `extra`.
struct Misfit;

impl Converter<'_> {
    fn resolve<'s>(&'s self, schema: &'s Schema) -> &'s Schema {
        match schema {
            Schema::Ref { name } => self
                .named
                .get(&name.fullname(None))
                .copied()
                .unwrap_or(schema),
            other => other,
        }
    }

    /// A JSON object as a record: known fields converted, the rest (and misfits) in `extra`.
    /// Fields named in `lent` are taken from those maps rather than from `obj`.
    fn record(
        &self,
        obj: &Map<String, Value>,
        lent: &Lent<'_>,
        schema: &Schema,
    ) -> Result<Avro, String> {
        let Schema::Record(r) = self.resolve(schema) else {
            return Err("not a record schema".into());
        };
        let mut extra: HashMap<String, Avro> = obj
            .iter()
            .filter(|(k, _)| !r.lookup.contains_key(k.as_str()))
            .map(|(k, v)| (k.clone(), Avro::String(v.to_string())))
            .collect();
        let mut fields = Vec::with_capacity(r.fields.len());
        for f in &r.fields {
            if f.name == "extra" {
                continue;
            }
            if let Some((_, map)) = lent.iter().find(|(n, _)| *n == f.name) {
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
                            extra.insert(f.name.clone(), Avro::String(text));
                        }
                        self.empty(&f.schema).ok_or_else(|| {
                            format!(
                                "{}.{}: the entity state does not fit and the field has no empty value",
                                r.name.fullname(None),
                                f.name
                            )
                        })?
                    }
                };
                fields.push((f.name.clone(), value));
                continue;
            }
            let got = obj.get(&f.name);
            let value = match self.value(got, &f.schema) {
                Ok(v) => v,
                Err(Misfit) => {
                    if let Some(v) = got {
                        extra.insert(f.name.clone(), Avro::String(v.to_string()));
                    }
                    self.empty(&f.schema).ok_or_else(|| {
                        format!(
                            "{}.{}: {} does not fit and the field has no empty value",
                            r.name.fullname(None),
                            f.name,
                            got.map_or("nothing".to_string(), |v| v.to_string())
                        )
                    })?
                }
            };
            fields.push((f.name.clone(), value));
        }
        if r.lookup.contains_key("extra") {
            let at = r.lookup["extra"];
            fields.insert(at.min(fields.len()), ("extra".into(), Avro::Map(extra)));
        }
        Ok(Avro::Record(fields))
    }

    /// A JSON object as a value of `schema`: a record, or the first record branch of a union.
    fn object(&self, m: &Map<String, Value>, schema: &Schema) -> Result<Avro, Misfit> {
        match self.resolve(schema) {
            Schema::Union(u) => {
                for (i, variant) in u.variants().iter().enumerate() {
                    if matches!(self.resolve(variant), Schema::Record(_)) {
                        if let Ok(x) = self.record(m, &[], variant) {
                            return Ok(Avro::Union(i as u32, Box::new(x)));
                        }
                    }
                }
                Err(Misfit)
            }
            Schema::Record(_) => self.record(m, &[], schema).map_err(|_| Misfit),
            _ => Err(Misfit),
        }
    }

    /// The value a field takes when its JSON is missing or misfit: null for a nullable field,
    /// an empty array or map; `None` for a required scalar.
    fn empty(&self, schema: &Schema) -> Option<Avro> {
        match self.resolve(schema) {
            Schema::Union(u) => u
                .variants()
                .iter()
                .position(|v| matches!(v, Schema::Null))
                .map(|i| Avro::Union(i as u32, Box::new(Avro::Null))),
            Schema::Array(_) => Some(Avro::Array(Vec::new())),
            Schema::Map(_) => Some(Avro::Map(HashMap::new())),
            _ => None,
        }
    }

    fn value(&self, got: Option<&Value>, schema: &Schema) -> Result<Avro, Misfit> {
        let schema = self.resolve(schema);
        let Some(v) = got.filter(|v| !v.is_null()) else {
            return match schema {
                Schema::Null => Ok(Avro::Null),
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
                        return Ok(Avro::Union(i as u32, Box::new(x)));
                    }
                }
                Err(Misfit)
            }
            Schema::Boolean => v.as_bool().map(Avro::Boolean).ok_or(Misfit),
            Schema::Int => v
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .map(Avro::Int)
                .ok_or(Misfit),
            Schema::Long => v.as_i64().map(Avro::Long).ok_or(Misfit),
            Schema::Double => v.as_f64().map(Avro::Double).ok_or(Misfit),
            Schema::String => match v {
                Value::String(s) => Ok(Avro::String(s.clone())),
                // Free-form objects (history patches) travel as JSON text.
                Value::Object(_) | Value::Array(_) => Ok(Avro::String(v.to_string())),
                _ => Err(Misfit),
            },
            Schema::Bytes => {
                use base64::Engine;
                let s = v.as_str().ok_or(Misfit)?;
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map(Avro::Bytes)
                    .map_err(|_| Misfit)
            }
            Schema::TimestampMillis => {
                let s = v.as_str().ok_or(Misfit)?;
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| Avro::TimestampMillis(t.timestamp_millis()))
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
                    .map(|i| Avro::Enum(i as u32, e.symbols[i].clone()))
                    .ok_or(Misfit)
            }
            Schema::Array(a) => {
                let items = v.as_array().ok_or(Misfit)?;
                items
                    .iter()
                    .map(|x| self.value(Some(x), &a.items))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Avro::Array)
            }
            Schema::Map(m) => {
                let obj = v.as_object().ok_or(Misfit)?;
                obj.iter()
                    .map(|(k, x)| self.value(Some(x), &m.types).map(|x| (k.clone(), x)))
                    .collect::<Result<HashMap<_, _>, _>>()
                    .map(Avro::Map)
            }
            Schema::Record(_) => {
                let m = v.as_object().ok_or(Misfit)?;
                self.record(m, &[], schema).map_err(|_| Misfit)
            }
            _ => Err(Misfit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let schema = parse(Writer::Record(Kind::NodeChange)).unwrap();
        let v = to_avro(&doc, &schema, Kind::NodeChange).unwrap();
        let bytes = GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(v)
            .unwrap();
        let back = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut bytes.as_slice())
            .unwrap();
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
                let schema = parse(writer).unwrap();
                let c = Converter::new(&schema);
                assert_eq!(
                    c.convert_record(record).unwrap(),
                    c.convert(&record.to_json(), kind).unwrap(),
                    "{writer:?}"
                );
            }
        }
    }

    #[test]
    fn statuses_times_and_raw_bytes_take_their_avro_types() {
        let schema = parse(Writer::Record(Kind::DeadLetter)).unwrap();
        let doc = serde_json::json!({
            "id": "dlq:x:1", "type": "synaptask.dead_letter", "source": "s", "subject": "x",
            "time": "2026-12-01T10:00:00.250Z", "sequence": 0, "traceId": "abcdefabcdef",
            "origin": "diff", "event": "graph:diff", "reason": "r", "raw": "/3s="
        });
        let v = to_avro(&doc, &schema, Kind::DeadLetter).unwrap();
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
        let schema = parse(Writer::Record(Kind::TaskStatusChanged)).unwrap();
        let doc = serde_json::json!({
            "id": "status:a:3", "type": "synaptask.task.status_changed", "source": "s",
            "subject": "a", "time": null, "sequence": 3, "traceId": "abcdefabcdef", "origin": "diff",
            "from": {"code": 1, "name": "InProgress"}, "to": {"code": 3, "name": "Completed"},
            "after": {"id": "a", "status": 3}, "changed": ["status"]
        });
        let v = to_avro(&doc, &schema, Kind::TaskStatusChanged).unwrap();
        let writer = GenericDatumWriter::builder(&schema).build().unwrap();
        assert!(writer.write_value_to_vec(v).is_ok());
    }
}
