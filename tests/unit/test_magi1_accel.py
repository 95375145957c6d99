"""SCOPE and the baselines on the MAGI-1 DiT through `MagiStackAdapter`.

The model is the real `MagiDiT` at the `tiny` size with seeded random weights, on CPU. Calls are
built by hand the way MAGI's pipeline builds them: a window of chunks staggered in noise level
(t: 0 = noise, 1 = clean; the accelerator gets sigma = 1 - t), the chunk that has just finished in
front at clean_t (inactive: its output is discarded, it is there for its K/V and as context), one
older clean chunk in MAGI's own K/V cache, block-causal key ranges (the clean chunk sees only
itself), Euler steps on the velocity.
"""
from __future__ import annotations

import importlib
import math
import pytest
import torch

from pipelines.magi1.accel_adapter import MagiStackAdapter, MagiSubset, accel_defaults
from pipelines.magi1.model import MagiDiT
from pipelines.magi1.schedule import t_schedule
from pipelines.magi1.sizes import config_for
from scope.config import make_config
from scope.executor import CallPlan, make_run_fn
from scope.hooks import CallContext, apply_accel, remove_accel
from scope.planner import plan_selective
from scope.scheduler import CACHE, PREDICT, RECOMPUTE, SKIP, Decision, coordinate_value

