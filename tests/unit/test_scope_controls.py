"""SCOPE as shipped (call granularity, Predict before Cache, observed-error bound) and each of
its stability controls: every control fires where it should and nowhere else.

Toy facts used below (tests/unit/scope_toy.py): with mix = 0 a chunk's stack residual is a
degree-2 polynomial in its noise level sigma, independent of the input, so order-2 Newton in
sigma predicts it exactly and lower orders do not.
"""

import math

import pytest
import torch

from scope.config import ScopeConfig, make_config
from scope.hooks import apply_accel
from scope.scheduler import (CACHE, PREDICT, RECOMPUTE, ChunkSignals, ScopeScheduler, UnitState,
                             coordinate_value, tighten_factor)
from scope.state import UnitKey
from tests.unit.scope_toy import (DTYPE, ToyAdapter, ToyModel, chunk_tokens, df_schedule, make_ctx,
                                  make_hidden, make_inputs)

EXACT = dict(rtol=1e-12, atol=1e-12)
# everything off except what a test turns on
QUIET = dict(force_final_step=False, sigma_floor_scale=1.0, max_consecutive=100, warmup_steps=1,
             indicator="probe", tau_cache=0.0, tau_predict=math.inf, error_estimate="off",
             horizon_rho=math.inf, order=1, coordinate="sigma", sync=True)


def policy(**kw):
    return ScopeScheduler(ScopeConfig(**{**QUIET, **kw}))


def step_policy(pol, chunk_sigmas, step, active=None, nxt=None, probes=None):
    ctx = make_ctx(chunk_sigmas, active=active, step=step, nxt=nxt)
    probe = probes if probes is not None else [torch.full((1, 2, 1), s, dtype=DTYPE) for s in chunk_sigmas]
    signals = ChunkSignals(probe=probe)
    decisions = pol.propose(ctx, signals)
    pol.commit(ctx, decisions, signals)
    return decisions


def run(pol, sigmas):
    return [step_policy(pol, [s], i)[0] for i, s in enumerate(sigmas)]


# ---------------------------------------------------------------------------------------------
# mode order and granularity
# ---------------------------------------------------------------------------------------------

def test_predict_is_tried_before_cache_and_the_paper_order_is_available():
    sig = [1.0, 0.9, 0.8, 0.7]
    both = dict(tau_cache=1e9, tau_predict=1e9, warmup_steps=2)
    assert [d.mode for d in run(policy(**both), sig)] == [RECOMPUTE, RECOMPUTE, PREDICT, PREDICT]
    assert [d.mode for d in run(policy(prefer="cache", **both), sig)] == [RECOMPUTE, RECOMPUTE, CACHE, CACHE]
    # Predict refused by a control (horizon 0.5 x span 0.1 < 0.1) falls back to Cache
    got = run(policy(**{**both, "horizon_rho": 0.5}), sig)
    assert [(d.mode, d.reason) for d in got][2] == (CACHE, "below-tau-cache")


def test_call_granularity_gives_every_active_chunk_the_same_indicator():
    """Two chunks whose probes change by 10 % and 50 %: per call both accumulate the pooled
    relative change (sum |d| / sum |prev| = (0.1 + 0.2) / 1.4 here); per chunk each its own."""
    def increments(granularity):
        pol = policy(granularity=granularity, tau_predict=1e9)
        step_policy(pol, [1.0, 0.4], 0, probes=[torch.full((1, 2, 1), v, dtype=DTYPE) for v in (1.0, 0.4)])
        got = step_policy(pol, [0.9, 0.3], 1, probes=[torch.full((1, 2, 1), v, dtype=DTYPE) for v in (0.9, 0.2)])
        return [d.indicator for d in got]

    assert increments("call") == pytest.approx([0.3 / 1.4, 0.3 / 1.4])
    assert increments("chunk") == pytest.approx([0.1, 0.5])


