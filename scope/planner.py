"""Selective computation: which chunks of the window go through the stack at one call.

Chunk classes (window order): `finished` (inactive, before the first active chunk: clean or
conditioning frames), `active` (updated after this call), `gap` (inactive inside the active
interval), `waiting` (inactive, after the last active chunk: not started, pure noise).

Exactness. Let R be the chunks that recompute at this call.
- Block-causal attention: a chunk attends only to itself and earlier chunks. Every chunk after
  max(R) (waiting chunks, later Cache/Predict chunks) cannot influence R: dropping it is exact.
  Chunks before max(R) influence R only through their keys/values; finished ones have fixed
  inputs, so K/V captured once and served later is exact ("exact" mode).
- Bidirectional attention (released SkyReels-V2 DF models): every chunk influences every other,
  so nothing can be dropped exactly; "exact" then runs the whole window. "approx" drops the
  waiting chunks and the finished chunks more than `context_chunks` before the active interval,
  and may serve stale K/V (`kv_cache_stale`): a measured approximation, never a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FINISHED, ACTIVE, GAP, WAITING = "finished", "active", "gap", "waiting"


@dataclass(frozen=True)
class SelectivePlan:
    """Window chunk indices (all sorted ascending)."""

    active: tuple[int, int] | None     # first..last active chunk, inclusive
    run: tuple[int, ...]               # chunks whose frames go through the stack
    context: tuple[int, ...]           # chunks present only as attention context (run or served)
    kv_served: tuple[int, ...]         # context chunks served from cached K/V (not run)
    kv_capture: tuple[int, ...]        # run chunks whose per-layer K/V to keep for later calls
    dropped: tuple[int, ...]           # chunks absent from this call's attention


def active_interval(chunk_active: Sequence[bool]) -> tuple[int, int] | None:
    """(first, last) active chunk, or None when no chunk is active."""
    idx = [j for j, a in enumerate(chunk_active) if a]
    return (idx[0], idx[-1]) if idx else None


def active_from_sigmas(sigma: Sequence[float], prev_sigma: Sequence[float]) -> list[bool]:
    """Chunks whose noise level changed since the previous call and are not finished (sigma>0):
    the SkyReels-V2 `update_mask` (new row != previous row, not done)."""
    if len(sigma) != len(prev_sigma):
        raise ValueError(f"need one sigma per chunk for both calls, got {len(sigma)} and {len(prev_sigma)}")
    return [s != p and s > 0.0 for s, p in zip(sigma, prev_sigma)]


def classify_chunks(chunk_active: Sequence[bool]) -> list[str]:
    """finished / active / gap / waiting for each window chunk."""
    interval = active_interval(chunk_active)
    if interval is None:
        return [FINISHED] * len(chunk_active)
    first, last = interval
    return [FINISHED if j < first else WAITING if j > last else ACTIVE if a else GAP
            for j, a in enumerate(chunk_active)]


def plan_selective(chunk_active: Sequence[bool], recompute: Sequence[bool], *, causal: bool,
                   mode: str, context_chunks: int = 1, kv_cache_finished: bool = False,
                   kv_cache_stale: bool = False, kv_finished_ready: Sequence[bool] | None = None,
                   kv_stale_ready: Sequence[bool] | None = None) -> SelectivePlan:
    """Plan one call. `recompute[j]`: chunk j recomputes. `kv_finished_ready[j]` /
    `kv_stale_ready[j]`: a valid finished / any earlier K/V entry exists for chunk j."""
    C = len(chunk_active)
    if len(recompute) != C:
        raise ValueError(f"need one recompute flag per chunk ({C}), got {len(recompute)}")
    if mode not in ("off", "exact", "approx"):
        raise ValueError(f"selective mode must be 'off', 'exact' or 'approx', got {mode!r}")
    fin_ready = list(kv_finished_ready) if kv_finished_ready is not None else [False] * C
    stale_ready = list(kv_stale_ready) if kv_stale_ready is not None else [False] * C
    interval = active_interval(chunk_active)
    classes = classify_chunks(chunk_active)
    R = [j for j in range(C) if recompute[j]]
    if not R:
        return SelectivePlan(interval, (), (), (), (), ())

    if mode == "off" or (mode == "exact" and not causal):
        return SelectivePlan(interval, tuple(range(C)), tuple(j for j in range(C) if not recompute[j]),
                             (), (), ())

    if mode == "exact":
        lo, hi = 0, max(R)
    else:
        first = interval[0] if interval is not None else min(R)
        last = interval[1] if interval is not None else max(R)
        lo = max(0, min(first, min(R)) - context_chunks)
        hi = max(R) if causal else max(last, max(R))

    run, served, capture, context = [], [], [], []
    for j in range(lo, hi + 1):
        if recompute[j]:
            run.append(j)
            if kv_cache_stale:
                capture.append(j)
            continue
        context.append(j)
        if classes[j] == FINISHED and kv_cache_finished:
            if fin_ready[j]:
                served.append(j)
            else:
                run.append(j)
                capture.append(j)
        elif classes[j] != FINISHED and kv_cache_stale:
            if stale_ready[j]:
                served.append(j)
            else:
                run.append(j)
                capture.append(j)
        else:
            run.append(j)
    dropped = tuple(j for j in range(C) if j < lo or j > hi)
    return SelectivePlan(interval, tuple(run), tuple(context), tuple(served), tuple(sorted(capture)),
                         dropped)
