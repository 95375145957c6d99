"""The stack hook end to end on the toy model: every mode writes exactly what it should."""

import json
import math

import pytest
import torch

from scope.config import ScopeConfig, make_config
from scope.executor import StageExecutor, make_run_fn
from scope.hooks import ACCEL_HOOK, Accelerator, HookRegistry, apply_accel, remove_accel
from tests.unit.scope_toy import (ToyAdapter, ToyModel, chunk_tokens, df_schedule, make_ctx,
                                  make_hidden, make_inputs)

EXACT = dict(rtol=1e-12, atol=1e-12)


def scope_cfg(**kw):
    base = dict(force_final_step=False, sigma_floor_scale=1.0, residual_dtype="input",
                max_consecutive=100, eps_error=math.inf, granularity="chunk", indicator="probe",
                prefer="cache", order=2, horizon_rho=1.0, error_estimate="embedded",
                coordinate="sigma")
    return ScopeConfig(**{**base, **kw})


def call(model, accel, ctx, h, chunk_sigmas, fpc=1, causal=False):
    inputs = make_inputs(chunk_sigmas, fpc=fpc, causal=causal)
    with accel.call(ctx):
        return model(h, inputs)


# ---------------------------------------------------------------------------------------------
# applying and removing
# ---------------------------------------------------------------------------------------------

def test_outside_a_call_context_the_model_is_unchanged():
    model = ToyModel(mix=0.3)
    h, inputs = make_hidden(3), make_inputs([0.2, 0.6, 1.0])
    before = model(h, inputs)
    accel = apply_accel(model, make_config("scope"), ToyAdapter())
    after = model(h, inputs)
    assert torch.equal(before, after)
    assert model.log[-1] == (0, 4, 6), "the full stack ran on every token"
    assert accel.stats("r").calls == 0


def test_remove_accel_restores_the_model_and_the_chain_is_printable():
    model = ToyModel()
    accel = apply_accel(model, make_config("none"), ToyAdapter())
    registry = HookRegistry.of(model, "run_blocks", create=False)
    assert registry.describe() == f"ToyModel.run_blocks: original -> {ACCEL_HOOK}"
    assert "run_blocks" in model.__dict__
    with pytest.raises(RuntimeError, match="already applied"):
        apply_accel(model, make_config("none"), ToyAdapter())
    assert remove_accel(model) is accel
    assert "run_blocks" not in model.__dict__ and "_scope_hook_registries" not in model.__dict__
    assert model.run_blocks.__func__ is ToyModel.run_blocks
    assert remove_accel(model) is None
    apply_accel(model, make_config("none"), ToyAdapter())   # can be applied again


def test_contexts_do_not_nest_and_one_stack_call_per_context():
    model = ToyModel()
    accel = apply_accel(model, make_config("none"), ToyAdapter())
    ctx = make_ctx([0.5])
    h, inputs = make_hidden(1), make_inputs([0.5])
    with accel.call(ctx):
        with pytest.raises(RuntimeError, match="do not nest"):
            with accel.call(ctx):
                pass
        model(h, inputs)
        with pytest.raises(RuntimeError, match="one stack call per accel.call"):
            model(h, inputs)


# ---------------------------------------------------------------------------------------------
# what each mode writes
# ---------------------------------------------------------------------------------------------

def test_each_mode_writes_its_value():
    """Chunk 0 is active, chunk 1 inactive. Chunk 0 sees sigma 1.0, 0.9, 0.75 (warm-up:
    Recompute), 0.7 (indicator 0.067 < tau_cache: Cache), 0.6 (acc 0.21 < tau_predict: Predict
    of order 2, exact because the toy residual is quadratic in sigma)."""
    model = ToyModel(mix=0.0)
    accel = apply_accel(model, scope_cfg(warmup_steps=3, tau_cache=0.1, tau_predict=0.5, order=2),
                        ToyAdapter())
    expected_modes = ["recompute"] * 3 + ["cache", "predict"]
    last_recompute_sigma = None
    for step, s in enumerate([1.0, 0.9, 0.75, 0.7, 0.6]):
        h = make_hidden(2, seed=step)
        runs_before = len(model.log)
        out = call(model, accel, make_ctx([s, 1.0], active=[True, False], step=step), h, [s, 1.0])
        mode = accel.stats("r").per_chunk[0]
        assert getattr(mode, expected_modes[step]) >= 1
        h0, o0 = chunk_tokens(h, 0), chunk_tokens(out, 0)
        if expected_modes[step] == "recompute":
            full = model.run_blocks(h, make_inputs([s, 1.0]))
            torch.testing.assert_close(o0, chunk_tokens(full, 0), **EXACT)
            last_recompute_sigma = s
        elif expected_modes[step] == "cache":
            torch.testing.assert_close(o0, h0 + model.residual(last_recompute_sigma), **EXACT)
            assert len(model.log) == runs_before, "Cache runs no block"
        else:
            torch.testing.assert_close(o0, h0 + model.residual(s), **EXACT)
            assert not torch.allclose(o0, h0 + model.residual(last_recompute_sigma))
            assert len(model.log) == runs_before, "Predict runs no block"
        # skip: the sampler discards it; h_in, or the computed value if it ran as context
        ran = expected_modes[step] == "recompute"
        skip_ref = model.run_blocks(h, make_inputs([s, 1.0])) if ran else h
        torch.testing.assert_close(chunk_tokens(out, 1), chunk_tokens(skip_ref, 1), **EXACT)
    stats = accel.stats("r")
    assert stats.modes.to_dict() == {"recompute": 3, "cache": 1, "predict": 1, "skip": 5}
    assert stats.reasons["warmup"] == 3 and stats.reasons["inactive"] == 5


