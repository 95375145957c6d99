"""Execute a decided call on one block range: run the selected frames once, write every
chunk's output, keep the residual history and K/V of this range.

`CallPlan` is what the decision side (stage 0 / `Accelerator.plan`) hands to every executor;
a pipeline stage executes the same plan on its own block range with its own residual shard, so
Cache and Predict need no traffic between stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from scope.baselines import make_policy
from scope.config import AccelConfig
from scope.extrapolation import embedded_error, newton_extrapolate, taylor_extrapolate
from scope.planner import SelectivePlan
from scope.scheduler import CACHE, PREDICT, RECOMPUTE, SKIP, Decision
from scope.state import StateStore, UnitKey, UnitState

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RunFn(Protocol):
    """Run blocks [start, end) on a frame subset; K/V lists as in `StackAdapter.run_stack_kv`."""

    def __call__(self, h: torch.Tensor, inputs: Any, start: int, end: int, served: list[Any],
                 capture: list[torch.Tensor]) -> tuple[torch.Tensor, list[Any]]: ...


def make_run_fn(model: Any, adapter: Any) -> RunFn:
    """A `RunFn` over the adapter's original (unwrapped) stack method of `model`."""

    def run_fn(h, inputs, start, end, served, capture):
        if not served and not capture:
            return adapter.run_stack(model, h, inputs, start, end), []
        if not hasattr(adapter, "run_stack_kv"):
            raise RuntimeError(f"{type(adapter).__name__} has no run_stack_kv: K/V serving "
                               f"(kv_cache_finished / kv_cache_stale) needs it; set both to false")
        return adapter.run_stack_kv(model, h, inputs, start, end, served, capture)

    return run_fn


@dataclass(frozen=True)
class CallPlan:
    """The decisions of one call, for every executor of the replica."""

    request: str
    branch: str
    step: int
    chunk_offset: int
    frames_per_chunk: int
    sigmas: tuple[float, ...]
    decisions: tuple[Decision, ...]
    selective: SelectivePlan
    released: tuple[int, ...] = ()       # absolute chunks whose residual history to drop first
    released_kv: tuple[int, ...] = ()    # absolute chunks whose K/V to drop first

    @property
    def num_chunks(self) -> int:
        return len(self.decisions)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(d.mode for d in self.decisions)

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(d.reason for d in self.decisions)

    def unit(self, j: int) -> UnitKey:
        return UnitKey(self.request, self.branch, self.chunk_offset + j)


@dataclass
class ExecReport:
    """What one `execute` measured: observed error of the would-be prediction at Recompute."""

    observed: dict[int, float] = field(default_factory=dict)   # window chunk -> relative error
    observed_span: dict[int, float] = field(default_factory=dict)  # its horizon in the coordinate
    norm_ratio: dict[int, float] = field(default_factory=dict)  # mean_token |r| / |r_prev| (MagCache)

    def observations(self) -> dict[int, tuple[float, float]]:
        return {j: (err, self.observed_span.get(j, 0.0)) for j, err in self.observed.items()}


