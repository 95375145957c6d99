"""`scope bench`: every acceleration method side by side on the procedural model, in one process.

    scope bench --methods none,scope,teacache,flowcache,taylorseer,fbcache --prompts 6 \
        --frames 48 --rounds 2 --json bench.json --plot bench.png
    scope bench --prompts-file captions.txt ...     # one caption per line, '#' comments
    scope bench --model magi-1-tiny --methods none,scope,teacache,flowcache,taylorseer,fbcache,magcache \
        --sweep none --prompts 3 --frames 48       # another family: its own table's defaults

What one run does (DESIGN section 5, "How we measure"):
1. load the bundle, fix the thread count (the same for every method), warm up once untimed;
2. for every prompt (held-out captions, or --prompts-file; seed = --seed + prompt index), in
   `rounds` interleaved timing rounds: even rounds run the reference (the plain model, no hooks:
   full compute with the bundle's asynchronous DF schedule) then every case (a method at one
   setting), odd rounds run them in reverse (reference last), so a drift in machine speed during
   the run does not favour the cases early in the list. Videos come from round 0; each
   generation's wall-clock is its minimum over the rounds;
3. overhead floor (unless --no-floor): the reference and every case once more on the first
   prompt with every transformer block replaced by the identity: what is left (embedding, head,
   sampler, acceleration planning, decoding) bounds the speedup any skipping could reach;
4. per case: `speedup` = sum of reference wall-clock / sum of the case's wall-clock over the
   prompts (measured in this run, on this machine), `block_eval_fraction` (transformer block x
   chunk evaluations run / those of full compute, from `RequestStats`), `psnr_db` / `ssim` of the
   decoded video against the reference of the same prompt and seed (mean over prompts; PSNR
   capped at 100 dB, see `jobs.quality`), `content_accuracy` (share of prompts whose checked
   colour, shape and motion all match the caption) with the per-attribute rates, and
   `overhead_floor_s` / `speedup_limit` (reference wall-clock / the case's floor, first prompt).

Cases: each method at its defaults; threshold sweeps (each baseline's main knob, SCOPE's
tau_cache / tau_predict and its selective-computation mode) so the plot shows every method's
speed-quality curve; ablations (selective computation alone, SCOPE without Predict, SCOPE
without Cache) and a timing control (the reference run again: its speedup shows the noise).

Output: a list of JSON objects (one per case; fields in `summarise_case`), a table on stdout and
optionally a PSNR-vs-speedup plot. The function API (`bench_cases`, `run_bench_on`) takes any
bundle-like object with `transformer`, `text_encoder`, `codec`, `defaults` and `schedule_args`;
one with `generate_record(case, prompt, frames, seed, **overrides)` generates its own videos (a
model family without the procedural checker: `jobs.magi.MagiBenchModel`, whose cases take their
defaults from the family's table and whose rows carry no content accuracy).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.quality import PSNR_CAP_DB, psnr, ssim

Log = Callable[[str], None]

# Selective computation that is exact under block-causal attention (the procedural model):
# drop chunks after the last recomputed one, serve finished chunks from cached K/V.
SELECTIVE_EXACT: dict[str, Any] = {"selective": "exact", "kv_cache_finished": True}
# FBCache runs block 0 and blocks 1..L-1 as two passes: no K/V serving
SELECTIVE_EXACT_NO_KV: dict[str, Any] = {"selective": "exact"}
# Under block-causal attention with an asynchronous schedule, the noisiest chunks (in warm-up,
# recomputing) come after the ones SCOPE would skip, so under "exact" a skipped chunk still runs
# as their context. Stale K/V lets it serve the keys/values of its last run instead (error of
# the same order as its cached output). All finished chunks stay (served from exact K/V):
# context_chunks larger than any window keeps every one of them.
SELECTIVE_STALE_KV: dict[str, Any] = {"selective": "approx", "context_chunks": 1024,
                                      "kv_cache_finished": True, "kv_cache_stale": True}

# TeaCache's published rescale polynomials were fitted on another model's indicator; the sweeps
# use the raw relative-L1 change (no polynomial) and move the threshold instead.
TEACACHE_SWEEP_BASE: dict[str, Any] = {"rescale": None}

# Every case runs with the selective computation that is exact on the block-causal procedural
# model (lossless, so it only ever makes a baseline stronger); FBCache serves block 0's and the
# tail's finished-chunk K/V too.
# Main knob per method and the values swept. "scope" sweeps max_consecutive around the
# calibrated config (the knob that sets its cost); baselines sweep their published knob.
SWEEPS: dict[str, dict[str, list[float]]] = {
    "default": {
        "scope": [1, 2, 4, 6],                               # max_consecutive around the calibrated 3
        "teacache-global": [0.03, 0.06],                     # threshold, one decision per window
        "flowcache": [0.2],                                  # threshold (input indicator)
        "taylorseer": [2, 3],                                # refresh interval, one decision per call
        "fbcache": [0.15],                                   # threshold
        "magcache": [0.06, 0.24],                            # threshold at K = 4 (README's 1.3B setting)
    },
    "wide": {
        "scope": [1, 2, 3, 4, 6, 8],
        "teacache-global": [0.02, 0.03, 0.045, 0.06, 0.09, 0.12],
        "flowcache": [0.1, 0.2, 0.4],
        "taylorseer": [2, 3, 4, 5],
        "fbcache": [0.1, 0.15, 0.2, 0.4],
        "magcache": [0.03, 0.06, 0.12, 0.24, 0.48],
    },
    # the baseline points SCOPE's calibrated curve did not dominate in the default run, and the
    # SCOPE settings that cover them (SCOPE_FRONTIER)
    "frontier": {
        "taylorseer": [2],
        "magcache": [0.24],
    },
}
# "frontier" sweep: SCOPE settings at both ends of the cost range (labelled overrides of the
# calibrated config)
SCOPE_FRONTIER: list[tuple[str, dict[str, Any]]] = [
    ("max_consecutive=1, lockstep", {"max_consecutive": 1, "sync": True}),
    ("max_consecutive=1, lockstep, step coordinate", {"max_consecutive": 1, "sync": True, "coordinate": "step"}),
    ("max_consecutive=1, tau_predict=0.1", {"max_consecutive": 1, "tau_predict": 0.1}),
    ("max_consecutive=1, warmup 3", {"max_consecutive": 1, "warmup_steps": 3}),
    ("max_consecutive=4, tau_predict=0.6", {"max_consecutive": 4, "tau_predict": 0.6}),
    ("max_consecutive=5", {"max_consecutive": 5}),
]


# ---------------------------------------------------------------------------------------------
# 1. Cases: what to run
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchCase:
    """One method at one setting. `config` is an AccelConfig dict; None = the plain model."""

    method: str
    setting: str
    config: dict[str, Any] | None
    group: str = "sweep"       # reference | default | sweep | ablation | control
    series: str = ""           # plot line the point belongs to

    def __post_init__(self) -> None:
        if self.config is not None:
            from scope.config import AccelConfig

            AccelConfig.from_dict(self.config)   # validate early: a typo fails before any run


def reference_case() -> BenchCase:
    return BenchCase("none", "full compute (reference)", None, "reference", "reference")


def scope_config(**overrides: Any) -> dict[str, Any]:
    """SCOPE as `scope generate --accel scope` runs it on the embedded model (its shipped,
    calibrated config), exact selective computation, plus overrides."""
    from pipelines.procedural.bundle import default_accel_config

    from scope.config import AccelConfig

    shipped = default_accel_config("scope")
    base = shipped.to_dict() if shipped is not None else {"method": "scope"}
    return AccelConfig.from_dict({**base, **SELECTIVE_EXACT, **overrides}).to_dict()


def no_predict(config: dict[str, Any]) -> dict[str, Any]:
    """The same SCOPE config without Predict: tau_predict = 0 (the indicator is never < 0)."""
    return {**config, "tau_predict": 0.0}


def no_cache(config: dict[str, Any]) -> dict[str, Any]:
    """The same SCOPE config without Cache: tau_cache = 0."""
    return {**config, "tau_cache": 0.0}


def bench_cases(methods: Sequence[str], sweep: str = "default",
                mag_ratios: dict[str, list[float]] | None = None, num_steps: int | None = None,
                family: str = "skyreels-v2", size: str | None = None,
                scope_base: dict[str, Any] | None = None) -> list[BenchCase]:
    """Defaults, sweeps and ablations for the methods asked for ('none' adds the selective-only
    ablation and the timing control; the reference always runs). MagCache needs `mag_ratios`
    measured on the model (`measure_mag_ratios`) and the schedule's `num_steps`. Published
    defaults and exact selective computation come from the model family's table (`family`,
    `size`); `scope_base` is SCOPE's config at its defaults (None: the embedded model's shipped,
    calibrated one)."""
    from pipelines.families import table
    from scope.config import METHOD_CONFIGS, AccelConfig

    fam = table(family)
    selective = dict(fam.SELECTIVE_EXACT)

    def scope_of(**overrides: Any) -> dict[str, Any]:
        if scope_base is None:
            return scope_config(**overrides)
        return AccelConfig.from_dict({**scope_base, **selective, **overrides}).to_dict()

    unknown = [m for m in methods if m not in METHOD_CONFIGS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(METHOD_CONFIGS)}")
    if sweep not in ("none", *SWEEPS):
        raise ValueError(f"unknown sweep {sweep!r}; valid: none, {', '.join(SWEEPS)}")
    if "magcache" in methods and mag_ratios is None:
        raise ValueError("bench_cases: magcache needs mag_ratios (measure them with measure_mag_ratios)")
    values = SWEEPS.get(sweep, {})
    mag = {"mag_ratios": mag_ratios, "num_steps": num_steps}
    cases: list[BenchCase] = []
    # 1. each method at its published / shipped defaults, with exact selective computation
    for m in methods:
        if m == "scope" and scope_base is None:
            cases.append(BenchCase(m, "calibrated (shipped config)", scope_config(), "default", "scope defaults"))
        elif m == "scope":
            cases.append(BenchCase(m, "defaults", {**scope_base, **selective}, "default", "scope defaults"))
        elif m == "magcache":
            cases.append(BenchCase(m, "defaults thr=0.12 K=2 ret=0.2", {"method": m, **mag, **selective},
                                   "default", "magcache defaults"))
        elif m != "none":
            cases.append(BenchCase(m, "defaults", {"method": m, **fam.accel_defaults(m, size), **selective},
                                   "default", f"{m} defaults"))
    # 2. sweeps of the main knob
    for m in methods:
        if m == "scope" and sweep == "frontier":
            for label, overrides in SCOPE_FRONTIER:
                cases.append(BenchCase(m, label, scope_of(**overrides), "sweep", "scope frontier"))
        for v in values.get(m, []) if m != "teacache" else values.get("teacache-global", []):
            if m == "scope":
                cfg, label = scope_of(max_consecutive=int(v)), f"max_consecutive={int(v)}"
            elif m == "teacache":
                cfg = {"method": m, **TEACACHE_SWEEP_BASE, "threshold": v, "granularity": "global", **selective}
                label = f"global thr={v:g} (no poly)"
            elif m == "taylorseer":
                cfg, label = {"method": m, "interval": int(v), **selective}, f"interval={int(v)} per call"
            elif m == "magcache":
                cfg, label = {"method": m, **mag, "threshold": v, "max_skip_steps": 4, **selective}, \
                    f"thr={v:g} K=4"
            else:
                cfg, label = {"method": m, "threshold": v, **selective}, f"thr={v:g}"
            cases.append(BenchCase(m, label, cfg, "sweep", m))
    if sweep not in ("none", "frontier") and "taylorseer" in methods:   # labelled extra: the per-chunk counter
        cases.append(BenchCase("taylorseer", "interval=2 per chunk (extra, not the original)",
                               {"method": "taylorseer", "interval": 2, "granularity": "chunk", **selective},
                               "sweep", "taylorseer per chunk"))
    # 3. ablations
    if "none" in methods:
        what = " + ".join(["exact", *[k for k in selective if k.startswith("kv_cache")]])
        cases.append(BenchCase("none", f"selective computation alone ({what})",
                               {"method": "none", **selective}, "ablation", "selective only"))
    if "scope" in methods and sweep not in ("none", "frontier"):
        ref = scope_of()
        for label, cfg in (("Cache instead of Predict (order 0, same rule)", {**ref, "order": 0}),
                           ("Predict in sigma (the paper's coordinate)", {**ref, "coordinate": "sigma"}),
                           ("per-chunk indicator (granularity chunk)", {**ref, "granularity": "chunk"}),
                           ("chunks in lockstep (sync)", {**ref, "sync": True})):
            cases.append(BenchCase("scope", label, cfg, "ablation", "scope ablations"))
    return cases


def measure_mag_ratios(bundle: Any, prompt: str, frames: int, seed: int = 0,
                       **overrides: Any) -> tuple[dict[str, list[float]], int]:
    """MagCache's calibration step: one full-compute generation that records the magnitude
    ratio of consecutive residuals per CFG branch and chunk step; returns ({branch: [ratio per
    step]}, num_steps)."""
    from pipelines.procedural.bundle import generate_video
    from pipelines.skyreels_v2.accel_adapter import WanStackAdapter
    from scope.baselines import mag_ratio_table
    from scope.config import make_config
    from scope.hooks import apply_accel, remove_accel
    from scope.stats import merge_stats

    model = bundle.transformer
    remove_accel(model)
    accel = apply_accel(model, make_config("magcache", calibrate=True, **SELECTIVE_EXACT), WanStackAdapter())
    try:
        _, _, info = generate_video(bundle, prompt, frames, seed, accel=accel, **overrides)
    finally:
        remove_accel(model)
    merged = merge_stats(prompt, [s.accel_stats for s in info["result"].segments if s.accel_stats is not None])
    steps = bundle.schedule_args(**overrides).num_steps
    return mag_ratio_table(merged.mag_ratios, steps), steps


# ---------------------------------------------------------------------------------------------
# 2. Running
# ---------------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """One generation of one case on one prompt."""

    prompt: str
    seed: int
    wall_s: float
    video: np.ndarray = field(repr=False)
    cpu_s: float = 0.0          # process CPU time (all threads): a contention-robust cross-check
    block_evals: int = 0
    block_evals_full: int = 0
    modes: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)


# Held-out prompts used when no --prompts-file is given. The first 6 held-out captions cover
# still, bouncing and straight-moving objects (see `with_still_and_moving`).
DEFAULT_PROMPTS = 6
STILL_MOTION = "stays still"


def heldout_prompts(n: int) -> list[str]:
    """n held-out captions (combinations never seen in training): the first n, except that for
    n >= 2 at least one still and one moving object are included (see `with_still_and_moving`)."""
    from pipelines.procedural.data import split_attributes

    captions = [a.caption() for a in split_attributes().heldout]
    if not 1 <= n <= len(captions):
        raise ValueError(f"--prompts must be in [1, {len(captions)}] (held-out captions); got {n}")
    return with_still_and_moving(captions, n)


def with_still_and_moving(captions: Sequence[str], n: int) -> list[str]:
    """The first n captions; when n >= 2 and they are all still (or all moving), the last one is
    swapped for the first caption of the missing kind further down the list.

    A bench on still objects only would hide motion errors, one on movers only would hide drift
    of a still object; the swap is deterministic so every run benches the same prompts."""
    chosen = list(captions[:n])
    if n < 2:
        return chosen
    for wanted in (True, False):        # True: a still caption, False: a moving one
        if not any((STILL_MOTION in c) == wanted for c in chosen):
            extra = next((c for c in captions[n:] if (STILL_MOTION in c) == wanted), None)
            if extra is not None:       # every caption is still or moving: at most one swap happens
                chosen[-1] = extra
    return chosen


def read_prompts_file(path: str | Path) -> list[tuple[int, str]]:
    """(line number, caption) for each caption line; blank lines and '#' comments are skipped."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        caption = line.strip()
        if caption and not caption.startswith("#"):
            entries.append((number, caption))
    return entries