def test_recompute_of_the_whole_window_equals_the_model():
    model = ToyModel(mix=0.4)
    accel = apply_accel(model, make_config("none"), ToyAdapter())
    h = make_hidden(3, fpc=2)
    out = call(model, accel, make_ctx([0.3, 0.6, 0.9], fpc=2), h, [0.3, 0.6, 0.9], fpc=2)
    remove_accel(model)
    assert torch.equal(out, model(h, make_inputs([0.3, 0.6, 0.9], fpc=2)))


def test_cfg_branches_and_requests_never_share_state():
    model = ToyModel()
    accel = apply_accel(model, scope_cfg(warmup_steps=1, tau_cache=1e9, tau_predict=math.inf),
                        ToyAdapter())
    h = make_hidden(1)
    call(model, accel, make_ctx([0.9], branch="cond", request="a"), h, [0.9])
    call(model, accel, make_ctx([0.5], branch="uncond", request="a"), h, [0.5])
    call(model, accel, make_ctx([0.3], branch="cond", request="b"), h, [0.3])
    # next call: everyone Caches its own residual
    for branch, request, sigma_then in (("cond", "a", 0.9), ("uncond", "a", 0.5), ("cond", "b", 0.3)):
        h2 = make_hidden(1, seed=7)
        out = call(model, accel, make_ctx([0.2], branch=branch, request=request, step=1), h2, [0.2])
        torch.testing.assert_close(out, h2 + model.residual(sigma_then), **EXACT,
                                   msg=f"{request}/{branch} must reuse its own residual")
    stats_a = accel.end_request("a")
    assert stats_a.calls == 4 and accel.executor.units.keys("a") == []
    out = call(model, accel, make_ctx([0.1], request="b", step=2), h, [0.1])
    torch.testing.assert_close(out, h + model.residual(0.3), **EXACT)   # b untouched by a's end


# ---------------------------------------------------------------------------------------------
# stats, memory
# ---------------------------------------------------------------------------------------------

SIG = {0: 1.0, 1: 0.9, 2: 0.7, 3: 0.45, 4: 0.2, 5: 0.0}


def run_schedule(model, accel, rows, causal=False, branches=("cond", "uncond"), h=None, request="r"):
    outs, pre = [], [0] * len(rows[0])
    for step, row in enumerate(rows):
        active = [n != p and n != 5 for n, p in zip(row, pre)]
        sig = [SIG[i] for i in row]
        nxt = [SIG[i + 1] if a else SIG[i] for i, a in zip(row, active)]
        x = make_hidden(len(row), seed=step) if h is None else h
        for br in branches:
            ctx = make_ctx(sig, active=active, nxt=nxt, branch=br, step=step, causal=causal,
                           request=request)
            outs.append((active, x, sig, call(model, accel, ctx, x, sig, causal=causal)))
        pre = row
    return outs


@pytest.mark.parametrize("cfg", [
    make_config("none"),
    make_config("scope", tau_cache=0.3, tau_predict=0.8, warmup_steps=2, order=1,
                selective="approx", context_chunks=1),
    make_config("teacache", granularity="chunk", rescale=None, threshold=0.3, warmup_steps=1),
    make_config("taylorseer", interval=2, selective="exact"),
    make_config("fbcache", threshold=0.5),
])
def test_stats_add_up(cfg):
    model = ToyModel(mix=0.2)
    accel = apply_accel(model, cfg, ToyAdapter())
    rows = df_schedule(5, 4, 2)
    run_schedule(model, accel, rows)
    st = accel.end_request("r")
    calls = 2 * len(rows)
    assert st.calls == calls and st.chunk_calls == calls * 5
    assert st.modes.total() == calls * 5 == sum(m.total() for m in st.per_chunk.values())
    assert sum(st.reasons.values()) == calls * 5
    assert 0 < st.block_evals <= st.block_evals_full == calls * 5 * 4
    assert st.context_block_evals <= st.block_evals
    assert st.modes.skip == calls * 5 - 2 * sum(n != 5 and n != p for r, pr in zip(rows, [[0] * 5] + rows)
                                               for n, p in zip(r, pr))
    json.dumps(st.to_dict())
    if cfg.method == "none":
        assert st.block_evals == st.block_evals_full and st.compute_fraction == 1.0
    else:
        assert st.compute_fraction < 1.0


