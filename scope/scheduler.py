"""The tri-modal decision (Recompute / Cache / Predict) per unit per call, and the policy
interface every method (SCOPE and the baselines) implements.

A policy is two-phase so the planner can sit in between: `propose` returns one `Decision` per
window chunk without touching state; the accelerator may upgrade some to Recompute (their
frames run anyway); `commit` then applies the final decisions to the per-unit state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from scope.config import ScopeConfig, resolve_rescale
from scope.state import CallContext, StateStore, UnitKey, UnitState

RECOMPUTE, CACHE, PREDICT, SKIP = "recompute", "cache", "predict", "skip"
MODES = (RECOMPUTE, CACHE, PREDICT, SKIP)
# per-chunk needs that say nothing about the other chunks (see ScopeConfig.sync)
HARD_REASONS = ("warmup", "no-history", "final")


@dataclass(frozen=True)
class Decision:
    """Mode of one chunk at one call, why, and what the commit needs."""

    mode: str
    reason: str
    coord: float = 0.0                 # coordinate of this call (sigma or step) for the history
    est_error: float | None = None     # embedded error estimate (Predict only)
    indicator: float | None = None     # this call's change indicator (after rescale)
    acc: float = 0.0                   # accumulated indicator if this call does not recompute
    ratio: float = 1.0                 # MagCache: accumulated magnitude ratio if not recomputing

    def upgraded(self, reason: str) -> Decision:
        return dataclasses.replace(self, mode=RECOMPUTE, reason=reason, est_error=None)


@dataclass
class ChunkSignals:
    """Per window chunk indicator sources (None where not available)."""

    probe: list[torch.Tensor | None] | None = None
    input: list[torch.Tensor | None] | None = None
    first_residual: list[torch.Tensor | None] | None = None


class ErrorEstimator(Protocol):
    def __call__(self, unit: UnitKey, coord: float) -> float | None: ...


def no_estimate(unit: UnitKey, coord: float) -> float | None:
    return None


# ---------------------------------------------------------------------------------------------
# Indicator helpers
# ---------------------------------------------------------------------------------------------

def l1_parts(cur: Sequence[torch.Tensor | None], prev: Sequence[torch.Tensor | None]
             ) -> list[tuple[float, float] | None]:
    """Per pair (sum |cur - prev|, sum |prev|), one device sync for all pairs."""
    idx = [i for i, (c, p) in enumerate(zip(cur, prev)) if c is not None and p is not None]
    out: list[tuple[float, float] | None] = [None] * len(cur)
    if not idx:
        return out
    parts = []
    for i in idx:
        wd = torch.promote_types(cur[i].dtype, torch.float32)
        c, p = cur[i].to(wd), prev[i].to(wd)
        parts.append(torch.stack([(c - p).abs().sum(), p.abs().sum()]))
    values = torch.stack(parts).cpu().tolist()
    for i, (num, den) in zip(idx, values):
        out[i] = (num, den)
    return out


def rel_l1(parts: tuple[float, float] | None) -> float:
    """mean|cur - prev| / mean|prev| from summed parts; inf when unknown."""
    if parts is None:
        return math.inf
    num, den = parts
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def poly_eval(coeffs: Sequence[float] | None, x: float) -> float:
    """numpy.poly1d-style evaluation (highest degree first), clamped at 0; identity if None."""
    if coeffs is None or math.isinf(x):
        return x
    value = 0.0
    for c in coeffs:
        value = value * x + c
    return max(value, 0.0)


def coordinate_value(kind: str, sigma: float, step: int) -> float:
    """The extrapolation coordinate of a chunk at noise level `sigma`, its own step index `step`."""
    if kind == "sigma":
        return sigma
    if kind == "timestep":
        return 1000.0 * sigma
    if kind == "step":
        return float(step)
    if kind == "logsnr":
        s = min(max(sigma, 1e-4), 1.0 - 1e-4)   # finite at the clean and pure-noise ends
        return math.log((1.0 - s) / s)
    raise ValueError(f"unknown coordinate {kind!r}; valid: sigma, timestep, step, logsnr")


def tighten_factor(sigma: float, floor_scale: float, knee: float) -> float:
    """1 above `knee`, shrinking linearly to `floor_scale` at sigma 0."""
    if sigma >= knee:
        return 1.0
    return floor_scale + (1.0 - floor_scale) * sigma / knee


def detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


# ---------------------------------------------------------------------------------------------
# Policy base
# ---------------------------------------------------------------------------------------------

class Policy:
    """Common machinery: unit state, commit, release. Subclasses implement `propose`."""

    name = "base"
    granularity = "chunk"
    needs_probe = False
    needs_input = False
    needs_first_block = False
    probe_kind = "default"
    extrapolator: str | None = None    # "newton" | "taylor" | None (no Predict)
    order = 0
    history = 1                        # residual points kept per unit (0 = none)
    error_reference = "lower"
    signal_on_recompute_only = False   # FBCache compares against the last full compute

    def __init__(self) -> None:
        self.units: StateStore[UnitState] = StateStore(UnitState)
        # a standalone policy keeps its own coordinates; bound to an executor's store, the
        # executor writes the residual history (coordinates included) when it records it
        self.records_history = True

    def bind(self, units: StateStore[UnitState]) -> None:
        """Decide on the unit states of an executor (one object per unit, no mirror)."""
        self.units, self.records_history = units, False

    # -- decide ----------------------------------------------------------------------------------
    def propose(self, ctx: CallContext, signals: ChunkSignals,
                estimate: ErrorEstimator = no_estimate) -> list[Decision]:
        raise NotImplementedError

    def commit(self, ctx: CallContext, decisions: Sequence[Decision], signals: ChunkSignals) -> None:
        """Apply final decisions (after any upgrades) to the per-unit state."""
        for j, d in enumerate(decisions):
            if not ctx.active[j]:
                continue
            st = self.units.ensure(ctx.unit(j))
            self._commit_unit(st, d, _pick(signals.probe, j) if self.needs_probe else
                              _pick(signals.first_residual, j), _pick(signals.input, j))
            st.last_sigma = ctx.sigmas[j]
        if self.granularity == "global":
            self._commit_global(ctx, decisions)

    def _commit_unit(self, st: UnitState, d: Decision, signal: torch.Tensor | None,
                     inp: torch.Tensor | None) -> None:
        st.active_calls += 1
        if d.mode == RECOMPUTE:
            st.acc, st.ratio = 0.0, 1.0
            st.since_recompute = 0
            if self.history > 0 and self.records_history:
                if st.coords and st.coords[-1] == d.coord:
                    st.coords.pop()
                st.coords.append(d.coord)
                del st.coords[: -self.history]
        else:
            st.acc, st.ratio = d.acc, d.ratio
            st.since_recompute += 1
        if signal is not None and (d.mode == RECOMPUTE or not self.signal_on_recompute_only):
            st.prev_signal = detached(signal)
        if inp is not None:
            st.prev_input = detached(inp)

    def _commit_global(self, ctx: CallContext, decisions: Sequence[Decision]) -> None:
        active = [d for j, d in enumerate(decisions) if ctx.active[j]]
        if not active:
            return
        g = self.units.ensure(ctx.global_unit())
        g.active_calls += 1
        if all(d.mode == RECOMPUTE for d in active):
            g.acc, g.since_recompute = 0.0, 0
        else:
            g.acc = active[0].acc
            g.since_recompute += 1

    def observe(self, request: str, branch: str, chunk_offset: int,
                observed: dict[int, tuple[float, float]]) -> None:
        """Measured errors of would-be predictions (window chunk -> (relative error, horizon))."""
        for j, (err, span) in observed.items():
            st = self.units.get(UnitKey(request, branch, chunk_offset + j))
            if st is not None:
                st.observed, st.observed_span = err, span

    # -- lifecycle -------------------------------------------------------------------------------
    def end_request(self, request: str) -> None:
        self.units.drop_request(request)

    # -- helpers ---------------------------------------------------------------------------------
    def _indicators(self, ctx: CallContext, signals: ChunkSignals, use_probe: bool, use_input: bool,
                    rescale: Sequence[float] | None) -> list[float]:
        """Per window chunk change indicator vs the unit's previous active call (inf if none)."""
        C = ctx.num_chunks
        states = [self.units.get(ctx.unit(j)) for j in range(C)]
        total = [0.0] * C
        if use_probe:
            cur = [_pick(signals.probe, j) for j in range(C)]
            prev = [None if s is None else s.prev_signal for s in states]
            for j, parts in enumerate(l1_parts(cur, prev)):
                total[j] += poly_eval(rescale, rel_l1(parts))
        if use_input:
            cur = [_pick(signals.input, j) for j in range(C)]
            prev = [None if s is None else s.prev_input for s in states]
            for j, parts in enumerate(l1_parts(cur, prev)):
                total[j] += rel_l1(parts)
        return total


