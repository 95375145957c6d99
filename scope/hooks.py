"""Attach acceleration to a model from outside: a hook on the model's block-stack method.

    accel = apply_accel(model, make_config("scope"), adapter)   # the model family's table
    with accel.call(CallContext(request="v1", branch="cond", step=s, ...)):
        out = model(x, t, context)            # the stack call inside is accelerated
    stats = accel.end_request("v1")
    remove_accel(model)                        # the model is as it was

The model file never mentions acceleration; model facts come from a small adapter table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch

from scope.baselines import make_policy
from scope.config import AccelConfig
from scope.executor import CallPlan, ExecReport, RunFn, StageExecutor, group_plans, make_run_fn
from scope.planner import FINISHED, classify_chunks, plan_selective
from scope.scheduler import PREDICT, RECOMPUTE, SKIP, ChunkSignals, Decision
from scope.state import CallContext
from scope.stats import RequestStats

__all__ = ["ACCEL_HOOK", "Accelerator", "CallContext", "CallPlan", "FirstBlockAccelerator", "HookRegistry",
           "StackAdapter", "StageExecutor", "apply_accel", "call_original", "make_accelerator", "make_run_fn",
           "remove_accel"]

ACCEL_HOOK = "scope.accel"
_REGISTRIES_ATTR = "_scope_hook_registries"


# ---------------------------------------------------------------------------------------------
# 1. Adapter protocol: the model-specific table
# ---------------------------------------------------------------------------------------------

@runtime_checkable
class StackAdapter(Protocol):
    """Where things are in one model family. Tokens are frame-major: [B, frames x tpf, D].

    Optional: `block_range(*args, **kwargs) -> (start, end)` (the hook refuses partial-range
    calls inside a context) and, for K/V serving,
    `run_stack_kv(model, h, inputs, start, end, served, capture) -> (h_out, captured)`: run like
    `run_stack`, letting every query also attend to the `served` entries (opaque per-chunk K/V
    objects this method returned earlier for the same block range, in chunk order) and returning
    one new entry per `capture` item (a LongTensor of frame positions within `inputs`).
    K/V entries are tensors or nested dicts / lists / tuples of tensors with the batch on dim 0.
    Batched calls (one CallContext per row) whose samples run different frames also need
    `select_rows(inputs, rows: LongTensor) -> inputs` (those batch rows only).
    """

    stack_method: str

    def num_blocks(self, model: Any) -> int: ...
    def split_stack_args(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]: ...
    def tokens_per_frame(self, inputs: Any) -> int: ...
    def num_frames(self, inputs: Any) -> int: ...
    def select_frames(self, inputs: Any, frames: torch.Tensor) -> Any: ...
    def probe(self, inputs: Any, h: torch.Tensor) -> torch.Tensor: ...
    def run_stack(self, model: Any, h: torch.Tensor, inputs: Any, start: int, end: int) -> torch.Tensor: ...


_ADAPTER_NEEDS = ("stack_method", "num_blocks", "split_stack_args", "tokens_per_frame", "num_frames",
                  "select_frames", "probe", "run_stack")


def _check_adapter(adapter: Any) -> None:
    missing = [name for name in _ADAPTER_NEEDS if not hasattr(adapter, name)]
    if missing:
        raise TypeError(f"{type(adapter).__name__} is not a StackAdapter: missing {missing} "
                        f"(see scope.hooks.StackAdapter)")


# ---------------------------------------------------------------------------------------------
# 2. Hook registry: named wrappers around one method of one model instance
# ---------------------------------------------------------------------------------------------

class HookRegistry:
    """Wrappers applied in registration order around `getattr(model, method)` on the instance.

    The class is untouched: the chain is installed as an instance attribute and removing the
    last hook restores what the instance had before.
    """

    def __init__(self, model: Any, method: str) -> None:
        self.model, self.method = model, method
        self._saved = model.__dict__.get(method, _MISSING)
        self._original: Callable[..., Any] = getattr(model, method)
        self._hooks: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {}
        self.payloads: dict[str, Any] = {}

    @classmethod
    def of(cls, model: Any, method: str, create: bool = True) -> HookRegistry | None:
        registries = model.__dict__.get(_REGISTRIES_ATTR)
        if registries is None:
            if not create:
                return None
            registries = {}
            object.__setattr__(model, _REGISTRIES_ATTR, registries)
        if method not in registries and create:
            if not callable(getattr(model, method, None)):
                raise AttributeError(f"{type(model).__name__} has no method {method!r} to hook")
            registries[method] = cls(model, method)
        return registries.get(method)

    @property
    def original(self) -> Callable[..., Any]:
        """The method as it was before any hook (bound to the model)."""
        return self._original

    def names(self) -> list[str]:
        return list(self._hooks)

    def __contains__(self, name: str) -> bool:
        return name in self._hooks

    def register(self, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
                 payload: Any = None) -> None:
        if name in self._hooks:
            raise ValueError(f"hook {name!r} is already registered on {self.describe()}")
        self._hooks[name] = wrap
        self.payloads[name] = payload
        self._install()

    def remove(self, name: str) -> Any:
        """Remove one hook; returns its payload."""
        if name not in self._hooks:
            raise KeyError(f"no hook {name!r} on {self.describe()}")
        del self._hooks[name]
        payload = self.payloads.pop(name)
        if self._hooks:
            self._install()
        else:
            self._uninstall()
        return payload

    def describe(self) -> str:
        chain = " -> ".join(["original", *self._hooks])
        return f"{type(self.model).__name__}.{self.method}: {chain}"

    __repr__ = describe

    def _install(self) -> None:
        fn = self._original
        for wrap in self._hooks.values():
            fn = wrap(fn)
        object.__setattr__(self.model, self.method, fn)

    def _uninstall(self) -> None:
        if self._saved is _MISSING:
            self.model.__dict__.pop(self.method, None)
        else:
            object.__setattr__(self.model, self.method, self._saved)
        registries = self.model.__dict__.get(_REGISTRIES_ATTR, {})
        registries.pop(self.method, None)
        if not registries:
            self.model.__dict__.pop(_REGISTRIES_ATTR, None)


_MISSING = object()


def call_original(model: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call `model.<method>` bypassing every registered hook."""
    registry = HookRegistry.of(model, method, create=False)
    fn = registry.original if registry is not None else getattr(model, method)
    return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# 3. Accelerator: decide (plan) + execute, stats, lifecycle
