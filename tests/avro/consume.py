"""Independent Avro consumers for tests/avro.rs.

Reads every message of the given Kafka topics with confluent-kafka's Consumer and decodes each
value twice: with confluent-kafka's AvroDeserializer (schema fetched from the registry by the
id in the wire header) and with fastavro's schemaless_reader on the same bytes. A NATS dump
(JSON lines of {"subject", "headers", "payload_hex"}) written by the Rust test is decoded with
fastavro. Every decoded record is compared with the JSON record of the same id that the
connector wrote to its file sink in the same run.

Prints one JSON line: {"kafka": n, "nats": n, "tombstones": n, "mismatches": [...]}.
"""
import argparse
import base64
import datetime
import io
import json
import struct
import sys

import fastavro
import urllib.request
from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

STATUS = ["Available", "InProgress", "Blocked", "Completed"]


def same(avro, js, path, out):
    """Compares a decoded Avro value with the JSON value it stands for; appends differences."""
    if isinstance(avro, dict) and isinstance(js, dict):
        extra = avro.get("extra") or {}
        for key, value in js.items():
            here = f"{path}.{key}"
            if avro.get(key) is not None:
                same(avro[key], value, here, out)
            elif value is None:
                continue
            elif key in extra:
                if json.loads(extra[key]) != value:
                    out.append(f"{here}: extra {extra[key]!r} != {value!r}")
            else:
                out.append(f"{here}: {value!r} missing from the Avro record")
        for key, value in avro.items():
            if key == "extra":
                for k in value:
                    if k not in js:
                        out.append(f"{path}.extra.{k}: not in the JSON record")
                continue
            if key not in js and value not in (None, [], {}):
                out.append(f"{path}.{key}: {value!r} only in the Avro record")
        return
    if isinstance(avro, datetime.datetime):
        want = datetime.datetime.fromisoformat(js.replace("Z", "+00:00")) if isinstance(js, str) else None
        if want is None or abs((avro - want).total_seconds()) > 0.001:
            out.append(f"{path}: time {avro.isoformat()} != {js!r}")
        return
    if isinstance(avro, bytes):
        if not isinstance(js, str) or base64.b64decode(js) != avro:
            out.append(f"{path}: bytes differ")
        return
    if isinstance(avro, str) and isinstance(js, (dict, list)):
        if json.loads(avro) != js:
            out.append(f"{path}: JSON text {avro[:80]!r} != {js!r}")
        return
    if isinstance(avro, str) and isinstance(js, int) and not isinstance(js, bool) and avro in STATUS:
        if STATUS[js] != avro:
            out.append(f"{path}: status {avro} != code {js}")
        return
    if isinstance(avro, list) and isinstance(js, list):
        if len(avro) != len(js):
            out.append(f"{path}: {len(avro)} items != {len(js)}")
            return
        for i, (a, j) in enumerate(zip(avro, js)):
            same(a, j, f"{path}[{i}]", out)
        return
    if isinstance(avro, (int, float)) and isinstance(js, (int, float)) and not isinstance(js, bool):
        if float(avro) != float(js):
            out.append(f"{path}: {avro} != {js}")
        return
    if avro != js:
        out.append(f"{path}: {avro!r} != {js!r}")


class Schemas:
    def __init__(self, url):
        self.url = url
        self.cache = {}

    def by_id(self, schema_id):
        if schema_id not in self.cache:
            with urllib.request.urlopen(f"{self.url}/schemas/ids/{schema_id}", timeout=10) as resp:
                text = json.load(resp)["schema"]
            self.cache[schema_id] = fastavro.parse_schema(json.loads(text))
        return self.cache[schema_id]

    def decode(self, payload):
        magic, schema_id = struct.unpack(">bI", payload[:5])
        if magic != 0:
            raise ValueError(f"magic byte {magic}")
        return fastavro.schemaless_reader(io.BytesIO(payload[5:]), self.by_id(schema_id)), schema_id


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True, help="the connector's JSON lines file")
    ap.add_argument("--registry", required=True)
    ap.add_argument("--bootstrap")
    ap.add_argument("--topics", default="")
    ap.add_argument("--nats-dump")
    ap.add_argument("--avro-keys", action="store_true", help="Kafka keys are Avro strings")
    args = ap.parse_args()

    records = {}
    with open(args.json) as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                records[r["id"]] = r
    schemas = Schemas(args.registry)
    mismatches = []
    seen = {"kafka": 0, "nats": 0, "tombstones": 0}

    def check(where, msg_id, decoded):
        want = records.get(msg_id)
        if want is None:
            mismatches.append(f"{where} {msg_id}: no JSON record with this id")
            return
        out = []
        same(decoded, want, msg_id, out)
        mismatches.extend(f"{where} {m}" for m in out)

    if args.bootstrap:
        deserializer = AvroDeserializer(SchemaRegistryClient({"url": args.registry}))
        consumer = Consumer({
            "bootstrap.servers": args.bootstrap,
            "group.id": "avro-check",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        consumer.subscribe(args.topics.split(","))
        idle = 0
        while idle < 8:
            msg = consumer.poll(1.0)
            if msg is None:
                idle += 1
                continue
            if msg.error():
                idle += 1
                continue
            idle = 0
            headers = dict((k, v.decode()) for k, v in (msg.headers() or []))
            if args.avro_keys:
                key = deserializer(msg.key(), SerializationContext(msg.topic(), MessageField.KEY))
                rec = records.get(headers.get("ce_id", "").removesuffix(":tombstone"))
                if msg.value() is not None and rec is not None:
                    want = rec.get("scope") if rec["type"] in ("synaptask.history.batch", "synaptask.gap") else rec["subject"]
                    if key != want:
                        mismatches.append(f"kafka key {key!r} != {want!r} ({headers.get('ce_id')})")
                seen["avro_keys"] = seen.get("avro_keys", 0) + 1
            if msg.value() is None:
                seen["tombstones"] += 1
                continue
            seen["kafka"] += 1
            ctx = SerializationContext(msg.topic(), MessageField.VALUE)
            by_confluent = deserializer(msg.value(), ctx)
            by_fastavro, schema_id = schemas.decode(msg.value())
            if headers.get("content-type") != "application/avro":
                mismatches.append(f"kafka {headers.get('ce_id')}: content-type {headers.get('content-type')}")
            check("kafka/confluent", headers["ce_id"], by_confluent)
            check("kafka/fastavro", headers["ce_id"], by_fastavro)
        consumer.close()

    if args.nats_dump:
        with open(args.nats_dump) as fh:
            for line in fh:
                m = json.loads(line)
                seen["nats"] += 1
                payload = bytes.fromhex(m["payload_hex"])
                decoded, schema_id = schemas.decode(payload)
                h = m["headers"]
                if h.get("content-type") != "application/avro" or h.get("schema_id") != str(schema_id):
                    mismatches.append(f"nats {h.get('Nats-Msg-Id')}: headers {h}")
                check("nats/fastavro", h["ce_id"], decoded)

    seen["json_records"] = len(records)
    seen["mismatches"] = mismatches[:50]
    seen["mismatch_count"] = len(mismatches)
    print(json.dumps(seen))


if __name__ == "__main__":
    sys.exit(main())
