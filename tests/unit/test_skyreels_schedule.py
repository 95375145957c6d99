"""SkyReels-V2 DF sampling: hand-worked schedules, UniPC properties, the pipeline with stub models."""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from pipelines.skyreels_v2.pipeline import (DFPipeline, PixelOverlap, ScheduleArgs, fps_embedding_id,
                                            plan_segments)
from pipelines.skyreels_v2.schedule import generate_timestep_matrix
from pipelines.skyreels_v2.unipc import FlowUniPCSolver, make_flow_schedule

T, F_ = True, False


# --------------------------------------------------------------------------------------------
# timestep matrix (template [800, 300]: index 0 -> 999, 1 -> 800, 2 -> 300, 3 -> 0)

TEMPLATE = torch.tensor([800, 300])


def test_sync_schedule_steps_every_frame_together():
    m = generate_timestep_matrix(3, torch.tensor([900, 500, 100]), 3, ar_step=0, num_pre_ready=0,
                                 causal_block_size=1)
    assert m.step_index.tolist() == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]
    assert m.step_matrix.tolist() == [[900] * 3, [500] * 3, [100] * 3]
    assert m.update_mask.all()
    assert m.valid_interval.tolist() == [[0, 3]] * 3


def test_async_schedule_each_frame_trails_by_ar_step():
    m = generate_timestep_matrix(3, TEMPLATE, 3, ar_step=1, num_pre_ready=0, causal_block_size=1)
    # rows = N + (blocks - 1) * ar_step = 2 + 2
    assert m.step_index.tolist() == [[1, 0, 0], [2, 1, 0], [3, 2, 1], [3, 3, 2]]
    assert m.step_matrix.tolist() == [[800, 999, 999], [300, 800, 999], [0, 300, 800], [0, 0, 300]]
    assert m.update_mask.tolist() == [[T, F_, F_], [T, T, F_], [F_, T, T], [F_, F_, T]]
    # every frame is updated exactly N times
    assert m.update_mask.sum(0).tolist() == [2, 2, 2]


def test_causal_blocks_repeat_per_frame_and_drop_the_tail():
    m = generate_timestep_matrix(5, TEMPLATE, 5, ar_step=1, num_pre_ready=0, causal_block_size=2)
    assert m.num_frames == 4                       # frame 4 does not fill a block
    assert m.step_index.tolist() == [[1, 1, 0, 0], [2, 2, 1, 1], [3, 3, 2, 2]]
    assert m.update_mask.tolist() == [[T, T, F_, F_], [T, T, T, T], [F_, F_, T, T]]
    assert m.valid_interval.tolist() == [[0, 4]] * 3


def test_prefix_frames_start_done_and_are_never_updated():
    m = generate_timestep_matrix(3, TEMPLATE, 3, ar_step=1, num_pre_ready=1, causal_block_size=1)
    assert m.step_index.tolist() == [[3, 1, 0], [3, 2, 1], [3, 3, 2]]
    assert m.step_matrix[:, 0].tolist() == [0, 0, 0]
    assert m.update_mask.tolist() == [[F_, T, F_], [F_, T, T], [F_, F_, T]]


def test_sliding_window_moves_when_the_next_frame_starts():
    m = generate_timestep_matrix(4, TEMPLATE, 2, ar_step=1, num_pre_ready=0, causal_block_size=1)
    assert m.step_index.tolist() == [[1, 0, 0, 0], [2, 1, 0, 0], [3, 2, 1, 0], [3, 3, 2, 1], [3, 3, 3, 2]]
    assert m.valid_interval.tolist() == [[0, 2], [0, 2], [1, 3], [2, 4], [2, 4]]
    # every update happens inside the window
    for row in range(m.rows):
        start, end = m.interval(row)
        assert not m.update_mask[row, :start].any() and not m.update_mask[row, end:].any()