# ---------------------------------------------------------------------------------------------

class Accelerator:
    """One method's policy, planner and executor for one model (or one pipeline replica).

    In-process, the stack hook calls `run`; a pipeline-parallel replica calls `plan` on stage 0
    and ships the `CallPlan` to each stage's `StageExecutor.execute`.
    """

    def __init__(self, config: AccelConfig, adapter: Any, num_blocks: int,
                 block_range: tuple[int, int] | None = None) -> None:
        if not isinstance(config, AccelConfig):
            raise TypeError(f"config must be an AccelConfig (see scope.config.make_config), got "
                            f"{type(config).__name__}")
        self.config, self.adapter, self.num_blocks = config, adapter, int(num_blocks)
        self.policy = make_policy(config)
        start, end = self._executed_range(block_range)
        self.executor = StageExecutor(config, adapter, start, end)
        # one state object per unit: the policy decides on the executor's unit states
        self.policy.bind(self.executor.units)
        self._plan_blocks = end - start if block_range is None else self.num_blocks
        self._stats: dict[str, RequestStats] = {}
        self._ctx: CallContext | None = None
        self._stack_calls = 0
        self._busy = False

    def _executed_range(self, block_range: tuple[int, int] | None) -> tuple[int, int]:
        """Blocks the executor runs (a subclass may keep some for itself)."""
        return block_range if block_range is not None else (0, self.num_blocks)

    # -- call scoping ----------------------------------------------------------------------------
    @contextmanager
    def call(self, ctx: CallContext | Sequence[CallContext]) -> Iterator[Accelerator]:
        """Scope one model call: the stack call inside is accelerated under `ctx`.

        A sequence of contexts describes a batched call: one context per batch row, each its own
        request (own decisions, residuals, K/V and stats), all at the same step of one schedule."""
        ctx = _checked_contexts(ctx)
        if self._ctx is not None:
            raise RuntimeError(f"accel.call contexts do not nest (already inside "
                               f"{_describe(self._ctx)})")
        self._ctx, self._stack_calls = ctx, 0
        try:
            yield self
        finally:
            self._ctx = None

    @property
    def current(self) -> CallContext | tuple[CallContext, ...] | None:
        return self._ctx

    # -- in-process: decide + execute -------------------------------------------------------------
    def run(self, ctx: CallContext | tuple[CallContext, ...], h: torch.Tensor, inputs: Any,
            run_fn: RunFn) -> torch.Tensor:
        """Accelerated stack output for one call (what the hook returns)."""
        self._stack_calls += 1
        if self._ctx is ctx and self._stack_calls > 1:
            raise RuntimeError("one stack call per accel.call(ctx): the model called its stack "
                               "twice inside one context")
        self._busy = True
        try:
            if isinstance(ctx, CallContext):
                return self._run(ctx, h, inputs, run_fn)
            return self._run_batch(ctx, h, inputs, run_fn)
        finally:
            self._busy = False

    def _run_batch(self, contexts: tuple[CallContext, ...], h: torch.Tensor, inputs: Any,
                   run_fn: RunFn) -> torch.Tensor:
        """B samples in one call, each deciding on its own state: samples whose plans run the
        same frames share one stack call (in exact selective mode that is every sample with the
        same last Recompute chunk), so a sample's output never depends on its batch neighbours'
        decisions."""
        if len(contexts) != h.shape[0]:
            raise ValueError(f"a batched call has {len(contexts)} call contexts for a batch of "
                             f"{h.shape[0]}; pass one context per batch row")
        probe = self.probe(inputs, h)
        plans = [self.plan(ctx, probe=None if probe is None else probe[b:b + 1], h=h[b:b + 1])
                 for b, ctx in enumerate(contexts)]
        groups = group_plans(plans)
        if len(groups) == 1:
            out = self.executor.execute(plans, h, inputs, run_fn)
            for p, report in zip(plans, self.executor.last_reports):
                self.record_report(p, report)
            return out
        out = torch.empty_like(h)
        for rows in groups:
            idx = torch.tensor(rows, device=h.device)
            part = self.executor.execute([plans[i] for i in rows], h[idx],
                                         _select_rows(self.adapter, inputs, idx), run_fn)
            out[idx] = part
            for i, report in zip(rows, self.executor.last_reports):
                self.record_report(plans[i], report)
        return out

    def _run(self, ctx: CallContext, h: torch.Tensor, inputs: Any, run_fn: RunFn) -> torch.Tensor:
        """Decide, execute, record."""
        plan = self.plan(ctx, probe=self.probe(inputs, h), h=h)
        out = self.executor.execute(plan, h, inputs, run_fn)
        self.record_report(plan, self.executor.last_report)
        return out

    def probe(self, inputs: Any, h: torch.Tensor) -> torch.Tensor | None:
        """The indicator source `plan` needs from the adapter (None if the policy needs none)."""
        if not self.policy.needs_probe:
            return None
        kind = self.policy.probe_kind
        if kind == "default":
            return self.adapter.probe(inputs, h)
        return self.adapter.probe(inputs, h, kind=kind)

    def plan(self, ctx: CallContext, probe: torch.Tensor | None = None,
             h: torch.Tensor | None = None) -> CallPlan:
        """Decide one call: modes per chunk (policy) and frames to run (planner); updates the
        decision-side state and the request's stats. `probe`: the policy's indicator source over
        the window [B, N, *] (`adapter.probe(inputs, h)`, or block 0's residual for FBCache);
        `h`: the stack input (needed by the "input" indicator)."""
        C, cfg = ctx.num_chunks, self.config
        released, released_kv = self._auto_release(ctx)
        signals = ChunkSignals()
        if self.policy.needs_probe or self.policy.needs_first_block:
            if probe is None:
                raise ValueError(f"policy {self.policy.name!r} needs a probe tensor in plan()")
            parts = _split_chunks(probe, C, "probe")
            if self.policy.needs_first_block:
                signals.first_residual = parts
            else:
                signals.probe = parts
        if self.policy.needs_input:
            if h is None:
                raise ValueError(f"policy {self.policy.name!r} uses the input indicator: pass h")
            signals.input = _split_chunks(h, C, "h")

        decisions = self.policy.propose(ctx, signals, self.executor.estimate)
        for j in range(C):   # the caller needs these computed in full (e.g. a K/V-writing pass)
            if ctx.required[j] and ctx.active[j] and decisions[j].mode != RECOMPUTE:
                decisions[j] = decisions[j].upgraded("required")
        recompute = [d.mode == RECOMPUTE or ctx.required[j] for j, d in enumerate(decisions)]
        fin_ready, stale_ready = self._kv_ready(ctx)
        sel = plan_selective(ctx.active, recompute, causal=ctx.causal, mode=cfg.selective,
                             context_chunks=cfg.context_chunks, kv_cache_finished=cfg.kv_cache_finished,
                             kv_cache_stale=cfg.kv_cache_stale, kv_finished_ready=fin_ready,
                             kv_stale_ready=stale_ready)
        if cfg.reuse_context_outputs:
            for j in sel.run:
                if ctx.active[j] and decisions[j].mode != RECOMPUTE:
                    decisions[j] = decisions[j].upgraded("in-run")
        self.policy.commit(ctx, decisions, signals)
        plan = CallPlan(ctx.request, ctx.branch, ctx.step, ctx.chunk_offset, ctx.frames_per_chunk,
                        ctx.sigmas, tuple(decisions), sel, released, released_kv)
        self._record_plan(ctx, plan)
        return plan

    # -- K/V readiness and automatic release (read off the executor's unit states) ----------------
    def _kv_ready(self, ctx: CallContext) -> tuple[list[bool], list[bool]]:
        exact = self.config.selective == "exact"
        units = [ctx.unit(j) for j in range(ctx.num_chunks)]
        stale = [self.executor.kv_ready(u, ctx.chunk_offset) for u in units]
        fin = [self.executor.kv_ready(u, ctx.chunk_offset, ctx.sigmas[j], exact) for j, u in enumerate(units)]
        return fin, stale

    def _auto_release(self, ctx: CallContext) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Drop state of chunks that left the window, and residual state of finished chunks."""
        req, br, off = ctx.request, ctx.branch, ctx.chunk_offset
        units = self.executor.units
        classes = classify_chunks(ctx.active)
        finished = {off + j for j, c in enumerate(classes) if c == FINISHED}
        keys = [k for k in units.keys(req, br) if k.chunk >= 0]
        unit_chunks = {k.chunk for k in keys if not _kv_only(units.get(k))}
        release = {c for c in unit_chunks if c < off}
        if self.policy.granularity == "chunk":
            release |= unit_chunks & finished
        # a unit's noise level never rises; if it does, the chunk holds new content (e.g. the next
        # segment reusing window positions): its old state is stale
        for j in range(ctx.num_chunks):
            st = units.get(ctx.unit(j)) if ctx.active[j] else None
            if st is not None and st.last_sigma is not None and ctx.sigmas[j] > st.last_sigma + 1e-6:
                release.add(off + j)
        kv_chunks = {k.chunk for k in keys if units.get(k).has_kv}
        release_kv = {c for c in kv_chunks if c < off} | (release & kv_chunks - finished)
        if not self.config.kv_cache_finished:
            release_kv |= kv_chunks & finished
        elif self.config.selective == "approx":
            first = next((j for j, c in enumerate(classes) if c != FINISHED), None)
            if first is not None:
                release_kv |= {c for c in kv_chunks & finished if c - off < first - self.config.context_chunks}
        # this range's own states now; other stages follow `plan.released` / `released_kv`
        if release:
            self.executor.clear_history(req, sorted(release), br)
        if release_kv:
            self.executor.clear_kv(req, sorted(release_kv), br)
        return tuple(sorted(release)), tuple(sorted(release_kv))

    # -- stats -------------------------------------------------------------------------------------
    def _stats_for(self, request: str) -> RequestStats:
        if request not in self._stats:
            self._stats[request] = RequestStats(request=request, method=self.config.method,
                                                num_blocks=self.num_blocks)
        return self._stats[request]

    def _record_plan(self, ctx: CallContext, plan: CallPlan) -> None:
        st = self._stats_for(ctx.request)
        sel = plan.selective
        st.calls += 1
        st.block_evals += len(sel.run) * self._plan_blocks
        st.block_evals_full += ctx.num_chunks * self.num_blocks
        st.context_block_evals += len([j for j in sel.run if plan.decisions[j].mode != RECOMPUTE]) * self._plan_blocks
        st.kv_served_chunks += len(sel.kv_served)
        st.dropped_chunks += len(sel.dropped)
        for j, d in enumerate(plan.decisions):
            st.record_mode(ctx.chunk_offset + j, d.mode, d.reason)
            if d.mode == PREDICT and d.est_error is not None:
                st.est_error.add(d.est_error)
            if self.config.trace:
                st.trace.append({"step": ctx.step, "branch": ctx.branch, "chunk": ctx.chunk_offset + j,
                                 "sigma": ctx.sigmas[j], "active": ctx.active[j], "mode": d.mode,
                                 "reason": d.reason, "indicator": d.indicator, "acc": d.acc,
                                 "est_error": d.est_error, "observed_error": None})

    def record_report(self, plan: CallPlan, report: ExecReport) -> None:
        """Add an executor's measured errors to the request's stats and feed them back to the
        policy (SCOPE's observed-error control)."""
        st = self._stats_for(plan.request)
        for j, err in report.observed.items():
            st.observed_error.add(err)
        self.policy.observe(plan.request, plan.branch, plan.chunk_offset, report.observations())
        for j, ratio in report.norm_ratio.items():
            unit = self.policy.units.get(plan.unit(j))
            step = 0 if unit is None else unit.active_calls - 1
            st.mag_ratios.setdefault(plan.branch, {}).setdefault(step, []).append(ratio)
        if self.config.trace and report.observed:
            rows = st.trace[-plan.num_chunks:]
            for row in rows:
                j = row["chunk"] - plan.chunk_offset
                if j in report.observed:
                    row["observed_error"] = report.observed[j]

    def stats(self, request: str) -> RequestStats:
        """Live stats of a request (empty if it made no call yet)."""
        return self._stats_for(request)

    # -- lifecycle ---------------------------------------------------------------------------------
    def release_chunks(self, request: str, chunks: list[int]) -> None:
        """Drop every state of these absolute chunks of a request (all branches)."""
        self.executor.release(request, chunks)

    def end_request(self, request: str) -> RequestStats:
        """Drop everything of a request and return its stats."""
        self.executor.end_request(request)
        stats = self._stats.pop(request, None)
        return stats if stats is not None else RequestStats(request=request, method=self.config.method,
                                                            num_blocks=self.num_blocks)

    def memory_bytes(self) -> int:
        """Bytes of tensors held for all requests (residuals, K/V, indicator inputs)."""
        return self.executor.memory_bytes()

    def num_units(self, request: str | None = None) -> int:
        """Units with decision-side state or history (K/V-only finished chunks not counted)."""
        return sum(not _kv_only(st) for _, st in self.executor.units.items(request))


class FirstBlockAccelerator(Accelerator):
    """First-Block Cache as its own accelerator: block 0 runs on every active chunk (plus its
    context; finished chunks served from block 0's own K/V), its residual is the policy's
    signal, and the planned executor runs blocks 1..L-1 from block 0's output."""

    def __init__(self, config: AccelConfig, adapter: Any, num_blocks: int,
                 block_range: tuple[int, int] | None = None) -> None:
        if int(num_blocks) < 2 or (block_range is not None and tuple(block_range) != (0, int(num_blocks))):
            raise ValueError(f"{config.method} needs the whole stack in one process and >= 2 blocks")
        super().__init__(config, adapter, num_blocks)
        self.head = StageExecutor(config, adapter, 0, 1)   # block 0's own K/V, no residuals
        self.head.history = 0

    def _executed_range(self, block_range: tuple[int, int] | None) -> tuple[int, int]:
        return 1, self.num_blocks

    def _run_batch(self, contexts: tuple[CallContext, ...], h: torch.Tensor, inputs: Any,
                   run_fn: RunFn) -> torch.Tensor:
        """Block 0 decides for the rest of the stack, per sample: samples run one at a time."""
        if len(contexts) != h.shape[0]:
            raise ValueError(f"a batched call has {len(contexts)} call contexts for a batch of "
                             f"{h.shape[0]}; pass one context per batch row")
        parts = []
        for b, ctx in enumerate(contexts):
            idx = torch.tensor([b], device=h.device)
            parts.append(self._run(ctx, h[idx], _select_rows(self.adapter, inputs, idx), run_fn))
        return torch.cat(parts)

    def _run(self, ctx: CallContext, h: torch.Tensor, inputs: Any, run_fn: RunFn) -> torch.Tensor:
        cfg = self.config
        behind = [k.chunk for k in self.head.units.keys(ctx.request, ctx.branch) if k.chunk < ctx.chunk_offset]
        self.head.release(ctx.request, behind, ctx.branch)   # memory bounded by the window
        ready = [self.head.kv_ready(ctx.unit(j), ctx.chunk_offset, ctx.sigmas[j]) for j in range(ctx.num_chunks)]
        must_run = [a or r for a, r in zip(ctx.active, ctx.required)]
        head = plan_selective(ctx.active, must_run, causal=ctx.causal, mode=cfg.selective,
                              context_chunks=cfg.context_chunks, kv_cache_finished=cfg.kv_cache_finished,
                              kv_finished_ready=ready)
        h1 = h
        if head.run:
            head_plan = CallPlan(ctx.request, ctx.branch, ctx.step, ctx.chunk_offset, ctx.frames_per_chunk,
                                 ctx.sigmas, tuple(_run_decision(ctx, j, head.run) for j in range(ctx.num_chunks)),
                                 head)
            h1 = self.head.execute(head_plan, h, inputs, run_fn)
        plan = self.plan(ctx, probe=h1 - h, h=h)
        stats = self._stats_for(ctx.request)
        stats.block_evals += len(head.run)
        stats.context_block_evals += len([j for j in head.run if not ctx.active[j]])
        out = self.executor.execute(plan, h1, inputs, run_fn)
        self.record_report(plan, self.executor.last_report)
        return out

    def release_chunks(self, request: str, chunks: list[int]) -> None:
        super().release_chunks(request, chunks)
        self.head.release(request, chunks)

    def end_request(self, request: str) -> RequestStats:
        self.head.end_request(request)
        return super().end_request(request)

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.head.memory_bytes()


def make_accelerator(config: AccelConfig, adapter: Any, num_blocks: int,
                     block_range: tuple[int, int] | None = None) -> Accelerator:
    """The accelerator class the method needs (FBCache decides from block 0's output)."""
    cls = FirstBlockAccelerator if make_policy(config).needs_first_block else Accelerator
    return cls(config, adapter, num_blocks, block_range)


def _kv_only(st: Any) -> bool:
    """A unit that holds nothing but K/V (a finished chunk)."""
    return st is not None and st.has_kv and not st.coords and st.active_calls == 0


def _run_decision(ctx: CallContext, j: int, run: tuple[int, ...]) -> Decision:
    if j in run:
        return Decision(RECOMPUTE, "first-block", coord=ctx.sigmas[j])
    return Decision(SKIP, "first-block", coord=ctx.sigmas[j])


def _checked_contexts(ctx: Any) -> CallContext | tuple[CallContext, ...]:
    """One context, or a tuple of per-row contexts of distinct requests at one step."""
    if isinstance(ctx, CallContext):
        return ctx
    if not isinstance(ctx, (list, tuple)) or not ctx:
        raise TypeError(f"accel.call needs a CallContext or a non-empty sequence of them (one per "
                        f"batch row), got {type(ctx).__name__}")
    bad = [type(c).__name__ for c in ctx if not isinstance(c, CallContext)]
    if bad:
        raise TypeError(f"accel.call got a sequence holding {bad[0]}; every entry must be a CallContext")
    requests = [c.request for c in ctx]
    if len(set(requests)) != len(requests):
        raise ValueError(f"a batched call needs one request per row; requests {requests} repeat")
    first = ctx[0]
    for c in ctx[1:]:
        if (c.branch, c.step, c.frames_per_chunk, c.num_chunks) != (first.branch, first.step,
                                                                    first.frames_per_chunk, first.num_chunks):
            raise ValueError(f"a batched call's contexts must share branch, step and window "
                             f"({first.branch!r}, step {first.step}, {first.num_chunks} chunks); "
                             f"{c.request!r} has ({c.branch!r}, step {c.step}, {c.num_chunks} chunks)")
    return tuple(ctx)


def _describe(ctx: CallContext | tuple[CallContext, ...]) -> str:
    if isinstance(ctx, CallContext):
        return f"request={ctx.request!r} step={ctx.step}"
    return f"requests={[c.request for c in ctx]} step={ctx[0].step}"


def _select_rows(adapter: Any, inputs: Any, rows: torch.Tensor) -> Any:
    """The stack inputs of some batch rows (the adapter knows which fields carry the batch)."""
    select = getattr(adapter, "select_rows", None)
    if select is None:
        raise RuntimeError(f"{type(adapter).__name__} has no select_rows: batched accelerated calls "
                           f"whose samples run different frames need it")
    return select(inputs, rows)


def _split_chunks(t: torch.Tensor, C: int, name: str) -> list[torch.Tensor]:
    """[B, N, ...] -> C views [B, N/C, ...] (tokens are frame-major, chunks equal-sized)."""
    if t.dim() < 2 or t.shape[1] % C:
        raise ValueError(f"{name} must be [B, N, ...] with N divisible by {C} chunks, "
                         f"got {tuple(t.shape)}")
    return list(t.split(t.shape[1] // C, dim=1))


# ---------------------------------------------------------------------------------------------
# 4. apply / remove
# ---------------------------------------------------------------------------------------------

def apply_accel(model: Any, config: AccelConfig, adapter: Any) -> Accelerator:
    """Wrap `getattr(model, adapter.stack_method)` on this instance; returns the Accelerator.
    Outside `accel.call(ctx)` the wrapped method runs the full stack unchanged."""
    _check_adapter(adapter)
    registry = HookRegistry.of(model, adapter.stack_method)
    if ACCEL_HOOK in registry:
        raise RuntimeError(f"acceleration is already applied ({registry.describe()}); "
                           f"call remove_accel(model) first")
    L = int(adapter.num_blocks(model))
    accel = make_accelerator(config, adapter, L)
    run_fn = make_run_fn(model, adapter)
    block_range = getattr(adapter, "block_range", None)

    def wrap(inner: Callable[..., Any]) -> Callable[..., Any]:
        def accelerated(*args: Any, **kwargs: Any) -> Any:
            ctx = accel.current
            if ctx is None or accel._busy:
                return inner(*args, **kwargs)
            if block_range is not None and tuple(block_range(*args, **kwargs)) != (0, L):
                raise RuntimeError(f"the acceleration hook handles full-stack calls only, got "
                                   f"blocks {tuple(block_range(*args, **kwargs))} of {L}; "
                                   f"pipeline stages use Accelerator.plan + StageExecutor.execute")
            h, inputs = adapter.split_stack_args(*args, **kwargs)
            return accel.run(ctx, h, inputs, run_fn)

        accelerated.__wrapped__ = inner  # type: ignore[attr-defined]
        return accelerated

    registry.register(ACCEL_HOOK, wrap, payload=accel)
    return accel


def remove_accel(model: Any, method: str | None = None) -> Accelerator | None:
    """Remove the acceleration hook; returns its Accelerator (None if none was applied)."""
    registries = model.__dict__.get(_REGISTRIES_ATTR, {})
    for name, registry in list(registries.items()):
        if (method is None or name == method) and ACCEL_HOOK in registry:
            return registry.remove(ACCEL_HOOK)
    return None
