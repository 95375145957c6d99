"""Each baseline's rule, behind the same policy interface as SCOPE."""

import pytest
import torch

from scope.baselines import FlowCachePolicy, TaylorSeerPolicy, TeaCachePolicy, make_policy
from scope.config import (FBCacheConfig, FlowCacheConfig, NoneConfig, TaylorSeerConfig,
                          TeaCacheConfig, make_config)
from scope.hooks import apply_accel
from scope.scheduler import CACHE, PREDICT, RECOMPUTE, ChunkSignals
from tests.unit.scope_toy import (DTYPE, ToyAdapter, ToyModel, chunk_tokens, make_ctx, make_hidden,
                                  make_inputs)

EXACT = dict(rtol=1e-12, atol=1e-12)
GEOMETRIC = [0.9 ** k for k in range(6)]     # every call changes sigma by 10 %: indicator 0.1


def drive(policy, chunk_sigmas, active=None, inputs=None, nxt=None):
    """chunk_sigmas: per call, per chunk. The probe is the chunk's sigma."""
    out = []
    for step, sig in enumerate(chunk_sigmas):
        ctx = make_ctx(sig, active=active, step=step, nxt=None if nxt is None else nxt[step])
        probe = [torch.full((1, 2, 1), s, dtype=DTYPE) for s in sig]
        signals = ChunkSignals(probe=probe if policy.needs_probe else None,
                               input=None if inputs is None else inputs[step])
        decisions = policy.propose(ctx, signals)
        policy.commit(ctx, decisions, signals)
        out.append([d.mode for d in decisions])
    return out


def test_teacache_accumulates_and_resets():
    # identity rescale, threshold 0.25: acc 0.1, 0.2 (reuse), 0.3 (compute, reset), 0.1 (reuse)
    pol = TeaCachePolicy(TeaCacheConfig(threshold=0.25, rescale=[1.0, 0.0], warmup_steps=1,
                                        granularity="chunk"))
    got = drive(pol, [[s] for s in GEOMETRIC[:5]])
    assert [m[0] for m in got] == [RECOMPUTE, CACHE, CACHE, RECOMPUTE, CACHE]


def test_teacache_rescale_polynomial_changes_the_distance():
    # rescale 3x: every call adds 0.3 >= 0.25, so nothing is ever reused
    pol = TeaCachePolicy(TeaCacheConfig(threshold=0.25, rescale=[3.0, 0.0], warmup_steps=1,
                                        granularity="chunk"))
    assert [m[0] for m in drive(pol, [[s] for s in GEOMETRIC[:4]])] == [RECOMPUTE] * 4


def test_teacache_global_makes_one_decision_for_the_window_per_chunk_does_not():
    # chunk 0 changes by 10 % per call, chunk 1 by 1 %
    calls = [[0.9 ** k, 0.99 ** k] for k in range(4)]
    glob = TeaCachePolicy(TeaCacheConfig(threshold=0.12, rescale=[1.0, 0.0], warmup_steps=1))
    per = TeaCachePolicy(TeaCacheConfig(threshold=0.12, rescale=[1.0, 0.0], warmup_steps=1,
                                        granularity="chunk"))
    g, p = drive(glob, calls), drive(per, calls)
    assert all(m[0] == m[1] for m in g), f"global decisions must agree across chunks: {g}"
    assert p[1] == [CACHE, CACHE] and p[2] == [RECOMPUTE, CACHE]


def test_teacache_warmup_and_final_defaults_follow_ret_steps():
    pol = TeaCachePolicy(TeaCacheConfig(threshold=10.0, rescale=None, granularity="chunk"))
    assert [m[0] for m in drive(pol, [[s] for s in GEOMETRIC])] == [RECOMPUTE] * 5 + [CACHE]
    pol = TeaCachePolicy(TeaCacheConfig(threshold=10.0, rescale=None, use_ret_steps=False,
                                        granularity="chunk"))
    got = drive(pol, [[0.9], [0.8], [0.7]], nxt=[[0.8], [0.7], [0.0]])
    assert [m[0] for m in got] == [RECOMPUTE, CACHE, RECOMPUTE]     # warm-up 1, final forced


def test_flowcache_is_per_chunk_on_the_stack_input():
    pol = FlowCachePolicy(FlowCacheConfig(threshold=0.05, warmup_steps=1, force_final_step=False))
    still = torch.ones(1, 2, 3, dtype=DTYPE)
    inputs = [[still, still * (1 + 0.5 * k)] for k in range(3)]     # chunk 1 moves a lot
    got = drive(pol, [[0.5, 0.5]] * 3, inputs=inputs)
    assert got == [[RECOMPUTE, RECOMPUTE], [CACHE, RECOMPUTE], [CACHE, RECOMPUTE]]


