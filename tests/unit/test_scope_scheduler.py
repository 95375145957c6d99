"""SCOPE's tri-modal decision and each stability control, one at a time.

The probe of a chunk is its noise level, so the indicator of a call is |s - s_prev| / s_prev.
"""

import math

import pytest
import torch

from scope.config import ScopeConfig
from scope.scheduler import CACHE, PREDICT, RECOMPUTE, ChunkSignals, ScopeScheduler, tighten_factor
from tests.unit.scope_toy import make_ctx

# the paper's per-unit reading (one indicator per chunk, Cache tested first, order 2 with the
# embedded estimate): each control is tested in isolation on it; the measured defaults (call
# granularity, Predict first, observed error) have their own tests below
BASE = dict(force_final_step=False, sigma_floor_scale=1.0, max_consecutive=100, warmup_steps=1,
            granularity="chunk", indicator="probe", prefer="cache", order=2, horizon_rho=1.0,
            error_estimate="embedded", eps_error=0.05, coordinate="sigma", tau_cache=0.05)


def drive(policy, sigmas, nxt=None, estimate=lambda unit, coord: None, request="r", branch="cond"):
    out = []
    for step, s in enumerate(sigmas):
        ctx = make_ctx([s], nxt=None if nxt is None else [nxt[step]], request=request,
                       branch=branch, step=step)
        signals = ChunkSignals(probe=[torch.full((1, 2, 1), s, dtype=torch.float64)])
        decisions = policy.propose(ctx, signals, estimate)
        policy.commit(ctx, decisions, signals)
        out.append(decisions[0])
    return out


def modes(decisions):
    return [(d.mode, d.reason) for d in decisions]


def scope(**kw):
    return ScopeScheduler(ScopeConfig(**{**BASE, **kw}))


def test_warmup_forces_recompute_for_the_first_w_calls():
    got = drive(scope(warmup_steps=3, tau_cache=1e9, tau_predict=math.inf), [1.0, 0.9, 0.8, 0.7, 0.6])
    assert modes(got) == [(RECOMPUTE, "warmup")] * 3 + [(CACHE, "below-tau-cache")] * 2


def test_no_history_without_warmup():
    got = drive(scope(warmup_steps=0, tau_cache=1e9, tau_predict=math.inf), [1.0, 0.9])
    assert modes(got) == [(RECOMPUTE, "no-history"), (CACHE, "below-tau-cache")]


def test_max_consecutive_non_recompute():
    got = drive(scope(max_consecutive=2, tau_cache=1e9, tau_predict=math.inf), [1.0, .9, .8, .7, .6, .5, .4])
    assert [d.mode for d in got] == [RECOMPUTE, CACHE, CACHE, RECOMPUTE, CACHE, CACHE, RECOMPUTE]
    assert got[3].reason == "max-consecutive"


def test_final_step_is_forced_and_needs_sigma_next():
    pol = scope(force_final_step=True, tau_cache=1e9, tau_predict=math.inf)
    got = drive(pol, [0.5, 0.3, 0.1], nxt=[0.3, 0.1, 0.0])
    assert modes(got)[1:] == [(CACHE, "below-tau-cache"), (RECOMPUTE, "final")]
    with pytest.raises(ValueError, match="force_final_step needs CallContext.chunk_sigma_next"):
        drive(scope(force_final_step=True), [0.5])


def test_accumulates_since_last_recompute_and_resets():
    # geometric sigmas: every indicator is 0.1; acc = 0.1, 0.2, 0.3, 0.4 -> reset -> 0.1
    sigmas = [0.9 ** k for k in range(6)]
    got = drive(scope(tau_cache=0.25, tau_predict=0.35, order=0), sigmas)
    assert [d.mode for d in got] == [RECOMPUTE, CACHE, CACHE, PREDICT, RECOMPUTE, CACHE]
    assert [d.acc for d in got[1:]] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.1])
    assert got[4].reason == "above-tau"


