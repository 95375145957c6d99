"""`scope`: the command-line entry point (generate, bench, calibrate, train)."""
from __future__ import annotations

import argparse
import sys

ACCEL_METHODS = ["none", "scope", "teacache", "flowcache", "taylorseer", "fbcache", "magcache"]


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from jobs.long_video import add_spec_flags

    p = sub.add_parser("generate", help="generate one video from a prompt (a job spec or flags)",
                       description="Generate a video with an AR diffusion-forcing model, optionally accelerated. "
                                   "Fields come from --spec (YAML) and the flags (flags win); model: omitted = "
                                   "the embedded procedural model, 'tiny' = the tiny random SkyReels-V2 chain "
                                   "(plumbing demo), a procedural bundle, or an official SkyReels-V2 DF folder / URL "
                                   "(config.json + *.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth + "
                                   "google/umt5-xxl/): prompt -> umT5 -> DF transformer -> Wan VAE -> frames; "
                                   "--image for image-to-video, --video to continue a video. MAGI-1: 'magi-1-tiny' "
                                   "(the tiny random chain) or a release folder (ckpt/magi/4.5B_distill with ckpt/vae, "
                                   "ckpt/t5 beside it): prompt -> T5 -> chunk-wise walk -> MAGI VAE -> frames.")
    add_spec_flags(p)
    p.add_argument("--accel-config", default=None,
                   help="JSON accelerator settings (from `scope calibrate`); the same as --accel PATH.json")
    p.add_argument("--stats", default=None, help="write run statistics (JSON) here")
    p.add_argument("--latents", default=None, help="also save the final latents (safetensors, tensor 'latents')")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")


def _add_long_video(sub: argparse._SubParsersAction) -> None:
    from jobs.long_video import build_parser

    p = sub.add_parser("long-video", help="a long video into an output folder: streamed segments, "
                       "checkpoints, resume (also: ray job submit -- python -m jobs.long_video --spec ...)",
                       description="Generate a long video segment by segment into an output folder "
                                   "(segments/, checkpoint/, video.mp4, stats.json); resubmit the same spec "
                                   "to resume.")
    build_parser(p)


def _add_dataset(sub: argparse._SubParsersAction) -> None:
    from jobs.dataset import build_parser

    p = sub.add_parser("dataset", help="a manifest of prompts -> videos + a metadata table, on Ray Data "
                       "(also: ray job submit -- python -m jobs.dataset ...)",
                       description="Generate one video per manifest row (Parquet, JSONL or CSV) into an output "
                                   "folder with a metadata table; exactly once, resumable.")
    build_parser(p)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed-quality bench of every acceleration method on the procedural model "
                                     "(or a MAGI-1 model: --model magi-1-tiny)")
    p.add_argument("target", nargs="?", default="accel", choices=["accel", "cluster", "batch"],
                   help="accel: methods side by side; cluster: Ray vs in-process; batch: the dataset job's "
                        "videos/s at batch sizes 1, 2, 4")
    p.add_argument("--videos", type=int, default=8, help="bench batch: videos per batch size")
    p.add_argument("--accels", default="none,scope",
                   help="bench batch: accelerators to measure, comma-separated (default none,scope)")
    p.add_argument("--methods", default=",".join(ACCEL_METHODS),
                   help="comma-separated methods (any name in scope.config.METHOD_CONFIGS)")
    p.add_argument("--prompts", type=int, default=None,
                   help="number of held-out prompts (default 6: still, bouncing and straight-moving objects)")
    p.add_argument("--prompts-file", default=None,
                   help="captions to bench instead, one per line (blank lines and '#' comments skipped); "
                        "prompt i gets seed --seed + i; every caption is checked before any generation")
    p.add_argument("--frames", type=int, default=48, help="video frames per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", default="default", choices=["none", "default", "wide", "frontier"], help="threshold sweeps")
    p.add_argument("--json", default="bench.json", help="results (list of objects)")
    p.add_argument("--plot", default=None, help="speed-quality plot (png)")
    p.add_argument("--model", default=None, help="model (default: the embedded procedural model; a MAGI-1 model "
                                                 "such as magi-1-tiny runs its own chain with its family's defaults)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, the same for every method")
    p.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=2,
                   help="interleaved timing rounds per prompt (odd rounds run the cases in reverse, reference "
                        "last); each generation keeps its fastest wall-clock (--repeats: the old name)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the overhead-floor runs (each case once more with identity blocks, first prompt)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (model default if omitted)")
    p.add_argument("--ar-step", type=int, default=2,
                   help="asynchronous step offset between causal blocks; the bench's targets are set on the "
                        "asynchronous DF schedule (default 2; 0 = synchronous, the procedural model's default)")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="find the cheapest SCOPE configuration that keeps a target PSNR")
    p.add_argument("--model", default=None)
    p.add_argument("--target-psnr", type=float, default=31.0, help="mean PSNR over the prompts (dB)")
    p.add_argument("--target-min-psnr", type=float, default=29.0, help="minimum PSNR over the prompts (dB)")
    p.add_argument("--rounds", type=int, default=2, help="coordinate-descent rounds over the knobs")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--out", default="accel.json", help="config JSON for `scope generate --accel-config`")
    p.add_argument("--seed", type=int, default=0, help="seed of the first calibration prompt (+1 per prompt)")
    p.add_argument("--families", default=None,
                   help="base configurations to search, comma-separated: exact, stale-kv (block-causal "
                        "models); default all")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (model default if omitted)")
    p.add_argument("--ar-step", type=int, default=None,
                   help="asynchronous step offset to calibrate under (default: the model's; calibrate the "
                        "schedule you generate with)")
    p.add_argument("--report", default=None, help="also write every evaluated point here (JSON)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the small procedural model (diffusion forcing)")
    p.add_argument("--out", default="pipelines/procedural/weights")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def run_cluster_bench(args: argparse.Namespace) -> None:
    """`scope bench cluster`: one-replica Ray vs in-process, stage busy fractions with several
    micro-batches in flight, throughput per replica as replicas are added (one run)."""
    import os
    from pathlib import Path

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster.bench import bench_cluster

    report = bench_cluster()
    text = report.to_json()
    print(text)
    target = "bench_cluster.json" if args.json == "bench.json" else args.json
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scope", description="SCOPE-Video: fast long-video generation "
                                     "with autoregressive video diffusion (Cache / Predict / Recompute).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_long_video(sub)
    _add_dataset(sub)
    _add_bench(sub)
    _add_calibrate(sub)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            from jobs.generate import run_generate
            run_generate(args)
        elif args.command == "dataset":
            from jobs.dataset import run_cli as run_dataset_cli
            return run_dataset_cli(args)
        elif args.command == "long-video":
            from jobs.long_video import run_cli
            return run_cli(args)
        elif args.command == "bench" and args.target == "batch":
            from jobs.bench_batch import run_bench_batch
            run_bench_batch(args)
        elif args.command == "bench" and args.target == "cluster":
            run_cluster_bench(args)
        elif args.command == "bench":
            from jobs.bench import run_bench
            run_bench(args)
        elif args.command == "calibrate":
            from jobs.calibrate import run_calibrate
            run_calibrate(args)
        elif args.command == "train":
            from pipelines.procedural.train import run_train
            run_train(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        # bad input or a run that cannot go on: one clear line, no traceback, no secret
        if isinstance(err, RuntimeError) and type(err).__name__ != "RunFault":
            raise
        from jobs.storage import safe_message
        print(f"scope {args.command}: error: {safe_message(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
