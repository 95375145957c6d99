"""The job spec at the boundary: one clear line per bad field, unknown fields refused, YAML and
flags, fingerprint, credentials never shown."""
from __future__ import annotations

import math

import pytest

from jobs.spec import JobSpec, SpecError

GOOD = {"prompt": "a red circle moves right", "frames": 48}


def _error(**changes) -> str:
    values = {**GOOD, **changes}
    with pytest.raises(SpecError) as info:
        JobSpec.from_mapping({k: v for k, v in values.items() if v is not ...})
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize("changes, words", [
    ({"guidance": math.inf}, ["'guidance'", "not a finite number"]),
    ({"guidance": math.nan}, ["'guidance'", "not a finite number"]),
    ({"shift": -1.0}, ["'shift'", "> 0"]),
    ({"frames": 0}, ["'frames'", "out of range"]),
    ({"frames": 10**9}, ["'frames'", "out of range"]),
    ({"frames": "48"}, ["'frames'", "not an integer"]),
    ({"frames": True}, ["'frames'", "not an integer"]),
    ({"frames": 2.5}, ["'frames'", "not an integer"]),
    ({"prompt": ""}, ["'prompt'", "empty"]),
    ({"prompt": "x" * 100_000}, ["'prompt'", "100000 characters"]),
    ({"prompt": 7}, ["'prompt'", "not a string"]),
    ({"backend": "gpu"}, ["'backend'", "local, ray"]),
    ({"stages": 2}, ["backend 'ray'"]),
    ({"duration_s": 10.0}, ["exactly one of 'frames'"]),
    ({"frames": ...}, ["exactly one of 'frames'"]),
    ({"storage_options": ["key"]}, ["'storage_options'", "mapping"]),
    ({"accel": "fast"}, ["'accel'", "accel.json"]),
    ({"steps": 0}, ["'steps'"]),
    ({"fps": 0}, ["'fps'"]),
    ({"checkpoint_every": 0}, ["'checkpoint_every'"]),
    ({"base_frames": 8, "overlap": 8}, ["'overlap'", "smaller than base_frames"]),
    ({"seed": -1}, ["'seed'"]),
    ({"duration_s": -3.0, "frames": ...}, ["'duration_s'"]),
])
def test_each_bad_field_is_one_line_naming_it(changes, words):
    message = _error(**changes)
    for word in words:
        assert word in message, message


def test_a_huge_prompt_is_not_echoed():
    message = _error(prompt="y" * 100_000)
    assert message.count("y") < 100


def test_unknown_fields_are_errors_with_a_suggestion():
    message = _error(guidence=6.0)
    assert "unknown field 'guidence'" in message and "did you mean 'guidance'" in message


def test_yaml_file_and_flag_overrides(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("prompt: a blue square bounces\nduration_s: 60\nseed: 4\nout: s3://bucket/run\n"
                    "storage_options:\n  key: AKIAEXAMPLE\n  secret: hunter2\n")
    spec = JobSpec.from_yaml(str(path))
    assert spec.duration_s == 60.0 and spec.seed == 4 and spec.frames is None
    assert spec.frame_count(8) == 480
    overridden = JobSpec.from_yaml(str(path), {"seed": 9, "frames": 16, "guidance": None})
    assert overridden.seed == 9 and overridden.frames == 16 and overridden.duration_s is None
    shown = str(spec.to_dict(redacted=True))
    assert "hunter2" not in shown and "AKIAEXAMPLE" not in shown
    assert "hunter2" not in spec.fingerprint()


@pytest.mark.parametrize("text, words", [
    ("prompt: [unclosed\n", ["not valid YAML", "line"]),
    ("- a list\n", ["mapping"]),
    ("frames: 3\n", ["'prompt' is required"]),
])
def test_bad_yaml_files(tmp_path, text, words):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        JobSpec.from_yaml(str(path))
    for word in words:
        assert word in str(info.value)
    with pytest.raises(SpecError, match="no such file"):
        JobSpec.from_yaml(str(tmp_path / "absent.yaml"))


def test_fingerprint_covers_what_changes_bytes_only():
    base = JobSpec(**GOOD)
    assert base.fingerprint() == JobSpec(**GOOD, out="elsewhere", checkpoint_every=5,
                                         storage_options={"key": "k"}).fingerprint()
    assert base.fingerprint() != JobSpec(**{**GOOD, "frames": 49}).fingerprint()
    assert base.fingerprint() != JobSpec(**GOOD, seed=1).fingerprint()
    diff = JobSpec(**GOOD, seed=1).differences(base.to_dict())
    assert diff == ["seed: 0 there vs 1 now"]


def test_a_day_of_video_is_the_limit():
    spec = JobSpec(prompt="a red circle moves right", duration_s=86400.0)
    assert spec.frame_count(8) == 8 * 86400
    with pytest.raises(SpecError, match="at most 24 h"):
        JobSpec(prompt="a red circle moves right", frames=10**7).frame_count(8)


def test_a_spec_full_of_bad_values_names_every_field_in_one_line():
    message = _error(guidance=math.inf, frames=0, backend="gpu", steps=-1, prompt="", fps=1000)
    assert message.startswith("6 bad spec fields:"), message
    for name in ("'guidance'", "'frames'", "'backend'", "'steps'", "'prompt'", "'fps'"):
        assert name in message, (name, message)
