"""B videos in one forward pass: each keeps its own noise, text and prefix, and its latents do
not depend on what it was batched with (up to float rounding of the larger matrix products)."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from jobs.runner import Draws
from jobs.setup import describe, load
from jobs.spec import JobSpec
from pipelines.skyreels_v2.pipeline import DFPipeline

PROMPTS = ["a red circle moves right", "a blue square bounces", "a green triangle stays still"]


def _inputs(prompt: str, seed: int, steps: int = 3, accel: str = "none"):
    plan = describe(JobSpec(prompt=prompt, frames=30, seed=seed, steps=steps, accel=accel))
    loaded = load(plan)
    segment = plan.segments[0]
    h, w = plan.latent_size
    draws = Draws(seed)
    noise = draws.segment_noise(0, (plan.channels, segment.num_frames, h, w))
    return plan, loaded, segment, noise, draws.prefix_noise(0)


def test_a_video_batched_with_others_equals_it_alone():
    videos = [_inputs(p, s) for p, s in zip(PROMPTS, (0, 7, 3))]
    plan, loaded, segment = videos[0][:3]
    pipe = DFPipeline(loaded.model)
    alone = [pipe.sample_segment(n, ld.context, ld.negative, plan.args, plan=segment, prefix_latents=ld.reference,
                                 addnoise_eps=e, request_id="a").latents for _, ld, _, n, e in videos]
    for batch in ([0, 1], [1, 2, 0]):
        infos = pipe.sample_segment_batch(
            [videos[i][3] for i in batch], [videos[i][1].context for i in batch],
            [videos[i][1].negative for i in batch], plan.args, plan=segment,
            prefixes=[videos[i][1].reference for i in batch],
            eps_sources=[videos[i][4] for i in batch], request_ids=[f"v{i}" for i in batch])
        for info, i in zip(infos, batch):
            diff = (info.latents - alone[i]).abs().max().item()
            # not bit-exact: a GEMM over B x N rows may round differently from one over N rows
            # (measured 3e-5 on latents of scale 1); content never crosses samples
            assert diff <= 2e-4, f"video {i} batched as {batch} differs from alone by {diff}"
            assert info.model_calls > 0 and info.rows == infos[0].rows


def test_batching_mixed_shapes_or_repeated_requests_is_refused():
    plan, loaded, segment, noise, eps = _inputs(PROMPTS[0], 0)
    with pytest.raises(ValueError, match="one shape"):
        DFPipeline(loaded.model).sample_segment_batch(
            [noise, noise[:, :-2]], [loaded.context] * 2, [loaded.negative] * 2, plan.args, plan=segment,
            prefixes=[None, None], eps_sources=[None, None], request_ids=["a", "b"])
    plan, loaded, segment, noise, eps = _inputs(PROMPTS[0], 0, accel="scope")
    with _accelerated(loaded.model, plan.accel) as accel, pytest.raises(ValueError, match="one request per row"):
        DFPipeline(loaded.model, accel=accel).sample_segment_batch(
            [noise, noise], [loaded.context] * 2, [loaded.negative] * 2, plan.args, plan=segment,
            prefixes=[None, None], eps_sources=[None, None], request_ids=["a", "a"])


@contextmanager
def _accelerated(model, config):
    from pipelines.skyreels_v2.accel_adapter import WanStackAdapter
    from scope.hooks import apply_accel, remove_accel

    remove_accel(model)
    try:
        yield apply_accel(model, config, WanStackAdapter())
    finally:
        remove_accel(model)


def _sample_batch(pipe, videos, batch, plan, segment):
    return pipe.sample_segment_batch(
        [videos[i][3] for i in batch], [videos[i][1].context for i in batch],
        [videos[i][1].negative for i in batch], plan.args, plan=segment,
        prefixes=[videos[i][1].reference for i in batch],
        eps_sources=[videos[i][4] for i in batch], request_ids=[f"v{i}" for i in batch])


@pytest.mark.parametrize("method", ["scope", "teacache", "fbcache"])
def test_an_accelerated_video_batched_with_others_equals_it_alone(method, monkeypatch):
    """Each video keeps its own decisions, residuals, K/V and stats: its latents and mode counts
    are those of the video sampled alone, whatever it is batched with; videos whose decisions
    run different frames are run in separate groups of the same call."""
    import scope.hooks

    videos = [_inputs(p, s, steps=10, accel=method) for p, s in zip(PROMPTS, (0, 7, 3))]
    plan, loaded, segment = videos[0][:3]
    groups: list[list[list[int]]] = []
    real_group = scope.hooks.group_plans
    monkeypatch.setattr(scope.hooks, "group_plans", lambda plans: groups.append(real_group(plans)) or groups[-1])
    with _accelerated(loaded.model, plan.accel) as accel:
        pipe = DFPipeline(loaded.model, accel=accel)
        alone = [pipe.sample_segment(n, ld.context, ld.negative, plan.args, plan=segment,
                                     prefix_latents=ld.reference, addnoise_eps=e, request_id=f"alone{i}")
                 for i, (_, ld, _, n, e) in enumerate(videos)]
        for batch in ([0, 1, 2], [2, 0]):
            infos = _sample_batch(pipe, videos, batch, plan, segment)
            for info, i in zip(infos, batch):
                diff = (info.latents - alone[i].latents).abs().max().item()
                scale = alone[i].latents.abs().max().item()
                # float rounding of B x N-row products (3e-5 of the latents' scale without an
                # accelerator over 10 steps); a sample mixing with another would move it by ~1
                assert diff <= 1e-4 * scale, f"{method}: video {i} batched as {batch} differs from alone by {diff}"
                assert info.accel_stats.modes.to_dict() == alone[i].accel_stats.modes.to_dict()
                assert info.accel_stats.block_evals == alone[i].accel_stats.block_evals
        assert accel.memory_bytes() == 0, "every request of the batch must be ended"
    if method == "scope":
        assert groups and all(sorted(sum(g, [])) == list(range(len(sum(g, [])))) for g in groups)
        assert any(len(g) > 1 for g in groups), "no call split its batch: the group path went untested"
        assert any(len(g) == 1 and len(g[0]) > 1 for g in groups), "no call shared one forward"


def test_bench_batch_reports_every_size_and_frames_do_not_move():
    from jobs.bench_batch import bench_batch

    report = bench_batch(videos=2, frames=8, sizes=(1, 2), rounds=1, accels=("none", "scope"))
    assert [(r["accel"], r["batch"]) for r in report["rows"]] == [("none", 1), ("none", 2), ("scope", 1), ("scope", 2)]
    for row in report["rows"]:
        assert row["videos_per_s"] > 0 and row["max_pixel_diff_vs_b1"] <= 1 and row["same_modes_as_b1"], row
