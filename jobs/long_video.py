"""The long-video job: one spec -> a video of any length, streamed to an output folder.

    ray job submit --working-dir . -- python -m jobs.long_video --spec spec.yaml
    scope long-video --spec spec.yaml            # the same code path in one process

Segments are written under `out/segments/` as they finish, the AR state is checkpointed every
`checkpoint_every` segments; submitting the same spec again after the driver was killed resumes
from the last checkpoint and gives the same bytes as an uninterrupted run; another spec into the
same `out` is refused. The whole video is then `out/video.mp4` (segment files joined without
re-encoding) and `out/stats.json` (written last: the job is complete). See `jobs/outputs.py` for
the folder layout and `jobs/runner.py` for the loop.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from jobs import storage
from jobs.spec import JobSpec, SpecError

SPEC_FLAGS = {   # CLI flag -> (spec field, type); a flag given on the command line wins over the file
    "--prompt": ("prompt", str), "--negative-prompt": ("negative_prompt", str), "--frames": ("frames", int),
    "--duration-s": ("duration_s", float), "--seed": ("seed", int), "--model": ("model", str),
    "--context": ("context", str), "--accel": ("accel", str), "--steps": ("steps", int),
    "--shift": ("shift", float), "--guidance": ("guidance", float), "--ar-step": ("ar_step", int),
    "--causal-block-size": ("causal_block_size", int), "--base-frames": ("base_frames", int),
    "--overlap": ("overlap", int), "--fps": ("fps", int), "--out": ("out", str),
    "--checkpoint-every": ("checkpoint_every", int), "--backend": ("backend", str),
    "--stages": ("stages", int), "--replicas": ("replicas", int),
    "--storage-timeout-s": ("storage_timeout_s", float), "--device": ("device", str),
    "--image": ("image", str), "--video": ("video", str), "--resolution": ("resolution", str),
    "--addnoise-condition": ("addnoise_condition", int), "--decode": ("decode", str),
}


def add_spec_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """`--spec FILE` plus one flag per spec field (defaults None: the file or the spec decides)."""
    parser.add_argument("--spec", default=None, help="YAML job spec (local path or URL); flags override it")
    for flag, (name, kind) in SPEC_FLAGS.items():
        if flag not in skip:
            parser.add_argument(flag, dest=name, type=kind, default=None, help=f"spec field {name}")


def spec_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> JobSpec:
    """The spec from `--spec` and the flags (flags win), then `defaults` for fields neither gave."""
    overrides = {name: getattr(args, name, None) for name, _ in SPEC_FLAGS.values()}
    if args.spec is not None:
        return JobSpec.from_yaml(args.spec, overrides)
    values = {k: v for k, v in overrides.items() if v is not None}
    for key, value in (defaults or {}).items():
        if key in ("frames", "duration_s") and ("frames" in values or "duration_s" in values):
            continue
        values.setdefault(key, value)
    return JobSpec.from_mapping(values, where="flags")


def check_one_video(spec: JobSpec) -> None:
    """One video runs on one replica: its segments depend on each other."""
    if spec.replicas > 1:
        raise SpecError(f"spec field 'replicas': {spec.replicas}; one video's segments depend on each other, "
                        f"so more replicas cannot speed it up: use replicas: 1 (or the dataset job for many videos)")


def check_long_video(spec: JobSpec) -> None:
    check_one_video(spec)
    if spec.out.endswith(".mp4"):
        raise SpecError(f"spec field 'out': {spec.out!r} names a file; the long-video job writes a folder "
                        f"(segments/, checkpoint/, video.mp4, stats.json), e.g. out: runs/video-1")


def run_long_video(spec: JobSpec, progress: bool = True) -> dict[str, Any]:
    """Plan, check, claim the folder, load, run the loop, join, write stats. Returns the stats."""
    from jobs.outputs import VideoFolder
    from jobs.runner import Progress, VideoRun, open_sampler, segments_with_frames, summary_stats
    from jobs.setup import check_memory, describe, load
    from monitoring.publish import JobMetrics, attach_to_ray_job, plan_labels

    check_long_video(spec)
    plan = describe(spec)                                  # 1. every check that needs no weights
    check_memory(plan)
    storage.check_writable(spec.out, spec.storage_options, spec.storage_timeout_s, what="out")
    folder = VideoFolder(spec, plan.fps)
    resumed = folder.claim()                               # 2. this folder is this spec's
    if resumed:
        folder.sweep()                                     # temporaries of the killed driver's writes
    _say(f"long-video: {plan.frames} frames ({plan.frames / plan.fps:.0f} s at {plan.fps} fps) in "
         f"{len(plan.segments)} segments -> {spec.out}; backend {spec.backend}, driver pid {os.getpid()}"
         + (", resuming" if resumed else ""))
    if resumed and folder.is_complete():
        _say(f"long-video: {spec.out} is already complete (stats.json present); nothing to do")
        import json

        return json.loads(storage.read_bytes(folder.path("stats.json"), spec.storage_options,
                                             spec.storage_timeout_s))
    threads = _use_all_cores(spec)
    loaded = load(plan)                                    # 3. weights, text, decoder
    if plan.accel_mismatch:
        _say(f"long-video: the accel config ({plan.accel_source}) was calibrated for another schedule "
             f"({'; '.join(plan.accel_mismatch)})", err=True)
    metrics = JobMetrics("long_video")
    attach_to_ray_job()                                    # under `ray job submit`: export through Ray's agent
    with open_sampler(plan, loaded) as sampler:            # 4. the loop
        metrics.worker_started(gpus=_gpus_in_use(plan, sampler))
        metrics.progress(0, len(plan.segments))
        metrics.in_flight(1)
        run = VideoRun(plan, loaded, sampler, folder, folder, checkpoint_every=spec.checkpoint_every,
                       progress=Progress(len(plan.segments), plan.frames, "long-video", enabled=progress),
                       on_segment=metrics.segment_observer(plan, accel=getattr(sampler, "accel", None),
                                                           job_progress=True))
        summary = run.run()
    frames = folder.assemble(segments_with_frames(plan))   # 5. the whole video, then stats (last)
    stats = summary_stats(plan, summary, {"video_frames": frames, "out": spec.out, "torch_threads": threads,
                                          **loaded.extra,
                                          "segments_written_this_run": summary.state.written_segments})
    folder.write_stats(stats)
    metrics.video_done(model=plan_labels(plan)[0])
    metrics.in_flight(0)
    _say(f"long-video: wrote {folder.path('video.mp4')}: {frames} frames, {summary.wall_s:.1f} s this run, "
         f"block evals {stats['block_evals']}/{stats['block_evals_full']}")
    return stats


def _gpus_in_use(plan: Any, sampler: Any) -> float:
    """GPUs this video runs on: the Ray replica's stages, or the driver's own device."""
    config = getattr(sampler, "config", None)              # RaySegmentSampler
    if config is not None:
        return config.workers * config.gpus_per_worker
    return 1.0 if plan.device.startswith("cuda") else 0.0


def _use_all_cores(spec: JobSpec) -> int:
    """A job driver started by `ray job submit` inherits OMP_NUM_THREADS=1 (Ray keeps drivers from
    oversubscribing a node); with the local backend the driver IS the compute, so it takes the
    cores it may run on. Measured: one thread made the 4800-frame job ~2x slower on 2 cores."""
    import torch

    if spec.backend == "local":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    return torch.get_num_threads()


def _say(line: str, err: bool = False) -> None:
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m jobs.long_video",
        description="Generate a long video segment by segment into an output folder, with checkpoints "
                    "(resubmit the same spec to resume).")
    add_spec_flags(parser)
    parser.add_argument("--no-progress", action="store_true", help="no per-segment progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args)


def run_cli(args: argparse.Namespace) -> int:
    from jobs.runner import RunFault

    try:
        spec = spec_from_args(args)
        run_long_video(spec, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError, RunFault) as err:
        message = storage.safe_message(err)
        print(f"long-video: error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