def load_prompts_file(path: str | Path, bundle: Any) -> list[str]:
    """Every caption of the file, each checked against the model's vocabulary before any
    generation starts: a typo on the last line should not cost a whole bench run."""
    from pipelines.procedural.bundle import check_prompt

    entries = read_prompts_file(path)
    if not entries:
        raise ValueError(f"{path}: no captions (one per line; blank lines and '#' comments are skipped)")
    for number, caption in entries:
        try:
            check_prompt(bundle, caption)
        except ValueError as err:
            problem = " ".join(str(err).split())      # one line, whatever check_prompt wrote
            raise ValueError(f"{path}, line {number}: {problem}") from None
    return [caption for _, caption in entries]


def bench_prompts(bundle: Any, prompts_file: str | Path | None, n: int | None) -> list[str]:
    """The captions to bench: the file's when given, else n (default 6) held-out captions."""
    if prompts_file is not None:
        if n is not None:
            raise ValueError("give either --prompts-file or --prompts, not both")
        return load_prompts_file(prompts_file, bundle)
    return heldout_prompts(DEFAULT_PROMPTS if n is None else n)


def generate_case(bundle: Any, case: BenchCase, prompt: str, frames: int, seed: int,
                  **overrides: Any) -> RunRecord:
    """Generate one video for a case (hooks applied outside the timed region) and check it."""
    if hasattr(bundle, "generate_record"):         # a model that generates through its own chain
        return bundle.generate_record(case, prompt, frames, seed, **overrides)
    from pipelines.procedural.bundle import generate_video
    from pipelines.procedural.checker import check_video
    from pipelines.skyreels_v2.accel_adapter import WanStackAdapter
    from scope.config import AccelConfig
    from scope.hooks import apply_accel, remove_accel
    from scope.stats import merge_stats

    model = bundle.transformer
    remove_accel(model)
    accel = None
    if case.config is not None:
        accel = apply_accel(model, AccelConfig.from_dict(case.config), WanStackAdapter())
    gc.collect()
    try:
        cpu_started, started = time.process_time(), time.perf_counter()
        video, _, info = generate_video(bundle, prompt, frames, seed, accel=accel, **overrides)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        remove_accel(model)
    record = RunRecord(prompt, seed, wall, video, cpu)
    parts = [s.accel_stats for s in info["result"].segments if s.accel_stats is not None]
    if parts:
        merged = merge_stats(prompt, parts)
        record.block_evals, record.block_evals_full = merged.block_evals, merged.block_evals_full
        record.modes = merged.modes.to_dict()
        record.reasons = dict(merged.reasons)
    checked = check_video(video)
    record.check = {"colour": checked.colour, "shape": checked.shape, "motion": checked.motion,
                    **{f"{k}_ok": v for k, v in checked.agreement(prompt).items()}}
    return record


