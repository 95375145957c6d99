"""`scope calibrate`: the cheapest SCOPE configuration that keeps a target quality, found by
measurement over every SCOPE knob.

    scope calibrate --target-psnr 31 --target-min-psnr 29 --out accel.json
    scope generate --prompt "a red circle moves right" --accel-config accel.json

The paper names hand-calibrated thresholds as SCOPE's weakness; this replaces the hand with a
search on the model itself:

1. references: for a few calibration prompts (captions of the TRAINING split, never the bench's
   held-out ones; seed = --seed + index) generate the full-compute video once (plain model);
2. a point passes when the MEAN PSNR over the prompts is >= --target-psnr and the MINIMUM is >=
   --target-min-psnr; its cost is the block-evaluation fraction (machine-independent);
3. coordinate descent over the knobs in `SEARCH` (rounds x knobs): for each knob, every listed
   value is measured with the others held at the current best; the best point (passing and
   cheapest, or, while nothing passes, the one closest to the target) becomes current. Knobs:
   the Predict threshold (indicator scale), max consecutive skips, the Cache threshold, the
   extrapolation coordinate and order, the error bound, the final-step control, warm-up and
   the indicator itself;
4. the winner is written with `calibrated_for`: the schedule it was measured on (steps, shift,
   ar_step, CFG, block size, window, frames, model digest), so a run under another schedule says
   so.

The written file is a plain `{"method": "scope", ...}` config that `load_config` and
`scope generate --accel-config` accept; the search goes to stdout (and `--report`).
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

# knob -> values tried, in the order coordinate descent visits them (cost knobs first)
SEARCH: dict[str, list[Any]] = {
    "tau_predict": [0.3, 0.6, 1.2],
    "max_consecutive": [2, 3, 4, 6],
    "tau_cache": [0.0, 0.05, 0.15],
    "coordinate": ["sigma", "step", "logsnr"],
    "order": [0, 1, 2],
    "eps_error": [0.25, 0.5, math.inf],
    "sync": [True, False],
    "force_final_step": [True, False],
    "warmup_steps": [1, 2],
    "indicator": ["input", "probe+input", "none"],
}


@dataclass
class Evaluation:
    """One configuration measured on every calibration prompt."""

    label: str
    config: dict[str, Any]
    psnr_min: float
    psnr_mean: float
    block_eval_fraction: float
    speedup: float
    passed: bool
    family: str = "exact"

    def line(self) -> str:
        return (f"[{self.family}] {self.label:38s} PSNR mean {self.psnr_mean:6.2f} min {self.psnr_min:6.2f}, "
                f"evals {self.block_eval_fraction:.3f}, x{self.speedup:.2f} -> {'pass' if self.passed else 'FAIL'}")


@dataclass
class CalibrationResult:
    config: dict[str, Any]                  # the chosen AccelConfig dict (method scope)
    best: Evaluation | None                 # None: no point kept the target
    evaluations: list[Evaluation] = field(default_factory=list)
    target_psnr: float = 30.0
    target_min_psnr: float = 28.0
    prompts: list[str] = field(default_factory=list)
    frames: int = 0
    reference_wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "best": None if self.best is None else asdict(self.best),
                "target_psnr": self.target_psnr, "target_min_psnr": self.target_min_psnr,
                "prompts": self.prompts, "frames": self.frames, "reference_wall_s": self.reference_wall_s,
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
    """The configurations the knobs are searched in: exact selective computation, and on
    block-causal models also stale K/V for skipped context chunks (`jobs.bench.SELECTIVE_STALE_KV`)."""
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


def schedule_record(bundle: Any, frames: int, **overrides: Any) -> dict[str, Any]:
    """What `calibrated_for` records: the schedule, the length and the model's weights digest."""
    args = bundle.schedule_args(**overrides)
    record = {"num_steps": args.num_steps, "shift": float(args.shift), "ar_step": args.ar_step,
              "guidance_scale": float(args.guidance_scale), "causal_block_size": args.causal_block_size,
              "base_num_frames": args.base_num_frames, "overlap_frames": args.overlap_frames,
              "frames": frames}
    digest = model_digest(bundle)
    if digest:
        record["model"] = digest
    return record


def model_digest(bundle: Any) -> str | None:
    """md5 of the model's weights file (first 12 hex digits), None when it has no file."""
    import hashlib

    path = getattr(bundle, "path", None)
    weights = Path(path) / "model.safetensors" if path is not None else None
    if weights is None or not weights.is_file():
        return None
    return hashlib.md5(weights.read_bytes()).hexdigest()[:12]