class StageExecutor:
    """Executes plans on blocks [start, end) and owns that range's unit states (`units`: one
    `UnitState` per (request, branch, chunk) with the residual history and the K/V of this
    range; the deciding accelerator's policy keeps its decision fields in the same objects)."""

    def __init__(self, config: AccelConfig, adapter: Any, start: int, end: int) -> None:
        if not 0 <= start < end:
            raise ValueError(f"block range must satisfy 0 <= start < end, got [{start}, {end})")
        policy = make_policy(config)
        self.adapter, self.start, self.end = adapter, start, end
        self.extrapolator = policy.extrapolator
        self.order, self.history = policy.order, policy.history
        self.measure_norm_ratio = bool(getattr(policy, "measure_norm_ratio", False))
        self.error_reference = policy.error_reference
        self.residual_dtype = config.residual_dtype
        self.exact_kv = config.selective == "exact"
        self.units: StateStore[UnitState] = StateStore(UnitState)
        self.last_report = ExecReport()
        self.last_reports: list[ExecReport] = [self.last_report]
        self.bytes_at_end: int | None = None   # memory_bytes() at the last end_request (monitoring)

    # -- execute ---------------------------------------------------------------------------------
    def execute(self, plan: CallPlan | Sequence[CallPlan], h: torch.Tensor, inputs: Any,
                run_fn: RunFn) -> torch.Tensor:
        """Output of blocks [start, end) for every token of the window: h [B, N, D] -> [B, N, D].

        `plan` is one plan for every row of h, or one plan per row (B samples of a batch, each
        its own request and state) that all run the same frames (`plan_signature` equal): the
        selected frames of the B samples then go through the stack in one call, each sample
        serving and capturing its own K/V and keeping its own residual history."""
        plans = [plan] if isinstance(plan, CallPlan) else list(plan)
        rows = self._rows_per_plan(plans, h)
        for p in plans:
            self._apply_releases(p)
        first = plans[0]
        C = first.num_chunks
        tpc = self._tokens_per_chunk(first, h, inputs)
        sel = first.selective
        computed: dict[int, torch.Tensor] = {}
        out_sub = None
        if sel.run:
            out_sub, computed = self._run_subset(plans, rows, h, inputs, run_fn, tpc)

        # the whole window ran: write into the fresh stack output instead of a copy of h
        whole = sel.run == tuple(range(C))
        out = out_sub if whole else h.clone()
        reports = []
        for b, p in enumerate(plans):
            rs = slice(b * rows, (b + 1) * rows)
            mine = {j: c[rs] for j, c in computed.items()}
            reports.append(self._write_outputs(p, h[rs], out[rs], mine, tpc, copy_computed=not whole))
        self.last_reports = reports
        self.last_report = reports[0]
        return out

    @staticmethod
    def _rows_per_plan(plans: list[CallPlan], h: torch.Tensor) -> int:
        if not plans:
            raise ValueError("execute needs at least one plan")
        if len(plans) == 1:
            return h.shape[0]
        if h.shape[0] != len(plans):
            raise ValueError(f"{len(plans)} per-sample plans need hidden states with one row each, "
                             f"got batch {h.shape[0]}")
        signature = plan_signature(plans[0])
        for p in plans[1:]:
            if plan_signature(p) != signature:
                raise ValueError(f"per-sample plans executed together must run the same frames; "
                                 f"{p.request!r} differs from {plans[0].request!r} (group them with "
                                 f"scope.executor.group_plans)")
        return 1

    def _write_outputs(self, plan: CallPlan, h: torch.Tensor, out: torch.Tensor,
                       computed: dict[int, torch.Tensor], tpc: int, copy_computed: bool) -> ExecReport:
        """Every chunk's output for one plan's rows (`out` is a view into the batch output), and
        the residual history of its Recompute chunks; returns the measured errors."""
        wd = torch.promote_types(h.dtype, torch.float32)
        report = ExecReport()
        pending_err: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        for j, d in enumerate(plan.decisions):
            sl = slice(j * tpc, (j + 1) * tpc)
            h_in = h[:, sl]
            unit = plan.unit(j)
            if d.mode in (RECOMPUTE, SKIP) and j in computed and copy_computed:
                out[:, sl] = computed[j]   # skip chunks that ran as context keep their output
            if d.mode == RECOMPUTE:
                if j not in computed:
                    raise RuntimeError(f"chunk {j} is Recompute but its frames did not run "
                                       f"(run={plan.selective.run})")
                pending_err.extend(self._record(unit, d.coord, h_in, computed[j], j, report))
            elif d.mode == CACHE:
                r_last = self._history(unit, j).residuals[-1]
                out[:, sl] = (h_in.to(wd) + r_last.to(wd)).to(h.dtype)
            elif d.mode == PREDICT:
                r_hat = self._predict(self._history(unit, j), d.coord)
                out[:, sl] = (h_in.to(wd) + r_hat.to(wd)).to(h.dtype)
            elif d.mode != SKIP:
                raise ValueError(f"unknown mode {d.mode!r} for chunk {j}")
        if pending_err:
            values = torch.stack([torch.stack([torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)])
                                  for _, a, b, _ in pending_err]).cpu().tolist()
            for (j, _, _, span), (num, den) in zip(pending_err, values):
                report.observed[j] = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
                report.observed_span[j] = span
        return report

    def _tokens_per_chunk(self, plan: CallPlan, h: torch.Tensor, inputs: Any) -> int:
        C, fpc = plan.num_chunks, plan.frames_per_chunk
        frames = int(self.adapter.num_frames(inputs))
        tpf = int(self.adapter.tokens_per_frame(inputs))
        if frames != C * fpc:
            raise ValueError(f"the stack input has {frames} frames but the call context describes "
                             f"{C} chunks x {fpc} frames = {C * fpc}")
        if h.dim() != 3 or h.shape[1] != frames * tpf:
            raise ValueError(f"hidden states must be [B, N, D] with N = frames x tokens_per_frame = "
                             f"{frames} x {tpf}, got {tuple(h.shape)}")
        return fpc * tpf

    def _run_subset(self, plans: list[CallPlan], rows: int, h: torch.Tensor, inputs: Any, run_fn: RunFn,
                    tpc: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        first = plans[0]
        sel, fpc = first.selective, first.frames_per_chunk
        pos = {j: i for i, j in enumerate(sel.run)}
        whole = sel.run == tuple(range(first.num_chunks))
        if whole:
            h_sub, in_sub = h, inputs
        else:
            frames = torch.cat([torch.arange(j * fpc, (j + 1) * fpc) for j in sel.run]).to(h.device)
            h_sub = torch.cat([h[:, j * tpc:(j + 1) * tpc] for j in sel.run], dim=1)
            in_sub = self.adapter.select_frames(inputs, frames)
        # each sample serves its own K/V: one entry per chunk, the samples' entries stacked on dim 0
        served = [kv_cat([self._served_kv(p, j) for p in plans]) for j in sel.kv_served]
        capture = [torch.arange(pos[j] * fpc, (pos[j] + 1) * fpc, device=h.device) for j in sel.kv_capture]
        out_sub, captured = run_fn(h_sub, in_sub, self.start, self.end, served, capture)
        if len(captured) != len(capture):
            raise RuntimeError(f"run_stack_kv returned {len(captured)} K/V entries for "
                               f"{len(capture)} captured chunks")
        for j, entry in zip(sel.kv_capture, captured):
            for b, p in enumerate(plans):
                unit = self.units.ensure(p.unit(j))
                unit.kv = entry if len(plans) == 1 else kv_rows(entry, slice(b * rows, (b + 1) * rows))
                unit.kv_offset, unit.kv_sigma = p.chunk_offset, p.sigmas[j]
                unit.kv_exact = self.exact_kv
        return out_sub, {j: out_sub[:, i * tpc:(i + 1) * tpc] for j, i in pos.items()}

    def _served_kv(self, plan: CallPlan, j: int) -> Any:
        unit = self.units.get(plan.unit(j))
        if unit is None or not unit.has_kv:
            raise RuntimeError(f"plan serves K/V of chunk {plan.unit(j)} but blocks "
                               f"[{self.start}, {self.end}) hold none")
        return unit.kv

    # -- residual history ------------------------------------------------------------------------
    def _history(self, unit: UnitKey, j: int) -> UnitState:
        hist = self.units.get(unit)
        if hist is None or not hist.residuals:
            raise RuntimeError(f"chunk {j} ({unit}) reuses a residual but blocks "
                               f"[{self.start}, {self.end}) have none: the plan and this "
                               f"executor's history disagree")
        return hist

    def _record(self, unit: UnitKey, coord: float, h_in: torch.Tensor, h_out: torch.Tensor,
                j: int, report: ExecReport | None = None) -> list[tuple[int, torch.Tensor, torch.Tensor, float]]:
        """Append this Recompute's residual to the unit's history; return the would-be
        prediction's error (checked against the residual just computed) for the report."""
        if self.history == 0:
            return []
        dtype = h_in.dtype if self.residual_dtype == "input" else DTYPES[self.residual_dtype]
        r = (h_out.to(torch.promote_types(h_out.dtype, torch.float32)) - h_in.to(
            torch.promote_types(h_in.dtype, torch.float32)))
        hist = self.units.ensure(unit)
        err: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        if hist.residuals and (not hist.coords or hist.coords[-1] != coord):
            guess = self._predict(hist, coord, strict=False)
            if guess is not None:
                err.append((j, guess.to(r.dtype) - r, r, abs(coord - hist.coords[-1])))
            if self.measure_norm_ratio and report is not None:
                prev = hist.residuals[-1].to(r.dtype)
                ratio = (r.norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-12)).mean()
                report.norm_ratio[j] = float(ratio)
        if hist.coords and hist.coords[-1] == coord:
            hist.coords.pop()
            hist.residuals.pop()
        hist.coords.append(coord)
        hist.residuals.append(r.to(dtype))
        del hist.coords[: -self.history]
        del hist.residuals[: -self.history]
        return err

    def _predict(self, hist: UnitState, coord: float, strict: bool = True) -> torch.Tensor | None:
        n = len(hist.residuals)
        if self.extrapolator == "taylor":
            return taylor_extrapolate(hist.coords, hist.residuals, coord, min(self.order, n - 1))
        if self.extrapolator == "newton" and self.order > 0:
            if n >= self.order + 1:
                return newton_extrapolate(hist.coords, hist.residuals, coord, self.order)
            if strict:
                raise RuntimeError(f"Predict of order {self.order} needs {self.order + 1} "
                                   f"residuals, this executor holds {n}")
            # checking only (observed error): the highest order the history allows, so the
            # first check happens at the second Recompute (order 0 bounds order 1 from above
            # on smooth residuals)
            return newton_extrapolate(hist.coords, hist.residuals, coord, n - 1)
        return hist.residuals[-1].to(torch.promote_types(hist.residuals[-1].dtype, torch.float32))

    def estimate(self, unit: UnitKey, coord: float) -> float | None:
        """Embedded error estimate of a Predict at `coord` (None when it cannot be formed)."""
        hist = self.units.get(unit)
        if hist is None or self.extrapolator != "newton":
            return None
        if len(hist.residuals) < self.order + 1:
            return None
        return embedded_error(hist.coords, hist.residuals, coord, self.order, self.error_reference)

    # -- K/V readiness (asked by the deciding accelerator) -----------------------------------------
    def kv_ready(self, unit: UnitKey, offset: int, sigma: float | None = None, exact: bool = False) -> bool:
        """This range holds K/V of the unit captured at this window offset (and, when given, at
        this noise level / with exact context)."""
        st = self.units.get(unit)
        if st is None or not st.has_kv or st.kv_offset != offset:
            return False
        return sigma is None or (st.kv_sigma == sigma and (st.kv_exact or not exact))

    # -- lifecycle -------------------------------------------------------------------------------
    def _apply_releases(self, plan: CallPlan) -> None:
        if plan.released:
            self.clear_history(plan.request, plan.released, plan.branch)
        if plan.released_kv:
            self.clear_kv(plan.request, plan.released_kv, plan.branch)

    def clear_history(self, request: str, chunks: Sequence[int], branch: str | None = None) -> None:
        """Forget decisions and residuals of these chunks; their K/V stays."""
        self.units.edit_chunks(request, chunks, UnitState.clear_history, branch)

    def clear_kv(self, request: str, chunks: Sequence[int], branch: str | None = None) -> None:
        self.units.edit_chunks(request, chunks, UnitState.clear_kv, branch)

    def release(self, request: str, chunks: Sequence[int], branch: str | None = None,
                kv: bool = True) -> None:
        if kv:
            self.units.drop_chunks(request, chunks, branch)
        else:
            self.clear_history(request, chunks, branch)

    def end_request(self, request: str) -> None:
        # plain stats for monitoring: what this range held when the request ended (a segment boundary)
        self.bytes_at_end = self.memory_bytes()
        self.units.drop_request(request)

    def memory_bytes(self) -> int:
        """Bytes held for all requests: residual history, K/V, indicator inputs."""
        return sum(_tensor_bytes([st.residuals, st.kv, st.prev_signal, st.prev_input])
                   for _, st in self.units.items())


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