FPC, HW = 2, 8                      # latent frames per chunk, latent height = width (4 x 4 tokens)
R = 4                               # window: the extra clean chunk + 3 denoising chunks
TPC = FPC * (HW // 2) ** 2          # tokens per chunk
CLEAN_T = 0.9999
STEPS = 16                          # per-chunk schedule; the window's chunks are staggered by 4
SLOTS = (10, 6, 2)                  # schedule index of the 3 denoising chunks at step 0, oldest first
CHUNK_OFFSET = 1                    # absolute chunk of window position 0 (chunk 0 is in MAGI's cache)
T_GRID = t_schedule(STEPS)

METHODS = {
    "none": {},
    "scope": {},
    "teacache": dict(accel_defaults("teacache"), threshold=0.05, use_ret_steps=False),
    "flowcache": {"warmup_steps": 1},
    "taylorseer": {"interval": 2},
    "fbcache": {},
    "magcache": {"calibrate": True},
}


# ----------------------------------------------------------------------------- helpers

def tiny_model() -> MagiDiT:
    torch.manual_seed(0)
    model = MagiDiT(config_for("tiny")).eval()
    with torch.no_grad():   # LayerNorm1p weights start at 0; give every parameter some spread
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
        model.rope.bands.copy_(1.0 / 10000 ** (torch.arange(4) / 4))
    return model


@pytest.fixture(scope="module")
def model() -> MagiDiT:
    return tiny_model()


def captions(model: MagiDiT, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch * R, cfg.caption_max_length, cfg.caption_channels, generator=g)
    mask = torch.zeros(batch * R, cfg.caption_max_length)
    mask[:, :5] = 1
    mask[::R] = 0                 # the extra clean chunk gets no text (upstream: null caption, mask 0)
    return y, mask


def clean_cache(model: MagiDiT, batch: int, seed: int = 7) -> dict:
    """MAGI's K/V cache of one clean chunk (absolute chunk 0), captured the way upstream writes it."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.latent_channels, FPC, HW, HW, generator=g)
    y = torch.zeros(batch, cfg.caption_max_length, cfg.caption_channels)
    store: dict = {}
    with torch.no_grad():
        model(x, torch.full((batch, 1), CLEAN_T), y, torch.ones(batch, dtype=torch.bool),
              torch.zeros(batch, cfg.caption_max_length), torch.tensor([[0, TPC]]), kv_capture=store)
    return {layer: (k.clone(), v.clone()) for layer, (k, v) in store.items()}


def kv_range() -> torch.Tensor:
    """Window position 0 (clean) sees itself; denoising chunk i sees back to the cached clean chunk."""
    return torch.tensor([[TPC, 2 * TPC]] + [[0, TPC * (i + 2)] for i in range(1, R)])


def window_t(step: int) -> list[float]:
    return [CLEAN_T] + [float(T_GRID[k + step]) for k in SLOTS]


def window_t_next(step: int) -> list[float]:
    return [CLEAN_T] + [float(T_GRID[k + step + 1]) for k in SLOTS]


def context(step: int, request: str = "v", branch: str = "cond", active=(False, True, True, True)) -> CallContext:
    sigma = [min(1.0, max(0.0, 1.0 - t)) for t in window_t(step)]
    sigma_next = [min(1.0, max(0.0, 1.0 - t)) if a else s
                  for t, a, s in zip(window_t_next(step), active, sigma)]
    return CallContext(request=request, branch=branch, step=step, frames_per_chunk=FPC, chunk_sigma=sigma,
                       chunk_active=list(active), causal=True, chunk_sigma_next=sigma_next,
                       chunk_offset=CHUNK_OFFSET)


class Walk:
    """B videos' window, called like MAGI's pipeline calls the model."""

    def __init__(self, model: MagiDiT, batch: int = 1, seed: int = 3) -> None:
        self.model, self.batch = model, batch
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, model.config.latent_channels, R * FPC, HW, HW, generator=g)
        self.y, self.mask = captions(model, batch, seed + 1)
        self.cache = clean_cache(model, batch)

    def args(self, step: int, branch: str = "cond", capture: dict | None = None) -> tuple[tuple, dict]:
        dropped = branch != "cond"          # the context pass: null text, dropped AdaLN token
        y = self.y if not dropped else torch.zeros_like(self.y)
        mask = self.mask if not dropped else torch.zeros_like(self.mask)
        t = torch.tensor([window_t(step)] * self.batch)
        args = (self.x, t, y, torch.full((self.batch,), dropped), mask, kv_range())
        kwargs = dict(slice_point=CHUNK_OFFSET, kv_cache=self.cache, kv_capture=capture,
                      capture_chunks=(0, 1) if capture is not None else None)
        return args, kwargs

    def forward(self, step: int, branch: str = "cond", capture: dict | None = None) -> torch.Tensor:
        args, kwargs = self.args(step, branch, capture)
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def inputs(self, step: int, branch: str = "cond"):
        args, kwargs = self.args(step, branch)
        with torch.no_grad():
            return self.model.embed(*args, **kwargs)

    def row_inputs(self, step: int, b: int):
        """Row b's call alone (B = 1)."""
        (x, t, y, dropped, mask, ranges), kwargs = self.args(step)
        rows = slice(b * R, (b + 1) * R)
        kwargs["kv_cache"] = {i: (k[b:b + 1], v[b:b + 1]) for i, (k, v) in self.cache.items()}
        with torch.no_grad():
            return self.model.embed(x[b:b + 1], t[b:b + 1], y[rows], dropped[b:b + 1], mask[rows], ranges, **kwargs)

    def euler(self, velocity: torch.Tensor, step: int, active=(False, True, True, True)) -> None:
        dt = [b - a for a, b in zip(window_t(step), window_t_next(step))]
        for j in range(R):
            if active[j]:
                self.x[:, :, j * FPC:(j + 1) * FPC] += velocity[:, :, j * FPC:(j + 1) * FPC] * dt[j]


def frames_of(j: int) -> slice:
    return slice(j * FPC, (j + 1) * FPC)


def tokens_of(j: int) -> slice:
    return slice(j * TPC, (j + 1) * TPC)


# ----------------------------------------------------------------------------- the table

def test_tokens_are_frame_major_and_the_table_matches_the_model(model):
    walk = Walk(model)
    inputs = walk.inputs(0)
    adapter = MagiStackAdapter()
    assert adapter.num_blocks(model) == len(model.layers)
    assert adapter.num_frames(inputs) == R * FPC and adapter.tokens_per_frame(inputs) == (HW // 2) ** 2
    assert adapter.block_range(inputs.tokens, inputs) == (0, len(model.layers))
    assert adapter.block_range(inputs.tokens, inputs, 1) == (1, len(model.layers))
    # changing latent frame f changes exactly tokens [f * tpf, (f + 1) * tpf)
    tpf = adapter.tokens_per_frame(inputs)
    for f in (0, 3, R * FPC - 1):
        walk2 = Walk(model)
        walk2.x[:, :, f] += 1.0
        changed = (walk2.inputs(0).tokens - inputs.tokens).abs().sum(-1)[0] > 0
        assert changed.nonzero().flatten().tolist() == list(range(f * tpf, (f + 1) * tpf))


def test_select_frames_keeps_rope_rows_conditions_and_captions(model):
    inputs = Walk(model).inputs(2)
    adapter = MagiStackAdapter(model)
    sub = adapter.select_frames(inputs, torch.tensor([2, 3, 6, 7]))       # window chunks 1 and 3
    assert isinstance(sub, MagiSubset) and sub.chunks == (1, 3)
    base = sub.inputs
    tok = torch.cat([torch.arange(TPC, 2 * TPC), torch.arange(3 * TPC, 4 * TPC)])
    assert torch.equal(base.rope_sin, inputs.rope_sin[tok]) and torch.equal(base.rope_cos, inputs.rope_cos[tok])
    assert torch.equal(base.condition, inputs.condition[:, [1, 3]])
    assert torch.equal(base.y_xattn, inputs.y_xattn[[1, 3]]) and torch.equal(base.kv_range, inputs.kv_range[[1, 3]])
    assert adapter.num_frames(sub) == 2 * FPC and base.num_chunks == 2
    with pytest.raises(ValueError, match="whole chunks"):
        adapter.select_frames(inputs, torch.tensor([1, 2]))


def test_probe_kinds_are_the_adaln_path(model):
    inputs = Walk(model).inputs(1)
    adapter = MagiStackAdapter(model)
    probe = adapter.probe(inputs, inputs.tokens)
    assert probe.shape == (1, R * TPC, model.config.cond_dim)
    for j in range(R):   # one condition per chunk: the chunk's noise level (+ the AdaLN caption token)
        assert torch.equal(probe[0, tokens_of(j)], inputs.condition[0, j].expand(TPC, -1))
    gates = adapter.probe(inputs, inputs.tokens, kind="gates")
    assert gates.shape == (1, R * TPC, 2 * model.config.hidden_size) and gates.abs().max() <= 1.0
    assert adapter.probe(inputs, inputs.tokens, kind="h") is inputs.tokens
    with pytest.raises(ValueError, match="rescale=null"):
        adapter.probe(inputs, inputs.tokens, kind="e0")
    # Wan's polynomial asks for Wan's probe: refused on MAGI, with the way out in the message
    importlib.import_module("pipelines.wan.calibration")     # registers Wan's polynomials by name

    assert accel_defaults("teacache") == {"rescale": None, "probe_kind": "condition"}
    accel = apply_accel(model, make_config("teacache", rescale="wan-1.3b"), MagiStackAdapter())
    try:
        walk = Walk(model)
        with pytest.raises(ValueError, match="no published rescale polynomial"):
            with accel.call(context(0)):
                walk.forward(0)
    finally:
        remove_accel(model)


# ----------------------------------------------------------------------------- identity and exactness

def test_outside_a_call_the_hooked_model_is_the_model(model):
    walk = Walk(model)
    before = walk.forward(1)
    accel = apply_accel(model, make_config("scope", selective="exact", kv_cache_finished=True), MagiStackAdapter())
    try:
        assert "run_blocks" in model.__dict__
        during = walk.forward(1)
        store_hooked: dict = {}
        walk.forward(1, "context", capture=store_hooked)
    finally:
        assert remove_accel(model) is accel
    assert "run_blocks" not in model.__dict__
    after = walk.forward(1)
    store: dict = {}
    walk.forward(1, "context", capture=store)
    assert torch.equal(during, before) and torch.equal(after, before)
    assert all(torch.equal(store[i][0], store_hooked[i][0]) for i in store)


def test_none_accel_runs_every_frame_and_changes_nothing(model):
    walk = Walk(model)
    accel = apply_accel(model, make_config("none"), MagiStackAdapter())
    try:
        for step in range(3):
            full = walk.forward(step)            # outside a call: the full model
            with accel.call(context(step)):
                out = walk.forward(step)
            torch.testing.assert_close(out[:, :, FPC:], full[:, :, FPC:], atol=0, rtol=0)
            walk.euler(out, step)
        stats = accel.end_request("v").to_dict()
    finally:
        remove_accel(model)
    assert stats["block_evals"] == stats["block_evals_full"]


def test_scope_exact_all_recompute_with_served_kv_equals_the_full_forward(model):
    """Every active chunk recomputes; the finished (extra clean) chunk is captured once and then
    served from K/V: the active chunks' velocity equals the full forward."""
    walk = Walk(model)
    config = make_config("scope", selective="exact", kv_cache_finished=True, tau_cache=0.0, tau_predict=0.0)
    accel = apply_accel(model, config, MagiStackAdapter())
    try:
        for step in range(4):
            full = walk.forward(step)
            with accel.call(context(step)):
                out = walk.forward(step)
            torch.testing.assert_close(out[:, :, FPC:], full[:, :, FPC:], atol=1e-5, rtol=1e-5)
            walk.euler(out, step)
        stats = accel.end_request("v").to_dict()
    finally:
        remove_accel(model)
    L = len(model.layers)
    assert {m: c for m, c in stats["modes"].items() if c} == {RECOMPUTE: 12, SKIP: 4}
    assert stats["kv_served_chunks"] == 3                       # steps 1..3: the clean chunk is served
    assert stats["block_evals"] == 4 * L + 3 * 3 * L < stats["block_evals_full"] == 16 * L


def _plan(ctx: CallContext, decisions: list[Decision], accel) -> CallPlan:
    cfg, ex = accel.config, accel.executor
    exact = cfg.selective == "exact"
    ready = [ex.kv_ready(ctx.unit(j), ctx.chunk_offset, ctx.sigmas[j], exact) for j in range(ctx.num_chunks)]
    stale = [ex.kv_ready(ctx.unit(j), ctx.chunk_offset) for j in range(ctx.num_chunks)]
    sel = plan_selective(ctx.active, [d.mode == RECOMPUTE for d in decisions], causal=True, mode=cfg.selective,
                         context_chunks=cfg.context_chunks, kv_cache_finished=cfg.kv_cache_finished,
                         kv_cache_stale=cfg.kv_cache_stale, kv_finished_ready=ready, kv_stale_ready=stale)
    return CallPlan(ctx.request, ctx.branch, ctx.step, ctx.chunk_offset, ctx.frames_per_chunk, ctx.sigmas,
                    tuple(decisions), sel)


def test_cache_and_predict_chunks_are_h_plus_the_reused_residual_and_the_tail_is_dropped(model):
    """Hand-made plans on the executor: two Recompute calls, then chunk 1 Recompute (chunk 0
    served), chunk 2 Cache, chunk 3 Predict (both after the last Recompute: dropped, exactly)."""
    adapter = MagiStackAdapter(model)
    accel = apply_accel(model, make_config("scope", selective="exact", kv_cache_finished=True, order=1), adapter)
    run_fn = make_run_fn(model, adapter)
    walk = Walk(model)
    coord = [[coordinate_value("logsnr", 1.0 - t, 0) for t in window_t(step)] for step in range(3)]
    residuals = []
    try:
        for step in range(3):
            inputs = walk.inputs(step)
            h = inputs.tokens
            with torch.no_grad():
                full = model.run_blocks(h, inputs)                 # outside a call: the whole stack
            residuals.append(full - h)
            ctx = context(step)
            if step < 2:
                modes = [SKIP, RECOMPUTE, RECOMPUTE, RECOMPUTE]
            else:
                modes = [SKIP, RECOMPUTE, CACHE, PREDICT]
            plan = _plan(ctx, [Decision(m, "test", coord=c) for m, c in zip(modes, coord[step])], accel)
            with torch.no_grad():
                out = accel.executor.execute(plan, h, inputs, run_fn)
            if step < 2:
                torch.testing.assert_close(out[:, TPC:], full[:, TPC:], atol=1e-5, rtol=1e-5)
                with torch.no_grad():
                    walk.euler(model.unembed(out, inputs), step)
        assert plan.selective.run == (1,) and plan.selective.kv_served == (0,)
        assert plan.selective.dropped == (2, 3)
        torch.testing.assert_close(out[:, tokens_of(1)], full[:, tokens_of(1)], atol=1e-5, rtol=1e-5)
        cached = h[:, tokens_of(2)] + residuals[1][:, tokens_of(2)]
        torch.testing.assert_close(out[:, tokens_of(2)], cached, atol=1e-5, rtol=1e-5)
        c0, c1, c2 = coord[0][3], coord[1][3], coord[2][3]
        r0, r1 = residuals[0][:, tokens_of(3)], residuals[1][:, tokens_of(3)]
        predicted = h[:, tokens_of(3)] + r1 + (r1 - r0) * (c2 - c1) / (c1 - c0)
        torch.testing.assert_close(out[:, tokens_of(3)], predicted, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[:, tokens_of(0)], h[:, tokens_of(0)])     # served, not run: input kept
    finally:
        remove_accel(model)
        accel.end_request("v")


def test_stale_kv_served_between_two_running_chunks_keeps_each_range_contiguous(model):
    """approx + kv_cache_stale: chunk 2 (Cache) serves the K/V of its last run while chunks 1 and 3
    run, chunk 0 is served as finished. The served chunks go in front of MAGI's cached clean chunk
    in the order that keeps every range contiguous; with K/V captured at the same inputs, stale
    equals fresh, so the call equals the full stack."""
    adapter = MagiStackAdapter(model)
    config = make_config("scope", selective="approx", kv_cache_finished=True, kv_cache_stale=True)
    accel = apply_accel(model, config, adapter)
    run_fn = make_run_fn(model, adapter)
    inputs = Walk(model).inputs(1)
    h = inputs.tokens
    with torch.no_grad():
        full = model.run_blocks(h, inputs)
    ctx = context(1)
    try:
        for modes in ([SKIP, RECOMPUTE, RECOMPUTE, RECOMPUTE], [SKIP, RECOMPUTE, CACHE, RECOMPUTE]):
            plan = _plan(ctx, [Decision(m, "test", coord=s) for m, s in zip(modes, ctx.sigmas)], accel)
            with torch.no_grad():
                out = accel.executor.execute(plan, h, inputs, run_fn)
        assert plan.selective.run == (1, 3) and plan.selective.kv_served == (0, 2)
        torch.testing.assert_close(out[:, TPC:], full[:, TPC:], atol=1e-5, rtol=1e-5)
    finally:
        remove_accel(model)
        accel.end_request("v")


def test_the_kv_writing_pass_still_writes_magi_cache_from_a_chunk_subset(model):
    """The context pass writes MAGI's K/V of the extra clean chunk (capture_chunks=(0, 1)); with the
    last chunk waiting, exact selective computation runs chunks 0..2 only: the write is the same."""
    walk = Walk(model)
    want: dict = {}
    walk.forward(0, "context", capture=want)
    active = (False, True, True, False)
    accel = apply_accel(model, make_config("none", selective="exact", kv_cache_finished=True), MagiStackAdapter())
    try:
        got: dict = {}
        with accel.call(context(0, branch="context", active=active)):
            walk.forward(0, "context", capture=got)
        stats = accel.end_request("v").to_dict()
    finally:
        remove_accel(model)
    assert stats["dropped_chunks"] == 1
    assert sorted(got) == sorted(want)
    for layer in want:
        torch.testing.assert_close(got[layer][0], want[layer][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[layer][1], want[layer][1], atol=1e-6, rtol=1e-6)
    # when SCOPE serves the clean chunk from its own K/V (captured by an earlier call of the same
    # branch and window), MAGI's write is filled from that entry: the same K/V
    accel = apply_accel(model, make_config("none", selective="exact", kv_cache_finished=True), MagiStackAdapter())
    try:
        for step in range(2):
            served: dict = {}
            with accel.call(context(step, branch="context")):
                walk.forward(step, "context", capture=served)
        stats = accel.end_request("v").to_dict()
    finally:
        remove_accel(model)
    assert stats["kv_served_chunks"] == 1
    for layer in want:
        torch.testing.assert_close(served[layer][0], want[layer][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(served[layer][1], want[layer][1], atol=1e-6, rtol=1e-6)
    # a plan that drops the chunk MAGI writes is refused, not silently missing from its cache
    accel = apply_accel(model, make_config("none", selective="approx", context_chunks=0), MagiStackAdapter())
    try:
        with pytest.raises(RuntimeError, match="writes MAGI's K/V cache"):
            with accel.call(context(0, branch="context")):
                walk.forward(0, "context", capture={})
    finally:
        remove_accel(model)


def test_a_kv_writing_pass_the_accelerator_skips_is_named_at_the_next_call(model):
    """MAGI's pipeline marks every chunk of its prefix K/V pass inactive (their outputs are
    discarded): any accelerator then runs nothing and MAGI's cache stays empty. The next call that
    reads that cache says why, instead of the model's "kv_range reaches token ..."."""
    walk = Walk(model)
    accel = apply_accel(model, make_config("none"), MagiStackAdapter())
    try:
        store: dict = {}
        with accel.call(context(0, branch="context", active=(False,) * R)):
            walk.forward(0, "context", capture=store)
        assert store == {}                                  # nothing ran: nothing written
        walk.cache = store
        with pytest.raises(RuntimeError, match="KV-writing pass that should have filled it ran nothing"):
            with accel.call(context(0)):
                walk.forward(0)
        accel.end_request("v")
    finally:
        remove_accel(model)


# ----------------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_magi_and_reports_stats(model, method):
    walk = Walk(model)
    config = make_config(method, **METHODS[method])
    accel = apply_accel(model, config, MagiStackAdapter())
    steps = 6
    try:
        for step in range(steps):
            with accel.call(context(step, branch="cond")):
                cond = walk.forward(step, "cond")
            with accel.call(context(step, branch="context")):
                ctx_out = walk.forward(step, "context")
            assert torch.isfinite(cond).all() and torch.isfinite(ctx_out).all()
            walk.euler(ctx_out + 1.5 * (cond - ctx_out), step)
        live = accel.stats("v").to_dict()
        stats = accel.end_request("v").to_dict()
        assert accel.memory_bytes() == 0 and accel.num_units() == 0
    finally:
        remove_accel(model)
    assert live == stats
    assert sum(stats["modes"].values()) == steps * 2 * R            # steps x branches x chunks
    assert 0 < stats["block_evals"] <= stats["block_evals_full"] == steps * 2 * R * len(model.layers)
    if method == "magcache":
        assert set(stats["mag_ratios"]) == {"cond", "context"}


def test_scope_defaults_skip_work_on_magi_and_memory_is_released(model):
    walk = Walk(model)
    accel = apply_accel(model, make_config("scope", selective="exact", kv_cache_finished=True), MagiStackAdapter())
    try:
        for step in range(6):
            with accel.call(context(step)):
                out = walk.forward(step)
            walk.euler(out, step)
        assert accel.memory_bytes() > 0
        stats = accel.end_request("v").to_dict()
        assert accel.memory_bytes() == 0
    finally:
        remove_accel(model)
    assert stats["block_evals"] < stats["block_evals_full"]
    assert stats["modes"].get(PREDICT, 0) + stats["modes"].get(CACHE, 0) > 0


# ----------------------------------------------------------------------------- batches

def _stack_outputs(model, walk_rows, contexts_per_step, config, batched: bool):
    """Stack outputs per step: one batched call (a context per row) or each row alone."""
    outs = []
    accel = apply_accel(model, config, MagiStackAdapter())
    try:
        for step, contexts in enumerate(contexts_per_step):
            inputs = walk_rows.inputs(step)
            if batched:
                with accel.call(contexts), torch.no_grad():
                    out = model.run_blocks(inputs.tokens, inputs)
            else:
                out = []
                for b, ctx in enumerate(contexts):
                    row = walk_rows.row_inputs(step, b)
                    with accel.call(ctx), torch.no_grad():
                        out.append(model.run_blocks(row.tokens, row))
                out = torch.cat(out)
            outs.append(out)
            with torch.no_grad():
                walk_rows.euler(model.unembed(out, inputs), step)
        stats = {c.request: accel.end_request(c.request).to_dict() for c in contexts_per_step[0]}
        assert accel.memory_bytes() == 0
    finally:
        remove_accel(model)
    return outs, stats


def test_a_batched_call_equals_each_row_alone(model):
    """Two videos in one batch, each its own request: row b's last chunk is still waiting, so the
    rows run different frames (select_rows); decisions and outputs equal those of each row alone."""
    config = make_config("scope", selective="exact", kv_cache_finished=True, trace=True)
    active = [(False, True, True, True), (False, True, True, False)]
    steps = [[context(s, "a", active=active[0]), context(s, "b", active=active[1])] for s in range(5)]
    batched, stats_b = _stack_outputs(model, Walk(model, batch=2), steps, config, batched=True)
    alone, stats_a = _stack_outputs(model, Walk(model, batch=2), steps, config, batched=False)
    for out_b, out_a in zip(batched, alone):
        # float32 rounding of the model's own batched vs single-row call (7e-6 at |h| ~ 11 at the
        # first step), carried along by the Euler walk: relative to the size of the hidden states
        torch.testing.assert_close(out_b, out_a, atol=1e-5 * float(out_a.abs().max()), rtol=1e-5)
    for request in ("a", "b"):
        keys = ("step", "chunk", "mode", "reason")
        assert [tuple(r[k] for k in keys) for r in stats_b[request]["trace"]] == \
               [tuple(r[k] for k in keys) for r in stats_a[request]["trace"]]
        assert stats_b[request]["modes"] == stats_a[request]["modes"]
    assert stats_b["b"]["dropped_chunks"] > 0


def test_a_batched_kv_writing_pass_fills_every_row(model):
    walk = Walk(model, batch=2)
    want: dict = {}
    walk.forward(0, "context", capture=want)
    accel = apply_accel(model, make_config("none", selective="exact", kv_cache_finished=True), MagiStackAdapter())
    try:
        got: dict = {}
        contexts = [context(0, "a", "context"), context(0, "b", "context", active=(False, True, False, False))]
        with accel.call(contexts):
            walk.forward(0, "context", capture=got)
        for c in contexts:
            accel.end_request(c.request)
    finally:
        remove_accel(model)
    for layer in want:
        assert torch.isfinite(got[layer][0]).all()
        torch.testing.assert_close(got[layer][0], want[layer][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[layer][1], want[layer][1], atol=1e-6, rtol=1e-6)


def test_sigma_is_one_minus_t():
    ctx = context(0)
    assert all(math.isclose(s, 1.0 - t, abs_tol=1e-7) for s, t in zip(ctx.sigmas, window_t(0)))
    assert ctx.sigmas[0] < 1e-3 and not ctx.active[0]     # the extra clean chunk: finished, nearly clean
