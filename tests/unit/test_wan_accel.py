"""SCOPE and the baselines on the real Wan DF transformer through the real DF pipeline."""
from __future__ import annotations

import pytest
import torch

from pipelines.skyreels_v2.accel_adapter import WanStackAdapter
from pipelines.skyreels_v2.model import WanDFTransformer
from pipelines.skyreels_v2.pipeline import DFPipeline, ScheduleArgs
from pipelines.skyreels_v2.sizes import config_for
from scope.config import make_config
from scope.hooks import apply_accel, remove_accel

METHODS = ["none", "scope", "teacache", "flowcache", "taylorseer", "fbcache"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = config_for("tiny")
    model = WanDFTransformer(cfg).eval()
    noise = torch.randn(16, 12, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(2))
    return model, noise, ctx, torch.zeros_like(ctx)


def _args(causal: bool) -> ScheduleArgs:
    return ScheduleArgs(num_steps=6, shift=5.0, guidance_scale=3.0, ar_step=2, causal_block_size=2,
                        base_num_frames=12, causal_attention=causal)


def _run(model, noise, ctx, neg, args, config=None):
    accel = apply_accel(model, config, WanStackAdapter()) if config is not None else None
    try:
        result = DFPipeline(model, accel=accel).generate(noise, ctx, neg, args)
    finally:
        if accel is not None:
            remove_accel(model)
    return result


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_counts_add_up(setup, method):
    model, noise, ctx, neg = setup
    result = _run(model, noise, ctx, neg, _args(True), make_config(method))
    stats = result.segments[0].accel_stats.to_dict()
    rows = result.segments[0].rows
    assert sum(stats["modes"].values()) == rows * 2 * 6        # rows x CFG branches x chunks
    assert 0 < stats["block_evals"] <= stats["block_evals_full"]
    assert torch.isfinite(result.latents).all()


def test_selective_exact_with_kv_cache_is_exact_under_block_causal_attention(setup):
    model, noise, ctx, neg = setup
    full = _run(model, noise, ctx, neg, _args(True)).latents
    config = make_config("none", selective="exact", kv_cache_finished=True)
    result = _run(model, noise, ctx, neg, _args(True), config)
    stats = result.segments[0].accel_stats.to_dict()
    torch.testing.assert_close(result.latents, full, atol=1e-5, rtol=1e-5)
    assert stats["block_evals"] < 0.6 * stats["block_evals_full"]   # real savings, same output


def test_selective_approx_is_an_approximation_under_bidirectional_attention(setup):
    model, noise, ctx, neg = setup
    full = _run(model, noise, ctx, neg, _args(False)).latents
    exact = _run(model, noise, ctx, neg, _args(False), make_config("none", selective="exact"))
    approx = _run(model, noise, ctx, neg, _args(False), make_config("none", selective="approx"))
    # "exact" never drops anything that can influence the result under bidirectional attention
    torch.testing.assert_close(exact.latents, full, atol=1e-5, rtol=1e-5)
    stats = approx.segments[0].accel_stats.to_dict()
    assert stats["block_evals"] < stats["block_evals_full"]
    assert (approx.latents - full).abs().max() > 1e-4   # it does change the output: a measured mode


def test_no_accel_call_context_means_unchanged_model(setup):
    model, noise, ctx, neg = setup
    x = noise[None, :, :4]
    t = torch.tensor([[999, 800, 500, 0]])
    before = model(x, t, ctx, fps=[1])
    apply_accel(model, make_config("scope"), WanStackAdapter())
    try:
        during = model(x, t, ctx, fps=[1])
    finally:
        remove_accel(model)
    torch.testing.assert_close(during, before, atol=0, rtol=0)
