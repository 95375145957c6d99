"""`scope generate --backend ray` equals the in-process run (same seed, same latents)."""
from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from jobs.cli import main

pytestmark = pytest.mark.integration


def _run(tmp_path, name: str, *extra: str) -> dict:
    latents = tmp_path / f"{name}.safetensors"
    rc = main(["generate", "--model", "tiny", "--prompt", "a test", "--frames", "33", "--seed", "3",
               "--steps", "4", "--base-frames", "6", "--overlap", "2", "--ar-step", "1",
               "--accel", "scope", "--out", str(tmp_path / f"{name}.mp4"), "--latents", str(latents),
               "--no-progress", *extra])
    assert rc == 0
    return load_file(str(latents))["latents"]


def test_ray_backend_two_stages_equals_local(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    local = _run(tmp_path, "local")
    try:
        remote = _run(tmp_path, "ray", "--backend", "ray", "--stages", "2")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert (remote - local).abs().max() < 1e-4, "Ray (2 stages) and in-process latents differ"
    assert os.path.getsize(tmp_path / "ray.mp4") > 0
