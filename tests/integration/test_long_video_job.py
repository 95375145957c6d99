"""The long-video job for real: `ray job submit` to a `ray start --head` cluster, output on a
moto S3 server, the driver killed mid-run (SIGKILL of its PID, and `ray job stop`), the same
spec submitted again: it resumes from its checkpoint and the frames equal an uninterrupted
run's, bit for bit; credentials appear in no log and no file; a bad spec is one clear line."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest
import yaml

from tests.integration.conftest import JOB_TERMINAL as TERMINAL
from tests.integration.conftest import RAY_TEST_ENV, job_client, submit_job, wait_job

pytestmark = pytest.mark.integration

SECRETS = (RAY_TEST_ENV["AWS_ACCESS_KEY_ID"], RAY_TEST_ENV["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(key="x", secret="y", client_kwargs={"endpoint_url": s3_endpoint})
    name = f"videos-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return name


def _fs(s3_endpoint):
    import s3fs

    return s3fs.S3FileSystem(key="x", secret="y", client_kwargs={"endpoint_url": s3_endpoint},
                             skip_instance_cache=True)


def _spec(tmp_path, s3_endpoint, out: str, **changes) -> str:
    values = {"prompt": "a red circle moves right", "frames": 240, "seed": 5, "steps": 3,
              "accel": "scope", "out": out, "checkpoint_every": 1,
              "storage_options": {"client_kwargs": {"endpoint_url": s3_endpoint}}}
    values.update(changes)
    path = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _submit(head, spec: str, *extra: str) -> str:
    return submit_job(head, "scope", "jobs.long_video", "--spec", spec, *extra)


def _client(head):
    return job_client(head)


def _wait(head, job: str, timeout: float = 400.0) -> str:
    return wait_job(head, job, timeout)


def _wait_for_checkpoint(head, job: str, fs, out: str, segments: int, timeout: float = 240.0) -> None:
    """Until the job's checkpoint says `segments` are done (read from S3, as a user would)."""
    from jobs.runner import RunState

    client, deadline = _client(head), time.monotonic() + timeout
    key = f"{out.removeprefix('s3://')}/checkpoint/state.safetensors"
    while time.monotonic() < deadline:
        if fs.exists(key):
            if RunState.from_bytes(fs.cat_file(key), key).next_segment >= segments:
                return
        status = str(client.get_job_status(job)).split(".")[-1]
        assert status not in TERMINAL, f"job ended ({status}) before the kill:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(0.2)
        fs.invalidate_cache()
    raise AssertionError(f"no checkpoint with {segments} segments within {timeout} s")


def _frames(fs, out: str) -> np.ndarray:
    from jobs.video import read_video

    local = f"/tmp/{uuid.uuid4().hex}.mp4"
    fs.get_file(f"{out.removeprefix('s3://')}/video.mp4", local)
    try:
        return read_video(local)
    finally:
        os.unlink(local)


def _segment_bytes(fs, out: str) -> dict[str, bytes]:
    root = f"{out.removeprefix('s3://')}/segments"
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.ls(root, refresh=True))}


def _assert_no_secret(head, job: str, fs, out: str) -> None:
    logs = _client(head).get_job_logs(job)
    for name in ("job.json", "stats.json"):
        logs += fs.cat_file(f"{out.removeprefix('s3://')}/{name}").decode()
    for secret in SECRETS:
        assert secret not in logs, "a credential leaked into the job's logs or files"


@pytest.fixture(scope="module")
def uninterrupted(ray_head, s3_endpoint, bucket, tmp_path_factory):
    out = f"s3://{bucket}/whole"
    job = _submit(ray_head, _spec(tmp_path_factory.mktemp("spec"), s3_endpoint, out))
    status = _wait(ray_head, job)
    logs = _client(ray_head).get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    fs = _fs(s3_endpoint)
    return {"out": out, "job": job, "logs": logs, "frames": _frames(fs, out), "segments": _segment_bytes(fs, out)}


def test_uninterrupted_job_streams_segments_and_reports_progress(ray_head, s3_endpoint, uninterrupted):
    fs = _fs(s3_endpoint)
    frames = uninterrupted["frames"]
    assert frames.shape == (240, 64, 64, 3)
    assert len(uninterrupted["segments"]) >= 10
    assert re.search(r"segment \d+/\d+, frames \d+/240, [\d.]+ frames/s, ETA", uninterrupted["logs"])
    import json

    stats = json.loads(fs.cat_file(f"{uninterrupted['out'].removeprefix('s3://')}/stats.json"))
    assert stats["frames"] == 240 and stats["video_frames"] == 240 and stats["accel"] == "scope"
    assert stats["block_evals"] < stats["block_evals_full"]
    _assert_no_secret(ray_head, uninterrupted["job"], fs, uninterrupted["out"])


@pytest.mark.parametrize("how", ["sigkill-driver", "ray-job-stop"])
def test_killed_driver_resumes_to_the_same_bytes(ray_head, s3_endpoint, bucket, tmp_path, uninterrupted, how):
    fs = _fs(s3_endpoint)
    out = f"s3://{bucket}/killed-{how}"
    spec = _spec(tmp_path, s3_endpoint, out)
    first = _submit(ray_head, spec)
    _wait_for_checkpoint(ray_head, first, fs, out, segments=3)
    if how == "sigkill-driver":
        logs = _client(ray_head).get_job_logs(first)
        pid = int(re.search(r"driver pid (\d+)", logs).group(1))
        os.kill(pid, signal.SIGKILL)
    else:
        subprocess.run([ray_head["ray"], "job", "stop", "--address", ray_head["address"], first],
                       env=ray_head["env"], check=True, capture_output=True, timeout=120)
    assert _wait(ray_head, first) in ("FAILED", "STOPPED")
    assert not fs.exists(f"{out.removeprefix('s3://')}/video.mp4")
    second = _submit(ray_head, spec)
    assert _wait(ray_head, second) == "SUCCEEDED", _client(ray_head).get_job_logs(second)[-3000:]
    logs = _client(ray_head).get_job_logs(second)
    assert "resuming" in logs and "resumed at" in logs
    np.testing.assert_array_equal(_frames(fs, out), uninterrupted["frames"])
    assert _segment_bytes(fs, out) == uninterrupted["segments"]
    _assert_no_secret(ray_head, second, fs, out)


def test_another_spec_into_the_same_out_is_refused(ray_head, s3_endpoint, tmp_path, uninterrupted):
    job = _submit(ray_head, _spec(tmp_path, s3_endpoint, uninterrupted["out"], seed=6))
    assert _wait(ray_head, job) == "FAILED"
    logs = _client(ray_head).get_job_logs(job)
    assert "holds a job with another spec (seed: 5 there vs 6 now)" in logs
    assert "Traceback" not in logs


def test_a_bad_spec_fails_at_once_in_one_line(ray_head, s3_endpoint, tmp_path):
    job = _submit(ray_head, _spec(tmp_path, s3_endpoint, "s3://nowhere/x", guidance=float("inf")))
    assert _wait(ray_head, job, timeout=120) == "FAILED"
    logs = _client(ray_head).get_job_logs(job)
    assert "spec field 'guidance': inf is not a finite number" in logs and "Traceback" not in logs
