"""`scope calibrate`: the fastest SCOPE thresholds that keep a target PSNR, found by measurement.

    scope calibrate --target-psnr 30 --out accel.json
    scope generate --prompt "a red circle moves right" --accel-config accel.json

The paper names hand-calibrated thresholds as SCOPE's weakness; this replaces the hand with a
small search on the model itself:

1. references: for a few calibration prompts (captions of the TRAINING split, never the bench's
   held-out ones; seed = --seed + index) generate the full-compute video once (plain model);
2. thresholds are one point of a 2-D family: tau_cache = s x tau0, tau_predict = r x tau_cache.
   For each ratio r, a coarse geometric scan of the scale s (x2 per step from s = 1, upwards
   while the quality target holds, downwards until it holds) brackets the boundary;
3. on the ratio whose passing point is cheapest, bisection (geometric midpoints) on s narrows the
   bracket;
4. a point passes when the MINIMUM PSNR over the calibration prompts is >= the target; among the
   passing points the one with the smallest block-evaluation fraction wins (deterministic, the
   machine-independent cost), ties broken by the measured speedup. The other SCOPE fields stay at
   scope/config.py's defaults, with exact selective computation + K/V serving of finished chunks
   when the model's attention is block-causal (exact there: it costs no quality).
5. steps 2-3 run once per family of base configurations (`base_families`): "exact" as above and,
   on block-causal models, "stale-kv" (skipped chunks serve the K/V of their last run); the
   winner is chosen over all families.

The written file is a plain `{"method": "scope", ...}` config that `load_config` and
`scope generate --accel-config` accept; the search itself goes to stdout (and `--report`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.bench import BenchCase, RunRecord, generate_case, reference_case
from jobs.quality import psnr

Log = Callable[[str], None]
DEFAULT_RATIOS = (2.0, 4.0)
MIN_SCALE, MAX_SCALE = 1 / 64, 256.0


@dataclass
class Evaluation:
    """One threshold point measured on every calibration prompt."""

    scale: float
    ratio: float
    config: dict[str, Any]
    psnr_min: float
    psnr_mean: float
    block_eval_fraction: float
    speedup: float
    passed: bool
    family: str = "exact"         # which base configuration (see `base_families`)

    def line(self) -> str:
        return (f"[{self.family}] tau_cache={self.config['tau_cache']:.4g} tau_predict={self.config['tau_predict']:.4g} "
                f"(s={self.scale:.4g}, r={self.ratio:g}): PSNR min {self.psnr_min:6.2f} mean {self.psnr_mean:6.2f}, "
                f"evals {self.block_eval_fraction:.3f}, speedup x{self.speedup:.2f} "
                f"-> {'pass' if self.passed else 'FAIL'}")


@dataclass
class CalibrationResult:
    config: dict[str, Any]                  # the chosen AccelConfig dict (method scope)
    best: Evaluation | None                 # None: no threshold point kept the target
    evaluations: list[Evaluation] = field(default_factory=list)
    target_psnr: float = 30.0
    prompts: list[str] = field(default_factory=list)
    frames: int = 0
    reference_wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "best": None if self.best is None else asdict(self.best),
                "target_psnr": self.target_psnr, "prompts": self.prompts, "frames": self.frames,
                "reference_wall_s": self.reference_wall_s,
                "evaluations": [asdict(e) for e in self.evaluations]}


def calibration_prompts(n: int) -> list[str]:
    """n training-split captions spread over the split (different colours, shapes, motions)."""
    from pipelines.procedural.data import split_attributes

    captions = [a.caption() for a in split_attributes().train]
    if not 1 <= n <= len(captions):
        raise ValueError(f"--prompts must be in [1, {len(captions)}]; got {n}")
    step = len(captions) / n
    return [captions[int(i * step + step / 2)] for i in range(n)]


def base_config(bundle: Any, **overrides: Any) -> dict[str, Any]:
    """SCOPE defaults + the selective computation that is exact for this model's attention."""
    causal = bool(bundle.schedule_args(**overrides).causal_attention)
    sel = {"selective": "exact", "kv_cache_finished": True} if causal else {}
    return {"method": "scope", **sel}


def base_families(bundle: Any, **overrides: Any) -> dict[str, dict[str, Any]]:
    """The configurations the thresholds are searched in: exact selective computation, and on
    block-causal models also stale K/V for skipped context chunks (`jobs.bench.SELECTIVE_STALE_KV`),
    which skips far more under asynchronous schedules at a measured quality cost."""
    from jobs.bench import SELECTIVE_STALE_KV

    families = {"exact": base_config(bundle, **overrides)}
    if bundle.schedule_args(**overrides).causal_attention:
        families["stale-kv"] = {"method": "scope", **SELECTIVE_STALE_KV}
    return families