def test_flowcache_per_chunk_warmup_counts_each_chunk_from_its_start():
    pol = FlowCachePolicy(FlowCacheConfig(threshold=1.0, warmup_steps=2, force_final_step=False,
                                          indicator="probe"))
    got = drive(pol, [[0.9, 1.0], [0.8, 0.9], [0.7, 0.8], [0.6, 0.7]],
                active=None)
    assert [m[0] for m in got] == [RECOMPUTE, RECOMPUTE, CACHE, CACHE]
    pol2 = FlowCachePolicy(FlowCacheConfig(threshold=1.0, warmup_steps=2, force_final_step=False,
                                           indicator="probe"))
    drive(pol2, [[0.9, 1.0]], active=[True, False])          # chunk 1 not started yet
    got = drive(pol2, [[0.8, 0.9], [0.7, 0.8]])
    assert [m[1] for m in got] == [RECOMPUTE, RECOMPUTE]    # its warm-up starts when it starts


def test_taylorseer_refresh_interval_and_first_enhance():
    pol = TaylorSeerPolicy(TaylorSeerConfig(interval=3, first_enhance=1, order=1))
    got = [m[0] for m in drive(pol, [[0.5]] * 8)]
    assert got == [RECOMPUTE, RECOMPUTE, PREDICT, PREDICT, RECOMPUTE, PREDICT, PREDICT, RECOMPUTE]


def test_taylorseer_predicts_in_the_step_index_exactly_for_linear_residuals():
    """Sigma falls linearly with the step and the toy residual is linear in sigma: an order-1
    Taylor step in the step index is exact."""
    model = ToyModel(coeffs=[(0.1, 0.5, 0.0), (0.2, -0.3, 0.0), (0.0, 1.0, 0.0), (0.3, 0.2, 0.0)])
    accel = apply_accel(model, make_config("taylorseer", interval=4, first_enhance=1, order=1,
                                           residual_dtype="input"), ToyAdapter())
    for step in range(5):
        s = 1.0 - 0.1 * step
        h = make_hidden(1, seed=step)
        with accel.call(make_ctx([s], step=step)):
            out = model(h, make_inputs([s]))
        torch.testing.assert_close(out, h + model.residual(s), **EXACT, msg=f"step {step}")
    assert accel.stats("r").modes.predict == 3


def test_fbcache_threshold_on_the_first_block_residual():
    """Block 0 adds (1 + sigma) w. The first-block residual changes by |ds| / (1 + s_last)."""
    model = ToyModel(coeffs=[(1.0, 1.0, 0.0), (0.2, 0.1, 0.3), (0.1, 0.4, 0.0), (0.3, 0.0, 0.2)])
    accel = apply_accel(model, FBCacheConfig(threshold=0.05), ToyAdapter())
    modes = []
    for step, s in enumerate([1.0, 0.98, 0.93, 0.88]):
        h = make_hidden(1, seed=step)
        n_before = len(model.log)
        with accel.call(make_ctx([s], step=step)):
            out = model(h, make_inputs([s]))
        st = accel.stats("r")
        modes.append("cache" if st.per_chunk[0].cache > sum(m == "cache" for m in modes) else "recompute")
        if modes[-1] == "cache":
            # block 0 ran (one short run), the tail residual comes from sigma 1.0
            assert model.log[n_before:] == [(0, 1, 2)]
            expected = h + model.residual(s, 0, 1) + model.residual(1.0, 1, 4)
            torch.testing.assert_close(out, expected, **EXACT)
        else:
            torch.testing.assert_close(out, h + model.residual(s), **EXACT)
    # 0.98: |0.02| / 2 = 0.01 < 0.05 reuse; 0.93: 0.07 / 2 (vs the last full compute) = 0.035
    # reuse; 0.88: 0.12 / 2 = 0.06 recompute
    assert modes == ["recompute", "cache", "cache", "recompute"]
    st = accel.stats("r")
    assert st.block_evals == 4 + 1 + 1 + 4 and st.block_evals_full == 16


def test_make_policy_maps_every_config():
    for method in ("none", "scope", "teacache", "flowcache", "taylorseer", "fbcache"):
        assert make_policy(make_config(method)).name == method
    assert make_policy(make_config("magcache", calibrate=True)).name == "magcache"
    assert isinstance(make_policy(NoneConfig()), object)
    with pytest.raises(ValueError, match="no policy for config type"):
        make_policy(object())


# ---------------------------------------------------------------------------------------------
# faithful defaults: TaylorSeer per call, FBCache with finished K/V, MagCache
# ---------------------------------------------------------------------------------------------