def test_rescale_polynomial_is_applied_to_the_indicator():
    got = drive(scope(tau_cache=0.15, tau_predict=0.5, order=0, rescale=[2.0, 0.0]), [1.0, 0.9])
    assert got[1].indicator == pytest.approx(0.2) and got[1].mode == PREDICT


def test_predict_between_thresholds_with_enough_history():
    # two recomputes (sigma 1.0, 0.9), then 0.85: indicator 0.0556, inside (tau_cache, tau_predict)
    got = drive(scope(warmup_steps=2, tau_cache=0.01, tau_predict=0.5, order=1), [1.0, 0.9, 0.85])
    assert modes(got)[2] == (PREDICT, "predict") and got[2].coord == pytest.approx(0.85)


def test_short_history_forces_recompute():
    got = drive(scope(warmup_steps=2, tau_cache=0.01, tau_predict=0.5, order=2), [1.0, 0.9, 0.85])
    assert modes(got)[2] == (RECOMPUTE, "short-history")


def test_horizon_limits_extrapolation_distance():
    # history spans 0.1 in sigma; 0.75 is 0.15 past the newest point
    got = drive(scope(warmup_steps=2, tau_cache=0.01, tau_predict=0.5, order=1, horizon_rho=1.0),
                [1.0, 0.9, 0.75])
    assert modes(got)[2] == (RECOMPUTE, "horizon")
    got = drive(scope(warmup_steps=2, tau_cache=0.01, tau_predict=0.5, order=1, horizon_rho=2.0),
                [1.0, 0.9, 0.75])
    assert got[2].mode == PREDICT


def test_error_estimate_above_eps_forces_recompute():
    def est(unit, coord):
        return 0.3
    kw = dict(warmup_steps=2, tau_cache=0.01, tau_predict=0.5, order=1)
    got = drive(scope(eps_error=0.1, **kw), [1.0, 0.9, 0.85], estimate=est)
    assert modes(got)[2] == (RECOMPUTE, "error-estimate") and got[2].est_error == 0.3
    got = drive(scope(eps_error=0.5, **kw), [1.0, 0.9, 0.85], estimate=est)
    assert got[2].mode == PREDICT and got[2].est_error == 0.3


def test_low_sigma_tightening_turns_a_cache_into_a_recompute():
    # the same indicator (0.1) at high and at low sigma; tau_cache 0.2, tau_predict 0.3
    kw = dict(tau_cache=0.2, tau_predict=0.3, order=0)
    assert drive(scope(**kw), [0.1, 0.09])[1].mode == CACHE
    tight = dict(kw, sigma_floor_scale=0.25)
    assert drive(scope(**tight), [1.0, 0.9])[1].mode == CACHE        # factor 0.925
    low = drive(scope(**tight), [0.1, 0.09])[1]                        # factor 0.3175
    assert (low.mode, low.reason) == (RECOMPUTE, "above-tau")
    assert tighten_factor(0.0, 0.25, 1.0) == 0.25 and tighten_factor(0.8, 0.25, 0.5) == 1.0


def test_branches_and_requests_have_separate_state():
    pol = scope(warmup_steps=2, tau_cache=1e9, tau_predict=math.inf)
    drive(pol, [1.0, 0.9], branch="cond")
    assert drive(pol, [0.8], branch="uncond")[0].reason == "warmup"
    assert drive(pol, [0.8], request="other")[0].reason == "warmup"
    assert drive(pol, [0.8], branch="cond")[0].mode == CACHE
    pol.end_request("r")
    assert pol.units.keys("r") == [] and len(pol.units.keys("other")) == 1


def test_inactive_chunks_skip_and_keep_no_state():
    pol = scope(warmup_steps=0, tau_cache=1e9, tau_predict=math.inf)
    ctx = make_ctx([0.5, 1.0], active=[True, False])
    sig = ChunkSignals(probe=[torch.ones(1, 2, 1), torch.ones(1, 2, 1)])
    ds = pol.propose(ctx, sig)
    pol.commit(ctx, ds, sig)
    assert [d.mode for d in ds] == [RECOMPUTE, "skip"]
    assert [k.chunk for k in pol.units.keys("r")] == [0]
