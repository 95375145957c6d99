"""`scope generate`: prompt -> one video file (+ stats, + latents): a short video through the
same spec, plan and segment loop as the long-video job (`jobs/long_video.py`).

    scope generate --prompt "a red circle moves right" --frames 48 --out out/video.mp4
    scope generate --spec spec.yaml --out out/video.mp4      # the job spec; flags win over it
    scope generate --model SkyReels-V2-DF-14B-720P --prompt "..." --out out/v.mp4   # 121 frames, 720P

Without --frames / --duration-s (and no --spec) the length is the model's: 48 frames for the
procedural and tiny models, upstream's window for a SkyReels-V2 folder (97 frames at 540p, 121 at 720p).

The segments go to a private work folder; the outputs (video, `--stats`, `--latents`) are then
committed as a set: each is staged under a unique temporary name next to its target, and only
when all are staged are they moved into place. No checkpoints (use `scope long-video` for those).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from jobs import storage
from jobs.spec import JobSpec, SpecError, short

GENERATE_DEFAULTS = {"frames": 48, "out": "out/video.mp4"}


def _check_target(flag: str, target: str | None, spec: JobSpec) -> None:
    """An output's folder must be writable (local: created and probed; remote: a probe object
    within the storage timeout): fail before any weights load."""
    if target is None:
        return
    folder = target.rsplit("/", 1)[0] if "/" in target else "."
    try:
        storage.check_writable(folder, spec.storage_options, spec.storage_timeout_s, what=flag)
    except storage.StorageError as err:
        raise SpecError(str(err)) from None


def check_outputs(spec: JobSpec, stats: str | None, latents: str | None) -> None:
    if not spec.out.endswith(".mp4"):
        raise SpecError(f"--out must name an .mp4 file; got {short(spec.out)}")
    targets = [t for t in (spec.out, stats, latents) if t is not None]
    if len(set(targets)) != len(targets):
        raise SpecError(f"--out, --stats and --latents must be different files; got {targets}")
    for flag, target in (("--out", spec.out), ("--stats", stats), ("--latents", latents)):
        _check_target(flag, target, spec)


def generate(spec: JobSpec, stats_path: str | None = None, latents_path: str | None = None,
             progress: bool = True, accel_method: str | None = None) -> dict[str, Any]:
    """Plan and check (no weights yet), load, run the segment loop into a work folder, commit
    the outputs as a set. Returns the stats."""
    from jobs.outputs import VideoFolder
    from jobs.runner import Progress, VideoRun, dumps_stats, open_sampler, segments_with_frames, summary_stats
    from jobs.setup import check_memory, describe, load

    from jobs.long_video import check_one_video

    check_one_video(spec)
    plan = describe(spec)
    if accel_method not in (None, "none", plan.accel.method):
        raise SpecError(f"--accel {accel_method} disagrees with --accel-config {short(spec.accel)} "
                        f"(method {plan.accel.method!r}); drop one of them")
    check_memory(plan, keep_latents=latents_path is not None)
    check_outputs(spec, stats_path, latents_path)
    loaded = load(plan)
    if plan.accel_mismatch:
        print(f"scope generate: the accel config ({plan.accel_source}) was calibrated for another schedule "
              f"({'; '.join(plan.accel_mismatch)}): its speed and quality were not measured for this one",
              file=sys.stderr)
    kept: list[torch.Tensor] = []
    with tempfile.TemporaryDirectory(prefix="scope-generate-") as work:
        folder = VideoFolder(replace(spec, storage_options={}), plan.fps, out=work)
        with open_sampler(plan, loaded) as sampler:
            run = VideoRun(plan, loaded, sampler, folder, None,
                           progress=Progress(len(plan.segments), plan.frames, "generate", stream=sys.stderr,
                                             enabled=progress),
                           on_latents=(lambda first, new: kept.append(new.clone())) if latents_path else None)
            summary = run.run()
        video = os.path.join(work, "video.mp4")
        frames = folder.assemble(segments_with_frames(plan), target=video)
        stats = summary_stats(plan, summary, {"video_frames": frames, **loaded.extra})
        staged = [(video, spec.out)]
        stats_file = os.path.join(work, "stats.json")
        Path(stats_file).write_bytes(dumps_stats(stats))
        if stats_path:
            staged.append((stats_file, stats_path))
        if latents_path:
            staged.append((_save_latents(plan, kept, work), latents_path))
        commit_set(staged, spec)
    return stats


def _save_latents(plan: Any, parts: list[torch.Tensor], work: str) -> str:
    """The video's latents (procedural: one per frame, the reference and the rounding cut)."""
    from safetensors.torch import save_file

    latents = torch.cat(parts, dim=1)                 # the video latents [0, latent_frames)
    if plan.kind == "procedural":
        latents = latents[:, plan.skip:plan.skip + plan.frames]
    else:
        latents = latents[:, plan.skip:]              # a continuation's prefix is the input video's
    path = os.path.join(work, "latents.safetensors")
    save_file({"latents": latents.contiguous().float()}, path)
    return path


def commit_set(staged: list[tuple[str, str]], spec: JobSpec) -> None:
    """Move local files to their targets as a set: stage every one under a unique temporary name
    beside its target first, then move them all into place (a failure while staging leaves no
    target touched). Every remote step is bounded by `storage_timeout_s`."""
    options, timeout = spec.storage_options, spec.storage_timeout_s
    moves = []
    try:
        for local, target in staged:
            temp = _temporary_name(target)
            storage.put_file(local, temp, options, timeout)
            moves.append((temp, target))
    except BaseException:
        for temp, _ in moves:
            _discard(temp, spec)
        raise
    for temp, target in moves:
        storage.move(temp, target, options, timeout)


def _temporary_name(target: str) -> str:
    """A unique name in the target's folder (local: hidden), never shared by two runs."""
    if storage.is_remote(target):
        return f"{target}.partial-{uuid.uuid4().hex}"
    target = target.removeprefix("file://")
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f".{name}.partial-{uuid.uuid4().hex}")


def _discard(temp: str, spec: JobSpec) -> None:
    try:
        storage.remove(temp, spec.storage_options, spec.storage_timeout_s)
    except storage.StorageError:   # best effort: the temporary name never shadows a real output
        pass


def run_generate(args: argparse.Namespace) -> None:
    from jobs.long_video import spec_from_args

    if args.accel_config is not None:
        args.accel_method, args.accel = args.accel, args.accel_config
    else:
        args.accel_method = None
    defaults = dict(GENERATE_DEFAULTS)
    if args.spec is None and args.frames is None and args.duration_s is None:
        from jobs.setup import default_frames

        defaults["frames"] = default_frames(args.model, args.resolution)   # upstream's 97 / 121 for SkyReels-V2
    spec = spec_from_args(args, defaults)
    stats = generate(spec, args.stats, args.latents, progress=not args.no_progress,
                     accel_method=args.accel_method)
    print(f"wrote {spec.out}: {stats['frames']} frames in {stats['wall_s']:.1f} s, "
          f"accel {stats['accel_config']['method']}, "
          f"block evals {stats['block_evals']}/{stats['block_evals_full']} "
          f"({100 * stats['block_eval_fraction']:.0f}%), modes {stats['modes']}")
