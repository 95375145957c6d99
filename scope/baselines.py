"""Baseline policies behind the same interface as SCOPE's scheduler (see scope/scheduler.py).

Rules follow ../shared/reference/NOTES_cache_baselines.md, section 2:
- TeaCache: acc += poly(rel_l1(probe)); acc < threshold -> reuse the last residual, else
  recompute and reset acc to 0; warm-up (ret steps) and optional final step always compute.
  "global" = one decision for the window (the rel-L1 is taken over the whole window's probe),
  "chunk" = per chunk (FlowCache's SkyReels-V2 port).
- FlowCache: the same accumulate-and-reset rule per chunk, on the chunk's stack input by
  default (MAGI-1 port), with a per-chunk warm-up and the final step computed.
- TaylorSeer: full compute at the first `first_enhance` steps and every `interval`-th step
  after; otherwise a Taylor expansion in the step index (stack-level residual here, where the
  original caches each attention / FFN output).
- FBCache: run block 0; rel_l1(first-block residual vs the one at the last full compute)
  < threshold -> add the cached tail residual, else run blocks 1..L-1.
Comparisons are strict (`<`) everywhere.
"""

from __future__ import annotations

import math

from scope.config import (AccelConfig, FBCacheConfig, FlowCacheConfig, MagCacheConfig, NoneConfig,
                          ScopeConfig, TaylorSeerConfig, TeaCacheConfig, resolve_rescale)
from scope.scheduler import (CACHE, PREDICT, RECOMPUTE, ChunkSignals, Decision, ErrorEstimator,
                             Policy, ScopeScheduler, l1_parts, no_estimate, poly_eval,
                             rel_l1, skip_decision)
from scope.state import CallContext, UnitState


class NonePolicy(Policy):
    """No acceleration: every active chunk recomputes; nothing is stored."""

    name = "none"
    history = 0

    def __init__(self, config: NoneConfig) -> None:
        super().__init__()
        self.config = config

    def propose(self, ctx: CallContext, signals: ChunkSignals,
                estimate: ErrorEstimator = no_estimate) -> list[Decision]:
        return [Decision(RECOMPUTE, "none", coord=ctx.sigmas[j]) if ctx.active[j]
                else skip_decision(ctx, j) for j in range(ctx.num_chunks)]

    def commit(self, ctx: CallContext, decisions, signals) -> None:
        return None


class _AccumulatePolicy(Policy):
    """TeaCache-style accumulate-and-reset reuse (shared by TeaCache and FlowCache)."""

    def __init__(self, threshold: float, warmup: int, force_final: bool,
                 rescale: tuple[float, ...] | None, use_probe: bool, use_input: bool) -> None:
        super().__init__()
        self.threshold, self.warmup, self.force_final = threshold, warmup, force_final
        self.rescale, self.needs_probe, self.needs_input = rescale, use_probe, use_input

    def _chunk_rule(self, ctx: CallContext, j: int, st: UnitState, d: float,
                    counter: int, acc: float) -> Decision:
        def make(mode: str, reason: str) -> Decision:
            return Decision(mode, reason, coord=ctx.sigmas[j], indicator=d, acc=acc)

        if counter < self.warmup:
            return make(RECOMPUTE, "warmup")
        if self.force_final and _final(ctx, j):
            return make(RECOMPUTE, "final")
        if not st.coords:
            return make(RECOMPUTE, "no-history")
        if acc < self.threshold:
            return make(CACHE, "below-threshold")
        return make(RECOMPUTE, "above-threshold")

    def _propose_chunks(self, ctx: CallContext, signals: ChunkSignals) -> list[Decision]:
        d_all = self._indicators(ctx, signals, self.needs_probe, self.needs_input, self.rescale)
        out = []
        for j in range(ctx.num_chunks):
            if not ctx.active[j]:
                out.append(skip_decision(ctx, j))
                continue
            st = self.units.get(ctx.unit(j)) or UnitState()
            out.append(self._chunk_rule(ctx, j, st, d_all[j], st.active_calls, st.acc + d_all[j]))
        return out

    def _propose_global(self, ctx: CallContext, signals: ChunkSignals) -> list[Decision]:
        C = ctx.num_chunks
        states = [self.units.get(ctx.unit(j)) for j in range(C)]
        g = self.units.get(ctx.global_unit()) or UnitState()
        cur = [signals.probe[j] if signals.probe is not None else None for j in range(C)]
        prev = [None if s is None else s.prev_signal for s in states]
        parts = [p for p in l1_parts(cur, prev) if p is not None]
        d = math.inf if not parts else poly_eval(self.rescale, rel_l1(
            (sum(p[0] for p in parts), sum(p[1] for p in parts))))
        acc = g.acc + d
        has_history = all(states[j] is not None and states[j].coords
                          for j in range(C) if ctx.active[j])
        final = self.force_final and any(_final(ctx, j) for j in range(C) if ctx.active[j])
        if g.active_calls < self.warmup:
            mode, reason = RECOMPUTE, "warmup"
        elif final:
            mode, reason = RECOMPUTE, "final"
        elif not has_history:
            mode, reason = RECOMPUTE, "no-history"
        elif acc < self.threshold:
            mode, reason = CACHE, "below-threshold"
        else:
            mode, reason = RECOMPUTE, "above-threshold"
        return [Decision(mode, reason, coord=ctx.sigmas[j], indicator=d, acc=acc) if ctx.active[j]
                else skip_decision(ctx, j) for j in range(C)]

    def commit(self, ctx: CallContext, decisions, signals: ChunkSignals) -> None:
        if self.granularity == "global":
            # every chunk keeps its probe (the global rel-L1 is over the whole window)
            for j in range(ctx.num_chunks):
                if signals.probe is not None and signals.probe[j] is not None and not ctx.active[j]:
                    self.units.ensure(ctx.unit(j)).prev_signal = signals.probe[j].detach().clone()
        super().commit(ctx, decisions, signals)