def test_under_block_causal_attention_only_the_forced_prefix_runs():
    """Call granularity on a block-causal toy: when only the oldest active chunk must recompute
    (its final step), the call runs that chunk alone (finished chunks served from K/V) and the
    tail predicts; the block evaluations of that call are one chunk's."""
    model = ToyModel(mix=0.0)
    cfg = make_config("scope", **{**QUIET, "force_final_step": True, "tau_predict": 1e9,
                                  "selective": "exact", "kv_cache_finished": True})
    accel = apply_accel(model, cfg, ToyAdapter())
    sig = [[0.6, 0.9, 1.0], [0.3, 0.7, 0.95], [0.1, 0.5, 0.9], [0.05, 0.3, 0.8]]
    nxt = [[0.3, 0.7, 0.95], [0.1, 0.5, 0.9], [0.05, 0.3, 0.8], [0.0, 0.2, 0.7]]
    for step in range(4):
        before = accel.stats("r").block_evals
        with accel.call(make_ctx(sig[step], nxt=nxt[step], step=step, causal=True)):
            model(make_hidden(3, seed=step), make_inputs(sig[step], causal=True))
    plan_evals = accel.stats("r").block_evals - before
    assert plan_evals == 1 * model.num_blocks                  # chunk 0 only
    assert accel.stats("r").reasons["final"] == 1 and accel.stats("r").modes.predict >= 2


# ---------------------------------------------------------------------------------------------
# stability controls, one at a time
# ---------------------------------------------------------------------------------------------

def test_max_consecutive_fires_after_exactly_n_reuses():
    got = run(policy(max_consecutive=2, tau_predict=1e9), [1.0, .9, .8, .7, .6, .5, .4])
    assert [d.mode for d in got] == [RECOMPUTE, RECOMPUTE, PREDICT, PREDICT, RECOMPUTE, PREDICT, PREDICT]
    assert [d.reason for d in got if d.mode == RECOMPUTE] == ["warmup", "short-history", "max-consecutive"]


def test_horizon_fires_beyond_rho_times_the_history_span_only():
    # history points 1.0 and 0.9 (span 0.1); rho = 2 allows sigma down to 0.7
    pol = policy(horizon_rho=2.0, tau_predict=1e9, tau_cache=0.0)
    got = run(pol, [1.0, 0.9])
    assert [d.mode for d in got] == [RECOMPUTE, RECOMPUTE]     # 2nd: short history (order 1)
    assert step_policy(pol, [0.75], 2)[0].mode == PREDICT      # 0.15 <= 0.2
    assert step_policy(pol, [0.65], 3)[0].reason == "horizon"  # 0.25 > 0.2


def test_budget_tightens_as_sigma_goes_to_zero():
    """The same indicator passes at high noise and fails near sigma = 0."""
    assert tighten_factor(1.0, 0.1, 0.5) == 1.0 and tighten_factor(0.0, 0.1, 0.5) == pytest.approx(0.1)
    kw = dict(sigma_floor_scale=0.1, sigma_knee=0.5, tau_predict=0.12, order=0)
    high = run(policy(**kw), [1.0, 0.9])              # indicator 0.1 < 0.12 x 1
    low = run(policy(**kw), [0.1, 0.09])              # indicator 0.1 > 0.12 x 0.28
    assert high[1].mode == PREDICT and (low[1].mode, low[1].reason) == (RECOMPUTE, "above-tau")


def test_observed_error_bounds_the_predictor_in_use_and_scales_with_the_horizon():
    pol = policy(error_estimate="observed", eps_error=0.1, tau_predict=1e9, order=1)
    run(pol, [1.0, 0.9])                              # two recomputes: order-1 history
    unit, st = UnitKey("r", "cond", 0), pol.units.get(UnitKey("r", "cond", 0))
    # measured: 4 % error at horizon 0.1; at horizon 0.1 -> 0.04, at 0.2 -> 0.04 x 2^2 = 0.16
    pol.observe("r", "cond", 0, {0: (0.04, 0.1)})
    assert pol.error_estimate(unit, st, 0.8) == pytest.approx(0.04)
    assert pol.error_estimate(unit, st, 0.7) == pytest.approx(0.16)
    assert step_policy(pol, [0.8], 2)[0].mode == PREDICT
    pol2 = policy(error_estimate="observed", eps_error=0.1, tau_predict=1e9, order=1)
    run(pol2, [1.0, 0.9])
    pol2.observe("r", "cond", 0, {0: (0.04, 0.1)})
    d = step_policy(pol2, [0.7], 2)[0]
    assert (d.mode, d.reason) == (RECOMPUTE, "error-estimate") and d.est_error == pytest.approx(0.16)