def summarise_case(case: BenchCase, runs: Sequence[RunRecord], refs: Sequence[RunRecord],
                   run_info: dict[str, Any], floor_s: float | None = None) -> dict[str, Any]:
    """One JSON row: method, setting, config, speedup, block_eval_fraction, psnr_db, ssim,
    content_accuracy (+ per attribute), overhead_floor_s / speedup_limit (None without a floor
    run), and the per-prompt details."""
    is_reference = case.group == "reference"
    per_prompt = []
    for run, ref in zip(runs, refs, strict=True):
        p = PSNR_CAP_DB if is_reference else psnr(run.video, ref.video)
        s = 1.0 if is_reference else ssim(run.video, ref.video)
        per_prompt.append({"prompt": run.prompt, "seed": run.seed, "wall_s": round(run.wall_s, 4),
                           "reference_wall_s": round(ref.wall_s, 4), "cpu_s": round(run.cpu_s, 4),
                           "speedup": ref.wall_s / run.wall_s, "psnr_db": p, "ssim": s,
                           "block_evals": run.block_evals, "block_evals_full": run.block_evals_full,
                           "check": run.check})
    ref_wall, wall = sum(r.wall_s for r in refs), sum(r.wall_s for r in runs)
    ref_cpu, cpu = sum(r.cpu_s for r in refs), sum(r.cpu_s for r in runs)
    evals, full = sum(r.block_evals for r in runs), sum(r.block_evals_full for r in runs)
    modes: dict[str, int] = {}
    for r in runs:
        for k, v in r.modes.items():
            modes[k] = modes.get(k, 0) + v
    attrs = ("colour", "shape", "motion")
    checked = all(f"{k}_ok" in r.check for r in runs for k in attrs)   # no checker: no content accuracy
    agree = {k: float(np.mean([r.check[f"{k}_ok"] for r in runs])) if checked else None for k in attrs}
    all_ok = float(np.mean([all(r.check[f"{k}_ok"] for k in attrs) for r in runs])) if checked else None
    return {
        "method": case.method, "setting": case.setting, "group": case.group, "series": case.series,
        "config": case.config if case.config is not None else {"method": "none", "hooks": False},
        "speedup": 1.0 if is_reference else ref_wall / wall,
        "speedup_cpu": 1.0 if is_reference else (ref_cpu / cpu if cpu > 0 else float("nan")),
        "block_eval_fraction": 1.0 if case.config is None else (evals / full if full else 1.0),
        "psnr_db": float(np.mean([p["psnr_db"] for p in per_prompt])),
        "psnr_db_min": float(np.min([p["psnr_db"] for p in per_prompt])),
        "ssim": float(np.mean([p["ssim"] for p in per_prompt])),
        "ssim_min": float(np.min([p["ssim"] for p in per_prompt])),
        "content_accuracy": all_ok,
        "content_accuracy_per_attribute": agree,
        "wall_s": round(wall, 4), "reference_wall_s": round(ref_wall, 4), "cpu_s": round(cpu, 4),
        **floor_fields(refs[0].wall_s, floor_s),
        "modes": modes, "per_prompt": per_prompt, "run": run_info,
    }