class TeaCachePolicy(_AccumulatePolicy):
    name = "teacache"

    def __init__(self, config: TeaCacheConfig) -> None:
        resolved = resolve_rescale(config.rescale)
        super().__init__(config.threshold, config.effective_warmup, config.effective_force_final,
                         None if resolved is None else resolved[0], True, False)
        self.config = config
        self.granularity = config.granularity
        self.probe_kind = config.effective_probe_kind

    def propose(self, ctx: CallContext, signals: ChunkSignals,
                estimate: ErrorEstimator = no_estimate) -> list[Decision]:
        if self.granularity == "global":
            return self._propose_global(ctx, signals)
        return self._propose_chunks(ctx, signals)


class FlowCachePolicy(_AccumulatePolicy):
    name = "flowcache"

    def __init__(self, config: FlowCacheConfig) -> None:
        resolved = resolve_rescale(config.rescale)
        super().__init__(config.threshold, config.warmup_steps, config.force_final_step,
                         None if resolved is None else resolved[0],
                         config.indicator == "probe", config.indicator == "input")
        self.config = config
        if resolved is not None and resolved[1] != "default":
            self.probe_kind = resolved[1]
        else:
            self.probe_kind = config.probe_kind

    def propose(self, ctx: CallContext, signals: ChunkSignals,
                estimate: ErrorEstimator = no_estimate) -> list[Decision]:
        return self._propose_chunks(ctx, signals)


class TaylorSeerPolicy(Policy):
    """Fixed refresh interval; Predict = Taylor series in the step index."""

    name = "taylorseer"
    extrapolator = "taylor"

    def __init__(self, config: TaylorSeerConfig) -> None:
        super().__init__()
        self.config = config
        self.granularity = config.granularity
        self.order = config.order
        self.history = config.order + 1

    def propose(self, ctx: CallContext, signals: ChunkSignals,
                estimate: ErrorEstimator = no_estimate) -> list[Decision]:
        cfg, out = self.config, []
        for j in range(ctx.num_chunks):
            if not ctx.active[j]:
                out.append(skip_decision(ctx, j))
                continue
            st = self.units.get(ctx.unit(j)) or UnitState()
            step = ctx.step if self.granularity == "global" else st.active_calls
            coord = float(step)
            if step < cfg.first_enhance:
                out.append(Decision(RECOMPUTE, "first-enhance", coord=coord))
            elif cfg.force_final_step and _final(ctx, j):
                out.append(Decision(RECOMPUTE, "final", coord=coord))
            elif (step - cfg.first_enhance) % cfg.interval == 0:
                out.append(Decision(RECOMPUTE, "refresh", coord=coord))
            elif not st.coords:
                out.append(Decision(RECOMPUTE, "no-history", coord=coord))
            else:
                out.append(Decision(PREDICT, "taylor", coord=coord))
        return out


class FBCachePolicy(Policy):
    """First-Block Cache; the accelerator runs block 0 and passes its residual as the signal."""

    name = "fbcache"
    needs_first_block = True
    signal_on_recompute_only = True

    def __init__(self, config: FBCacheConfig) -> None:
        super().__init__()
        self.config = config
        self.granularity = config.granularity

    def propose(self, ctx: CallContext, signals: ChunkSignals,
                estimate: ErrorEstimator = no_estimate) -> list[Decision]:
        cfg, C = self.config, ctx.num_chunks
        cur = signals.first_residual or [None] * C
        states = [self.units.get(ctx.unit(j)) or UnitState() for j in range(C)]
        parts = l1_parts(cur, [s.prev_signal for s in states])
        if self.granularity == "global":
            g = self.units.get(ctx.global_unit()) or UnitState()
            act = [j for j in range(C) if ctx.active[j]]
            known = [parts[j] for j in act]
            diff = math.inf if any(p is None for p in known) or not known else rel_l1(
                (sum(p[0] for p in known), sum(p[1] for p in known)))
            final = cfg.force_final_step and any(_final(ctx, j) for j in act)
            mode, reason = self._rule(g.active_calls, final,
                                      all(states[j].coords for j in act), diff)
            return [Decision(mode, reason, coord=ctx.sigmas[j], indicator=diff) if ctx.active[j]
                    else skip_decision(ctx, j) for j in range(C)]
        out = []
        for j in range(C):
            if not ctx.active[j]:
                out.append(skip_decision(ctx, j))
                continue
            diff = rel_l1(parts[j])
            final = cfg.force_final_step and _final(ctx, j)
            mode, reason = self._rule(states[j].active_calls, final,
                                      bool(states[j].coords), diff)
            out.append(Decision(mode, reason, coord=ctx.sigmas[j], indicator=diff))
        return out

    def _rule(self, counter: int, final: bool, has_history: bool, diff: float) -> tuple[str, str]:
        if counter < self.config.warmup_steps:
            return RECOMPUTE, "warmup"
        if final:
            return RECOMPUTE, "final"
        if not has_history:
            return RECOMPUTE, "no-history"
        if diff < self.config.threshold:
            return CACHE, "below-threshold"
        return RECOMPUTE, "above-threshold"


