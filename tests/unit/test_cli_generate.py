"""`scope generate` end to end on the tiny DF model: every --accel value, multi-segment, files."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from jobs.cli import build_parser, main
from jobs.video import read_video


def _generate(tmp_path, *extra: str) -> tuple[int, dict]:
    out, stats = tmp_path / "v.mp4", tmp_path / "s.json"
    rc = main(["generate", "--model", "tiny", "--prompt", "a test", "--frames", "33", "--seed", "3",
               "--steps", "4", "--base-frames", "6", "--overlap", "2", "--ar-step", "1",
               "--out", str(out), "--stats", str(stats), "--latents", str(tmp_path / "l.safetensors"),
               "--no-progress", *extra])
    return rc, (json.loads(stats.read_text()) if stats.exists() else {})


@pytest.mark.parametrize("accel", ["none", "scope", "teacache", "flowcache", "taylorseer", "fbcache"])
def test_generate_tiny_async_multi_segment(tmp_path, accel):
    rc, stats = _generate(tmp_path, "--accel", accel)
    assert rc == 0
    assert stats["segments"] >= 2                         # 9 latent frames, windows of 6
    for key in ("frames", "wall_s", "block_evals", "block_evals_full", "modes"):
        assert key in stats
    assert set(stats["modes"]) >= {"recompute", "cache", "predict"}
    assert stats["frames"] == 33 and read_video(str(tmp_path / "v.mp4")).shape[0] == 33
    assert 0 < stats["block_evals"] <= stats["block_evals_full"]
    assert load_file(str(tmp_path / "l.safetensors"))["latents"].shape[1] >= 9


def test_same_seed_same_latents(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _generate(a)
    _generate(b)
    assert load_file(str(a / "l.safetensors"))["latents"].equal(load_file(str(b / "l.safetensors"))["latents"])


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "spec field 'frames': 0 is out of range"),
    (["--frames", "1000000000"], "spec field 'frames'"),
    (["--frames", "10000000"], "at most 24 h"),
    (["--out", "x.avi"], ".mp4"),
    (["--accel-config", "/nonexistent.json"], "'accel': '/nonexistent.json': no such file"),
    (["--stages", "2"], "need backend 'ray'"),
    (["--backend", "ray", "--replicas", "2"], "more replicas cannot speed it up"),
    (["--stats", "/proc/no/such/stats.json"], "--stats /proc/no/such: No such file or directory"),
    (["--guidance", "inf"], "spec field 'guidance': inf is not a finite number"),
    (["--guidance", "nan"], "spec field 'guidance': nan is not a finite number"),
    (["--shift", "-2"], "spec field 'shift'"),
    (["--prompt", "p" * 100_000], "100000 characters"),
    (["--context", "/no/such/embeddings.safetensors"], "'context'"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    rc = main(["generate", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "v.mp4"), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 600, err[:1000]
    assert not (tmp_path / "v.mp4").exists()


def test_nan_text_embeddings_fail_before_sampling(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    context = torch.randn(16, 32)
    context[3, 5] = float("nan")
    path = tmp_path / "context.safetensors"
    save_file({"context": context}, str(path))
    rc = main(["generate", "--model", "tiny", "--prompt", "x", "--context", str(path), "--frames", "9",
               "--out", str(tmp_path / "v.mp4"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "NaN or inf" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "v.mp4").exists()


def test_same_spec_same_bytes_and_normal_permissions(tmp_path):
    import os

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _generate(a)
    _generate(b)
    for name in ("v.mp4", "l.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between identical runs"
    stats_a, stats_b = json.loads((a / "s.json").read_text()), json.loads((b / "s.json").read_text())
    assert stats_a["block_evals"] == stats_b["block_evals"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("v.mp4", "s.json", "l.safetensors"):
        assert (a / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in a.iterdir()) == ["l.safetensors", "s.json", "v.mp4"], "temporary files left"


def test_help_lists_commands():
    text = build_parser().format_help()
    for command in ("generate", "bench", "calibrate", "train"):
        assert command in text


def test_embedded_model_accelerates_with_its_shipped_calibrated_config(tmp_path, capsys):
    """`--accel scope` on the embedded model takes the config its weights ship (calibrated by
    `scope calibrate`), really caches / predicts, and says where the config came from; used at
    another length than the one it was calibrated for, it says so on stderr."""
    out, stats_path = tmp_path / "v.mp4", tmp_path / "s.json"
    rc = main(["generate", "--prompt", "a red circle moves right", "--frames", "12", "--seed", "0",
               "--steps", "30", "--ar-step", "2", "--accel", "scope", "--out", str(out),
               "--stats", str(stats_path), "--no-progress"])
    assert rc == 0
    stats = json.loads(stats_path.read_text())
    assert stats["accel"] == "scope" and stats["accel_config_source"].startswith("shipped with the model")
    calibrated = stats["accel_config"]["calibrated_for"]
    assert (calibrated["num_steps"], calibrated["ar_step"]) == (30, 2)   # the closest shipped config
    assert calibrated["frames"] != 12
    assert stats["modes"]["predict"] + stats["modes"]["cache"] > 0, stats["modes"]
    assert stats["block_evals"] < stats["block_evals_full"]
    assert any("frames: calibrated" in m for m in stats["accel_schedule_mismatch"])
    assert "calibrated for another schedule" in capsys.readouterr().err


def test_accel_config_file_is_reported_as_applied_whatever_accel_says(tmp_path, capsys):
    config = tmp_path / "accel.json"
    config.write_text(json.dumps({"method": "taylorseer", "interval": 2,
                                  "calibrated_for": {"num_steps": 30, "ar_step": 2}}))
    rc, stats = _generate(tmp_path, "--accel-config", str(config))
    assert rc == 0
    assert stats["accel"] == "taylorseer" and stats["accel_config_source"] == str(config)
    assert stats["accel_schedule_mismatch"] == ["ar_step: calibrated 2, used with 1",
                                                "num_steps: calibrated 30, used with 4"]
    err = capsys.readouterr().err
    assert "num_steps: calibrated 30, used with 4" in err and len(err.strip().splitlines()) == 1


def test_magcache_without_measured_ratios_is_one_clear_line(tmp_path, capsys):
    rc, _ = _generate(tmp_path, "--accel", "magcache")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "mag_ratios is not set" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "v.mp4").exists()


def test_the_shipped_config_closest_to_the_schedule_is_chosen():
    from pipelines.procedural.bundle import default_accel_config

    fast = default_accel_config("scope", schedule={"num_steps": 30, "ar_step": 2, "frames": 48})
    default = default_accel_config("scope", schedule={"num_steps": 10, "ar_step": 0, "frames": 48})
    assert (fast.calibrated_for["num_steps"], fast.calibrated_for["ar_step"]) == (30, 2)
    assert (default.calibrated_for["num_steps"], default.calibrated_for["ar_step"]) == (10, 0)
    assert default_accel_config("teacache") is None
