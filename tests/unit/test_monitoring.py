"""Metric definitions and publishers without Ray: names follow Prometheus conventions, labels are
bounded, and the series published from the plain stats objects equal those objects (a real
segment loop on the tiny model included)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from monitoring import metrics as M
from monitoring.publish import JobMetrics, MemorySink, failure_reason, model_label
from scope.stats import RequestStats

NAME = re.compile(r"^scope_[a-z][a-z0-9_]*[a-z0-9]$")
BASE_UNITS = ("_seconds", "_bytes", "_ratio", "_total", "_gpus", "_depth", "_in_flight")


def test_every_metric_follows_prometheus_conventions():
    assert len({m.name for m in M.METRICS}) == len(M.METRICS), "a metric is defined twice"
    for m in M.METRICS:
        assert NAME.match(m.name), m.name
        assert m.help and m.help[0].isupper(), f"{m.name}: help text"
        if m.kind == M.COUNTER:
            assert m.name.endswith("_total") and not m.ray_name.endswith("_total"), m.name
            assert m.series == f"ray_{m.name}"
        else:
            assert not m.name.endswith("_total"), f"{m.name}: only counters end in _total"
        if m.kind == M.HISTOGRAM:
            assert m.name.endswith("_seconds") and list(m.buckets) == sorted(set(m.buckets)) and m.buckets[0] > 0
            assert m.series_names() == tuple(f"ray_{m.name}_{p}" for p in ("bucket", "sum", "count"))
        assert m.name.endswith(BASE_UNITS), f"{m.name}: say the unit (base units only)"
        assert not any(u in m.name for u in ("_ms", "_milliseconds", "_mb", "_kb", "_percent")), m.name
        for label in m.labels:
            assert label in M.LABEL_VALUES or label in ("model", "method", "job_id", "stage", "sp_rank"), \
                f"{m.name}: label {label} has no bounded value set"
            assert label not in ("job", "instance"), f"{m.name}: {label} is Prometheus's own label"


def test_labels_are_checked_and_free_form_values_are_made_safe():
    with pytest.raises(ValueError, match="not one of"):
        M.check_labels(M.CHUNK_MODES, {"job_kind": "dataset", "model": "m", "method": "scope", "mode": "magic"})
    with pytest.raises(ValueError, match="takes labels"):
        M.check_labels(M.FRAMES_GENERATED, {"job_kind": "dataset"})
    assert model_label("procedural", "/anything") == "procedural"
    assert model_label("tiny", "tiny") == "tiny"
    label = model_label("checkpoint", "s3://AKIAKEY:secret@bucket/models/SkyReels-V2-DF-14B-720P/?versionId=3")
    assert label == "SkyReels-V2-DF-14B-720P" and "secret" not in label
    assert len(M.free_label("x" * 500)) == M.MAX_LABEL_CHARS and M.free_label("a b/c") == "a_b_c"


def _stats(modes: dict[str, int], evals: int, full: int) -> RequestStats:
    stats = RequestStats(request="r/seg0", method="scope", block_evals=evals, block_evals_full=full)
    chunk = 0
    for mode, n in modes.items():
        for _ in range(n):
            stats.record_mode(chunk % 3, mode, "test")
            chunk += 1
    return stats


def test_a_segment_publishes_its_frames_steps_modes_and_saved_work():
    sink = MemorySink()
    metrics = JobMetrics("long_video", sink=sink)
    for k in range(2):
        info = SimpleNamespace(model_calls=8, row_seconds=[0.02, 0.04, 0.03, 0.05],
                               accel_stats=_stats({"recompute": 5, "cache": 2, "predict": 3, "skip": 2}, 30, 48))
        metrics.segment_done(info, 12, model="procedural", method="scope")
    labels = {"job_kind": "long_video", "model": "procedural"}
    assert sink.get(M.FRAMES_GENERATED, **labels) == 24 and sink.get(M.SEGMENTS_FINISHED, **labels) == 2
    assert sink.get(M.MODEL_CALLS, **labels) == 16
    assert sink.get(M.STEP_SECONDS, **labels) == [0.02, 0.04, 0.03, 0.05] * 2
    by_mode = {m: sink.get(M.CHUNK_MODES, **labels, method="scope", mode=m) for m in M.MODES}
    assert by_mode == {"recompute": 10, "cache": 4, "predict": 6, "skip": 4}
    assert sum(by_mode.values()) == sink.get(M.CHUNK_CALLS, **labels, method="scope") == 24
    assert sink.get(M.BLOCK_EVALS_RUN, **labels, method="scope") == 60
    assert sink.get(M.BLOCK_EVALS_SAVED, **labels, method="scope") == 36


def test_progress_moves_the_last_progress_time_only_when_work_finishes():
    now = [1000.0]
    sink = MemorySink()
    metrics = JobMetrics("dataset", sink=sink, job_id="02000000", clock=lambda: now[0])
    labels = {"job_kind": "dataset", "job_id": "02000000"}
    metrics.progress(0, 4)
    now[0] = 1010.0
    metrics.progress(0, 4)                                   # nothing finished: the time stays
    assert sink.get(M.JOB_LAST_PROGRESS, **labels) == 1000.0 and sink.get(M.QUEUE_DEPTH, **labels) == 4
    now[0] = 1020.0
    metrics.progress(3, 4)
    assert sink.get(M.JOB_LAST_PROGRESS, **labels) == 1020.0
    assert sink.get(M.JOB_PROGRESS, **labels) == 0.75 and sink.get(M.QUEUE_DEPTH, **labels) == 1
    metrics.progress(0, 0)
    assert sink.get(M.JOB_PROGRESS, **labels) == 1.0, "an empty job is done"


def test_stage_counters_are_published_as_increments_and_survive_a_reset():
    sink = MemorySink()
    metrics = JobMetrics("long_video", sink=sink)
    metrics.stage_done(SimpleNamespace(calls=10, busy_s=2.0), stage=1, sp_rank=0, cache_bytes=4096)
    metrics.stage_done(SimpleNamespace(calls=25, busy_s=5.5), stage=1, sp_rank=0, cache_bytes=1024)
    metrics.stage_done(SimpleNamespace(calls=4, busy_s=1.0), stage=1, sp_rank=0, cache_bytes=None)  # reset
    assert sink.get(M.STAGE_CALLS, stage="1", sp_rank="0") == 29
    assert sink.get(M.STAGE_BUSY, stage="1", sp_rank="0") == pytest.approx(6.5)
    assert sink.get(M.CACHE_BYTES, job_kind="long_video", stage="1", sp_rank="0") == 1024


def test_failed_rows_get_a_bounded_reason_and_workers_zero_their_counters():
    from jobs.runner import RunFault
    from jobs.spec import SpecError

    assert failure_reason(RunFault("nan")) == "non_finite"
    assert failure_reason(SpecError("bad field")) == "invalid_row"
    assert failure_reason(ValueError("does not know the word")) == "rejected"
    assert failure_reason(KeyError("x")) == "rejected"
    sink = MemorySink()
    metrics = JobMetrics("dataset", sink=sink)
    metrics.worker_started(gpus=1, restart_kind="video_maker")     # no Ray: not a restart
    assert {r: sink.get(M.ROWS_FAILED, reason=r) for r in M.FAIL_REASONS} == dict.fromkeys(M.FAIL_REASONS, 0.0)
    assert sink.get(M.WORKER_RESTARTS, kind="video_maker") == 0.0
    assert sink.get(M.WORKER_GPUS, job_kind="dataset") == 1
    metrics.restart_seen("video_maker", reconstructed=True)
    metrics.row_failed("rejected", 2)
    assert sink.get(M.WORKER_RESTARTS, kind="video_maker") == 1 and sink.get(M.ROWS_FAILED, reason="rejected") == 2


class _Frames:
    def __init__(self):
        self.segments: dict[int, np.ndarray] = {}

    def has_segment(self, index: int) -> bool:
        return index in self.segments

    def write_segment(self, index: int, frames: np.ndarray) -> None:
        self.segments[index] = frames


def test_the_segment_loop_feeds_series_equal_to_its_own_stats():
    """A real run (tiny model, SCOPE, local backend): the published series equal stats.json."""
    from jobs.runner import VideoRun, open_sampler, summary_stats
    from jobs.setup import describe, load
    from jobs.spec import JobSpec

    spec = JobSpec(prompt="a test", frames=49, seed=1, model="tiny", steps=3, base_frames=6, overlap=2,
                   ar_step=1, accel="scope")
    plan = describe(spec)
    loaded = load(plan)
    sink = MemorySink()
    metrics = JobMetrics("long_video", sink=sink, job_id="01000000")
    with open_sampler(plan, loaded) as sampler:
        summary = VideoRun(plan, loaded, sampler, _Frames(), None,
                           on_segment=metrics.segment_observer(plan, accel=sampler.accel, job_progress=True)).run()
    stats = summary_stats(plan, summary)
    labels = {"job_kind": "long_video", "model": "tiny"}
    assert sink.get(M.FRAMES_GENERATED, **labels) == stats["frames"] == 49
    assert sink.get(M.SEGMENTS_FINISHED, **labels) == len(plan.segments) >= 3
    assert sink.get(M.MODEL_CALLS, **labels) == stats["model_calls"]
    assert len(sink.get(M.STEP_SECONDS, **labels)) == stats["rows"]
    by_mode = {m: sink.get(M.CHUNK_MODES, **labels, method="scope", mode=m) for m in M.MODES}
    assert by_mode == {m: float(n) for m, n in stats["modes"].items()}
    assert sum(by_mode.values()) == sink.get(M.CHUNK_CALLS, **labels, method="scope") \
        == stats["accel_stats"]["chunk_calls"]
    assert sink.get(M.BLOCK_EVALS_RUN, **labels, method="scope") == stats["block_evals"]
    assert sink.get(M.BLOCK_EVALS_SAVED, **labels, method="scope") == stats["block_evals_full"] - stats["block_evals"]
    assert sink.get(M.JOB_PROGRESS, job_kind="long_video", job_id="01000000") == 1.0
    assert sink.get(M.CACHE_BYTES, job_kind="long_video", stage="0", sp_rank="0") > 0
