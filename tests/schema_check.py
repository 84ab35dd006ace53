# Validates every JSON line of a file against schemas/record.schema.json (draft 2020-12).
# Usage: python3 tests/schema_check.py SCHEMA RECORDS.jsonl ; prints "N valid" or the first errors.
import json
import sys

import jsonschema

schema = json.load(open(sys.argv[1]))
validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
errors, count = [], 0
text = open(sys.argv[2]).read()
# The sink may be mid-write: a last line without its newline is not complete yet.
text = text[: text.rfind("\n") + 1]
for line in text.splitlines():
    if not line.strip():
        continue
    count += 1
    record = json.loads(line)
    for e in validator.iter_errors(record):
        errors.append(f"{record.get('id')}: {e.message} at {list(e.path)}")
if errors:
    print("\n".join(errors[:20]))
    sys.exit(1)
print(f"{count} valid")