def test_taylorseer_decides_once_per_model_call_by_default():
    """Its original counts model calls: chunks at different phases of an asynchronous schedule
    refresh together (the per-chunk counter staggers them and stays as a labelled extra)."""
    assert TaylorSeerConfig().granularity == "global"
    rows = [[0.9, 1.0], [0.8, 0.9], [0.7, 0.8], [0.6, 0.7], [0.5, 0.6], [0.4, 0.5]]
    got = drive(TaylorSeerPolicy(TaylorSeerConfig(interval=2)), rows)
    assert all(len(set(modes)) == 1 for modes in got[2:]), got      # one decision per call


def test_fbcache_serves_finished_chunks_kv_and_stays_exact_where_it_recomputes():
    """Block 0 and the tail each keep finished chunks' K/V; the outputs equal FBCache without K/V
    serving, with fewer tokens through block 0."""
    from tests.unit.scope_toy import df_schedule

    def run(kv):
        model = ToyModel(mix=0.3)
        cfg = make_config("fbcache", threshold=0.05, selective="exact", kv_cache_finished=kv)
        accel = apply_accel(model, cfg, ToyAdapter())
        outs, pre = [], [0] * 4
        h = make_hidden(4, seed=1)
        for step, row in enumerate(df_schedule(4, 4, 1)):
            sig = [max(0.0, 1.0 - r / 4) for r in row]
            active = [r != p and r <= 4 for r, p in zip(row, pre)]
            nxt = [max(0.0, s - 0.25) if a else s for s, a in zip(sig, active)]
            with accel.call(make_ctx(sig, active=active, nxt=nxt, step=step, causal=True)):
                out = model(h, make_inputs(sig, causal=True))     # finished chunks keep their input
            outs.append([chunk_tokens(out, j) for j in range(4) if active[j]])
            pre = row
        block0_tokens = sum(n for (start, end, n) in model.log if start == 0)
        return outs, accel.stats("r"), block0_tokens

    plain, st_plain, tok_plain = run(False)
    served, st_kv, tok_kv = run(True)
    for a, b in zip(plain, served):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    assert st_kv.kv_served_chunks > 0 and tok_kv < tok_plain


def test_magcache_skips_while_the_accumulated_ratio_error_is_small_and_at_most_k_times():
    from scope.baselines import MagCachePolicy
    from scope.config import MagCacheConfig

    # ratio 0.98 per step: err after n skips = sum_i |1 - 0.98^i| = 0.02, 0.0596, 0.1184
    cfg = MagCacheConfig(mag_ratios={"cond": [1.0] + [0.98] * 19}, threshold=0.1, max_skip_steps=3,
                         retention_ratio=0.1, num_steps=20)
    got = [m[0] for m in drive(MagCachePolicy(cfg), [[1.0 - 0.05 * k] for k in range(9)])]
    # calls 0-1: retention (int(0.1 x 20) = 2); then skip 2 (err 0.02, 0.0596), the 3rd would reach 0.118
    assert got == [RECOMPUTE, RECOMPUTE, CACHE, CACHE, RECOMPUTE, CACHE, CACHE, RECOMPUTE, CACHE]
    k_bound = MagCacheConfig(mag_ratios={"cond": [1.0] * 20}, threshold=1.0, max_skip_steps=2, retention_ratio=0.0)
    got = [m[0] for m in drive(MagCachePolicy(k_bound), [[1.0 - 0.05 * k] for k in range(7)])]
    assert got == [RECOMPUTE, CACHE, CACHE, RECOMPUTE, CACHE, CACHE, RECOMPUTE]


def test_magcache_ratio_table_is_resampled_to_the_step_count_and_kept_per_branch():
    from scope.baselines import MagCachePolicy
    from scope.config import MagCacheConfig

    pol = MagCachePolicy(MagCacheConfig(mag_ratios={"cond": [1.0, 0.9, 0.8], "uncond": [1.0, 0.5, 0.4]},
                                        num_steps=5))
    assert [pol.gamma("cond", s) for s in range(5)] == [1.0, 0.9, 0.9, 0.8, 0.8]
    assert pol.gamma("uncond", 4) == 0.4


def test_magcache_calibration_measures_the_residual_magnitude_ratio():
    """Toy residual = poly(sigma) x w: the measured ratio at each step is |poly(s_t)| / |poly(s_t-1)|."""
    from scope.baselines import mag_ratio_table

    model = ToyModel()
    accel = apply_accel(model, make_config("magcache", calibrate=True), ToyAdapter())
    sig = [1.0, 0.8, 0.5]
    for step, s in enumerate(sig):
        with accel.call(make_ctx([s], step=step)):
            model(make_hidden(1, seed=step), make_inputs([s]))
    st = accel.end_request("r")
    assert st.modes.recompute == 3 and st.reasons == {"calibrate": 3}
    table = mag_ratio_table(st.mag_ratios, 3)["cond"]
    want = [1.0] + [float(model.residual(sig[i]).norm() / model.residual(sig[i - 1]).norm()) for i in (1, 2)]
    assert table == pytest.approx(want)