def floor_fields(reference_wall_s: float, floor_s: float | None) -> dict[str, Any]:
    """`overhead_floor_s` (the case without block evaluations, first prompt) and `speedup_limit`
    (the first prompt's reference wall-clock / that floor); both None when no floor was run."""
    if floor_s is None:
        return {"overhead_floor_s": None, "speedup_limit": None}
    limit = reference_wall_s / floor_s if floor_s > 0 else float("inf")
    return {"overhead_floor_s": round(floor_s, 4), "speedup_limit": limit}


def run_bench_on(bundle: Any, cases: Sequence[BenchCase], prompts: Sequence[str], frames: int,
                 seed: int = 0, threads: int | None = None, warmup: bool = True, rounds: int = 2,
                 floor: bool = True, log: Log | None = print, repeats: int | None = None,
                 **overrides: Any) -> list[dict[str, Any]]:
    """Run the reference and every case on every prompt in interleaved timing rounds; rows out.

    Each generation keeps its fastest wall-clock over the `rounds` (`repeats` is the old name):
    other processes on a shared machine only ever add time, so the minimum is the least disturbed
    measurement (outputs are deterministic and are taken from round 0, which runs the reference
    first). `floor` adds the overhead-floor runs (`measure_floors`). `overrides` are sampling
    settings for `generate_video`."""
    log = log or (lambda _: None)
    rounds = rounds if repeats is None else repeats
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    if threads is not None:
        torch.set_num_threads(threads)
    # entry 0 is the reference: summaries compare every case with it
    entries = [reference_case(), *[c for c in cases if c.group != "reference"]]
    if warmup:   # one untimed generation: lazy init, allocator, caches
        generate_case(bundle, entries[0], prompts[0], min(frames, bundle.schedule_args(**overrides).base_num_frames
                                                          or frames), seed, **overrides)
    started = time.perf_counter()
    records = _timed_rounds(bundle, entries, prompts, frames, seed, rounds, log, overrides)
    if floor and not getattr(bundle, "supports_floor", True):
        log("    (no overhead floor for this model: its K/V-writing passes need real blocks)")
        floor = False
    floors = measure_floors(bundle, entries, prompts[0], frames, seed, log, **overrides) if floor else None
    run_info = _run_info(bundle, prompts, frames, seed, rounds, floors, overrides)
    run_info["bench_seconds"] = round(time.perf_counter() - started, 1)
    return [summarise_case(case, records[i], records[0], run_info, floors[i] if floors else None)
            for i, case in enumerate(entries)]