def select_families(available: dict[str, dict[str, Any]], names: str | None) -> dict[str, dict[str, Any]]:
    """The families named in `names` (comma-separated; None or '' = all of `available`)."""
    if not names:
        return available
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in available]
    if unknown or not wanted:
        raise ValueError(f"--families {names!r}: unknown {unknown}; this model offers "
                         f"{', '.join(available)} (comma-separated)")
    return {n: available[n] for n in wanted}


def calibrate(bundle: Any, prompts: Sequence[str], frames: int, target_psnr: float = 30.0,
              seed: int = 0, ratios: Sequence[float] = DEFAULT_RATIOS, tau0: float | None = None,
              bisect_steps: int = 3, base: dict[str, Any] | None = None, threads: int | None = None,
              log: Log | None = print, families: dict[str, dict[str, Any]] | None = None,
              **overrides: Any) -> CalibrationResult:
    """Search tau_cache / tau_predict as described in the module docstring, in every family of
    base configurations (`base` alone = one family; default `base_families`)."""
    from scope.config import ScopeConfig, make_config

    log = log or (lambda _: None)
    if threads is not None:
        torch.set_num_threads(threads)
    if not ratios or any(r <= 1.0 for r in ratios):
        raise ValueError(f"ratios (tau_predict / tau_cache) must be > 1, e.g. 2,4; got {list(ratios)}")
    if families is None:
        families = {"given": dict(base)} if base is not None else base_families(bundle, **overrides)
    if not families:
        raise ValueError("calibrate needs at least one base configuration family")
    tau0 = ScopeConfig().tau_cache if tau0 is None else tau0

    # 1. references (plain model), after one untimed warm-up
    ref_case = reference_case()
    generate_case(bundle, ref_case, prompts[0], min(frames, bundle.schedule_args(**overrides).base_num_frames
                                                    or frames), seed, **overrides)
    refs: list[RunRecord] = [generate_case(bundle, ref_case, p, frames, seed + i, **overrides)
                             for i, p in enumerate(prompts)]
    ref_wall = sum(r.wall_s for r in refs)
    log(f"calibrate: {len(prompts)} training-split prompts x {frames} frames, reference {ref_wall:.1f} s, "
        f"target min PSNR {target_psnr:g} dB")
    cache: dict[tuple[str, float, float], Evaluation] = {}
    everything: list[Evaluation] = []
    for family, base in families.items():
        log(f" family {family}: {json.dumps(base)}")
        everything += _search_family(bundle, prompts, frames, refs, ref_wall, base, family, ratios, tau0,
                                     target_psnr, seed, bisect_steps, cache, log, overrides)

    # 4. choose
    passing = [e for e in everything if e.passed]
    best = _best(passing) if passing else None
    if best is not None:
        config = best.config
    else:   # nothing kept the target: never skip a step (Predict band empty, no Cache)
        first = next(iter(families.values()))
        config = make_config(**{**first, "tau_cache": 0.0, "tau_predict": math.nextafter(0.0, 1.0)}).to_dict()
    config = {k: v for k, v in config.items() if k != "trace"}
    return CalibrationResult(config, best, sorted(everything, key=lambda e: (e.family, e.ratio, e.scale)),
                             target_psnr, list(prompts), frames, ref_wall)


