"""The dataset job's manifest: thousands of prompts, one video per row.

    rows = read_manifest("s3://bucket/prompts.parquet", storage_options)   # raw dict rows
    for row in plan_rows(rows, base_spec):                                  # one Row each
        if row.error: report(row.error)        # one line; the other rows still run
        else: generate(row.spec, out=join(base_spec.out, row.key))

Two kinds of failure, on purpose:

- the manifest as a whole (missing, unknown format, not Parquet, empty, no id/prompt column, an
  unknown column) raises `ManifestError` before anything runs: these are mistakes in every row,
  and a typo'd column would otherwise be silently ignored for the whole dataset;
- one bad row (no id, a bad number, a duplicate id, a 5000-character prompt, an unreadable JSONL
  line or CSV record) gets a one-line `Row.error` and the other rows go on.

Columns: `id` and `prompt` (both required per row) and any `JobSpec` field except the job-level
ones (`JOB_LEVEL_FIELDS`: where outputs go and how the job runs), which a row may not set. A null
/ empty cell means "not given": the row takes the job spec's value.

Seeds: a row without a seed gets `default_seed(id, base.seed)`, a hash of the id, so reordering,
adding or removing rows never changes another row's video; change the job spec's seed to get a
fresh take of every video.

Rows count from 0 in every message (`Row.index`); the header of a CSV is not a row. JSONL and
CSV rows also carry the file line they start on (`__line__`), shown in their errors.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import typing
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from jobs.spec import JobSpec, SpecError, short
from jobs.storage import StorageError, is_remote, read_bytes

# where the outputs go and how the job runs: one value for the whole job, never per row
JOB_LEVEL_FIELDS = ("out", "backend", "stages", "replicas", "storage_options", "storage_timeout_s",
                    "checkpoint_every", "batch_size", "device")
ROW_FIELDS = ("id",) + tuple(f.name for f in fields(JobSpec) if f.name not in JOB_LEVEL_FIELDS)
MAX_ID_CHARS = 256
KEY_PREFIX_CHARS = 80
KEY_HASH_CHARS = 12
SEED_MODULUS = 2**31
FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
FORMAT_HINT = ".parquet, .jsonl, .json (one object per line, or one array of objects) or .csv"


class ManifestError(ValueError):
    """A manifest that cannot be used at all: one line naming the url, the reason and the fix."""


# ------------------------------------------------------------------------------ field types

def _numeric_fields(kind: type) -> tuple[str, ...]:
    """Row fields whose JobSpec type is `kind` (or `kind | None`): CSV gives them as strings."""
    hints = typing.get_type_hints(JobSpec)
    return tuple(name for name in ROW_FIELDS if name in hints
                 and (hints[name] is kind or kind in typing.get_args(hints[name])))


INT_FIELDS = _numeric_fields(int)
FLOAT_FIELDS = _numeric_fields(float)


# ------------------------------------------------------------------------------ reading

def read_manifest(url: str, storage_options: dict | None = None, timeout_s: float = 10.0) -> list[dict]:
    """The manifest's rows as plain dicts (None for nulls), each with `__index__` (0-based).

    Values are as the file holds them (CSV: strings, empty cells None); `plan_rows` converts and
    checks them. A line or record that cannot be parsed becomes a row {"__index__", "__line__",
    "__error__"} so that one bad line costs one row, not the manifest.
    """
    kind = _format_of(url)
    data = _read_all(url, storage_options, timeout_s)
    if kind == "parquet":
        columns, rows = _parse_parquet(url, data)
    elif kind == "csv":
        columns, rows = _parse_csv(url, data)
    else:
        columns, rows = _parse_json_lines(url, data, allow_array=kind == "json")
    if rows or columns:   # a bare "[]" or a header-only file has no columns worth naming
        _check_columns(url, columns)
    if not rows:
        raise ManifestError(f"manifest {url}: has no rows; add at least one row with an id and a prompt")
    for index, row in enumerate(rows):
        row["__index__"] = index
    return rows


def _format_of(url: str) -> str:
    path = urlsplit(url).path if is_remote(url) else url
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        named = f"extension {suffix!r}" if suffix else "no extension"
        raise ManifestError(f"manifest {url}: unknown format ({named}); name it {FORMAT_HINT}")
    return FORMATS[suffix]


def _read_all(url: str, storage_options: dict | None, timeout_s: float) -> bytes:
    try:
        data = read_bytes(url, storage_options, timeout_s)
    except StorageError as err:
        raise ManifestError(f"manifest {url}: {err}") from None
    if data is None:
        where = "no such object; check the URL" if is_remote(url) else "no such file; check the path"
        raise ManifestError(f"manifest {url}: {where}")
    if not data.strip():
        raise ManifestError(f"manifest {url}: the file is empty; write one row per video with an id and a prompt")
    return data


def _check_columns(url: str, columns: dict[str, str]) -> None:
    """`columns`: column name -> where it is first seen (for JSONL, keys vary per line)."""
    allowed = set(ROW_FIELDS) | set(JOB_LEVEL_FIELDS)   # job-level ones are refused per row, clearly
    for name, seen in columns.items():
        if name not in allowed:
            raise ManifestError(f"manifest {url}: unknown column {short(name, 40)}{seen}; "
                                f"{_did_you_mean(name)}valid columns: {', '.join(ROW_FIELDS)}")
    for required in ("id", "prompt"):
        if required not in columns:
            found = ", ".join(short(name, 30) for name in list(columns)[:20]) or "none"
            raise ManifestError(f"manifest {url}: no {required!r} column (columns: {found}); "
                                f"every row needs an id and a prompt")


def _did_you_mean(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, ROW_FIELDS, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _parse_parquet(url: str, data: bytes) -> tuple[dict[str, str], list[dict]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(io.BytesIO(data))
    except (pyarrow.ArrowException, OSError, ValueError) as err:
        raise ManifestError(f"manifest {url}: not a Parquet file ({short(str(err), 100)}); "
                            f"write it with pyarrow.parquet.write_table") from None
    names = table.column_names
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ManifestError(f"manifest {url}: column {short(twice[0], 40)} appears twice; keep one")
    return {name: "" for name in names}, table.to_pylist()


def _parse_csv(url: str, data: bytes) -> tuple[dict[str, str], list[dict]]:
    """Python's csv reader, not pyarrow's: pyarrow reports a malformed record without its line,
    so it could only be dropped or kill the manifest; here it becomes an error row in place."""
    try:
        text = data.decode("utf-8-sig")   # -sig: spreadsheets often start CSV files with a BOM
    except UnicodeDecodeError as err:
        raise ManifestError(f"manifest {url}: not UTF-8 text (bad byte at offset {err.start}); "
                            f"save it as UTF-8 CSV") from None
    records = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(records, [])]
    _check_csv_header(url, header)
    rows: list[dict] = []
    while True:
        first_line = records.line_num + 1
        try:
            record = next(records)
        except StopIteration:
            break
        except csv.Error as err:
            rows.append({"__line__": first_line, "__error__": f"not a valid CSV record ({short(str(err), 80)}); "
                                                              f"fix the quoting"})
            continue
        if record:   # the csv module gives [] for a blank line: not a row
            rows.append(_csv_row(header, record, first_line))
    return {name: "" for name in header}, rows


def _check_csv_header(url: str, header: list[str]) -> None:
    for number, name in enumerate(header, start=1):
        if not name:
            raise ManifestError(f"manifest {url}: column {number} of the header has no name; name it or "
                                f"remove the trailing comma")
        if header.count(name) > 1:
            raise ManifestError(f"manifest {url}: column {short(name, 40)} appears twice in the header; keep one")


def _csv_row(header: list[str], record: list[str], line: int) -> dict:
    if len(record) != len(header):
        return {"__line__": line, "__error__": f"has {len(record)} fields but the header has {len(header)}; "
                                               f"quote fields that contain commas"}
    # an empty cell is "not given": the row takes the job spec's value
    row: dict[str, Any] = {name: (value if value != "" else None) for name, value in zip(header, record)}
    row["__line__"] = line
    return row


def _parse_json_lines(url: str, data: bytes, allow_array: bool) -> tuple[dict[str, str], list[dict]]:
    """One JSON object per line, parsed line by line so that one bad line is one bad row."""
    if allow_array and data.lstrip().startswith((b"[", b"\xef\xbb\xbf[")):
        return _parse_json_array(url, data)
    rows: list[dict] = []
    columns: dict[str, str] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        row, names = _json_line(raw, number)
        rows.append(row)
        for name in names:
            columns.setdefault(name, f" (first at line {number})")
    if rows and all("__error__" in row for row in rows):
        raise ManifestError(f"manifest {url}: no line is a JSON object (line {rows[0]['__line__']}: "
                            f"{rows[0]['__error__']})")
    return columns, rows


def _json_line(raw: bytes, number: int) -> tuple[dict, list[str]]:
    """(row, the line's column names); a bad line is an error row with no columns."""
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        return _bad_line(number, f"not UTF-8 (bad byte at offset {err.start}); save the file as UTF-8")
    except json.JSONDecodeError as err:
        return _bad_line(number, f"not valid JSON ({err.msg} at column {err.colno}); write one JSON object per line")
    if not isinstance(value, dict):
        return _bad_line(number, f"a JSON {type(value).__name__}, not an object; write one JSON object per line")
    # the names come from the file, so a "__line__" key there is an unknown column, not ours
    return {**value, "__line__": number}, list(value)


def _bad_line(number: int, why: str) -> tuple[dict, list[str]]:
    return {"__line__": number, "__error__": why}, []


def _parse_json_array(url: str, data: bytes) -> tuple[dict[str, str], list[dict]]:
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"manifest {url}: not a valid JSON array ({short(str(err), 100)}); "
                            f"fix it or write one JSON object per line (.jsonl)") from None
    rows: list[dict] = []
    columns: dict[str, str] = {}
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            rows.append({"__error__": f"array element {number} is a JSON {type(item).__name__}, not an object"})
            continue
        rows.append(dict(item))
        for name in item:
            columns.setdefault(name, f" (first in element {number})")
    return columns, rows