def _pick(values: list[torch.Tensor | None] | None, j: int) -> torch.Tensor | None:
    return None if values is None else values[j]


def skip_decision(ctx: CallContext, j: int) -> Decision:
    return Decision(SKIP, "inactive", coord=ctx.sigmas[j])


# ---------------------------------------------------------------------------------------------
# SCOPE
# ---------------------------------------------------------------------------------------------

class ScopeScheduler(Policy):
    """SCOPE's tri-modal decision with its stability controls.

    Per active chunk, in order (first match wins):
      warm-up (first `warmup_steps` active calls of the chunk) -> Recompute "warmup"
      final step (`force_final_step`, sigma_next == 0) -> Recompute "final"
      no residual yet -> Recompute "no-history"
      `max_consecutive` non-Recompute calls in a row -> Recompute "max-consecutive"
      then the two reuse bands in the `prefer` order (predict first by default):
        acc < tau_predict * s(sigma) and the Predict controls pass -> Predict "predict"
            (controls: order + 1 residuals kept, else "short-history"; the horizon
             |x - x_newest| <= rho * span of the used points, else "horizon"; the error
             estimate <= eps_error * s(sigma), else "error-estimate")
        acc < tau_cache * s(sigma) -> Cache "below-tau-cache"
      else -> Recompute with the reason of the last band that failed ("above-tau" when the
      indicator was above both thresholds)
    where acc = indicator accumulated since the chunk's last Recompute including this call
    (granularity "call": the same call-level increment for every active chunk) and s(sigma) the
    low-sigma tightening factor; x is the chunk's coordinate (`coordinate_value`).
    """

    name = "scope"
    extrapolator = "newton"

    def __init__(self, config: ScopeConfig) -> None:
        super().__init__()
        self.config = config
        resolved = resolve_rescale(config.rescale)
        self.rescale = None if resolved is None else resolved[0]
        self.needs_probe = config.indicator in ("probe", "probe+input")
        self.needs_input = config.indicator in ("input", "probe+input")
        self.probe_kind = config.probe_kind if resolved is None or resolved[1] == "default" else resolved[1]
        self.order = config.order
        self.history = config.history_len
        self.error_reference = "higher" if self.history == self.order + 2 else "lower"

    def propose(self, ctx: CallContext, signals: ChunkSignals,
                estimate: ErrorEstimator = no_estimate) -> list[Decision]:
        cfg = self.config
        increments = self._increments(ctx, signals)
        out = []
        for j in range(ctx.num_chunks):
            if not ctx.active[j]:
                out.append(skip_decision(ctx, j))
                continue
            unit = ctx.unit(j)
            st = self.units.get(unit) or UnitState()
            sigma, d = ctx.sigmas[j], increments[j]
            coord = coordinate_value(cfg.coordinate, sigma, st.active_calls)
            acc = st.acc + d
            scale = tighten_factor(sigma, cfg.sigma_floor_scale, cfg.sigma_knee)

            def make(mode: str, reason: str, est: float | None = None) -> Decision:
                return Decision(mode, reason, coord=coord, est_error=est, indicator=d, acc=acc)

            final = ctx.is_final(j)
            if cfg.force_final_step and final is None:
                raise ValueError("ScopeConfig.force_final_step needs CallContext.chunk_sigma_next "
                                 "(the noise level after this step); pass it or set "
                                 "force_final_step=false")
            if st.active_calls < cfg.warmup_steps:
                out.append(make(RECOMPUTE, "warmup"))
            elif cfg.force_final_step and final:
                out.append(make(RECOMPUTE, "final"))
            elif not st.coords:
                out.append(make(RECOMPUTE, "no-history"))
            elif st.since_recompute >= cfg.max_consecutive:
                out.append(make(RECOMPUTE, "max-consecutive"))
            else:
                out.append(self._reuse_or_recompute(unit, st, coord, acc, scale, estimate, make))
        if cfg.granularity == "call" and cfg.sync:
            out = self._in_lockstep(ctx, out)
        return out

    @staticmethod
    def _in_lockstep(ctx: CallContext, decisions: list[Decision]) -> list[Decision]:
        """A soft Recompute anywhere recomputes every active chunk (reason "sync")."""
        soft = any(d.mode == RECOMPUTE and d.reason not in HARD_REASONS for d in decisions)
        if not soft:
            return decisions
        return [d.upgraded("sync") if ctx.active[j] and d.mode != RECOMPUTE else d
                for j, d in enumerate(decisions)]

    # -- the two reuse bands ---------------------------------------------------------------------
    def _reuse_or_recompute(self, unit, st, coord, acc, scale, estimate, make) -> Decision:
        cfg = self.config
        bands = (PREDICT, CACHE) if cfg.prefer == "predict" else (CACHE, PREDICT)
        why, why_est = "above-tau", None
        for mode in bands:
            tau = cfg.tau_predict if mode == PREDICT else cfg.tau_cache
            if not acc < tau * scale:
                continue
            if mode == CACHE:
                return make(CACHE, "below-tau-cache")
            failed, est = self._predict_control(unit, st, coord, scale, estimate)
            if failed is None:
                return make(PREDICT, "predict", est)
            why, why_est = failed, est
        return make(RECOMPUTE, why, why_est)

    def _predict_control(self, unit, st, coord, scale, estimate) -> tuple[str | None, float | None]:
        """(None, estimate) when Predict may run, else (the control that refused it, estimate)."""
        cfg, k = self.config, self.order
        if len(st.coords) < k + 1:
            return "short-history", None
        if k >= 1:
            used = st.coords[-(k + 1):]
            span = max(used) - min(used)
            if abs(coord - used[-1]) > cfg.horizon_rho * span:
                return "horizon", None
        est = self.error_estimate(unit, st, coord, estimate)
        if est is not None and est > cfg.eps_error * scale:
            return "error-estimate", est
        return None, est

    def error_estimate(self, unit: UnitKey, st: UnitState, coord: float,
                       estimate: ErrorEstimator = no_estimate) -> float | None:
        """Relative error expected of a Predict at `coord` (None = no information yet)."""
        kind = self.config.error_estimate
        if kind == "off":
            return None
        if kind == "embedded":
            return estimate(unit, coord)
        if st.observed is None or not st.coords:
            return None
        h = abs(coord - st.coords[-1])
        if st.observed_span <= 0.0:
            return st.observed
        # local error of an order-k extrapolation grows like h^(k+1)
        return st.observed * (h / st.observed_span) ** (self.order + 1)

    # -- indicator ---------------------------------------------------------------------------------
    def _increments(self, ctx: CallContext, signals: ChunkSignals) -> list[float]:
        """This call's indicator per window chunk (the same call-level value under "call")."""
        cfg, C = self.config, ctx.num_chunks
        if cfg.indicator == "none":
            return [0.0] * C
        if cfg.granularity == "chunk":
            return self._indicators(ctx, signals, self.needs_probe, self.needs_input, self.rescale)
        active = [j for j in range(C) if ctx.active[j]]
        states = [self.units.get(ctx.unit(j)) for j in active]
        total = 0.0
        for use, values, attr, poly in ((self.needs_probe, signals.probe, "prev_signal", self.rescale),
                                        (self.needs_input, signals.input, "prev_input", None)):
            if not use:
                continue
            cur = [_pick(values, j) for j in active]
            prev = [None if s is None else getattr(s, attr) for s in states]
            known = [p for p in l1_parts(cur, prev) if p is not None]
            rel = math.inf if not known else rel_l1((sum(p[0] for p in known), sum(p[1] for p in known)))
            total += poly_eval(poly, rel)
        return [total if ctx.active[j] else 0.0 for j in range(C)]