def round_order(entries: Sequence[Any], round_index: int) -> list[Any]:
    """Even rounds: [reference, case 1 .. case K]; odd rounds: [case K .. case 1, reference].

    Alternating the direction gives every case the same mean position in time, so a machine that
    speeds up or slows down during the run (thermal state, other load) does not favour the cases
    that happen to come early."""
    return list(entries) if round_index % 2 == 0 else list(reversed(entries))


def _timed_rounds(bundle: Any, entries: Sequence[BenchCase], prompts: Sequence[str], frames: int,
                  seed: int, rounds: int, log: Log, overrides: dict[str, Any]) -> list[list[RunRecord]]:
    """records[entry][prompt]: round-0 outputs with the fastest wall / CPU time of all rounds."""
    records: list[list[RunRecord]] = [[] for _ in entries]
    for p, prompt in enumerate(prompts):
        s = seed + p
        for r in range(rounds):
            log(f"[{p + 1}/{len(prompts)}] {prompt!r} seed {s} round {r + 1}/{rounds}")
            for i in round_order(range(len(entries)), r):
                run = _keep_fastest(records[i], p, generate_case(bundle, entries[i], prompt, frames, s, **overrides))
                _log_generation(log, entries[i], run, records[0][p])
    return records


def _log_generation(log: Log, case: BenchCase, run: RunRecord, ref: RunRecord) -> None:
    """One progress line; `ref` always exists here because round 0 runs the reference first."""
    if case.group == "reference":
        seen = (f" (checker: {run.check['colour']} {run.check['shape']} {run.check['motion']})"
                if "colour" in run.check else "")
        log(f"    reference  {run.wall_s:6.2f} s{seen}")
        return
    frac = run.block_evals / run.block_evals_full if run.block_evals_full else 1.0
    log(f"    {case.method:10s} {case.setting[:60]:60s} {run.wall_s:6.2f} s  "
        f"x{ref.wall_s / run.wall_s:4.2f}  evals {frac:5.3f}  PSNR {psnr(run.video, ref.video):6.2f}")