def calibrate(bundle: Any, prompts: Sequence[str], frames: int, target_psnr: float = 30.0,
              target_min_psnr: float | None = None, seed: int = 0, rounds: int = 2,
              search: dict[str, list[Any]] | None = None, base: dict[str, Any] | None = None,
              threads: int | None = None, log: Log | None = print,
              families: dict[str, dict[str, Any]] | None = None, **overrides: Any) -> CalibrationResult:
    """Coordinate descent over `search` (default SEARCH) in every family of base configurations."""
    from scope.config import ScopeConfig

    log = log or (lambda _: None)
    if threads is not None:
        torch.set_num_threads(threads)
    target_min = target_psnr if target_min_psnr is None else target_min_psnr
    search = dict(SEARCH if search is None else search)
    unknown = sorted(set(search) - set(ScopeConfig.field_names()))
    if unknown:
        raise ValueError(f"calibrate: unknown SCOPE knob(s) {unknown}; valid: {', '.join(ScopeConfig.field_names())}")
    if families is None:
        families = {"given": dict(base)} if base is not None else base_families(bundle, **overrides)
    if not families:
        raise ValueError("calibrate needs at least one base configuration family")

    # 1. references (plain model), after one untimed warm-up
    ref_case = reference_case()
    generate_case(bundle, ref_case, prompts[0], min(frames, bundle.schedule_args(**overrides).base_num_frames
                                                    or frames), seed, **overrides)
    refs: list[RunRecord] = [generate_case(bundle, ref_case, p, frames, seed + i, **overrides)
                             for i, p in enumerate(prompts)]
    ref_wall = sum(r.wall_s for r in refs)
    log(f"calibrate: {len(prompts)} training-split prompts x {frames} frames, reference {ref_wall:.1f} s, "
        f"target PSNR mean >= {target_psnr:g} dB, min >= {target_min:g} dB")
    measured: dict[str, Evaluation] = {}

    def evaluate(family: str, cfg: dict[str, Any], label: str) -> Evaluation:
        key = family + json.dumps(cfg, sort_keys=True, default=str)
        if key not in measured:
            case = BenchCase("scope", label, cfg, "sweep")
            runs = [generate_case(bundle, case, p, frames, seed + i, **overrides) for i, p in enumerate(prompts)]
            values = [psnr(run.video, ref.video) for run, ref in zip(runs, refs)]
            evals, full = sum(r.block_evals for r in runs), sum(r.block_evals_full for r in runs)
            mean, low = float(np.mean(values)), float(min(values))
            measured[key] = Evaluation(label, cfg, low, mean, evals / full if full else 1.0,
                                       ref_wall / sum(r.wall_s for r in runs),
                                       bool(mean >= target_psnr and low >= target_min), family)
            log("  " + measured[key].line())
        return measured[key]

    # 2-3. coordinate descent per family
    for family, fam_base in families.items():
        log(f" family {family}: {json.dumps(fam_base)}")
        current = _validated({**fam_base, "method": "scope"})
        best = evaluate(family, current, "start")
        for r in range(rounds):
            changed = False
            for knob, values in search.items():
                for value in values:
                    cfg = {**best.config, knob: value}
                    try:
                        cfg = _validated(cfg)
                    except ValueError:
                        continue
                    ev = evaluate(family, cfg, f"r{r} {knob}={value}")
                    if _better(ev, best, target_psnr, target_min):
                        best, changed = ev, True
            if not changed:
                break

    # 4. choose over every measured point (any family)
    everything = list(measured.values())
    passing = [e for e in everything if e.passed]
    winner = min(passing, key=lambda e: (round(e.block_eval_fraction, 9), -e.psnr_min)) if passing else None
    if winner is not None:
        config = dict(winner.config)
    else:   # nothing kept the target: never reuse (selective computation only)
        config = _validated({**next(iter(families.values())), "method": "scope", "tau_cache": 0.0,
                             "tau_predict": 0.0})
    config.pop("trace", None)
    config["calibrated_for"] = schedule_record(bundle, frames, **overrides)
    return CalibrationResult(config, winner, everything, target_psnr, target_min, list(prompts), frames, ref_wall)


def _validated(cfg: dict[str, Any]) -> dict[str, Any]:
    from scope.config import AccelConfig

    return AccelConfig.from_dict(cfg).to_dict()


def _shortfall(e: Evaluation, target: float, target_min: float) -> float:
    return max(0.0, target - e.psnr_mean) + max(0.0, target_min - e.psnr_min)


def _better(new: Evaluation, old: Evaluation, target: float, target_min: float) -> bool:
    """Passing beats failing; two passing points: fewer block evaluations (ties: higher min
    PSNR); two failing points: the smaller shortfall below the targets."""
    if new.passed != old.passed:
        return new.passed
    if new.passed:
        a, b = round(new.block_eval_fraction, 6), round(old.block_eval_fraction, 6)
        return a < b or (a == b and new.psnr_min > old.psnr_min)
    return _shortfall(new, target, target_min) < _shortfall(old, target, target_min)


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

    for name in ("target_psnr", "target_min_psnr"):
        value = getattr(args, name, None)
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of dB, e.g. 30; got {value}")
    if getattr(args, "rounds", 2) < 1:
        raise ValueError(f"--rounds must be >= 1; got {args.rounds}")
    bundle = load_bundle(args.model)
    prompts = calibration_prompts(args.prompts)
    overrides = {"num_inference_steps": getattr(args, "steps", None), "ar_step": getattr(args, "ar_step", None)}
    families = select_families(base_families(bundle, **overrides), getattr(args, "families", None))
    result = calibrate(bundle, prompts, args.frames, args.target_psnr, getattr(args, "target_min_psnr", None),
                       seed=getattr(args, "seed", 0) or 0, rounds=getattr(args, "rounds", 2),
                       threads=getattr(args, "threads", None) or 2, families=families,
                       log=lambda s: print(s, flush=True), **overrides)
    write_config(result.config, args.out)
    if result.best is None:
        print(f"no configuration kept the quality target on the calibration prompts; wrote a config "
              f"that never reuses a residual (selective computation only) to {args.out}")
    else:
        print(f"best: {result.best.line()}")
        print(f"wrote {args.out}")
    report = getattr(args, "report", None)
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n")
        print(f"wrote {report}")
    return result