def _search_family(bundle: Any, prompts: Sequence[str], frames: int, refs: Sequence[RunRecord], ref_wall: float,
                   base: dict[str, Any], family: str, ratios: Sequence[float], tau0: float, target_psnr: float,
                   seed: int, bisect_steps: int, cache: dict[tuple[str, float, float], Evaluation], log: Log,
                   overrides: dict[str, Any]) -> list[Evaluation]:
    """Steps 2 and 3 of the module docstring in one family of base configurations."""
    from scope.config import make_config

    def evaluate(scale: float, ratio: float) -> Evaluation:
        key = (family, round(math.log2(scale), 6), ratio)
        if key in cache:
            return cache[key]
        tc = tau0 * scale
        cfg = make_config(**{**base, "tau_cache": tc, "tau_predict": tc * ratio}).to_dict()
        case = BenchCase("scope", f"{family} s={scale:g} r={ratio:g}", cfg, "sweep")
        runs = [generate_case(bundle, case, p, frames, seed + i, **overrides) for i, p in enumerate(prompts)]
        values = [psnr(run.video, ref.video) for run, ref in zip(runs, refs)]
        evals, full = sum(r.block_evals for r in runs), sum(r.block_evals_full for r in runs)
        ev = Evaluation(scale, ratio, cfg, float(min(values)), float(np.mean(values)),
                        evals / full if full else 1.0, ref_wall / sum(r.wall_s for r in runs),
                        bool(min(values) >= target_psnr), family)
        cache[key] = ev
        log("  " + ev.line())
        return ev

    # 2. coarse scan per ratio: bracket (last pass, first fail)
    brackets: dict[float, tuple[float | None, float | None]] = {}
    for ratio in ratios:
        s = 1.0
        first = evaluate(s, ratio)
        if first.passed:
            lo, hi, prev, flat = s, None, first, 0
            while s * 2 <= MAX_SCALE and flat < 2:
                s *= 2
                ev = evaluate(s, ratio)
                if not ev.passed:
                    hi = s
                    break
                lo = s
                # saturated: larger thresholds no longer change the decisions (other controls bind)
                same = ev.block_eval_fraction == prev.block_eval_fraction and ev.psnr_min == prev.psnr_min
                flat, prev = (flat + 1 if same else 0), ev
        else:
            lo, hi = None, s
            while s / 2 >= MIN_SCALE:
                s /= 2
                if evaluate(s, ratio).passed:
                    lo = s
                    break
                hi = s
        brackets[ratio] = (lo, hi)

    # 3. bisection on the scale for the ratio whose passing point is cheapest
    def mine() -> list[Evaluation]:
        return [e for k, e in cache.items() if k[0] == family]

    passing = [e for e in mine() if e.passed]
    if passing:
        ratio = _best(passing).ratio
        lo, hi = brackets[ratio]
        if lo is not None and hi is not None:
            for _ in range(bisect_steps):
                mid = math.sqrt(lo * hi)
                if evaluate(mid, ratio).passed:
                    lo = mid
                else:
                    hi = mid

    return mine()


def _best(evaluations: Sequence[Evaluation]) -> Evaluation:
    """Fewest block evaluations, then the faster measured run; points that make the very same
    decisions (same fraction and PSNR: timing differences are noise) go to the smaller scale."""
    groups: dict[tuple[float, float], list[Evaluation]] = {}
    for e in evaluations:
        groups.setdefault((round(e.block_eval_fraction, 9), round(e.psnr_min, 6)), []).append(e)
    candidates = [min(g, key=lambda e: e.scale) for g in groups.values()]
    return min(candidates, key=lambda e: (round(e.block_eval_fraction, 9), -e.speedup))


def write_config(config: dict[str, Any], path: str | Path) -> None:
    """Validate through `make_config` and write atomically what `load_config` reads."""
    from scope.config import AccelConfig

    text = AccelConfig.from_dict(config).to_json() + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_calibrate(args: argparse.Namespace) -> CalibrationResult:
    """`scope calibrate`: search, print, write the config (and the search report)."""
    from pipelines.procedural.bundle import load_bundle

    if not math.isfinite(args.target_psnr) or args.target_psnr <= 0:
        raise ValueError(f"--target-psnr must be a positive number of dB, e.g. 30; got {args.target_psnr}")
    bundle = load_bundle(args.model)
    prompts = calibration_prompts(args.prompts)
    ratios = [float(r) for r in str(getattr(args, "ratios", None) or "2,4").split(",") if r.strip()]
    overrides = {"num_inference_steps": getattr(args, "steps", None), "ar_step": getattr(args, "ar_step", None)}
    families = select_families(base_families(bundle, **overrides), getattr(args, "families", None))
    result = calibrate(bundle, prompts, args.frames, args.target_psnr, seed=getattr(args, "seed", 0) or 0,
                       ratios=ratios, threads=getattr(args, "threads", None) or 2, families=families,
                       log=lambda s: print(s, flush=True), **overrides)
    write_config(result.config, args.out)
    if result.best is None:
        print(f"no threshold point kept min PSNR >= {args.target_psnr:g} dB on the calibration prompts; "
              f"wrote a config that never skips a step (selective computation only) to {args.out}")
    else:
        print(f"best: {result.best.line()}")
        print(f"wrote {args.out}: {json.dumps({k: result.config[k] for k in ('tau_cache', 'tau_predict', 'selective', 'kv_cache_finished')})}")
    report = getattr(args, "report", None)
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"wrote {report}")
    return result
