"""Monitoring for real: a Ray head exporting metrics (`--metrics-export-port`), a Prometheus
server (Debian's) running the shipped scrape configuration and rules on 127.0.0.1, a long-video
job (2 pipeline stages, SCOPE) and a dataset job (2 actors, one bad row, one row the model
refuses) submitted with `ray job submit`, then Prometheus's HTTP API:

- frames generated grow while the long video runs and end at the frames it wrote;
- the SCOPE mode counts add up to the chunk calls, and both equal the jobs' own stats;
- per-GPU (here per-worker) throughput is non-zero for both jobs;
- `ScopeJobStalled` fires for the long video when its stage workers are frozen (SIGSTOP) and
  resolves when they continue;
- every dashboard panel's query finds data; the dashboard is rendered as a PNG (to
  $SCOPE_DASHBOARD_PNG as well when set: docs/dashboard.png is made that way).

Everything runs on this machine and is stopped by process group; Prometheus scrapes every second
and Ray's processes export every second (`RAY_metrics_report_interval_ms=1000`).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from infra.local.prometheus import prometheus, ray_head_with_metrics
from monitoring.dashboard import PANELS, render_png
from tests.integration.conftest import job_client, submit_job, wait_job

pytestmark = pytest.mark.integration

STALL_AFTER_S = 6          # ScopeJobStalled's threshold here (shipped: 900 s, for 5 m)
LONG_FRAMES = 480
DATASET_ROWS = [{"id": f"row-{i}", "prompt": p} for i, p in enumerate(
    ["a red circle moves right", "a blue square bounces", "a green triangle stays still", "a white circle moves up"])]
BAD_ROWS = [{"id": "bad-frames", "prompt": "a red circle moves right", "frames": "many"},   # invalid_row
            {"id": "dragon", "prompt": "a dragon flies over the sea"}]                      # rejected


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("monitoring")
    with ray_head_with_metrics(work, num_cpus=6) as head, \
            prometheus(head, work, stall_after_s=STALL_AFTER_S) as prom:
        yield {"head": head, "prom": prom, "work": work}


def _until(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stage_worker_pids(head: dict, job_id: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=head["address"], filters=[("class_name", "=", "StageWorker")], limit=1000)
    return [a.pid for a in actors if a.state == "ALIVE" and a.job_id == job_id and a.pid]


def _firing(prom, alert: str) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"].get("alertname") == alert and a["state"] == "firing"]


def _total(prom, expr: str) -> float:
    value = prom.value(f"sum({expr})")
    return 0.0 if value is None else value


def test_metrics_alerts_and_dashboard_on_a_real_prometheus(stack, tmp_path):
    head, prom = stack["head"], stack["prom"]
    started = time.time()

    # -- submit both jobs -----------------------------------------------------------------------
    long_out = tmp_path / "long"
    spec = tmp_path / "long.yaml"
    spec.write_text(yaml.safe_dump({"prompt": "a red circle moves right", "frames": LONG_FRAMES, "steps": 3,
                                    "accel": "scope", "backend": "ray", "stages": 2, "seed": 3,
                                    "checkpoint_every": 8, "out": str(long_out)}))
    long_job = submit_job(head, "lv-metrics", "jobs.long_video", "--spec", str(spec), "--no-progress")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in DATASET_ROWS + BAD_ROWS) + "\n")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"frames": 40, "steps": 2, "accel": "scope"}))   # 3 segments a row
    data_out = tmp_path / "dataset"
    data_job = submit_job(head, "ds-metrics", "jobs.dataset", "--manifest", str(manifest), "--out", str(data_out),
                          "--spec", str(base), "--workers", "2", "--no-progress")
    client = job_client(head)
    long_id = _until(lambda: client.get_job_info(long_job).job_id, 60, "the long video's Ray job id")

    # -- stall the long video on purpose: freeze its stage workers after its first segment -----------
    progress = f'scope:job_progress:ratio{{job_kind="long_video",job_id="{long_id}"}}'
    _until(lambda: (prom.value(progress) or 0) > 0, 150, "the long video's first segment in Prometheus")

    def stalled() -> list[dict]:
        return [a for a in _firing(prom, "ScopeJobStalled") if a["labels"]["job_id"] == long_id]

    _until(lambda: not stalled(), 60, "no ScopeJobStalled while segments finish (it may fire during start-up)")
    pids = _stage_worker_pids(head, long_id)
    assert len(pids) == 2, f"expected the replica's 2 stage workers, found {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(3)                      # a call finishing at the SIGSTOP is exported and scraped
        frozen_at = prom.value(progress)
        fired = _until(stalled, 60, "ScopeJobStalled for the frozen long video")
        assert fired[0]["labels"]["job_kind"] == "long_video" and fired[0]["labels"]["severity"] == "page"
        assert prom.value(progress) == frozen_at < 1, "a frozen job made progress"
        lost = [a for a in prom.alerts() if a["labels"].get("alertname") == "ScopeJobLost"
                and a["labels"].get("job_id") == long_id]
        assert not lost, f"the driver is alive (blocked on its frozen stages) and must keep reporting: {lost}"
        time.sleep(3)                      # the picture shows the alert firing for a while
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    _until(lambda: not stalled(), 90, "ScopeJobStalled to resolve once the stage workers continue")

    # -- both jobs finish; their stats are the reference -------------------------------------------
    for job in (long_job, data_job):
        status = wait_job(head, job, timeout=300)
        assert status == "SUCCEEDED", client.get_job_logs(job)[-3000:]
    stats = json.loads((long_out / "stats.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((data_out / "rows").glob("*.json"))]
    done = [r for r in records if r["status"] == "done"]
    assert len(done) == len(DATASET_ROWS) and len(records) == len(DATASET_ROWS) + len(BAD_ROWS)
    ds_modes = {m: sum(json.loads(r["modes"])[m] for r in done) for m in ("recompute", "cache", "predict", "skip")}

    frames_lv = 'ray_scope_frames_generated_total{job_kind="long_video"}'
    _until(lambda: _total(prom, frames_lv) == stats["frames"]
           and _total(prom, 'ray_scope_videos_finished_total{job_kind="dataset"}') == len(done),
           30, "the last exported values")
    # the range's last grid point must not fall before the scrape that saw the final values
    # (points are `started + k * step`; one step past now always lands after it)
    end = time.time() + 1.0

    # frames generated grow while the long video runs, and end at what it wrote
    series = prom.query_range(f"sum({frames_lv})", started, end, 1.0)[0]["values"]
    values = [float(v) for _, v in series]
    assert values == sorted(values) and len(set(values)) >= 4, f"frames did not grow step by step: {values}"
    assert values[-1] == stats["frames"] == LONG_FRAMES
    assert _total(prom, 'ray_scope_frames_generated_total{job_kind="dataset"}') == sum(r["frames"] for r in done)

    # the mode counts add up to the chunk calls, and equal the jobs' own stats
    for kind, modes, chunk_calls in (
            ("long_video", stats["modes"], stats["accel_stats"]["chunk_calls"]),
            ("dataset", ds_modes, sum(ds_modes.values()))):
        by_mode = {r["metric"]["mode"]: float(r["value"][1]) for r in
                   prom.query(f'sum by (mode) (ray_scope_chunk_modes_total{{job_kind="{kind}"}})')}
        calls = _total(prom, f'ray_scope_chunk_calls_total{{job_kind="{kind}"}}')
        assert sum(by_mode.values()) == calls == chunk_calls > 0, (kind, by_mode, calls, chunk_calls)
        assert by_mode == {m: float(n) for m, n in modes.items()}, (kind, by_mode, modes)
    assert _total(prom, 'ray_scope_block_evals_run_total{job_kind="long_video"}') == stats["block_evals"]
    assert _total(prom, 'ray_scope_block_evals_saved_total{job_kind="long_video"}') == \
        stats["block_evals_full"] - stats["block_evals"] > 0

    # per-GPU (here: per worker) throughput is non-zero for both jobs
    window = f"{int(end - started) + 5}s"
    for kind in ("long_video", "dataset"):
        peaks = prom.query(f'max_over_time(scope:frames_per_gpu:rate1m{{job_kind="{kind}"}}[{window}])')
        assert peaks and max(float(p["value"][1]) for p in peaks) > 0, (kind, peaks)

    # every rank's cache and busy time, the failed rows by reason, finished videos
    cache = prom.query(f'max by (stage) (max_over_time(ray_scope_accel_cache_bytes{{job_kind="long_video"}}[{window}]))')
    assert {c["metric"]["stage"] for c in cache} == {"0", "1"} and all(float(c["value"][1]) > 0 for c in cache)
    assert {r["metric"]["stage"] for r in prom.query("ray_scope_stage_busy_seconds_total")} >= {"0", "1"}
    failed = {r["metric"]["reason"]: float(r["value"][1]) for r in prom.query("scope:rows_failed:sum")}
    assert failed == {"invalid_row": 1.0, "rejected": 1.0, "non_finite": 0.0}, failed
    assert _total(prom, 'ray_scope_videos_finished_total{job_kind="long_video"}') == 1
    assert _total(prom, "ray_scope_worker_restarts_total") == 0

    # finished jobs are not lost: each reported 100 % before its driver exited
    assert not [a for a in prom.alerts() if a["labels"].get("alertname") == "ScopeJobLost"], prom.alerts()

    # every dashboard panel finds data; the picture
    step = max(1.0, (end - started) / 200)
    for panel in PANELS:
        found = sum(len(prom.query_range(q.expr, started, end, step)) for q in panel.queries)
        assert found > 0, f"dashboard panel {panel.title!r} found no series"
    out = tmp_path / "dashboard.png"
    counts = render_png(prom.url, out, started, end, title="SCOPE-Video dashboard: a long video (2 stages, "
                        "frozen on purpose) and a dataset job, on one CPU box")
    assert out.stat().st_size > 20_000 and all(counts.values()), counts
    if os.environ.get("SCOPE_DASHBOARD_PNG"):
        Path(os.environ["SCOPE_DASHBOARD_PNG"]).write_bytes(out.read_bytes())
