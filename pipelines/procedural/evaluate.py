"""Content accuracy of the procedural model on held-out captions, on videos longer than training.

For every caption of the split (default: the held-out combinations of `data.split_attributes`)
and every repeat (seed), generate a multi-segment video of `--frames` latent (= video) frames
with the bundle's defaults and read its colour, shape and motion back with `checker.check_video`.

    .venv/bin/python -m pipelines.procedural.evaluate --frames 64 --repeats 2 --json out/eval.json
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

from pipelines.procedural.bundle import ProceduralBundle, generate_video, load_bundle
from pipelines.procedural.checker import agreement_rates, check_video
from pipelines.procedural.data import split_attributes


def evaluate(bundle: ProceduralBundle, frames: int = 64, repeats: int = 2, split: str = "heldout",
             seed: int = 1000, log: bool = True, limit: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Generate repeats x captions videos, check each; rates per attribute and per caption.

    `limit` keeps every k-th caption of the split so that about `limit` remain (quick sweeps).
    """
    captions = [a.caption() for a in split_attributes().get(split)]
    if limit is not None and limit < len(captions):
        captions = captions[::-(-len(captions) // limit)]
    results, truths, rows = [], [], []
    started = time.perf_counter()
    segments = 0
    for r in range(repeats):
        for i, caption in enumerate(captions):
            video, _, info = generate_video(bundle, caption, frames, seed + r * 1000 + i, **overrides)
            check = check_video(video)
            segments = info["segments"]
            results.append(check)
            truths.append(caption)
            agree = check.agreement(caption)
            rows.append({"caption": caption, "seed": info["seed"], "colour": check.colour, "shape": check.shape,
                         "motion": check.motion, **{f"{k}_ok": v for k, v in agree.items()}})
            if log:
                marks = " ".join(f"{k}:{'ok' if v else 'NO (' + str(getattr(check, k)) + ')'}"
                                 for k, v in agree.items())
                print(f"[{len(rows):3d}] {caption:32s} {marks}", flush=True)
    rates = agreement_rates(results, truths)
    schedule = info["schedule"]
    return {"split": split, "videos": len(rows), "frames": frames, "segments": segments,
            "repeats": repeats, "rates": rates, "seconds": round(time.perf_counter() - started, 1),
            "schedule": {k: getattr(schedule, k) for k in ("num_steps", "shift", "guidance_scale", "ar_step",
                                                           "causal_block_size", "base_num_frames",
                                                           "overlap_frames")},
            "videos_detail": rows}


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description="Colour / shape / motion accuracy of the procedural model.")
    parser.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    parser.add_argument("--frames", type=int, default=64, help="video frames per sample (training clips: 16)")
    parser.add_argument("--repeats", type=int, default=2, help="seeds per caption")
    parser.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="about this many captions of the split")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--shift", type=float, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--ar-step", type=int, default=None)
    parser.add_argument("--overlap", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    report = evaluate(load_bundle(args.weights), args.frames, args.repeats, args.split, args.seed,
                      limit=args.limit, num_inference_steps=args.steps, shift=args.shift, guidance_scale=args.guidance,
                      ar_step=args.ar_step, overlap_frames=args.overlap)
    summary = {k: v for k, v in report.items() if k != "videos_detail"}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
