"""The dataset manifest: every format reads to the same rows, a manifest that cannot work fails at
once in one line, a bad row costs only itself, seeds follow ids, object names stay inside `out`."""
from __future__ import annotations

import csv
import json
import re
import time

import fsspec
import pyarrow
import pyarrow.parquet
import pytest

from jobs.manifest import (FLOAT_FIELDS, INT_FIELDS, JOB_LEVEL_FIELDS, ROW_FIELDS, ManifestError, Row,
                           bad_row_key, default_seed, plan_rows, read_manifest, safe_key)
from jobs.spec import JobSpec

BASE = JobSpec(prompt="the job's prompt", frames=48, steps=30, out="out/dataset")
ROWS = [{"id": "cat", "prompt": "a cat walks", "frames": 24},
        {"id": "dog", "prompt": "a dog runs", "seed": 7},
        {"id": "owl", "prompt": "an owl blinks", "duration_s": 2.5, "guidance": 4.0}]


# ------------------------------------------------------------------------------ writers

def _write_parquet(path, rows):
    names = list(dict.fromkeys(name for row in rows for name in row))   # from_pylist reads row 0's only
    pyarrow.parquet.write_table(pyarrow.table({name: [row.get(name) for row in rows] for name in names}), path)
    return str(path)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _write_csv(path, rows):
    names = list(dict.fromkeys(name for row in rows for name in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


WRITERS = {"parquet": _write_parquet, "jsonl": _write_jsonl, "json": _write_jsonl, "csv": _write_csv}


def _manifest_error(url, **kwargs) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(url, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"manifest {url}: "), message
    return message


def _without_markers(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("__")}


# ------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_each_format_round_trips_to_the_same_specs(tmp_path, kind):
    url = WRITERS[kind](tmp_path / f"prompts.{kind}", ROWS)
    rows = read_manifest(url)
    assert [row["__index__"] for row in rows] == [0, 1, 2]
    planned = plan_rows(rows, BASE)
    assert [row.error for row in planned] == [None, None, None]
    cat, dog, owl = (row.spec for row in planned)
    assert (cat.prompt, cat.frames, cat.duration_s, cat.steps) == ("a cat walks", 24, None, 30)
    assert (dog.frames, dog.seed) == (48, 7)              # the job's length, the row's seed
    assert (owl.frames, owl.duration_s, owl.guidance) == (None, 2.5, 4.0)  # row's length replaces job's
    assert cat.out == BASE.out                            # job-level fields come from the job
    assert [row.id for row in planned] == ["cat", "dog", "owl"]
    assert planned[0].key == safe_key("cat")


def test_rows_are_plain_dicts_with_none_for_nulls(tmp_path):
    url = _write_parquet(tmp_path / "m.parquet", [{"id": "a", "prompt": "x", "steps": None},
                                                  {"id": "b", "prompt": "y", "steps": 12}])
    assert [_without_markers(row) for row in read_manifest(url)] == [
        {"id": "a", "prompt": "x", "steps": None}, {"id": "b", "prompt": "y", "steps": 12}]
    assert [row.spec.steps for row in plan_rows(read_manifest(url), BASE)] == [30, 12]  # null: job's


def test_csv_reads_text_and_converts_numbers_per_field(tmp_path):
    url = tmp_path / "m.csv"
    url.write_text('\ufeffid, prompt ,frames,seed,guidance\n'
                   '1,"a cat, on a mat",24,"7",6.5\n'
                   '2,"two\nlines",,,\n'
                   '3,x,1e2,30.0,\n')
    rows = read_manifest(str(url))
    assert rows[0]["prompt"] == "a cat, on a mat" and rows[0]["frames"] == "24"
    assert rows[1]["frames"] is None                      # an empty cell is "not given"
    first, second, third = plan_rows(rows, BASE)
    assert (first.spec.frames, first.spec.seed, first.spec.guidance) == (24, 7, 6.5)
    assert (second.spec.prompt, second.spec.frames) == ("two\nlines", 48)
    assert (third.spec.frames, third.spec.seed) == (100, 30)


def test_json_array_is_read_too(tmp_path):
    url = tmp_path / "m.json"
    url.write_text(json.dumps(ROWS, indent=2))
    assert [row.spec.prompt for row in plan_rows(read_manifest(str(url)), BASE)] == [
        "a cat walks", "a dog runs", "an owl blinks"]


def test_integer_ids_become_text(tmp_path):
    url = _write_jsonl(tmp_path / "m.jsonl", [{"id": 17, "prompt": "x"}, {"id": "17", "prompt": "y"}])
    first, second = plan_rows(read_manifest(url), BASE)
    assert first.id == "17" and first.spec is not None
    assert "duplicate id '17' (first at row 0)" in second.error


# ------------------------------------------------------------------------------ unreadable manifests

def test_unreadable_manifests_fail_at_once_in_one_line(tmp_path):
    assert "no such file" in _manifest_error(str(tmp_path / "missing.parquet"))
    (tmp_path / "m.txt").write_text("id,prompt\n1,x\n")
    message = _manifest_error(str(tmp_path / "m.txt"))
    assert "unknown format" in message and all(ext in message for ext in (".parquet", ".jsonl", ".json", ".csv"))
    assert "no extension" in _manifest_error(str(tmp_path / "manifest"))
    (tmp_path / "garbage.parquet").write_bytes(b"\x00\x01not parquet at all" * 50)
    message = _manifest_error(str(tmp_path / "garbage.parquet"))
    assert "not a Parquet file" in message and "pyarrow.parquet.write_table" in message
    for name in ("empty.parquet", "empty.jsonl", "empty.csv"):
        (tmp_path / name).write_bytes(b"")
        assert "empty" in _manifest_error(str(tmp_path / name))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    assert "empty" in _manifest_error(str(tmp_path / "blank.jsonl"))


def test_remote_manifests_read_through_storage():
    fs = fsspec.filesystem("memory")
    root = f"memory://manifest-test-{time.monotonic_ns()}"
    try:
        fs.pipe(f"{root}/m.jsonl", b'{"id": "a", "prompt": "x"}\n')
        (row,) = plan_rows(read_manifest(f"{root}/m.jsonl", storage_options={}), BASE)
        assert row.spec.prompt == "x"
        assert "no such object; check the URL" in _manifest_error(f"{root}/missing.parquet")
        assert "unknown format (extension '.txt')" in _manifest_error(f"{root}/m.txt?version=2")
    finally:
        fs.rm(root[len("memory://"):], recursive=True)


def test_a_folder_is_a_storage_error_in_one_line(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    assert "check the path" in _manifest_error(str(tmp_path / "folder.csv"))


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_missing_prompt_or_id_column_fails_at_once(tmp_path, kind):
    message = _manifest_error(WRITERS[kind](tmp_path / f"a.{kind}", [{"id": "a", "frames": 3}]))
    assert "no 'prompt' column (columns: 'id', 'frames')" in message
    message = _manifest_error(WRITERS[kind](tmp_path / f"b.{kind}", [{"prompt": "x"}]))
    assert "no 'id' column" in message


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_an_unknown_column_fails_the_whole_manifest(tmp_path, kind):
    rows = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "gudiance": 3.0}]
    message = _manifest_error(WRITERS[kind](tmp_path / f"m.{kind}", rows))
    assert "unknown column 'gudiance'" in message and "did you mean 'guidance'?" in message
    assert "valid columns: id, prompt" in message


def test_unknown_column_messages_name_where_and_csv_header_faults(tmp_path):
    assert "(first at line 2)" in _manifest_error(_write_jsonl(
        tmp_path / "m.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "__index__": 5}]))
    (tmp_path / "trailing.csv").write_text("id,prompt,\n1,x,\n")
    assert "column 3 of the header has no name" in _manifest_error(str(tmp_path / "trailing.csv"))
    (tmp_path / "twice.csv").write_text("id,prompt,prompt\n1,x,y\n")
    assert "'prompt' appears twice" in _manifest_error(str(tmp_path / "twice.csv"))
    (tmp_path / "latin1.csv").write_bytes("id,prompt\n1,café\n".encode("latin-1"))
    assert "not UTF-8" in _manifest_error(str(tmp_path / "latin1.csv"))


def test_manifests_without_rows_fail(tmp_path):
    (tmp_path / "header.csv").write_text("id,prompt\n")
    assert "has no rows" in _manifest_error(str(tmp_path / "header.csv"))
    (tmp_path / "none.json").write_text("[]")
    assert "has no rows" in _manifest_error(str(tmp_path / "none.json"))
    url = str(tmp_path / "none.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"id": pyarrow.array([], pyarrow.string()),
                                               "prompt": pyarrow.array([], pyarrow.string())}), url)
    assert "has no rows" in _manifest_error(url)


def test_garbage_named_jsonl_fails_at_once(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
    assert "no line is a JSON object (line 1" in _manifest_error(str(tmp_path / "m.jsonl"))


# ------------------------------------------------------------------------------ bad rows

def _planned(tmp_path, kind, rows) -> list[Row]:
    return plan_rows(read_manifest(WRITERS[kind](tmp_path / f"m.{kind}", rows)), BASE)


def test_each_bad_row_gets_its_own_error_and_good_rows_their_spec(tmp_path):
    rows = [{"id": "ok-1", "prompt": "fine", "frames": 12, "seed": 3, "out": None},
            {"id": "empty-prompt", "prompt": "", "frames": None, "seed": None, "out": None},
            {"id": None, "prompt": "no id", "frames": None, "seed": None, "out": None},
            {"id": "bad-frames", "prompt": "x", "frames": "abc", "seed": None, "out": None},
            {"id": "half-seed", "prompt": "x", "frames": None, "seed": 1.5, "out": None},
            {"id": "long", "prompt": "p" * 5000, "frames": None, "seed": None, "out": None},
            {"id": "ok-1", "prompt": "again", "frames": None, "seed": None, "out": None},
            {"id": "own-out", "prompt": "x", "frames": None, "seed": None, "out": "elsewhere"},
            {"id": "ok-2", "prompt": "fine too", "frames": None, "seed": None, "out": None},
            {"id": "ok-1", "prompt": "third", "frames": None, "seed": None, "out": None}]
    # jsonl keeps each value's type (frames "abc" as text, seed 1.5 as a float)
    planned = _planned(tmp_path, "jsonl", rows)
    errors = [row.error for row in planned]
    for message in filter(None, errors):
        assert "\n" not in message and len(message) < 400, message
    assert planned[0].spec.frames == 12 and planned[0].spec.seed == 3 and errors[0] is None
    assert errors[1].startswith("row 1 (id 'empty-prompt', line 2): ") and "'prompt' is empty" in errors[1]
    assert errors[2] == "row 2 (line 3): no id; give every row a non-empty id"
    assert errors[3].startswith("row 3 (id 'bad-frames', line 4): spec field 'frames': 'abc' is not an integer")
    assert "spec field 'seed': 1.5 is not an integer" in errors[4]
    assert "spec field 'prompt': 5000 characters, at most 2000" in errors[5] and "p" * 100 not in errors[5]
    assert errors[6] == ("row 6 (id 'ok-1', line 7): duplicate id 'ok-1' (first at row 0); "
                         "give every row its own id")
    assert "field 'out' is set for the whole job, not per row" in errors[7]
    assert errors[8] is None and planned[8].spec.prompt == "fine too" and planned[8].spec.out == BASE.out
    assert "duplicate id 'ok-1' (first at row 0)" in errors[9]
    assert [row.spec is None for row in planned] == [e is not None for e in errors]
    assert (planned[2].key, planned[6].key, planned[9].key) == ("row-2-bad", "row-6-bad", "row-9-bad")
    assert planned[3].key == safe_key("bad-frames")               # a bad spec keeps its id's key
    assert len({row.key for row in planned}) == len(planned)      # every row has its own key


def test_csv_bad_rows(tmp_path):
    url = tmp_path / "m.csv"
    url.write_text("id,prompt,seed,frames\n"
                   'a,x,"7",\n'          # "7" -> 7
                   "b,x,abc,\n"
                   "c,x,1.5,\n"
                   "d,x,,0\n"
                   "e,x\n"                # too few fields
                   "f,x,1,2,3\n"          # too many: an unquoted comma in a prompt
                   ",x,,\n"
                   "g,,,\n"
                   "h,x,,2\n")
    planned = plan_rows(read_manifest(str(url)), BASE)
    errors = [row.error for row in planned]
    assert errors[0] is None and planned[0].spec.seed == 7
    assert "spec field 'seed': 'abc' is not an integer" in errors[1]
    assert "spec field 'seed': 1.5 is not an integer" in errors[2]
    assert "spec field 'frames': 0 is out of range" in errors[3]
    assert errors[4] == "row 4 (line 6): has 2 fields but the header has 4; quote fields that contain commas"
    assert errors[5].startswith("row 5 (line 7): has 5 fields")
    assert "no id" in errors[6]
    assert errors[7] == "row 7 (id 'g', line 9): field 'prompt' is missing; give every row a non-empty prompt"
    assert errors[8] is None and planned[8].spec.frames == 2


def test_bad_jsonl_lines_cost_one_row(tmp_path):
    url = tmp_path / "m.jsonl"
    url.write_bytes(b'{"id": "a", "prompt": "x"}\n'
                    b'{"id": "b", "prompt": \n'
                    b'[1, 2]\n'
                    b'\n'
                    b'{"id": "c", "prompt": "\xff"}\n'
                    b'{"id": "d", "prompt": "y"}\r\n')
    planned = plan_rows(read_manifest(str(url)), BASE)
    assert [row.index for row in planned] == [0, 1, 2, 3, 4]
    assert planned[0].error is None and planned[4].error is None and planned[4].spec.prompt == "y"
    assert planned[1].error.startswith("row 1 (line 2): not valid JSON")
    assert planned[2].error == "row 2 (line 3): a JSON list, not an object; write one JSON object per line"
    assert planned[3].error.startswith("row 3 (line 5): not UTF-8")


@pytest.mark.parametrize("value, words", [
    ("", "empty id"), ("   ", "empty id"), (True, "not a string or an integer"),
    (1.5, "not a string or an integer"), ([1], "not a string or an integer"),
    ("x" * 300, "id of 300 characters, at most 256")])
def test_bad_ids(value, words):
    (row,) = plan_rows([{"id": value, "prompt": "x"}], BASE)
    assert words in row.error and row.spec is None and row.key == "row-0-bad" and len(row.error) < 300


def test_numbers_from_text_and_pandas_floats():
    rows = [{"id": 3.0, "prompt": "x", "steps": 20.0, "guidance": "5", "shift": float("nan")},
            {"id": "b", "prompt": "x", "guidance": "strong"},
            {"id": "c", "prompt": "x", "frames": " 12 ", "duration_s": None}]
    first, second, third = plan_rows(rows, BASE)
    assert (first.id, first.spec.steps, first.spec.guidance, first.spec.shift) == ("3", 20, 5.0, None)
    assert "spec field 'guidance': 'strong' is not a number" in second.error
    assert third.spec.frames == 12


def test_a_row_may_set_both_lengths_only_to_be_told():
    (row,) = plan_rows([{"id": "a", "prompt": "x", "frames": 3, "duration_s": 1.0}], BASE)
    assert "exactly one of 'frames'" in row.error
    (row,) = plan_rows([{"id": "a", "prompt": "x", "duration_s": 1.0}],
                       JobSpec(prompt="p", duration_s=5.0))
    assert (row.spec.frames, row.spec.duration_s) == (None, 1.0)


def test_job_level_and_unknown_fields_in_hand_built_rows():
    for name in JOB_LEVEL_FIELDS:
        (row,) = plan_rows([{"id": "a", "prompt": "x", name: 2}], BASE)
        assert f"field {name!r} is set for the whole job" in row.error
    (row,) = plan_rows([{"id": "a", "prompt": "x", "promt": "y"}], BASE)
    assert "unknown field 'promt'; did you mean 'prompt'?" in row.error


def test_row_fields_and_numeric_types():
    assert ROW_FIELDS[:3] == ("id", "prompt", "frames") and not set(ROW_FIELDS) & set(JOB_LEVEL_FIELDS)
    assert set(INT_FIELDS) == {"frames", "seed", "steps", "ar_step", "causal_block_size", "base_frames",
                               "overlap", "fps", "addnoise_condition"}
    assert set(FLOAT_FIELDS) == {"duration_s", "shift", "guidance"}


# ------------------------------------------------------------------------------ seeds

def test_default_seed_follows_the_id_not_the_position():
    rows = [{"id": f"clip-{n}", "prompt": f"prompt {n}"} for n in range(20)]
    forward = {row.id: row.spec.seed for row in plan_rows(rows, BASE)}
    backward = {row.id: row.spec.seed for row in plan_rows(rows[::-1][:15], BASE)}
    assert all(forward[row_id] == seed for row_id, seed in backward.items())
    assert len(set(forward.values())) == 20 and all(0 <= s < 2**31 for s in forward.values())
    assert forward["clip-3"] == default_seed("clip-3", BASE.seed)
    other_take = plan_rows(rows, BASE.with_overrides(seed=1))
    assert all(row.spec.seed != forward[row.id] for row in other_take)   # a new job seed: a new take
    (explicit,) = plan_rows([{"id": "clip-3", "prompt": "p", "seed": 0}], BASE)
    assert explicit.spec.seed == 0


# ------------------------------------------------------------------------------ keys

HOSTILE_IDS = ["../x", "/abs", "a/b", "a_b", "a b", "..", ".", "", "...", ".hidden", "a/../../b", "\\win\\path",
               "C:\\x", "naïve", "日本語", "日本", "\x00", "\n", "tab\there", "x" * 1000, "x" * 1001,
               "-rf", "\ud800", "a..b", "A", "a", "%2e%2e", "~", "con", " ", "a" * 80 + "/..",
               "emoji 🎬"]


def test_safe_key_never_escapes_and_never_collides():
    keys = [safe_key(row_id) for row_id in HOSTILE_IDS]
    for key in keys:
        assert "/" not in key and "\\" not in key and ".." not in key, key
        assert not key.startswith((".", "-")) and 13 < len(key) <= 93, key
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in key), key
    assert len(set(keys)) == len(keys)
    assert keys == [safe_key(row_id) for row_id in HOSTILE_IDS]      # deterministic
    assert safe_key("clip-7").startswith("clip-7-") and safe_key("a/b").startswith("a_b-")


def test_a_key_collision_is_an_error_not_an_overwrite(monkeypatch):
    monkeypatch.setattr("jobs.manifest.safe_key", lambda row_id: "same")
    first, second = plan_rows([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}], BASE)
    assert first.error is None and "maps to the same key 'same' as id 'a'" in second.error
    assert second.key == "row-1-bad"


def test_bad_row_keys_never_equal_a_safe_key():
    assert re.fullmatch(r".*-[0-9a-f]{12}", safe_key("row-3-bad"))
    assert not re.fullmatch(r".*-[0-9a-f]{12}", bad_row_key(3))


# ------------------------------------------------------------------------------ speed

@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_a_thousand_rows_plan_in_well_under_a_second(tmp_path, kind):
    rows = [{"id": f"clip-{n:05d}", "prompt": f"a red circle number {n} moves right", "frames": 24 + n % 5,
             "guidance": 5.0} for n in range(1000)]
    url = WRITERS[kind](tmp_path / f"m.{kind}", rows)
    start = time.perf_counter()
    planned = plan_rows(read_manifest(url), BASE)
    elapsed = time.perf_counter() - start
    print(f"{kind}: 1000 rows read and planned in {elapsed * 1000:.0f} ms")
    assert all(row.error is None for row in planned) and len({row.key for row in planned}) == 1000
    assert elapsed < 1.0