def _run_info(bundle: Any, prompts: Sequence[str], frames: int, seed: int, rounds: int,
              floors: list[float] | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings every row shares (copied into each row's `run`)."""
    schedule = bundle.schedule_args(**overrides)
    return {"model": str(getattr(bundle, "path", "")), "frames": frames, "prompts": list(prompts), "seed": seed,
            "threads": torch.get_num_threads(),
            "rounds": rounds, "repeats": rounds,    # `repeats`: the old name, for older readers
            "floor": None if floors is None else {"prompt": prompts[0], "seed": seed,
                                                  "reference_overhead_floor_s": round(floors[0], 4)},
            "torch": torch.__version__, "machine": machine_description(),
            "schedule": {k: getattr(schedule, k) for k in ("num_steps", "shift", "guidance_scale", "ar_step",
                                                           "causal_block_size", "base_num_frames",
                                                           "overlap_frames", "causal_attention")}}


# ---------------------------------------------------------------------------------------------
# Overhead floor: the same generation with no transformer block evaluated
# ---------------------------------------------------------------------------------------------

class SkipBlock(torch.nn.Module):
    """Stand-in for a transformer block in the floor run: returns its hidden states unchanged.

    `WanDFTransformer.run_blocks` calls `blocks[i](h, inputs, i, mask)`; the accelerators reach the
    blocks only through `run_blocks` (`call_original`), so replacing the modules catches every
    path, and any signature works: the first positional argument (or h= / x= keyword) comes back.

    K/V: a real block stores its keys/values with `inputs.record(layer, k, v)`. This one records
    nothing, so on the K/V-serving path (`WanStackAdapter.run_stack_kv`) every captured chunk gets
    an empty dict (one per captured chunk, as the executor checks) and serving it later adds no
    prefix keys. That is deliberate: there is no attention left to read placeholder K/V, and
    fabricating tensors would add copies the floor should not count. The floor therefore also
    leaves out the K/V concatenation of served chunks, a small part of the block cost."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            return args[0]
        for name in ("h", "x", "hidden_states"):
            if name in kwargs:
                return kwargs[name]
        raise TypeError("SkipBlock needs the hidden states as first argument (or h= / x=)")


@contextmanager
def blocks_skipped(model: Any) -> Iterator[None]:
    """Every module of `model.blocks` (an nn.ModuleList) replaced by a `SkipBlock`, restored on exit
    even when the generation fails: a bench that leaves identity blocks behind would silently
    corrupt every later measurement on the same bundle."""
    blocks = model.blocks
    originals = list(blocks)
    try:
        for i in range(len(blocks)):
            blocks[i] = SkipBlock()
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def measure_floors(bundle: Any, entries: Sequence[BenchCase], prompt: str, frames: int, seed: int,
                   log: Log | None = None, **overrides: Any) -> list[float]:
    """Wall-clock of each entry's generation on `prompt` with every block evaluation removed
    (embedding, head, sampler, hooks and planning, decoding still run): the time no skipping
    scheme can go below. One untimed-output run per entry; the decisions the accelerators take
    on identity blocks may differ from the real run's, which changes only their planning cost."""
    log = log or (lambda _: None)
    floors = []
    with blocks_skipped(bundle.transformer):
        for case in entries:
            floors.append(generate_case(bundle, case, prompt, frames, seed, **overrides).wall_s)
            log(f"    floor {case.method:10s} {case.setting[:54]:54s} {floors[-1]:6.2f} s")
    return floors


def _keep_fastest(records: list[RunRecord], index: int, new: RunRecord) -> RunRecord:
    """records[index] = the first run of this prompt, with the fastest wall / CPU time seen."""
    if index == len(records):
        records.append(new)
    else:
        old = records[index]
        old.wall_s, old.cpu_s = min(old.wall_s, new.wall_s), min(old.cpu_s, new.cpu_s)
    return records[index]


def machine_description() -> str:
    """CPU model, cores, accelerator (none on the bench machine)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPU cores, {gpu}"


# ---------------------------------------------------------------------------------------------
# 3. Output: table, plot, JSON
# ---------------------------------------------------------------------------------------------

def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table, one line per row, in bench order; floor / limit show '-' without a floor run."""
    head = (f"{'method':10s} {'setting':58s} {'speedup':>7s} {'(cpu)':>6s} {'evals':>6s} {'PSNR':>6s} {'min':>6s} "
            f"{'SSIM':>6s} {'content':>7s}  {'col/shp/mot':>14s} {'floor':>7s} {'limit':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        a = r["content_accuracy_per_attribute"]
        content = "      -" if r["content_accuracy"] is None else f"{r['content_accuracy']:7.2f}"
        per = "             -" if a["colour"] is None else f"{a['colour']:4.2f}/{a['shape']:4.2f}/{a['motion']:4.2f}"
        lines.append(f"{r['method']:10s} {r['setting'][:58]:58s} {r['speedup']:7.2f} {r['speedup_cpu']:6.2f} "
                     f"{r['block_eval_fraction']:6.3f} {r['psnr_db']:6.2f} {r['psnr_db_min']:6.2f} "
                     f"{r['ssim']:6.4f} {content}  {per} "
                     f"{_optional(r.get('overhead_floor_s'), 7, '.3f')} {_optional(r.get('speedup_limit'), 6, '.2f')}")
    return "\n".join(lines)


def _optional(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}{spec}}"


METHOD_COLOURS = {"scope": "tab:red", "teacache": "tab:blue", "flowcache": "tab:green",
                  "taylorseer": "tab:purple", "fbcache": "tab:orange", "magcache": "tab:brown",
                  "none": "black"}
GROUP_MARKERS = {"default": "s", "sweep": "o", "ablation": "^"}


def plot_bench(rows: Sequence[dict[str, Any]], path: str | Path, target_psnr: float = 30.0,
               target_speedup: float = 5.0) -> None:
    """PSNR (dB) vs speedup (left: measured wall-clock; right: 1 / block_eval_fraction, the
    machine-independent compute ratio). One colour per method, sweeps as lines, defaults as open
    squares, ablations as triangles; points at the 100 dB cap (exact) sit on the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["group"] not in ("reference", "control")]
    finite = [r["psnr_db"] for r in points if r["psnr_db"] < PSNR_CAP_DB]
    top = min(PSNR_CAP_DB, max([*finite, target_psnr]) + 6.0)
    bottom = min([*finite, target_psnr]) - 3.0
    series: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        series.setdefault(r["series"] or r["method"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    panels = (("speedup", "speedup vs full compute (wall-clock ratio, same run)"),
              ("compute", "1 / block_eval_fraction (transformer block evaluations saved)"))
    for ax, (key, xlabel) in zip(axes, panels):
        def x_of(r: dict[str, Any]) -> float:
            return r["speedup"] if key == "speedup" else 1.0 / r["block_eval_fraction"]

        for name, pts in series.items():
            pts = sorted(pts, key=x_of)
            group, method = pts[0]["group"], pts[0]["method"]
            line = group == "sweep" and len(pts) > 1 and "selective mode" not in name
            marker = "D" if "selective mode" in name else GROUP_MARKERS.get(group, "o")
            ax.plot([x_of(r) for r in pts], [min(r["psnr_db"], top) for r in pts], marker=marker,
                    linestyle=("--" if "chunk" in name else "-") if line else "none",
                    color=METHOD_COLOURS.get(method, "grey"), markerfacecolor="none" if group == "default" else None,
                    label=name, markersize=6, linewidth=2.2 if method == "scope" and line else 1.2)
        ax.axhline(target_psnr, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(target_speedup, color="grey", linestyle=":", linewidth=0.8)
        ax.axvline(1.0, color="black", linewidth=0.5)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom, top + 1)
    axes[0].set_ylabel(f"PSNR vs full compute (dB); exact runs ({PSNR_CAP_DB:g} dB cap) at the top")
    run = rows[0]["run"] if rows else {}
    fig.suptitle(f"{run.get('model') or 'procedural model'}: {len(run.get('prompts', []))} prompts x "
                 f"{run.get('frames')} frames, "
                 f"{run.get('threads')} thread(s), best of {run.get('rounds', run.get('repeats', 1))} "
                 f"interleaved timing round(s)", fontsize=10)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Atomic write of the rows (a list of objects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(list(rows), indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# 4. Entry point
# ---------------------------------------------------------------------------------------------

def _run_bench_family(args: argparse.Namespace, methods: list[str], ref: Any) -> list[dict[str, Any]]:
    """`scope bench --model <another family's model>`: the same cases, rounds and rows, on the model's
    own chain (`generate_record`), with the defaults of its family's table; no content checker."""
    if ref.family != "magi-1":
        raise ValueError(f"scope bench runs the embedded procedural model or a MAGI-1 model; {args.model!r} is "
                         f"a {ref.family} {ref.kind} model (bench it through scope generate --stats)")
    from jobs.magi import MagiBenchModel

    threads = getattr(args, "threads", None) or 2
    torch.set_num_threads(threads)
    model = MagiBenchModel(args.model, steps=getattr(args, "steps", None))
    prompts = model.prompts(getattr(args, "prompts_file", None), getattr(args, "prompts", None))
    mag_ratios, num_steps = None, None
    if "magcache" in methods:   # MagCache's own calibration step, on a caption not benched
        mag_ratios, num_steps = model.measure_mag_ratios(args.frames, args.seed)
        print(f"magcache: ratios measured on {model.calibration_prompt!r} ({num_steps} steps)", flush=True)
    cases = bench_cases(methods, args.sweep, mag_ratios=mag_ratios, num_steps=num_steps, family=ref.family,
                        size=ref.size, scope_base={"method": "scope"})
    rounds = getattr(args, "rounds", None) or 2
    print(f"scope bench: {len(cases) + 1} cases x {len(prompts)} prompts x {args.frames} frames, {rounds} rounds, "
          f"{threads} threads, model {args.model} ({model.describe_schedule()}; --ar-step does not apply)",
          flush=True)
    rows = run_bench_on(model, cases, prompts, args.frames, seed=args.seed, threads=threads, rounds=rounds,
                        floor=not getattr(args, "no_floor", False), log=lambda s: print(s, flush=True))
    write_json(rows, args.json)
    print(format_table(rows))
    print(f"wrote {args.json}")
    if args.plot:
        plot_bench(rows, args.plot)
        print(f"wrote {args.plot}")
    return rows


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling settings from the CLI (None = the bundle's defaults)."""
    return {"num_inference_steps": getattr(args, "steps", None), "ar_step": getattr(args, "ar_step", None)}


def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`scope bench accel ...`: run, print the table, write JSON (and the plot)."""
    if getattr(args, "target", "accel") != "accel":
        raise ValueError("`scope bench cluster` is not part of this bench; use `scope bench accel` "
                         "(methods side by side on the procedural model)")
    from pipelines.procedural.bundle import load_bundle

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bench_cases(methods, args.sweep, mag_ratios={"cond": [1.0]})   # names and sweep checked before loading
    from pipelines.families import detect

    ref = detect(args.model)
    if ref.family != "skyreels-v2" or ref.kind not in ("procedural",):
        return _run_bench_family(args, methods, ref)
    bundle = load_bundle(args.model)
    # every caption is checked before the first generation
    prompts = bench_prompts(bundle, getattr(args, "prompts_file", None), getattr(args, "prompts", None))
    threads = getattr(args, "threads", None) or 2
    torch.set_num_threads(threads)
    mag_ratios, num_steps = None, None
    if "magcache" in methods:   # MagCache's own calibration step, on a training caption
        from jobs.calibrate import calibration_prompts

        mag_ratios, num_steps = measure_mag_ratios(bundle, calibration_prompts(1)[0], args.frames, args.seed,
                                                   **sampling_overrides(args))
        print(f"magcache: ratios measured on {calibration_prompts(1)[0]!r} ({num_steps} steps)", flush=True)
    cases = bench_cases(methods, args.sweep, mag_ratios=mag_ratios, num_steps=num_steps)
    rounds = getattr(args, "rounds", None) or 2
    print(f"scope bench: {len(cases) + 1} cases x {len(prompts)} prompts x {args.frames} frames, "
          f"{rounds} rounds, {threads} threads, model {bundle.path}", flush=True)
    rows = run_bench_on(bundle, cases, prompts, args.frames, seed=args.seed, threads=threads, rounds=rounds,
                        floor=not getattr(args, "no_floor", False), log=lambda s: print(s, flush=True),
                        **sampling_overrides(args))
    write_json(rows, args.json)
    print(format_table(rows))
    print(f"wrote {args.json}")
    if args.plot:
        plot_bench(rows, args.plot)
        print(f"wrote {args.plot}")
    return rows