def test_memory_is_bounded_by_the_window_not_the_video():
    """A 3-chunk window slides one chunk every 3 calls over a 20-chunk video."""
    model = ToyModel()
    accel = apply_accel(model, scope_cfg(warmup_steps=1, tau_cache=0.05, tau_predict=0.5, order=1),
                        ToyAdapter())
    peak_units, peak_bytes = [], []
    for offset in range(18):
        for k in range(3):
            sig = [max(0.05, 1.0 - 0.1 * (3 * j + k + 1)) for j in range(3)]
            for br in ("cond", "uncond"):
                ctx = make_ctx(sig, branch=br, step=3 * offset + k, offset=offset)
                call(model, accel, ctx, make_hidden(3, seed=k), sig)
        peak_units.append(len(accel.executor.units))
        peak_bytes.append(accel.memory_bytes())
    assert max(peak_units) <= 3 * 2, "at most window chunks x branches units hold state"
    assert max(k.chunk for k in accel.executor.units.keys()) == 17 + 2
    assert peak_bytes[-1] == peak_bytes[5], "memory stays flat as the video grows"
    accel.release_chunks("r", [17, 18, 19])
    assert len(accel.executor.units) == 0 and accel.num_units("r") == 0


def test_finished_chunks_drop_their_residuals():
    model = ToyModel()
    accel = apply_accel(model, make_config("flowcache", indicator="probe", warmup_steps=1),
                        ToyAdapter())
    rows = df_schedule(5, 4, 2)
    run_schedule(model, accel, rows[:7], branches=("cond",))       # row 6: F F A A W
    held = sorted(k.chunk for k, st in accel.executor.units.items("r") if st.residuals)
    assert held == [2, 3], f"finished chunks 0, 1 must be released, held {held}"


# ---------------------------------------------------------------------------------------------
# selective computation
# ---------------------------------------------------------------------------------------------

def test_selective_exact_with_finished_kv_matches_the_full_causal_model():
    model = ToyModel(mix=0.5)
    rows = df_schedule(5, 4, 2)
    h = make_hidden(5, seed=3)
    accel = apply_accel(model, make_config("none", selective="exact", kv_cache_finished=True),
                        ToyAdapter())
    outs = run_schedule(model, accel, rows, causal=True, h=h, branches=("cond",))
    st = accel.end_request("r")
    remove_accel(model)
    for step, (active, x, sig, out) in enumerate(outs):
        full = model(x, make_inputs(sig, causal=True))
        for j, a in enumerate(active):
            if a:
                torch.testing.assert_close(chunk_tokens(out, j), chunk_tokens(full, j), **EXACT,
                                           msg=f"row {step} chunk {j}: selective exact != full")
    assert st.kv_served_chunks > 0 and st.dropped_chunks > 0
    assert st.block_evals < st.block_evals_full


def test_selective_approx_on_bidirectional_attention_saves_compute_and_is_measured():
    model = ToyModel(mix=0.5)
    rows = df_schedule(5, 4, 2)
    h = make_hidden(5, seed=3)
    accel = apply_accel(model, make_config("none", selective="approx", context_chunks=0), ToyAdapter())
    outs = run_schedule(model, accel, rows, h=h, branches=("cond",))
    st = accel.end_request("r")
    remove_accel(model)
    active, x, sig, out = outs[6]                      # row 6: F F A A W
    full = model(x, make_inputs(sig))
    assert not torch.allclose(chunk_tokens(out, 2), chunk_tokens(full, 2)), "approx is not exact"
    assert st.block_evals < st.block_evals_full and st.dropped_chunks > 0


def test_cache_chunk_that_runs_as_context_takes_the_computed_output():
    model = ToyModel()
    cfg = make_config("teacache", granularity="chunk", rescale=None, threshold=0.2, warmup_steps=1)
    accel = apply_accel(model, cfg, ToyAdapter())
    h = make_hidden(2)
    call(model, accel, make_ctx([0.9, 0.9]), h, [0.9, 0.9])
    # chunk 0 barely changes (Cache), chunk 1 jumps (Recompute): with selective "off" the whole
    # window runs, so chunk 0 takes its computed output
    out = call(model, accel, make_ctx([0.88, 0.4], step=1), h, [0.88, 0.4])
    torch.testing.assert_close(out, model.run_blocks(h, make_inputs([0.88, 0.4])), **EXACT)
    assert accel.stats("r").reasons.get("in-run") == 1


