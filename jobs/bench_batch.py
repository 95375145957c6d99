"""`scope bench batch`: videos/s of the dataset job's batched denoising at B = 1, 2, 4 on the
embedded model, in one process, side by side, per accelerator (none and SCOPE by default), and
how far a video's frames move when it is batched with others (they should not: only float
rounding of larger matrix products; with an accelerator each video keeps its own decisions).

    .venv/bin/scope bench batch --videos 8 --frames 16 --accels none,scope --json bench_batch.json
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from jobs.runner import VideoRun, open_sampler, run_batch
from jobs.setup import describe, load
from jobs.spec import JobSpec

CAPTIONS = ["a red circle moves right", "a blue square bounces", "a green triangle stays still",
            "a white circle moves up", "a yellow square moves left", "a magenta triangle bounces",
            "a red square moves down", "a blue circle stays still"]


class _Frames:
    """A writer that keeps each segment's frames (the bench compares them)."""

    def __init__(self):
        self.segments: dict[int, np.ndarray] = {}

    def has_segment(self, index: int) -> bool:
        return index in self.segments

    def write_segment(self, index: int, frames: np.ndarray) -> None:
        self.segments[index] = frames

    def video(self) -> np.ndarray:
        return np.concatenate([self.segments[i] for i in sorted(self.segments)])


def _make(specs: list[JobSpec], batch: int, models: dict[str, Any],
          modes: dict[Any, Any]) -> tuple[float, list[np.ndarray]]:
    """All videos in batches of `batch`; (seconds, frames of each video); each video's mode
    counts go into `modes`."""
    plans = [describe(s) for s in specs]
    loaded = [load(p, models) for p in plans]
    writers = [_Frames() for _ in specs]
    started = time.perf_counter()
    for first in range(0, len(specs), batch):
        runs = [VideoRun(plans[i], loaded[i], None, writers[i], None)
                for i in range(first, min(first + batch, len(specs)))]
        with open_sampler(plans[first], loaded[first]) as pipeline:     # the plan's accelerator
            summaries = run_batch(runs, pipeline)
        for run, summary in zip(runs, summaries):
            modes[run.plan.spec.prompt, run.plan.spec.seed] = summary.state.accel.modes.to_dict()
    return time.perf_counter() - started, [w.video() for w in writers]


def bench_batch(videos: int = 8, frames: int = 16, sizes: tuple[int, ...] = (1, 2, 4), rounds: int = 2,
                threads: int = 2, accels: tuple[str, ...] = ("none", "scope")) -> dict[str, Any]:
    """Per accelerator and batch size: seconds for all videos (fastest of interleaved rounds),
    videos/s, and the largest pixel difference of any video from the same video at B = 1."""
    torch.set_num_threads(threads)
    models: dict[str, Any] = {}
    rows = []
    for accel in accels:
        specs = [JobSpec(prompt=CAPTIONS[i % len(CAPTIONS)], frames=frames, seed=i, accel=accel)
                 for i in range(videos)]
        best: dict[int, float] = {}
        frames_of: dict[int, list[np.ndarray]] = {}
        modes_of: dict[int, dict[Any, Any]] = {}
        for r in range(rounds):                       # interleaved; odd rounds in reverse order
            for size in (sizes if r % 2 == 0 else tuple(reversed(sizes))):
                modes_of[size] = {}
                seconds, made = _make(specs, size, models, modes_of[size])
                best[size] = min(best.get(size, float("inf")), seconds)
                frames_of[size] = made
        reference = frames_of[sizes[0]]
        for size in sizes:
            diff = max(int(np.abs(a.astype(int) - b.astype(int)).max())
                       for a, b in zip(frames_of[size], reference))
            rows.append({"accel": accel, "batch": size, "seconds": round(best[size], 3),
                         "videos_per_s": round(videos / best[size], 3),
                         "speedup_vs_b1": round(best[sizes[0]] / best[size], 3),
                         "max_pixel_diff_vs_b1": diff,
                         "same_modes_as_b1": modes_of[size] == modes_of[sizes[0]]})
    return {"videos": videos, "frames": frames, "rounds": rounds, "threads": threads, "accels": list(accels),
            "model": "embedded procedural", "rows": rows}


def run_bench_batch(args: Any) -> None:
    report = bench_batch(videos=args.videos, frames=args.frames, rounds=getattr(args, "rounds", 2),
                         accels=tuple(a for a in getattr(args, "accels", "none,scope").split(",") if a))
    text = json.dumps(report, indent=1)
    print(text)
    target = "bench_batch.json" if args.json == "bench.json" else args.json
    if target:
        with open(target, "w") as f:
            f.write(text)
