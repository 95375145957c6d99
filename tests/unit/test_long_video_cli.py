"""`scope long-video` in one process: the output folder, an idempotent resubmit, another spec
refused, and storage faults failing fast in one line (a silent S3 endpoint, an unwritable folder)."""
from __future__ import annotations

import json
import os
import time

import yaml

from jobs.cli import main
from jobs.video import read_video

SECRET = "very-secret-value-0042"


def _args(out, *extra):
    return ["long-video", "--prompt", "a blue square moves left", "--frames", "30", "--steps", "2",
            "--accel", "scope", "--out", str(out), "--no-progress", *extra]


def test_long_video_writes_its_folder_and_a_resubmit_is_idempotent(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out)) == 0
    stats = json.loads((out / "stats.json").read_text())
    segments = sorted(p.name for p in (out / "segments").iterdir())
    assert segments == [f"{i:05d}.mp4" for i in range(len(segments))] and len(segments) >= 2
    assert read_video(str(out / "video.mp4")).shape == (30, 64, 64, 3)
    assert stats["frames"] == 30 and stats["video_frames"] == 30 and stats["peak_rss_mb"] > 0
    manifest = json.loads((out / "job.json").read_text())
    assert manifest["spec"]["prompt"] == "a blue square moves left"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(_args(out)) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert main(_args(out, "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "holds a job with another spec (seed: 0 there vs 1 now)" in err and len(err.splitlines()) == 1


def test_an_unwritable_out_fails_in_one_line_before_loading(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    started = time.monotonic()
    assert main(_args(blocker / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("long-video: error: out ") and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - started < 10


def test_a_silent_s3_endpoint_fails_fast_in_one_line_without_credentials(tmp_path, capsys, silent_endpoint):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "prompt": "a red circle moves right", "frames": 16, "out": "s3://bucket/run", "storage_timeout_s": 2,
        "storage_options": {"key": "AKIAEXAMPLEKEY", "secret": SECRET,
                            "client_kwargs": {"endpoint_url": silent_endpoint}}}))
    started = time.monotonic()
    assert main(["long-video", "--spec", str(spec), "--no-progress"]) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert elapsed < 12, f"took {elapsed:.1f} s"
    assert "not reachable within 2 s" in err and len(err.strip().splitlines()) == 1, err
    assert SECRET not in err and "AKIAEXAMPLEKEY" not in err
    assert not os.path.exists("s3:")
