"""Plain per-request statistics, filled on the hot path; metrics code reads only this object.

Counting rules:
- one *unit-call* = one chunk of the window at one model call; every unit-call gets exactly one
  mode, so sum(modes) == chunk_calls == sum over calls of the window's chunk count;
- one *block evaluation* = one transformer block applied to one chunk's frames in one call;
  `block_evals_full` counts every block on every chunk of the window at every call (what the
  unaccelerated model runs), so block_evals <= block_evals_full;
- `context_block_evals` is the part of `block_evals` spent on chunks that ran only as attention
  context (their output was not used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scope.scheduler import MODES


@dataclass
class ModeCounts:
    recompute: int = 0
    cache: int = 0
    predict: int = 0
    skip: int = 0

    def add(self, mode: str, n: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        setattr(self, mode, getattr(self, mode) + n)

    def total(self) -> int:
        return self.recompute + self.cache + self.predict + self.skip

    def to_dict(self) -> dict[str, int]:
        return {m: getattr(self, m) for m in MODES}


@dataclass
class ErrorSummary:
    """Running max / mean of a relative error."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "max": self.max}


@dataclass
class RequestStats:
    """Everything one request did, aggregated over its CFG branches."""

    request: str
    method: str = "none"
    num_blocks: int = 0
    calls: int = 0
    chunk_calls: int = 0
    modes: ModeCounts = field(default_factory=ModeCounts)
    per_chunk: dict[int, ModeCounts] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    block_evals: int = 0
    block_evals_full: int = 0
    context_block_evals: int = 0
    kv_served_chunks: int = 0
    dropped_chunks: int = 0
    est_error: ErrorSummary = field(default_factory=ErrorSummary)       # embedded, at Predict
    observed_error: ErrorSummary = field(default_factory=ErrorSummary)  # measured at Recompute
    trace: list[dict[str, Any]] = field(default_factory=list)
    # MagCache calibration: measured magnitude ratio per branch per chunk step
    mag_ratios: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def record_mode(self, chunk: int, mode: str, reason: str) -> None:
        self.chunk_calls += 1
        self.modes.add(mode)
        self.per_chunk.setdefault(chunk, ModeCounts()).add(mode)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    @property
    def compute_fraction(self) -> float:
        """block_evals / block_evals_full (1.0 = no saving)."""
        return self.block_evals / self.block_evals_full if self.block_evals_full else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (chunk keys become strings)."""
        return {
            "request": self.request,
            "method": self.method,
            "num_blocks": self.num_blocks,
            "calls": self.calls,
            "chunk_calls": self.chunk_calls,
            "modes": self.modes.to_dict(),
            "per_chunk": {str(c): m.to_dict() for c, m in sorted(self.per_chunk.items())},
            "reasons": dict(sorted(self.reasons.items())),
            "block_evals": self.block_evals,
            "block_evals_full": self.block_evals_full,
            "context_block_evals": self.context_block_evals,
            "compute_fraction": self.compute_fraction,
            "kv_served_chunks": self.kv_served_chunks,
            "dropped_chunks": self.dropped_chunks,
            "est_error": self.est_error.to_dict(),
            "observed_error": self.observed_error.to_dict(),
            "trace": list(self.trace),
            "mag_ratios": {b: {str(k): v for k, v in sorted(d.items())} for b, d in self.mag_ratios.items()},
        }


def merge_stats(request: str, parts: list[RequestStats]) -> RequestStats:
    """One `RequestStats` for a request made of several parts (e.g. the segments of a long
    video, each its own accelerator request); per-chunk counts are summed by chunk index."""
    merged = RequestStats(request=request)
    for part in parts:
        merged.method = part.method
        merged.num_blocks = max(merged.num_blocks, part.num_blocks)
        merged.calls += part.calls
        merged.chunk_calls += part.chunk_calls
        for mode, n in part.modes.to_dict().items():
            merged.modes.add(mode, n)
        for chunk, counts in part.per_chunk.items():
            target = merged.per_chunk.setdefault(chunk, ModeCounts())
            for mode, n in counts.to_dict().items():
                target.add(mode, n)
        for reason, n in part.reasons.items():
            merged.reasons[reason] = merged.reasons.get(reason, 0) + n
        merged.block_evals += part.block_evals
        merged.block_evals_full += part.block_evals_full
        merged.context_block_evals += part.context_block_evals
        merged.kv_served_chunks += part.kv_served_chunks
        merged.dropped_chunks += part.dropped_chunks
        for name in ("est_error", "observed_error"):
            mine, theirs = getattr(merged, name), getattr(part, name)
            mine.count += theirs.count
            mine.total += theirs.total
            mine.max = max(mine.max, theirs.max)
        merged.trace.extend(part.trace)
        for branch, by_step in part.mag_ratios.items():
            for step, values in by_step.items():
                merged.mag_ratios.setdefault(branch, {}).setdefault(step, []).extend(values)
    return merged