def test_readme_async_setting_row_counts():
    template = make_flow_schedule(30, 8.0).timesteps
    assert generate_timestep_matrix(25, template, 25, 5, 0, 5).rows == 50
    assert generate_timestep_matrix(25, template, 25, 5, 5, 5).rows == 45
    row29 = generate_timestep_matrix(25, template, 25, 5, 0, 5).step_matrix[29, ::5]
    assert row29.tolist() == [216, 666, 822, 901, 948]


@pytest.mark.parametrize("kwargs, message", [
    (dict(causal_block_size=0), "causal_block_size"),
    (dict(num_frames=1, causal_block_size=2), "at least causal_block_size"),
    (dict(num_pre_ready=4), "leave at least one block"),
    (dict(ar_step=-1), "ar_step must be >= 0"),
    (dict(base_num_frames=2, ar_step=0), "ar_step must be at least 1"),
])
def test_schedule_rejects_bad_arguments(kwargs, message):
    args = dict(num_frames=4, step_template=TEMPLATE, base_num_frames=4, ar_step=1, num_pre_ready=0,
                causal_block_size=1) | kwargs
    with pytest.raises(ValueError, match=message):
        generate_timestep_matrix(**args)


# --------------------------------------------------------------------------------------------
# UniPC


def test_flow_schedule_matches_upstream_30_steps_shift_8():
    schedule = make_flow_schedule(30, 8.0)
    assert schedule.timesteps.tolist() == [
        999, 995, 991, 986, 980, 975, 969, 963, 956, 948, 941, 932, 922, 912, 901, 888, 874, 859,
        841, 822, 799, 773, 743, 708, 666, 615, 551, 470, 363, 216]
    assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas[-1] == 0
    assert (schedule.sigmas[1:] < schedule.sigmas[:-1]).all()


def _run_solver(solver, velocity_of, sample):
    for timestep in solver.schedule.timesteps:
        sample = solver.step(velocity_of(sample), timestep, sample)
    return sample


def test_unipc_is_exact_for_a_straight_flow():
    """x(sigma) = (1 - sigma) x0 + sigma eps has constant velocity eps - x0: x0 is recovered."""
    schedule = make_flow_schedule(8, 5.0)
    x0, eps = torch.randn(4, 3, 3), torch.randn(4, 3, 3)
    start = (1 - schedule.sigmas[0]) * x0 + schedule.sigmas[0] * eps
    out = _run_solver(FlowUniPCSolver(schedule), lambda _: eps - x0, start)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_upstream_aliasing_changes_the_first_correction_only():
    """With the quirk the second step corrects from the step-0 result: a straight flow is no longer exact."""
    schedule = make_flow_schedule(8, 5.0)
    x0, eps = torch.randn(4, 3, 3), torch.randn(4, 3, 3)
    start = (1 - schedule.sigmas[0]) * x0 + schedule.sigmas[0] * eps
    plain, aliased = FlowUniPCSolver(schedule), FlowUniPCSolver(schedule, alias_first_sample=True)
    velocity, first = eps - x0, schedule.timesteps[0]
    x1 = plain.step(velocity, first, start)
    assert torch.equal(x1, aliased.step(velocity, first, start))        # step 0 is identical
    plain.step(velocity, schedule.timesteps[1], x1)
    aliased.step(velocity, schedule.timesteps[1], x1)
    assert not torch.allclose(plain.last_step.corrected_sample, aliased.last_step.corrected_sample,
                              atol=1e-3)
    torch.testing.assert_close(plain.last_step.corrected_sample, x1)   # exact flow: nothing to correct
    aliased = FlowUniPCSolver(schedule, alias_first_sample=True)
    assert (_run_solver(aliased, lambda _: velocity, start) - x0).abs().max() > 1e-2


def test_unipc_orders_warm_up_and_end_first_order():
    for steps, orders in [(1, [1]), (2, [1, 1]), (5, [1, 2, 2, 2, 1])]:
        solver = FlowUniPCSolver(make_flow_schedule(steps, 3.0))
        seen = []
        sample = torch.randn(2, 2)
        for timestep in solver.schedule.timesteps:
            sample = solver.step(torch.randn(2, 2), timestep, sample)
            seen.append(solver.last_step.order)
        assert seen == orders
        assert solver.finished