# ---------------------------------------------------------------------------------------------
# decide once, execute per stage
# ---------------------------------------------------------------------------------------------

def test_two_pipeline_stages_reproduce_the_in_process_result():
    model = ToyModel(mix=0.2)
    cfg = scope_cfg(warmup_steps=3, tau_cache=0.05, tau_predict=0.6, order=2, horizon_rho=3.0)
    adapter = ToyAdapter()
    accel = apply_accel(model, cfg, adapter)
    stage0 = Accelerator(cfg, adapter, num_blocks=4, block_range=(0, 2))
    stage1 = StageExecutor(cfg, adapter, 2, 4)
    run_fn = make_run_fn(model, adapter)
    seen = set()
    for step, s in enumerate([1.0, 0.92, 0.85, 0.83, 0.78, 0.7, 0.6, 0.55]):
        sig = [s, min(1.0, s + 0.05)]
        h, inputs, ctx = make_hidden(2, seed=step), make_inputs(sig), make_ctx(sig, step=step)
        with accel.call(ctx):
            ref = model(h, inputs)
        plan = stage0.plan(ctx, probe=stage0.probe(inputs, h), h=h)
        mid = stage0.executor.execute(plan, h, inputs, run_fn)
        out = stage1.execute(plan, mid, inputs, run_fn)
        torch.testing.assert_close(out, ref, **EXACT, msg=f"step {step} modes {plan.modes}")
        seen.update(plan.modes)
    assert {"recompute", "cache", "predict"} <= seen


def test_observed_error_and_trace_are_recorded():
    model = ToyModel()
    accel = apply_accel(model, scope_cfg(warmup_steps=10, order=1, trace=True), ToyAdapter())
    for step, s in enumerate([1.0, 0.8, 0.6, 0.4]):
        call(model, accel, make_ctx([s], step=step), make_hidden(1), [s])
    st = accel.stats("r")
    # checked from the second Recompute on: order 0 while only one point is kept, then order 1
    assert st.observed_error.count == 3
    assert st.observed_error.max > 0.0           # the toy residual is quadratic
    assert [row["mode"] for row in st.trace] == ["recompute"] * 4
    observed = [row["observed_error"] for row in st.trace]
    assert observed[0] is None and None not in observed[1:]
    assert max(observed[1:]) == pytest.approx(st.observed_error.max)


# ---------------------------------------------------------------------------------------------
# misuse is reported clearly
# ---------------------------------------------------------------------------------------------

class RangeAdapter(ToyAdapter):
    def block_range(self, h, inputs, start=0, end=None):
        return start, 4 if end is None else end


def test_partial_stack_calls_inside_a_context_are_refused():
    model = ToyModel()
    accel = apply_accel(model, make_config("none"), RangeAdapter())
    with accel.call(make_ctx([0.5])):
        with pytest.raises(RuntimeError, match="full-stack calls only, got blocks \\(0, 2\\)"):
            model.run_blocks(make_hidden(1), make_inputs([0.5]), 0, 2)


def test_context_that_does_not_match_the_frames_is_refused():
    model = ToyModel()
    accel = apply_accel(model, make_config("none"), ToyAdapter())
    with accel.call(make_ctx([0.5, 0.5], fpc=2)):
        with pytest.raises(ValueError, match="has 2 frames but the call context describes 2 chunks x 2"):
            model(make_hidden(2), make_inputs([0.5, 0.5]))


def test_an_object_that_is_not_an_adapter_is_refused():
    with pytest.raises(TypeError, match="missing \\['num_blocks'"):
        apply_accel(ToyModel(), make_config("none"), type("A", (), {"stack_method": "run_blocks"})())


def test_a_chunk_whose_noise_level_rises_starts_fresh():
    """The next segment of a long video reuses window positions: old residuals must not leak."""
    model = ToyModel()
    accel = apply_accel(model, scope_cfg(warmup_steps=1, tau_cache=1e9, tau_predict=math.inf),
                        ToyAdapter())
    h = make_hidden(1)
    call(model, accel, make_ctx([0.5]), h, [0.5])
    out = call(model, accel, make_ctx([1.0], step=1), h, [1.0])      # new content at sigma 1.0
    torch.testing.assert_close(out, model.run_blocks(h, make_inputs([1.0])), **EXACT)
    assert accel.stats("r").reasons["warmup"] == 2
