"""The dataset job for real: `ray job submit` of `python -m jobs.dataset` to a `ray start --head`
cluster, output on a moto S3 server: good and bad rows, every id exactly once, a re-submission
that writes nothing, a worker actor killed mid-job (frames equal to an undisturbed run)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import time
import uuid

import pytest
import yaml

from tests.integration.conftest import job_client, submit_job, wait_job  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle moves right", "a blue square bounces", "a green triangle stays still",
           "a white circle moves up", "a yellow square moves left", "a magenta triangle bounces"]
BAD_ROWS = [
    ({"id": "no-prompt", "prompt": ""}, "'prompt'"),
    ({"id": "bad-frames", "prompt": PROMPTS[0], "frames": "many"}, "frames"),
    ({"id": "bad-seed", "prompt": PROMPTS[0], "seed": 1.5}, "seed"),
    ({"id": "too-long", "prompt": "x" * 5000}, "characters"),
    ({"id": "unknown-words", "prompt": "a dragon flies over the sea"}, "does not know the word"),
    ({"id": "g0", "prompt": PROMPTS[1]}, "duplicate id"),
]


def _fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(key="x", secret="y", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    name = f"datasets-{uuid.uuid4().hex[:8]}"
    _fs(s3_endpoint).mkdir(name)
    return name


def _manifest(fs, bucket: str, good: int, bad: bool) -> str:
    rows = [{"id": f"g{i}", "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(good)]
    if bad:
        rows[1:1] = [row for row, _ in BAD_ROWS]
    key = f"{bucket}/manifests/{uuid.uuid4().hex[:6]}.jsonl"
    fs.pipe_file(key, "\n".join(json.dumps(r) for r in rows).encode())
    return f"s3://{key}"


def _submit(head, tmp_path, endpoint: str, manifest: str, out: str, *extra: str) -> str:
    spec = tmp_path / f"base-{uuid.uuid4().hex[:6]}.yaml"
    spec.write_text(yaml.safe_dump({"frames": 8, "steps": 2, "accel": "scope",
                                    "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}}))
    return submit_job(head, "dataset", "jobs.dataset", "--manifest", manifest, "--out", out,
                      "--spec", str(spec), "--workers", "2", *extra)


def _client(head):
    return job_client(head)


def _wait(head, job: str, timeout: float = 400.0) -> str:
    return wait_job(head, job, timeout)


def _table(fs, out: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(fs.cat_file(f"{out.removeprefix('s3://')}/metadata.parquet"))).to_pylist()


def _objects(fs, out: str) -> dict[str, tuple]:
    root = out.removeprefix("s3://")
    return {p: (info["size"], info.get("ETag"), str(info.get("LastModified")))
            for p, info in fs.find(root, detail=True).items()}


def _videos(fs, out: str) -> dict[str, bytes]:
    root = f"{out.removeprefix('s3://')}/videos"
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.ls(root, refresh=True))}


@pytest.fixture(scope="module")
def finished(ray_head, s3_endpoint, bucket, tmp_path_factory):
    fs = _fs(s3_endpoint)
    manifest = _manifest(fs, bucket, good=6, bad=True)
    out = f"s3://{bucket}/run"
    tmp = tmp_path_factory.mktemp("ds")
    job = _submit(ray_head, tmp, s3_endpoint, manifest, out)
    status = _wait(ray_head, job)
    logs = _client(ray_head).get_job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    return {"manifest": manifest, "out": out, "logs": logs, "tmp": tmp}


def test_good_and_bad_rows_every_id_once(s3_endpoint, finished):
    fs = _fs(s3_endpoint)
    table = _table(fs, finished["out"])
    assert len(table) == 6 + len(BAD_ROWS)                 # one record per manifest row
    done = [r["id"] for r in table if r["status"] == "done"]
    assert sorted(done) == [f"g{i}" for i in range(6)]      # every good id exactly once
    duplicate = [r for r in table if r["id"] == "g0" and r["status"] == "error"]
    assert len(duplicate) == 1 and "duplicate id 'g0'" in duplicate[0]["error"]
    by_id = {r["id"]: r for r in table if r["status"] == "done" or r["id"] != "g0"}
    for i in range(6):
        row = by_id[f"g{i}"]
        assert row["status"] == "done" and row["frames"] == 8 and row["error"] is None, row
        assert fs.exists(row["uri"].removeprefix("s3://")) and row["block_eval_fraction"] <= 1.0
        assert json.loads(row["modes"])["recompute"] > 0
    for bad, words in BAD_ROWS[:-1]:
        row = by_id[bad["id"]]
        assert row["status"] == "error" and words in row["error"] and row["uri"] is None, row
        assert "\n" not in row["error"] and len(row["error"]) < 400
    assert len(_videos(fs, finished["out"])) == 6
    assert re.search(r"rows \d+/7 done, 1 failed, [\d.]+ videos/s", finished["logs"]), finished["logs"][-2000:]


def test_resubmitting_a_finished_job_writes_nothing(ray_head, s3_endpoint, finished):
    fs = _fs(s3_endpoint)
    before = _objects(fs, finished["out"])
    job = _submit(ray_head, finished["tmp"], s3_endpoint, finished["manifest"], finished["out"])
    assert _wait(ray_head, job) == "SUCCEEDED"
    assert _objects(fs, finished["out"]) == before
    assert "already done" in _client(ray_head).get_job_logs(job)


def test_a_killed_worker_actor_leaves_every_id_exactly_once(ray_head, s3_endpoint, bucket, tmp_path):
    from ray.util.state import list_actors

    fs = _fs(s3_endpoint)
    manifest = _manifest(fs, bucket, good=12, bad=False)
    calm, killed_out = f"s3://{bucket}/calm", f"s3://{bucket}/killed"
    assert _wait(ray_head, _submit(ray_head, tmp_path, s3_endpoint, manifest, calm)) == "SUCCEEDED"
    job = _submit(ray_head, tmp_path, s3_endpoint, manifest, killed_out)
    deadline, victim = time.monotonic() + 300, None
    while time.monotonic() < deadline and victim is None:
        done = fs.find(f"{killed_out.removeprefix('s3://')}/rows")
        ray_job = _client(ray_head).get_job_info(job).job_id     # this job's actors only
        if len(done) >= 2 and ray_job:
            actors = [a for a in list_actors(address=ray_head["address"], filters=[("state", "=", "ALIVE")])
                      if "VideoMaker" in (a.class_name or "") and a.job_id == ray_job]
            if actors:
                victim = actors[0].pid
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
        fs.invalidate_cache()
    assert victim, "no worker actor was found to kill"
    assert _wait(ray_head, job) == "SUCCEEDED", _client(ray_head).get_job_logs(job)[-4000:]
    table = _table(fs, killed_out)
    assert sorted(r["id"] for r in table) == sorted(f"g{i}" for i in range(12))
    assert all(r["status"] == "done" for r in table), [r for r in table if r["status"] != "done"]
    assert _videos(fs, killed_out) == _videos(fs, calm)