# ------------------------------------------------------------------------------ planning

@dataclass
class Row:
    """One manifest row: a spec to run, or the one-line reason it cannot run.

    key: the row's object name under `out`, set for every row (a bad row still gets its error
    record) and unique across rows: `safe_key(id)`, or `bad_row_key(index)` when the row has no id
    of its own (missing, invalid, unparseable, or a duplicate: that key is the first row's).
    """

    index: int
    id: str | None
    spec: JobSpec | None
    error: str | None
    key: str | None


def plan_rows(rows: list[dict], base: JobSpec) -> list[Row]:
    """One Row per manifest row: the job spec `base` with the row's fields on top."""
    base_values = base.to_dict(redacted=False)
    first_index_of_id: dict[str, int] = {}
    id_of_key: dict[str, str] = {}
    planned = []
    for position, row in enumerate(rows):
        planned.append(_plan_row(row, row.get("__index__", position), base_values, first_index_of_id, id_of_key))
    return planned


def _plan_row(row: dict, index: int, base_values: dict, first_index_of_id: dict[str, int],
              id_of_key: dict[str, str]) -> Row:
    line = row.get("__line__")
    if "__error__" in row:
        return Row(index, None, None, f"{_where(index, None, line)}: {row['__error__']}", bad_row_key(index))
    row_id, problem = _row_id(row.get("id"))
    if problem:
        return Row(index, None, None, f"{_where(index, None, line)}: {problem}", bad_row_key(index))
    where = _where(index, row_id, line)
    if row_id in first_index_of_id:
        return Row(index, row_id, None, f"{where}: duplicate id {short(row_id, 40)} (first at row "
                                        f"{first_index_of_id[row_id]}); give every row its own id",
                   bad_row_key(index))
    first_index_of_id[row_id] = index
    key = safe_key(row_id)
    if id_of_key.setdefault(key, row_id) != row_id:   # 48 hash bits: never in practice, but checked
        return Row(index, row_id, None, f"{where}: id maps to the same key {key!r} as id "
                                        f"{short(id_of_key[key], 40)}; rename one", bad_row_key(index))
    try:
        spec = _row_spec(row, row_id, base_values)
    except SpecError as err:
        return Row(index, row_id, None, f"{where}: {err}", key)
    return Row(index, row_id, spec, None, key)