class MagCachePolicy(Policy):
    """MagCache: one decision per call from calibrated magnitude ratios (no runtime probe).

    Each active chunk accumulates its own ratio / error at its own step (under an asynchronous
    schedule the chunks of one call sit at different steps); the call skips only when every
    active chunk may. `calibrate=true` recomputes everything and the executor measures the
    ratios (`RequestStats.mag_ratios`)."""

    name = "magcache"
    granularity = "global"

    def __init__(self, config: MagCacheConfig) -> None:
        super().__init__()
        self.config = config
        self.measure_norm_ratio = config.calibrate

    def gamma(self, branch: str, step: int) -> float:
        """Calibrated magnitude ratio at a chunk's step (nearest index if step counts differ)."""
        ratios = self.config.mag_ratios or {}
        table = ratios.get(branch) or ratios.get("cond") or next(iter(ratios.values()))
        steps = self.config.num_steps or len(table)
        if steps != len(table) and steps > 1:
            step = int(step * (len(table) - 1) / (steps - 1) + 0.5)   # nearest, halves up
        return table[min(max(step, 0), len(table) - 1)]

    def propose(self, ctx: CallContext, signals: ChunkSignals,
                estimate: ErrorEstimator = no_estimate) -> list[Decision]:
        cfg, C = self.config, ctx.num_chunks
        act = [j for j in range(C) if ctx.active[j]]
        states = {j: self.units.get(ctx.unit(j)) or UnitState() for j in act}
        g = self.units.get(ctx.global_unit()) or UnitState()
        retain = int(round(cfg.retention_ratio * (cfg.num_steps or self._table_len())))
        proposals: dict[int, Decision] = {}
        reason = "below-threshold"
        for j in act:
            st = states[j]
            ratio = 1.0 if cfg.calibrate else st.ratio * self.gamma(ctx.branch, st.active_calls)
            err = st.acc + abs(1.0 - ratio)
            proposals[j] = Decision(CACHE, "below-threshold", coord=ctx.sigmas[j], indicator=err,
                                    acc=err, ratio=ratio)
            if cfg.calibrate:
                reason = "calibrate"
            elif g.active_calls < retain:
                reason = "retention"
            elif not st.coords:
                reason = "no-history"
            elif not (err < cfg.threshold and st.since_recompute + 1 <= cfg.max_skip_steps):
                reason = reason if reason != "below-threshold" else "above-threshold"
        recompute = reason != "below-threshold"
        return [skip_decision(ctx, j) if not ctx.active[j] else
                proposals[j].upgraded(reason) if recompute else proposals[j] for j in range(C)]

    def _table_len(self) -> int:
        ratios = self.config.mag_ratios or {"": [1.0]}
        return max(len(v) for v in ratios.values())


def mag_ratio_table(samples: dict[str, dict[int, list[float]]], num_steps: int) -> dict[str, list[float]]:
    """Per branch, the mean measured ratio at every step 0..num_steps-1 (1.0 where none was
    measured: step 0 has no previous residual)."""
    table = {}
    for branch, by_step in sorted(samples.items()):
        table[branch] = [sum(by_step[s]) / len(by_step[s]) if by_step.get(s) else 1.0
                         for s in range(num_steps)]
    return table


def _final(ctx: CallContext, j: int) -> bool:
    final = ctx.is_final(j)
    if final is None:
        raise ValueError("force_final_step needs CallContext.chunk_sigma_next (the noise level "
                         "after this step); pass it or set force_final_step=false")
    return final


POLICIES: dict[type[AccelConfig], type[Policy]] = {
    NoneConfig: NonePolicy,
    ScopeConfig: ScopeScheduler,
    TeaCacheConfig: TeaCachePolicy,
    FlowCacheConfig: FlowCachePolicy,
    TaylorSeerConfig: TaylorSeerPolicy,
    FBCacheConfig: FBCachePolicy,
    MagCacheConfig: MagCachePolicy,
}


def make_policy(config: AccelConfig) -> Policy:
    """The policy object for a config (one per accelerator; holds that accelerator's state)."""
    try:
        cls = POLICIES[type(config)]
    except KeyError:
        raise ValueError(f"no policy for config type {type(config).__name__}; valid: "
                         f"{', '.join(c.__name__ for c in POLICIES)}") from None
    return cls(config)