# ---------------------------------------------------------------------------------------------
# batches of per-sample plans

def plan_signature(plan: CallPlan) -> tuple:
    """What decides the frames one call runs: plans with equal signatures share one stack call."""
    sel = plan.selective
    return (plan.num_chunks, plan.frames_per_chunk, sel.run, sel.kv_served, sel.kv_capture)


def group_plans(plans: Sequence[CallPlan]) -> list[list[int]]:
    """Indices of per-sample plans grouped by signature, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(plans):
        groups.setdefault(plan_signature(p), []).append(i)
    return list(groups.values())


def kv_cat(entries: list[Any]) -> Any:
    """Samples' K/V entries (nested dict / list / tuple of tensors, batch on dim 0) as one."""
    first = entries[0]
    if len(entries) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(entries, dim=0)
    if isinstance(first, dict):
        return {k: kv_cat([e[k] for e in entries]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(kv_cat([e[i] for e in entries]) for i in range(len(first)))
    raise TypeError(f"K/V entries must be tensors or dicts / lists / tuples of them, got {type(first).__name__}")


def kv_rows(entry: Any, rows: slice) -> Any:
    """One sample's rows of a batched K/V entry (cloned: the batch tensor is not kept alive)."""
    if isinstance(entry, torch.Tensor):
        return entry[rows].clone()
    if isinstance(entry, dict):
        return {k: kv_rows(v, rows) for k, v in entry.items()}
    if isinstance(entry, (list, tuple)):
        return type(entry)(kv_rows(v, rows) for v in entry)
    raise TypeError(f"K/V entries must be tensors or dicts / lists / tuples of them, got {type(entry).__name__}")
