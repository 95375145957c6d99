"""MAGI-1 chunk-wise sampling: bounded K/V cache, equality with upstream's whole-video buffer,
batch independence, streaming, accelerator call contexts, bad inputs.

The model is the real `MagiDiT` at a tiny random size on CPU. `_buffer_walk` restates upstream's
walk literally where the pipeline deliberately differs (a K/V buffer for the whole video written
from `slice_point` on, the uncond pass as one batch item per chunk at positions from 0, the
nearly-clean chunk's copy appended to the window), so the pipeline is checked against it on
schedules the golden cases do not cover (i2v, whole-chunk prefixes, window 1 and 2, 12-step
distill, wider k/v ranges).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines.magi1.model import MagiConfig, MagiDiT, distill_dt_factor
from pipelines.magi1.pipeline import Caption, Guidance, MagiPipeline, SampleArgs, noise_generators
from pipelines.magi1.schedule import ChunkPlan, ChunkSchedule, plan_chunk_calls

C, H, W, L, CAP = 16, 4, 4, 6, 32          # latent channels, latent size, caption tokens / channels
WIDTH = 2                                   # latent frames per chunk (upstream 6; small keeps it fast)


def tiny_model(seed: int = 0, glu: bool = False) -> MagiDiT:
    config = MagiConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                        num_query_groups=2, kv_channels=16, apply_layernorm_1p=True, params_dtype="torch.float32",
                        in_channels=C, out_channels=C, caption_channels=CAP, caption_max_length=L,
                        gated_linear_unit=glu)
    torch.manual_seed(seed)
    model = MagiDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.05))
    return model.eval()


def sample_args(steps: int = 8, window: int = 4, cfg: int = 3, distill: bool = False, **schedule) -> SampleArgs:
    return SampleArgs(schedule=ChunkSchedule(num_steps=steps, window_size=window, chunk_width=WIDTH, **schedule),
                      guidance=Guidance(cfg_number=cfg), distill=distill)


def caption(seed: int, chunks: int | None = None) -> Caption:
    g = torch.Generator().manual_seed(seed)
    shape = (L, CAP) if chunks is None else (chunks, L, CAP)
    mask = torch.zeros(shape[:-1])
    mask[..., :3 + seed % 3] = 1
    return Caption(torch.randn(shape, generator=g), mask)


def null_caption(model: MagiDiT) -> Caption:
    mask = torch.zeros(L)
    mask[:4] = 1
    return Caption(model.y_embedder.null_caption_embedding.detach().clone(), mask)


# ------------------------------------------------------------------------------------------
# upstream's walk, restated with a whole-video K/V buffer


def _buffer_walk(model: MagiDiT, noise: torch.Tensor, cap: Caption, null: Caption, args: SampleArgs,
                 prefix: torch.Tensor | None) -> list[torch.Tensor]:
    """Chunks as upstream's `walk` yields them (B = 1)."""
    schedule, guidance = args.schedule, args.guidance
    width = schedule.chunk_width
    plan = plan_chunk_calls(noise.shape[2] // width, schedule, 0 if prefix is None else prefix.shape[2])
    tpc = width * (H // 2) * (W // 2)
    xs = noise.clone()
    buffer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    yielded = []

    def y_rows(chunks, text_from):            # [R, L, CAP], [R, L]: null before `text_from`, caption after
        ys, ms = [], []
        for j, c in enumerate(chunks):
            source = cap if j >= text_from else null
            y, m = source.rows([c])
            ys.append(y[0])
            ms.append(m[0])
        return torch.stack(ys), torch.stack(ms)

    def forward(x, t, y, m, dropped, kv_range, sp, uses_cache, write, skip_last, dt):
        kv_cache, capture = None, {} if write else None
        if uses_cache and sp > 0:
            kv_cache = {layer: (k[:, :sp * tpc], v[:, :sp * tpc]) for layer, (k, v) in buffer.items()}
        out = model(x, t[None], y, torch.tensor([dropped]), m, kv_range, slice_point=sp, distill_dt=dt,
                    kv_cache=kv_cache, kv_capture=capture)
        if write and uses_cache:
            for layer, (k, v) in capture.items():
                keep = k.shape[1] - (tpc if skip_last else 0)
                old_k, old_v = buffer.get(layer, (torch.zeros(1, plan.chunk_num * tpc + tpc, *k.shape[2:]),) * 2)
                old_k, old_v = old_k.clone(), old_v.clone()
                old_k[:, sp * tpc:sp * tpc + keep] = k[:, :keep]
                old_v[:, sp * tpc:sp * tpc + keep] = v[:, :keep]
                buffer[layer] = (old_k, old_v)
        return out

    for call in plan.calls:
        sp, n = call.slice_point, call.num_chunks
        dt = distill_dt_factor(schedule.num_steps, call.distill_interval) if args.distill else None
        if call.prefix_pass:
            x = prefix[:, :, :n * width]
        else:
            x = xs[:, :, sp * width:(sp + n) * width].clone()
            first, count = call.prefix_pad
            if count:
                x[:, :, :count] = prefix[:, :, first:first + count]
        t = torch.tensor(call.t)
        kv_range = call.kv_range_tokens(tpc)
        uses_cache = call.uses_cache
        lead = 1 if call.extra_clean else 0
        text_from = n if call.prefix_pass else lead
        cy, cm = y_rows(call.chunks, text_from)
        ny, nm = y_rows(call.chunks, n)
        if guidance.cfg_number == 3:
            c_text = forward(x, t, cy, cm, False, kv_range, sp, uses_cache, False, False, dt)
            c_pre = forward(x, t, ny, nm, True, kv_range, sp, uses_cache, True, call.nearly_clean, dt)
            solo_x = x[:, :, lead * width:].reshape(1, C, n - lead, width, H, W).transpose(1, 2).reshape(
                n - lead, C, width, H, W)
            u = model(solo_x, t[lead:, None], ny[lead:], torch.ones(n - lead, dtype=torch.bool), nm[lead:],
                      torch.tensor([[0, tpc]]), slice_point=0, distill_dt=dt)
            u = u.reshape(1, n - lead, C, width, H, W).transpose(1, 2).reshape(1, C, (n - lead) * width, H, W)
            p, s = guidance.scales(t[lead:])
            p, s = p.repeat_interleave(width).view(1, 1, -1, 1, 1), s.repeat_interleave(width).view(1, 1, -1, 1, 1)
            v = (1 - p) * u + (p - s) * c_pre[:, :, lead * width:] + s * c_text[:, :, lead * width:]
        elif call.nearly_clean:
            copy = x[:, :, lead * width:(lead + 1) * width]
            rng = torch.cat([kv_range, torch.tensor([[0, tpc]]) + kv_range.max()])
            out = forward(torch.cat([x, copy], dim=2), torch.cat([t, t[lead:lead + 1]]),
                          torch.cat([cy, cy[lead:lead + 1]]), torch.cat([cm, cm[lead:lead + 1]]), False, rng, sp,
                          uses_cache, True, True, dt)
            mixed = out[:, :, lead * width:(lead + 1) * width] * 0.7 + out[:, :, n * width:] * (1 - 0.7)
            v = torch.cat([mixed, out[:, :, (lead + 1) * width:n * width]], dim=2)
        else:
            v = forward(x, t, cy, cm, False, kv_range, sp, uses_cache, True, False, dt)[:, :, lead * width:]
        if call.prefix_pass:
            continue
        dts = torch.tensor(call.t_next) - plan.t[list(call.t_index[lead:])]
        stepped = x[:, :, lead * width:] + v * dts.repeat_interleave(width).view(1, 1, -1, 1, 1)
        xs[:, :, (sp + lead) * width:(sp + n) * width] = stepped
        if call.finished is not None:
            start, end = plan.yield_span(call.finished)
            yielded.append(xs[:, :, start:end].clone())
    return yielded


CONFIGS = {
    "t2v_cfg3": dict(chunks=4, args=dict()),
    "t2v_cfg1_distill_12steps": dict(chunks=4, args=dict(steps=12, cfg=1, distill=True)),
    "cfg1_base_window2_more_chunks": dict(chunks=5, args=dict(cfg=1, window=2)),
    "window1": dict(chunks=3, args=dict(steps=4, window=1, noise2clean_kvrange=(2,))),
    "fewer_chunks_than_window": dict(chunks=2, args=dict()),
    "i2v_prefix1": dict(chunks=3, prefix=1, args=dict()),
    "v2v_prefix5_partial": dict(chunks=5, prefix=5, args=dict()),
    "v2v_prefix4_whole_chunks_cfg1": dict(chunks=5, prefix=4, args=dict(cfg=1, distill=True)),
    "wide_kv_ranges": dict(chunks=5, args=dict(noise2clean_kvrange=(6, 6, 5, 4), clean_chunk_kvrange=2)),
    "default_kv_ranges": dict(chunks=4, args=dict(noise2clean_kvrange=())),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pipeline_matches_upstream_buffer_walk(name):
    spec = CONFIGS[name]
    args = sample_args(**spec["args"])
    model = tiny_model(glu=args.distill)
    chunks = spec["chunks"]
    noise = torch.randn(1, C, chunks * WIDTH, H, W, generator=torch.Generator().manual_seed(3))
    prefix = None
    if spec.get("prefix"):
        prefix = torch.randn(1, C, spec["prefix"], H, W, generator=torch.Generator().manual_seed(4))
    cap, null = caption(1, chunks), null_caption(model)
    with torch.no_grad():
        expected = _buffer_walk(model, noise, cap, null, args, prefix)
    result = MagiPipeline(model).generate(noise, [cap], args, prefix=prefix, null_captions=[null])
    assert [c.index for c in result.chunks] == list(range(len(expected)))
    for got, want in zip(result.chunks, expected):
        torch.testing.assert_close(got.latents, want, atol=2e-5, rtol=2e-5)
    assert result.max_cached_chunks <= result.plan.cache_reach + 1


# ------------------------------------------------------------------------------------------
# bounded memory, batch independence, streaming


def _peak(chunks: int, steps: int = 4) -> tuple[int, int, ChunkPlan]:
    model = tiny_model()
    args = sample_args(steps=steps, window=2, cfg=1)
    stats: dict = {}
    stream = MagiPipeline(model).stream(noise_generators([7]), [caption(2)], args, num_chunks=chunks,
                                        latent_shape=(C, H, W), stats=stats)
    assert sum(1 for _ in stream) == chunks
    return stats["max_cached_chunks"], stats["max_live_chunks"], stats["plan"]


def test_kv_cache_and_latents_stay_bounded_over_a_long_run():
    short_cache, short_live, _ = _peak(8)
    long_cache, long_live, plan = _peak(24)
    # upstream's buffer would hold all 24 chunks; the pipeline holds what attention reaches
    # (window 2 with [5, 4, 3, 2]: the newest chunk sees 5 chunks, 2 of them before the window)
    assert plan.cache_reach == 2
    assert long_cache == short_cache <= plan.cache_reach + 1
    assert long_live == short_live <= plan.schedule.window_size + 1


def test_cache_reach_of_the_default_schedule_is_one_chunk():
    plan = plan_chunk_calls(40, ChunkSchedule())            # 4.5B defaults: 64 steps, window 4, [5, 4, 3, 2]
    assert plan.cache_reach == 1
    assert all(c.cached_chunks == () or c.cached_chunks == (c.slice_point - 1,) for c in plan.calls)
    wide = plan_chunk_calls(40, dataclasses.replace(ChunkSchedule(), noise2clean_kvrange=(8, 8, 8, 8)))
    assert wide.cache_reach == 7                           # the last chunk alone sees 7 clean ones before it


def test_a_video_does_not_depend_on_its_batch_neighbours():
    model = tiny_model()
    args = sample_args(steps=4, window=2)
    prefix = [torch.randn(C, 3, H, W, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    caps = [caption(11, 4), caption(12)]
    pipe = MagiPipeline(model)
    together = pipe.generate(noise_generators([21, 22]), caps, args, num_chunks=4, latent_shape=(C, H, W),
                             prefix=prefix)
    for b in range(2):
        alone = pipe.generate(noise_generators([21 + b]), [caps[b]], args, num_chunks=4, latent_shape=(C, H, W),
                              prefix=prefix[b][None])
        torch.testing.assert_close(together.latents[b:b + 1], alone.latents, atol=1e-5, rtol=1e-5)
    # and neighbours really differ (the test would pass trivially otherwise)
    assert (together.latents[0] - together.latents[1]).abs().max() > 1e-2


def test_chunks_stream_as_soon_as_they_are_clean():
    model = tiny_model()
    args = sample_args(steps=4, window=2)
    stats: dict = {}
    calls: list[int] = []
    pipe = MagiPipeline(model)
    stream = pipe.stream(torch.randn(1, C, 4 * WIDTH, H, W), caption(1), args,
                         on_call=lambda r: calls.append(r.call.index), stats=stats)
    seen = []
    for out in stream:
        seen.append((out.index, len(calls)))
        assert out.latents.shape == (1, C, WIDTH, H, W)
    plan = stats["plan"]
    finishing = [c.index + 1 for c in plan.calls if c.finished is not None]
    assert seen == list(zip(range(4), finishing))
    assert finishing[0] < len(plan.calls)                  # the first chunk arrives before the walk ends


# ------------------------------------------------------------------------------------------
# accelerator call contexts


class RecordingAccel:
    """Stands in for `scope.hooks.Accelerator`: checks and records every context it is given."""

    def __init__(self) -> None:
        self.contexts: list = []
        self.ended: list[str] = []

    def call(self, ctx):
        import contextlib

        from scope.hooks import _checked_contexts   # the accelerator's own check of what it is given
        _checked_contexts(ctx)
        self.contexts.append(ctx)
        return contextlib.nullcontext()

    def end_request(self, request: str) -> None:
        self.ended.append(request)


def test_every_model_call_is_described_to_the_accelerator():
    model = tiny_model()
    accel = RecordingAccel()
    args = sample_args(steps=4, window=2)
    prefix = torch.randn(1, C, 3, H, W)
    result = MagiPipeline(model, accel).generate(torch.randn(1, C, 4 * WIDTH, H, W), caption(1), args,
                                                 prefix=prefix, request_ids=["v0"])
    assert len(accel.contexts) == result.model_calls
    branches = {}
    for ctx in accel.contexts:
        branches.setdefault(ctx.step, []).append(ctx.branch)
        assert ctx.request == "v0" and ctx.causal and ctx.frames_per_chunk == WIDTH
    plan = result.plan
    assert branches[0] == ["prefix"]                       # whole prefix chunk: its K/V only
    assert all(branches[c.index] == ["cond", "context", "uncond"] for c in plan.calls[1:])
    for ctx in accel.contexts:
        call = plan.calls[ctx.step]
        if ctx.branch in ("cond", "context"):
            assert ctx.chunk_offset == call.slice_point and list(ctx.active) == list(call.active)
            assert ctx.sigmas == pytest.approx([1 - t for t in call.t], abs=1e-6)
        if ctx.branch == "uncond":
            assert ctx.chunk_offset == call.denoising[0] and all(ctx.active)
        if call.finished is not None and ctx.branch != "prefix":
            j = list(range(ctx.chunk_offset, ctx.chunk_offset + ctx.num_chunks)).index(call.finished)
            assert ctx.is_final(j)
    assert accel.ended == ["v0"]


def test_batched_calls_get_one_context_per_video():
    accel = RecordingAccel()
    MagiPipeline(tiny_model(glu=True), accel).generate(
        noise_generators([1, 2]), [caption(1), caption(2)], sample_args(steps=4, window=2, cfg=1, distill=True),
        num_chunks=3, latent_shape=(C, H, W), request_ids=["a", "b"])
    assert all(isinstance(ctx, list) and [c.request for c in ctx] == ["a", "b"] for ctx in accel.contexts)
    assert {ctx[0].branch for ctx in accel.contexts} == {"cond", "solo"}


# ------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("make, match", [
    (lambda m: dict(noise=torch.randn(C, 8, H, W)), "noise must be"),
    (lambda m: dict(noise=torch.randn(1, C, 7, H, W)), "whole chunks"),
    (lambda m: dict(noise=torch.randn(1, 8, 8, H, W)), "channels"),
    (lambda m: dict(noise=torch.randn(1, C, 8, 3, W)), "multiple of the patch"),
    (lambda m: dict(captions=[caption(1), caption(2)]), "captions for 1 videos"),
    (lambda m: dict(captions=Caption(torch.randn(L, CAP + 1), torch.ones(L))), "caption_channels"),
    (lambda m: dict(captions=caption(1, chunks=2)), "per-chunk rows"),
    (lambda m: dict(prefix=torch.randn(1, C, 8, H, W)), "leave something to generate"),
    (lambda m: dict(prefix=torch.randn(1, C, 2, H + 2, W)), "must match"),
    (lambda m: dict(noise=noise_generators([1])), "num_chunks"),
    (lambda m: dict(request_ids=["x", "y"]), "request_ids"),
])
def test_bad_inputs_are_refused_before_any_model_call(make, match):
    model = tiny_model()
    accel = RecordingAccel()
    kwargs = dict(noise=torch.randn(1, C, 8, H, W), captions=caption(1))
    kwargs.update(make(model))
    noise, caps = kwargs.pop("noise"), kwargs.pop("captions")
    with pytest.raises(ValueError, match=match):
        MagiPipeline(model, accel).stream(noise, caps, sample_args(steps=4, window=2), **kwargs)
    assert accel.contexts == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=10, window_size=4), "multiple of window_size"),
    (dict(num_steps=8, noise2clean_kvrange=(5, 4, 3)), "multiple of len"),
    (dict(noise2clean_kvrange=(5, 0, 3, 2)), ">= 1"),
    (dict(shortcut_mode="8,8,16"), "shortcut_mode"),
    (dict(window_size=0), "window_size"),
    (dict(clean_t=1.5), "clean_t"),
])
def test_bad_schedules_say_what_is_valid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChunkSchedule(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cfg_number=2), "cfg_number"),
    (dict(text_scales=(7.5, 7.5)), "one entry per t interval"),
    (dict(cfg_t_range=(0.1, 0.0217, 0.3, 0.5, 0.999)), "increasing"),
])
def test_bad_guidance_says_what_is_valid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Guidance(**kwargs)
