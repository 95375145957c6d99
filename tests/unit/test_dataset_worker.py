"""The dataset job's worker without Ray: rows of one shape and accelerator batched (each video
with its own accelerator state), a committed row never made again, a row the model cannot take
recorded as an error."""
from __future__ import annotations

import json

import numpy as np

from jobs.dataset import VideoMaker, _batches, _row_spec
from jobs.manifest import plan_rows
from jobs.setup import describe, load
from jobs.spec import JobSpec
from jobs.video import read_video


def _items(rows, base):
    planned = plan_rows([{**r, "__index__": i} for i, r in enumerate(rows)], base)
    return planned, {"key": [r.key for r in planned],
                     "item": [json.dumps({"index": r.index, "id": r.id, "spec": _row_spec(r.spec)}) for r in planned]}


def test_worker_batches_by_shape_commits_once_and_records_bad_prompts(tmp_path):
    base = JobSpec(prompt="(set per row)", frames=8, steps=2, accel="none", out=str(tmp_path))
    rows = [{"id": "a", "prompt": "a red circle moves right"}, {"id": "b", "prompt": "a blue square bounces"},
            {"id": "c", "prompt": "a green triangle stays still", "accel": "scope"},
            {"id": "d", "prompt": "a dragon flies"}]
    planned, batch = _items(rows, base)
    worker = VideoMaker(str(tmp_path), {}, 10.0)
    out = worker(batch)
    status = dict(zip(out["id"], out["status"]))
    assert status == {"a": "done", "b": "done", "c": "done", "d": "error"}
    assert "does not know the word" in out["error"][3] and all(out["fresh"])
    for key in out["key"][:3]:
        assert read_video(str(tmp_path / "videos" / f"{key}.mp4")).shape == (8, 64, 64, 3)
        assert (tmp_path / "rows" / f"{key}.json").is_file()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = worker(batch)                                  # a retried batch: nothing is made twice
    assert not any(again["fresh"]) and again["status"] == out["status"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before

    # a and b (no accel, one shape) were denoised together; each equals its video made alone
    alone = VideoMaker(str(tmp_path / "alone"), {}, 10.0)
    single = {"key": batch["key"][:1], "item": batch["item"][:1]}
    alone(single)
    key = batch["key"][0]
    together = read_video(str(tmp_path / "videos" / f"{key}.mp4")).astype(int)
    by_itself = read_video(str(tmp_path / "alone" / "videos" / f"{key}.mp4")).astype(int)
    assert np.abs(together - by_itself).max() <= 2


def test_rows_are_grouped_by_shape_and_accelerator():
    base = JobSpec(prompt="(set per row)", frames=8, steps=2, accel="none")
    specs = [base.with_overrides(prompt="a red circle moves right"),
             base.with_overrides(prompt="a blue square bounces"),
             base.with_overrides(prompt="a blue square bounces", frames=16),
             base.with_overrides(prompt="a red circle moves right", accel="scope"),
             base.with_overrides(prompt="a green triangle stays still", accel="scope", seed=5),
             base.with_overrides(prompt="a green triangle stays still", accel="teacache")]
    models: dict = {}
    ready = [(None, describe(s), None) for s in specs]
    groups = _batches([(i, plan, load(plan, models)) for i, (_, plan, _) in enumerate(ready)])
    assert sorted(sorted(e[0] for e in g) for g in groups) == [[0, 1], [2], [3, 4], [5]]


def test_accelerated_rows_batched_together_equal_each_made_alone(tmp_path):
    """Two SCOPE rows in one batch: each video, its modes and its compute fraction are those of
    the row made by itself (its own decisions, not its batch-mate's)."""
    base = JobSpec(prompt="(set per row)", frames=16, steps=8, accel="scope", out=str(tmp_path))
    rows = [{"id": "p", "prompt": "a red circle moves right", "seed": 1},
            {"id": "q", "prompt": "a blue square bounces", "seed": 2}]
    planned, batch = _items(rows, base)
    together = VideoMaker(str(tmp_path / "together"), {}, 10.0)(batch)
    for i, key in enumerate(batch["key"]):
        alone = VideoMaker(str(tmp_path / f"alone{i}"), {}, 10.0)({"key": [key], "item": [batch["item"][i]]})
        assert alone["status"] == ["done"] and together["status"][i] == "done"
        assert alone["modes"][0] == together["modes"][i]
        assert alone["block_eval_fraction"][0] == together["block_eval_fraction"][i] < 1.0
        a = read_video(str(tmp_path / f"alone{i}" / "videos" / f"{key}.mp4")).astype(int)
        b = read_video(str(tmp_path / "together" / "videos" / f"{key}.mp4")).astype(int)
        assert np.abs(a - b).max() <= 2


def test_job_level_faults_are_raised_not_recorded_and_a_nan_video_spares_its_batch(tmp_path, monkeypatch):
    import pytest

    from jobs import runner
    from jobs.setup import DeviceError

    base = JobSpec(prompt="(set per row)", frames=8, steps=2, accel="none", out=str(tmp_path))
    rows = [{"id": "a", "prompt": "a red circle moves right"}, {"id": "b", "prompt": "a blue square bounces"}]
    _, batch = _items(rows, base)
    worker = VideoMaker(str(tmp_path), {}, 10.0)

    def no_gpu(spec):
        raise DeviceError("spec field 'device': 'cuda' but this machine shows 0 CUDA GPU(s)")

    monkeypatch.setattr("jobs.setup.resolve_device", no_gpu)
    with pytest.raises(DeviceError):
        worker(batch)
    assert not (tmp_path / "rows").exists(), "a job-level fault was recorded as row errors"
    monkeypatch.undo()

    real = runner.run_batch

    def poisoned(runs, pipeline):
        if len(runs) > 1:
            raise runner.RunFault("segment 0: the model produced NaN or inf latents")
        return real(runs, pipeline)

    monkeypatch.setattr(runner, "run_batch", poisoned)
    out = worker(batch)
    assert out["status"] == ["done", "done"], out["error"]    # retried alone, each on its own