def test_solver_does_not_keep_caller_buffers():
    """Passing a view that the caller overwrites must equal passing separate tensors."""
    schedule = make_flow_schedule(6, 8.0)
    torch.manual_seed(0)
    velocities, start = torch.randn(6, 4, 2, 2), torch.randn(4, 2, 2)
    separate, in_place = FlowUniPCSolver(schedule), FlowUniPCSolver(schedule)
    sample, buffer = start.clone(), start.clone()[None]
    for i, timestep in enumerate(schedule.timesteps):
        sample = separate.step(velocities[i], timestep, sample)
        buffer[0] = in_place.step(velocities[i], timestep, buffer[0])
    torch.testing.assert_close(buffer[0], sample, atol=0, rtol=0)


def test_first_step_must_be_a_schedule_timestep():
    with pytest.raises(ValueError, match="not in the schedule"):
        FlowUniPCSolver(make_flow_schedule(4, 8.0)).step(torch.zeros(1), 123, torch.zeros(1))


# --------------------------------------------------------------------------------------------
# pipeline with stub models

C, H, W = 4, 2, 2


class ConstantModel:
    """velocity = `value_of(context)` everywhere; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, fps=None, causal_block_size=None):
        self.calls.append(dict(shape=tuple(x.shape), t=t.clone(), fps=fps, cbs=causal_block_size,
                               context=float(context.flatten()[0])))
        return torch.full_like(x, float(context.flatten()[0]))


class WavyModel:
    """A velocity that depends on the input and t, so every step changes the sample."""

    def __call__(self, x, t, context, fps=None, causal_block_size=None):
        return 0.5 * x + t[:, None, :, None, None].float() / 1000 + context.mean()


def _contexts(cond=1.0, uncond=-1.0):
    return torch.full((1, 3, 5), cond), torch.full((1, 3, 5), uncond)


def test_cfg_combines_two_calls_and_straight_flow_lands_on_x0():
    model = ConstantModel()
    args = ScheduleArgs(num_steps=6, shift=5.0, guidance_scale=3.0, ar_step=1, fps=16)
    noise = torch.randn(C, 3, H, W)
    cond, uncond = _contexts(2.0, 0.5)
    result = DFPipeline(model, faithful_aliasing=False).generate(noise, cond, uncond, args)
    v = 0.5 + 3.0 * (2.0 - 0.5)
    sigma0 = make_flow_schedule(6, 5.0).sigmas[0]
    torch.testing.assert_close(result.latents, noise - sigma0 * v, atol=1e-5, rtol=1e-5)
    info = result.segments[0]
    assert info.model_calls == 2 * info.rows == len(model.calls)
    assert [c["context"] for c in model.calls[:2]] == [2.0, 0.5]        # cond then uncond
    assert all(c["fps"] == [fps_embedding_id(16)] == [0] for c in model.calls)
    assert all(c["cbs"] is None for c in model.calls)                   # bidirectional by default


def test_guidance_at_most_one_runs_only_the_cond_branch():
    model = ConstantModel()
    args = ScheduleArgs(num_steps=3, guidance_scale=1.0)
    DFPipeline(model).generate(torch.randn(C, 2, H, W), _contexts()[0], None, args)
    assert len(model.calls) == 3 and fps_embedding_id(24) == 1
    with pytest.raises(ValueError, match="negative_context"):
        DFPipeline(model).generate(torch.randn(C, 2, H, W), _contexts()[0], None,
                                   ScheduleArgs(num_steps=3, guidance_scale=5.0))


def test_frames_change_only_at_rows_that_update_them():
    records = []
    args = ScheduleArgs(num_steps=4, guidance_scale=1.0, ar_step=2, causal_block_size=2)
    prefix = torch.randn(C, 2, H, W)
    result = DFPipeline(WavyModel()).generate(torch.randn(C, 6, H, W), _contexts()[0], None, args,
                                              prefix_latents=prefix, on_row=records.append)
    matrix = result.segments[0].matrix
    inputs = torch.stack([r.model_input for r in records] + [result.latents])
    changed = (inputs[1:] != inputs[:-1]).transpose(1, 2).flatten(2).any(-1)   # [rows, F]
    assert torch.equal(changed, matrix.update_mask)
    assert torch.equal(result.latents[:, :2], prefix)
    assert [r.t.tolist() for r in records] == matrix.step_matrix.tolist()


def test_addnoise_noises_only_the_model_input_of_the_prefix():
    records = []
    args = ScheduleArgs(num_steps=3, guidance_scale=1.0, ar_step=1, addnoise_condition=20)
    prefix, noise = torch.randn(C, 1, H, W), torch.randn(C, 3, H, W)
    rows = generate_timestep_matrix(3, make_flow_schedule(3, 8.0).timesteps, 3, 1, 1, 1).rows
    eps = torch.randn(rows, C, 1, H, W)
    result = DFPipeline(WavyModel()).generate(noise, _contexts()[0], None, args, prefix_latents=prefix,
                                              addnoise_eps=eps, on_row=records.append)
    assert torch.equal(result.latents[:, :1], prefix)
    for k, record in enumerate(records):
        torch.testing.assert_close(record.model_input[:, :1], prefix * 0.98 + eps[k] * 0.02)
        assert record.t[0] == 20
    # a generator gives reproducible draws
    runs = [DFPipeline(WavyModel()).generate(noise, _contexts()[0], None, args, prefix_latents=prefix,
                                             addnoise_eps=torch.Generator().manual_seed(3)).latents
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("latents, base, overlap, count", [
    (65, 25, 5, 3),     # README: 257 frames, base 97, overlap 17
    (185, 25, 5, 9),    # README: 737 frames
    (13, 5, 2, 4),
    (25, 25, 5, 1),
    (26, 25, 5, 2),
])
def test_segment_count_follows_upstream_formula(latents, base, overlap, count):
    plans = plan_segments(latents, base, overlap)
    assert len(plans) == count
    if latents > base:
        assert count == 1 + (latents - base - 1) // (base - overlap) + 1
    assert plans[-1].start + plans[-1].num_frames == latents
    assert all(p.num_frames <= base for p in plans)
    assert all(b.start == a.start + a.num_frames - overlap for a, b in zip(plans, plans[1:]))


def test_latent_overlap_keeps_the_overlapping_latents():
    args = ScheduleArgs(num_steps=3, guidance_scale=1.0, ar_step=1, base_num_frames=5,
                        overlap_frames=2)
    noise = torch.randn(C, 13, H, W)
    done = []
    result = DFPipeline(WavyModel()).generate(noise, _contexts()[0], None, args,
                                              progress=lambda d, t: done.append((d, t)))
    segments = result.segments
    assert [s.plan.num_frames for s in segments] == [5, 5, 5, 4]
    assert result.latents.shape == noise.shape
    for previous, segment in zip(segments, segments[1:]):
        assert segment.num_prefix == 2
        assert torch.equal(segment.latents[:, :2], previous.latents[:, -2:])
        start = segment.plan.start
        assert torch.equal(result.latents[:, start:start + segment.plan.num_frames], segment.latents)
    total = sum(s.rows for s in segments)
    assert done[-1] == (total, total) and len(done) == total
    assert all(len(s.row_seconds) == s.rows for s in segments)


def test_latent_overlap_truncates_the_prefix_to_whole_blocks():
    args = ScheduleArgs(num_steps=2, guidance_scale=1.0, ar_step=1, causal_block_size=2,
                        base_num_frames=6, overlap_frames=3)
    with pytest.warns(UserWarning, match="truncated"):
        result = DFPipeline(WavyModel()).generate(torch.randn(C, 9, H, W), _contexts()[0], None, args)
    first, second = result.segments
    assert second.num_prefix == 2
    assert torch.equal(second.latents[:, :2], first.latents[:, -3:-1])
    assert torch.equal(result.latents[:, :6], first.latents)
    assert torch.equal(result.latents[:, 6:], second.latents[:, 3:])


def test_pixel_overlap_decodes_takes_the_history_and_reencodes():
    encoded = []

    def decode(latents):                # [C, F, h, w] -> [C, 1 + 4 (F - 1), h, w]
        return torch.cat([latents[:, :1], latents[:, 1:].repeat_interleave(4, dim=1)], dim=1).tanh()

    def encode(video):                  # [C, T, h, w] -> [C, 1 + (T - 1) // 4, h, w]
        encoded.append(video.shape[1])
        return video[:, ::4].atanh()

    args = ScheduleArgs(num_steps=2, guidance_scale=1.0, ar_step=1, base_num_frames=5,
                        overlap_frames=2)
    overlap = PixelOverlap(encode=encode, decode=decode, history_frames=5)
    result = DFPipeline(WavyModel()).generate(torch.randn(C, 8, H, W) * 0.1, _contexts()[0], None,
                                              args, pixel_overlap=overlap)
    assert encoded == [5]                               # one later segment, 5 pixel frames
    assert result.video.shape[1] == 1 + 4 * (8 - 1)
    with pytest.raises(ValueError, match="agree"):
        DFPipeline(WavyModel()).generate(torch.randn(C, 8, H, W), _contexts()[0], None, args,
                                         pixel_overlap=PixelOverlap(encode, decode, history_frames=9))


def test_sliding_window_feeds_base_frames_per_call():
    model = ConstantModel()
    args = ScheduleArgs(num_steps=2, guidance_scale=1.0, ar_step=1, base_num_frames=2)
    DFPipeline(model).generate(torch.randn(C, 4, H, W), _contexts()[0], None, args)
    assert {c["shape"][2] for c in model.calls} == {2}


@dataclass
class _FakeCallContext:
    request: str
    branch: str
    step: int
    frames_per_chunk: int
    chunk_sigma: torch.Tensor
    chunk_active: torch.Tensor
    causal: bool


class _RecordingAccel:
    def __init__(self):
        self.contexts, self.ended = [], []

    @contextmanager
    def call(self, ctx):
        self.contexts.append(ctx)
        yield

    def end_request(self, request):
        self.ended.append(request)
        return {"request": request}


def test_accelerator_sees_one_context_per_call(monkeypatch):
    try:
        import scope.hooks  # noqa: F401
    except ImportError:   # scope.hooks not written yet: stand in for its CallContext
        monkeypatch.setitem(sys.modules, "scope.hooks",
                            types.SimpleNamespace(CallContext=_FakeCallContext))
    accel = _RecordingAccel()
    args = ScheduleArgs(num_steps=2, shift=1.0, guidance_scale=2.0, ar_step=1, causal_block_size=2)
    result = DFPipeline(ConstantModel(), accel).generate(torch.randn(C, 4, H, W), *_contexts(), args,
                                                         request_id="r1")
    matrix = result.segments[0].matrix
    assert len(accel.contexts) == 2 * matrix.rows
    assert [c.branch for c in accel.contexts[:2]] == ["cond", "uncond"]
    for ctx in accel.contexts:
        row = ctx.step
        assert ctx.request == "r1" and ctx.frames_per_chunk == 2 and ctx.causal is False
        torch.testing.assert_close(ctx.chunk_sigma, matrix.step_matrix[row, ::2].float() / 1000)
        assert torch.equal(ctx.chunk_active, matrix.update_mask[row, ::2])
    assert accel.ended == ["r1"] and result.segments[0].accel_stats == {"request": "r1"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(overlap_frames=5), "needs base_num_frames"),
    (dict(base_num_frames=5, overlap_frames=5), "overlap_frames must be in"),
    (dict(num_steps=0), "num_steps"),
    (dict(addnoise_condition=-1), "addnoise_condition"),
])
def test_schedule_args_explain_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleArgs(**kwargs)


def test_dtype_option_keeps_latents_in_that_dtype():
    result = DFPipeline(WavyModel(), dtype=torch.float64).generate(
        torch.randn(C, 2, H, W), _contexts()[0], None, ScheduleArgs(num_steps=2, guidance_scale=1.0))
    assert result.latents.dtype == torch.float64