def _where(index: int, row_id: str | None, line: int | None) -> str:
    details = ([f"id {short(row_id, 40)}"] if row_id is not None else []) + ([f"line {line}"] if line else [])
    return f"row {index}" + (f" ({', '.join(details)})" if details else "")


def _row_id(value: Any) -> tuple[str | None, str | None]:
    """(id, None), or (None, why it is not a usable id). Integer ids become their decimal text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)   # an int column with a null in it comes out of pandas as floats
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "no id; give every row a non-empty id"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"id {short(value, 40)} is not a string or an integer; use text ids"
    text = str(value)
    if not text.strip():
        return None, "empty id; give every row a non-empty id"
    if len(text) > MAX_ID_CHARS:
        return None, (f"id of {len(text)} characters, at most {MAX_ID_CHARS} allowed "
                      f"(starts {short(text[:40])}); shorten it")
    return text, None


def _row_spec(row: dict, row_id: str, base_values: dict) -> JobSpec:
    given = {name: _coerce(name, value) for name, value in row.items() if not name.startswith("__") and name != "id"}
    given = {name: value for name, value in given.items() if value is not None}   # null: take the job's value
    for name in given:
        if name not in ROW_FIELDS and name not in JOB_LEVEL_FIELDS:   # rows built by hand, not read
            raise SpecError(f"unknown field {short(name, 40)}; {_did_you_mean(str(name))}"
                            f"valid fields: {', '.join(ROW_FIELDS)}")
        if name in JOB_LEVEL_FIELDS:
            raise SpecError(f"field {name!r} is set for the whole job, not per row; "
                            f"remove it from the manifest and set it in the job spec")
    if "prompt" not in given:
        raise SpecError("field 'prompt' is missing; give every row a non-empty prompt")
    values = dict(base_values)
    if "frames" in given or "duration_s" in given:
        values.pop("frames", None)       # the row's length replaces the job's, whichever kind it is
        values.pop("duration_s", None)
    values.update(given)
    if "seed" not in given:
        values["seed"] = default_seed(row_id, base_values["seed"])
    return JobSpec.from_mapping(values, where="row")


def _coerce(name: str, value: Any) -> Any:
    """A number from text for numeric fields (CSV gives strings); NaN (pandas' null) is None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if name in INT_FIELDS:
        return _to_int(name, value)
    if name in FLOAT_FIELDS and isinstance(value, str):
        try:
            return float(value.strip()) if value.strip() else None
        except ValueError:
            raise SpecError(f"spec field {name!r}: {short(value)} is not a number; e.g. 6.0") from None
    return value


def _to_int(name: str, value: Any) -> Any:
    """Integral floats (30.0, "1e3") become ints; anything else is left for JobSpec to refuse."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            raise SpecError(f"spec field {name!r}: {short(value)} is not an integer; e.g. 48") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def default_seed(row_id: str, base_seed: int) -> int:
    """A row's seed when it gives none: depends only on the id and the job's seed, so reordering
    or editing other rows never changes this row's video."""
    material = f"{base_seed}\x00{row_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big") % SEED_MODULUS


# ------------------------------------------------------------------------------ object names

_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
_DOT_RUN = re.compile(r"\.{2,}")


def bad_row_key(index: int) -> str:
    """The key of a row without a usable id of its own. It ends in "bad", never in the 12 hex
    digits every `safe_key` ends in, so it cannot take a good row's place."""
    return f"row-{int(index)}-bad"


def safe_key(row_id: str) -> str:
    """An object name for `row_id` that cannot leave `out`: no "/", no "..", no leading dot, at
    most 93 characters. The readable part is lossy ("a/b" and "a_b" both read "a_b"), so the
    first 12 hex of sha256(id) follow it and distinct ids get distinct keys."""
    readable = _DOT_RUN.sub("_", _UNSAFE_RUN.sub("_", row_id)).lstrip(".-")[:KEY_PREFIX_CHARS]
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_HASH_CHARS]
    return f"{readable or 'id'}-{digest}"
