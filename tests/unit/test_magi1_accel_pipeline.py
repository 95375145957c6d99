"""Accelerators on the real MAGI-1 chunk-wise pipeline (tiny random DiT): every method runs a
text-to-video and a continuation walk; the passes that write MAGI's clean-chunk K/V always compute
(`CallContext.chunk_required`), so no method can leave the cache empty; exact selective
computation with nothing reused equals the unaccelerated pipeline."""
from __future__ import annotations

import pytest
import torch

from pipelines.magi1.accel_adapter import MagiStackAdapter, accel_defaults
from pipelines.magi1.pipeline import MagiPipeline
from scope.config import make_config
from scope.hooks import apply_accel, remove_accel
from tests.unit.test_magi1_pipeline import C, H, W, WIDTH, caption, sample_args, tiny_model

METHODS = ["none", "scope", "teacache", "flowcache", "taylorseer", "fbcache", "magcache"]


def _config(method: str):
    extra = {"calibrate": True} if method == "magcache" else {}
    return make_config(method, selective="exact", **accel_defaults(method), **extra)


def _walk(model, accel, prefix: bool, cfg: int = 3):
    args = sample_args(steps=4, window=2, cfg=cfg, distill=cfg == 1)
    noise = torch.randn(1, C, 5 * WIDTH, H, W, generator=torch.Generator().manual_seed(3))
    pre = torch.randn(1, C, 3, H, W, generator=torch.Generator().manual_seed(4)) if prefix else None
    return MagiPipeline(model, accel).generate(noise, caption(1), args, prefix=pre, request_ids=["v"])


@pytest.mark.parametrize("prefix", [False, True], ids=["t2v", "v2v"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_the_real_walk_and_keeps_the_cache_written(method, prefix):
    model = tiny_model()
    accel = apply_accel(model, _config(method), MagiStackAdapter())
    ended = []
    real_end = accel.end_request
    accel.end_request = lambda r: ended.append(real_end(r)) or ended[-1]
    try:
        result = _walk(model, accel, prefix)
        assert torch.isfinite(result.latents).all()
        stats = ended[-1]
        assert stats.calls == result.model_calls and 0 < stats.block_evals <= stats.block_evals_full
        assert accel.memory_bytes() == 0                       # the request ended
    finally:
        remove_accel(model)


@pytest.mark.parametrize("cfg", [3, 1], ids=["base-3-pass", "distill-1-pass"])
def test_exact_none_equals_the_unaccelerated_pipeline(cfg):
    model = tiny_model(glu=cfg == 1)
    plain = _walk(model, None, True, cfg)
    accel = apply_accel(model, _config("none"), MagiStackAdapter())
    try:
        accelerated = _walk(model, accel, True, cfg)
    finally:
        remove_accel(model)
    torch.testing.assert_close(accelerated.latents, plain.latents, atol=1e-5, rtol=1e-5)


def test_scope_reuses_work_on_magi_and_stays_close():
    model = tiny_model()
    plain = _walk(model, None, False)
    accel = apply_accel(model, _config("scope"), MagiStackAdapter())
    seen = []
    real_end = accel.end_request
    accel.end_request = lambda r: seen.append(real_end(r)) or seen[-1]
    try:
        fast = _walk(model, accel, False)
    finally:
        remove_accel(model)
    stats = seen[-1]
    assert stats.block_evals < stats.block_evals_full
    err = (fast.latents - plain.latents).norm() / plain.latents.norm()
    assert err < 0.5, f"SCOPE on MAGI-1 moved the latents by {err:.3f} (relative)"