def test_observed_error_is_measured_on_the_model_for_the_configured_order():
    """On the toy (residual quadratic in sigma) order 2 predicts exactly: once its own error has
    been measured (0) the bound lets every Predict through; order 1 errs, and the same bound
    refuses it every time."""
    def reasons(order):
        model = ToyModel()
        cfg = make_config("scope", **{**QUIET, "order": order, "error_estimate": "observed", "eps_error": 1e-3,
                                      "tau_predict": 1e9, "max_consecutive": 1})
        accel = apply_accel(model, cfg, ToyAdapter())
        for step, s in enumerate([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]):
            with accel.call(make_ctx([s], step=step)):
                model(make_hidden(1), make_inputs([s]))
        return accel.stats("r").reasons

    exact, linear = reasons(2), reasons(1)
    # order 2 is refused only while its error was measured with fewer points (orders 0, 1)
    assert exact.get("error-estimate", 0) <= 2 and exact.get("predict", 0) >= 3
    assert linear.get("predict", 0) == 0 and linear.get("error-estimate", 0) >= 4


def test_short_history_and_final_and_warmup_fire_only_where_they_should():
    pol = policy(order=2, tau_predict=1e9, warmup_steps=2, force_final_step=True)
    sig, nxt = [1.0, 0.8, 0.6, 0.4, 0.2], [0.8, 0.6, 0.4, 0.2, 0.0]
    got = [step_policy(pol, [s], i, nxt=[n])[0] for i, (s, n) in enumerate(zip(sig, nxt))]
    assert [(d.mode, d.reason) for d in got] == [
        (RECOMPUTE, "warmup"), (RECOMPUTE, "warmup"), (RECOMPUTE, "short-history"), (PREDICT, "predict"),
        (RECOMPUTE, "final")]


# ---------------------------------------------------------------------------------------------
# coordinates
# ---------------------------------------------------------------------------------------------

def test_coordinates():
    assert coordinate_value("sigma", 0.25, 7) == 0.25
    assert coordinate_value("timestep", 0.25, 7) == 250.0
    assert coordinate_value("step", 0.25, 7) == 7.0
    assert coordinate_value("logsnr", 0.25, 7) == pytest.approx(math.log(3.0))
    assert math.isfinite(coordinate_value("logsnr", 0.0, 0)) and math.isfinite(coordinate_value("logsnr", 1.0, 0))
    with pytest.raises(ValueError, match="unknown coordinate"):
        coordinate_value("time", 0.5, 0)


@pytest.mark.parametrize("coordinate", ["sigma", "timestep"])
def test_order_two_in_the_noise_level_predicts_the_toy_exactly(coordinate):
    """Newton in sigma (or the timestep, an affine copy of it) reproduces a residual quadratic
    in sigma at uneven steps; the step index does not."""
    model = ToyModel()
    cfg = make_config("scope", **{**QUIET, "order": 2, "coordinate": coordinate, "tau_predict": 1e9,
                                  "residual_dtype": "input"})
    accel = apply_accel(model, cfg, ToyAdapter())
    for step, s in enumerate([1.0, 0.93, 0.8, 0.62, 0.4]):
        h = make_hidden(1, seed=step)
        with accel.call(make_ctx([s], step=step)):
            out = model(h, make_inputs([s]))
        torch.testing.assert_close(out, h + model.residual(s), **EXACT)
    assert accel.stats("r").modes.predict == 2


def test_step_coordinate_counts_each_chunks_own_steps():
    pol = policy(coordinate="step", tau_predict=1e9)
    got = run(pol, [1.0, 0.5, 0.45, 0.44])
    assert [d.coord for d in got] == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("sync", [True, False])
def test_sync_recomputes_every_active_chunk_on_a_soft_recompute(sync):
    """Chunk 0 hits max_consecutive while chunk 1 (one call younger) may still predict: in
    lockstep both recompute ("sync"); otherwise only chunk 0 does."""
    pol = policy(order=0, tau_predict=1e9, max_consecutive=2, sync=sync)
    step_policy(pol, [0.9, 1.0], 0, active=[True, False])
    step_policy(pol, [0.8, 1.0], 1)
    step_policy(pol, [0.7, 0.9], 2)
    got = step_policy(pol, [0.6, 0.8], 3)
    assert (got[0].mode, got[0].reason) == (RECOMPUTE, "max-consecutive")
    assert (got[1].mode, got[1].reason) == ((RECOMPUTE, "sync") if sync else (PREDICT, "predict"))
