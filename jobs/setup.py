"""From a `JobSpec` to what the segment loop needs, in two phases:

1. `describe(spec) -> VideoPlan`: cheap (reads the model folder's JSON files only): the schedule,
   the video's length in frames and latents, the segments, the latent geometry, the decoder
   kind, the accelerator config. Everything a bad spec can get wrong fails here, before any
   weights load or worker starts (`check_memory` too).
2. `load(plan) -> LoadedVideo`: the transformer, the text embeddings (checked finite), the clean
   reference prefix, the frame decoder.

Models: None = the embedded procedural model (pipelines/procedural/weights); "tiny" = a tiny
SkyReels-V2 DF transformer with seeded random weights (plumbing demo, latent preview); a folder
(local or fsspec URL): a procedural bundle when it has `pipeline.json`, else an official
SkyReels-V2 DF checkpoint, which needs `context` (precomputed umT5 embeddings) until the text
encoder and VAE land; its video is then a latent preview.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.spec import JobSpec, SpecError, short
from pipelines.skyreels_v2.pipeline import ScheduleArgs, SegmentPlan, plan_segments

# Wan VAE: 4x temporal (the first latent is one frame), 8x spatial compression
WAN_TEMPORAL, WAN_SPATIAL = 4, 8
SKYREELS_540P_LATENT = (68, 120)
TINY_LATENT = (8, 8)


# ------------------------------------------------------------------------------------ decoding

@dataclass
class FrameDecoder:
    """Latents -> uint8 frames, segment by segment, so no whole-video buffer is ever needed.

    Video latent `l` (after `skip` reference latents that are not part of the video) covers
    frames [m, m + 1) with m = l - skip when `temporal` is 1, and, as Wan's causal VAE, frame 0
    for m = 0 and frames [4m - 3, 4m + 1) after it when `temporal` is 4. Frames at or past
    `frames` (the rounding of the last causal block) are cropped.
    """

    decode_latents: Callable[[torch.Tensor, bool], np.ndarray]   # (latents [C, n, h, w], starts the
    frames: int                                                   #  video) -> uint8 [T, H, W, 3]
    skip: int = 0
    temporal: int = 1
    kind: str = "procedural codec"

    def first_frame(self, latent: int) -> int:
        """First frame of video latent `latent` (uncropped)."""
        if self.temporal == 1 or latent == 0:
            return latent
        return self.temporal * latent - (self.temporal - 1)

    def frame_range(self, start: int, end: int) -> tuple[int, int]:
        """Frames [f0, f1) of video latents [start, end) (latent indices count the reference)."""
        first, last = max(start, self.skip) - self.skip, max(end, self.skip) - self.skip
        if last <= first:
            return min(self.first_frame(first), self.frames), min(self.first_frame(first), self.frames)
        return min(self.first_frame(first), self.frames), min(self.first_frame(last), self.frames)

    def decode(self, latents: torch.Tensor, start: int) -> np.ndarray | None:
        """Frames of the latents [start, start + n) (`latents` [C, n, h, w]); None when they hold
        no video frame (the reference prefix, or the rounding past the end)."""
        f0, f1 = self.frame_range(start, start + latents.shape[1])
        if f1 <= f0:
            return None
        first = max(start, self.skip) - self.skip
        frames = self.decode_latents(latents[:, max(self.skip - start, 0):], first == 0)
        offset = self.first_frame(first)
        return frames[f0 - offset:f1 - offset]


def latent_preview(latents: torch.Tensor, first_is_single: bool) -> np.ndarray:
    """A viewable stand-in for a VAE decode: 3 latent channels -> RGB through a fixed sigmoid
    (no whole-video statistics: segments decode alike), 4x in time, 8x in space. The video's
    first latent gives one frame, as Wan's causal VAE does."""
    rgb = torch.sigmoid(latents[:3].detach().cpu().float() * 0.5)  # [3, n, h, w]
    repeats = torch.full((rgb.shape[1],), WAN_TEMPORAL, dtype=torch.long)
    if first_is_single:
        repeats[0] = 1
    rgb = rgb.repeat_interleave(repeats, dim=1)
    rgb = rgb.repeat_interleave(WAN_SPATIAL, 2).repeat_interleave(WAN_SPATIAL, 3)
    return (rgb.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------ the plan

@dataclass
class VideoPlan:
    """Everything decided from the spec and the model folder's JSON, before any weights load."""

    spec: JobSpec
    kind: str                          # "procedural" | "tiny" | "checkpoint"
    source: str                        # what a worker loads: a folder / URL or a named size
    args: ScheduleArgs
    frames: int                        # video frames
    fps: int
    channels: int
    latent_size: tuple[int, int]
    latent_frames: int                 # latents sampled (reference prefix included)
    skip: int                          # leading reference latents, not part of the video
    temporal: int                      # video frames per latent (1, or 4 for Wan)
    segments: list[SegmentPlan]
    accel: Any                         # the resolved AccelConfig
    accel_source: str
    accel_mismatch: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"                # where this process runs the model (`resolve_device`)

    @property
    def overlap(self) -> int:
        return self.args.overlap_frames or 0

    def new_latents_of(self, segment: SegmentPlan) -> tuple[int, int]:
        """Video latents [start, end) a segment adds (the overlap with the previous one excluded)."""
        first = segment.start + (0 if segment.index == 0 else self.overlap)
        return first, segment.start + segment.num_frames


def describe(spec: JobSpec) -> VideoPlan:
    """The plan of a spec; raises SpecError (one line) on anything that cannot run."""
    kind, source, defaults, model_config = _describe_model(spec)
    if kind == "procedural":
        from pipelines.procedural.bundle import schedule_from_defaults

        args = _schedule(lambda **o: schedule_from_defaults(defaults, **o), spec)
        fps = spec.fps or int(defaults.get("fps", 8))
        channels = int(defaults.get("latent_channels", model_config.get("in_dim", 16)))
        patch = 4
        latent_size = (int(defaults.get("height", 64)) // patch, int(defaults.get("width", 64)) // patch)
        frames = spec.frame_count(fps)
        skip = args.causal_block_size if defaults.get("reference_block", False) else 0
        latent_frames = skip + math.ceil(frames / args.causal_block_size) * args.causal_block_size
        temporal = 1
    else:
        fps = spec.fps or 24
        frames = spec.frame_count(fps)
        cbs = spec.causal_block_size or (2 if kind == "tiny" else 1)
        latent_frames = math.ceil((math.ceil((frames - 1) / WAN_TEMPORAL) + 1) / cbs) * cbs   # covers every frame
        base = spec.base_frames or min(latent_frames, 8 if kind == "tiny" else 25)
        overlap = spec.overlap if spec.overlap is not None else min(2 * cbs, base - cbs)
        args = _schedule(ScheduleArgs, spec, defaults={
            "num_steps": 8 if kind == "tiny" else 30, "shift": 8.0, "guidance_scale": 6.0, "ar_step": 2,
            "causal_block_size": cbs, "base_num_frames": base,
            "overlap_frames": overlap if latent_frames > base else None, "fps": fps})
        channels = int(model_config.get("in_dim", 16))
        latent_size = TINY_LATENT if kind == "tiny" else SKYREELS_540P_LATENT
        skip, temporal = 0, WAN_TEMPORAL
    _check_block_multiples(args)
    segments = plan_segments(latent_frames, args.base_num_frames, args.overlap_frames)
    accel, accel_source, mismatch = resolve_accel(spec, args, frames, source if kind == "procedural" else None)
    return VideoPlan(spec, kind, source, args, frames, fps, channels, latent_size, latent_frames, skip,
                     temporal, segments, accel, accel_source, mismatch, defaults, resolve_device(spec))


class DeviceError(SpecError):
    """The device asked for is not on this machine (a job-level fault, never a row's)."""


def resolve_device(spec: JobSpec) -> str:
    """The spec's device for this process: auto = the first CUDA GPU when one is visible. On the
    Ray backend the driver keeps the CPU (the stages hold the model and take the GPUs)."""
    if spec.backend == "ray":
        return "cpu"
    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.device.startswith("cuda"):
        index = int(spec.device[5:] or 0) if ":" in spec.device else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise DeviceError(f"spec field 'device': {spec.device!r} but this machine shows "
                            f"{torch.cuda.device_count()} CUDA GPU(s); use device: auto or cpu")
    return spec.device


def _check_block_multiples(args: ScheduleArgs) -> None:
    """Windows and overlaps must be whole causal blocks: otherwise trailing latents of a window
    are never denoised (noise in the video) or a later segment has nothing left to generate."""
    cbs = args.causal_block_size
    for name, value in (("base_frames", args.base_num_frames), ("overlap", args.overlap_frames)):
        if value is not None and value % cbs:
            raise SpecError(f"spec field {name!r}: {value} latent frames is not a multiple of "
                            f"causal_block_size {cbs}; use {max(cbs, value - value % cbs)} or "
                            f"{value - value % cbs + cbs}")


def _schedule(build: Callable[..., ScheduleArgs], spec: JobSpec, defaults: dict[str, Any] | None = None
              ) -> ScheduleArgs:
    """ScheduleArgs from the spec's overrides; its own checks become spec errors."""
    overrides = {"num_steps": spec.steps, "shift": spec.shift, "guidance_scale": spec.guidance,
                 "ar_step": spec.ar_step, "causal_block_size": spec.causal_block_size,
                 "base_num_frames": spec.base_frames, "overlap_frames": spec.overlap}
    values = dict(defaults or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return build(**values)
    except ValueError as err:
        raise SpecError(f"spec schedule: {err}") from None


def _describe_model(spec: JobSpec) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(kind, source, pipeline defaults, transformer config) from JSON files only."""
    if spec.model == "tiny":
        from dataclasses import asdict

        from pipelines.skyreels_v2.sizes import config_for

        return "tiny", "tiny", {}, asdict(config_for("tiny"))
    if spec.model is None:
        from pipelines.procedural.bundle import WEIGHTS_DIR

        folder = str(WEIGHTS_DIR)
    else:
        folder = spec.model.rstrip("/")
    pipeline = _read_json(folder, "pipeline.json", required=False)
    config = _read_json(folder, "config.json", required=True)
    if pipeline is not None:
        if "://" in folder and not folder.startswith("file://"):
            raise SpecError(f"spec field 'model': {short(folder)} is a procedural bundle on remote storage; "
                            f"copy it to a local folder first")
        return "procedural", folder, pipeline, config
    if spec.context is None:
        raise SpecError(f"spec field 'context': the checkpoint {short(folder)} needs precomputed umT5 "
                        f"embeddings (context: embeddings.safetensors with 'context' [L, text_dim]); the "
                        f"umT5 encoder is not built in yet")
    return "checkpoint", folder, {}, config


def _read_json(folder: str, name: str, required: bool) -> dict[str, Any] | None:
    import fsspec

    url = f"{folder}/{name}"
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            if not required:
                return None
            raise SpecError(f"spec field 'model': {short(folder)} has no {name}; give a folder with "
                            f"config.json + *.safetensors, 'tiny', or omit model for the embedded one")
        text = fs.cat_file(path).decode("utf-8", errors="replace")
    except SpecError:
        raise
    except Exception as err:   # storage faults: one line, never a traceback
        raise SpecError(f"spec field 'model': cannot read {short(url)} ({type(err).__name__}: "
                        f"{short(str(err), 80)})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"{url}: not valid JSON ({err.msg} at line {err.lineno}); fix or re-export it") from None
    if not isinstance(value, dict):
        raise SpecError(f"{url}: must hold a JSON object, got {type(value).__name__}; fix or re-export it")
    return value


# ------------------------------------------------------------------------------------ accel

def resolve_accel(spec: JobSpec, args: ScheduleArgs, frames: int, model_folder: str | None
                  ) -> tuple[Any, str, list[str]]:
    """(config, where it came from, how its calibration schedule differs from this run's):
    1. `accel` names an accel.json (path or URL): that file;
    2. else, for a procedural model, the calibrated config its weights folder ships for the
       method (`weights/accel/<method>.json`, the closest calibration schedule);
    3. else the method's defaults, plus exact selective computation on a block-causal model
       (outputs stay equal to full compute).
    MagCache takes the schedule's step count (its ratio table is resampled to it)."""
    from pipelines.wan.calibration import accel_defaults   # every model here is Wan-based
    from scope.config import AccelConfig, make_config

    schedule = schedule_dict(args, frames)
    try:
        if spec.accel.endswith(".json"):
            config, source = AccelConfig.from_dict(_read_accel_file(spec)), spec.accel
        else:
            config, source = _shipped_config(spec.accel, model_folder, schedule), "shipped"
            if config is None:
                causal = args.causal_attention and spec.accel != "none"
                extra = {"selective": "exact", "kv_cache_finished": True} if causal else {}
                config, source = make_config(spec.accel, **{**accel_defaults(spec.accel), **extra}), "defaults"
        if config.method == "magcache":
            config = config.replace(num_steps=args.num_steps)
    except SpecError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise SpecError(f"spec field 'accel' ({short(spec.accel)}): {short(str(err), 300)}") from None
    if source == "shipped":
        source = "shipped with the model (pipelines/procedural/weights/accel)"
    return config, source, config.schedule_mismatch(schedule)


def _read_accel_file(spec: JobSpec) -> dict[str, Any]:
    if "://" in spec.accel and not spec.accel.startswith("file://"):
        from jobs.storage import StorageError, read_bytes

        try:
            data = read_bytes(spec.accel, spec.storage_options, spec.storage_timeout_s)
        except StorageError as err:
            raise SpecError(f"spec field 'accel': {err}") from None
        if data is None:
            raise SpecError(f"spec field 'accel': {short(spec.accel)}: no such object")
        text = data.decode("utf-8", errors="replace")
    else:
        path = Path(spec.accel.removeprefix("file://"))
        if not path.is_file():
            raise SpecError(f"spec field 'accel': {short(spec.accel)}: no such file (write one with "
                            f"`scope calibrate --out accel.json`, or name a method: scope, teacache, ...)")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"spec field 'accel': {short(spec.accel)} is not valid JSON ({err.msg}, line "
                        f"{err.lineno})") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec field 'accel': {short(spec.accel)} must hold a JSON object with 'method'")
    return data


def _shipped_config(method: str, folder: str | None, schedule: dict[str, Any]) -> Any:
    if method == "none" or folder is None:
        return None
    from pipelines.procedural.bundle import default_accel_config

    return default_accel_config(method, folder, schedule)


def schedule_dict(args: ScheduleArgs, frames: int) -> dict[str, Any]:
    return {"num_steps": args.num_steps, "shift": float(args.shift), "ar_step": args.ar_step,
            "guidance_scale": float(args.guidance_scale), "causal_block_size": args.causal_block_size,
            "base_num_frames": args.base_num_frames, "overlap_frames": args.overlap_frames, "frames": frames}


# ------------------------------------------------------------------------------------ memory

def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (the kernel's estimate of what can still be allocated)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def segment_bytes(plan: VideoPlan) -> int:
    """What one segment holds in memory at most: its latents, noise and one solver state per
    frame (~6 copies), the model window's activations (~16 copies of the tokens at the model
    width is generous for a block), and its decoded frames."""
    h, w = plan.latent_size
    window = max(s.num_frames for s in plan.segments)
    latent = plan.channels * window * h * w * 4
    frames_per_latent = plan.temporal
    pixels = window * frames_per_latent * h * w * (WAN_SPATIAL if plan.temporal > 1 else 4) ** 2 * 3
    return 6 * latent + 16 * latent * 8 + pixels


def check_memory(plan: VideoPlan, keep_latents: bool = False) -> None:
    """Fail before loading when a segment (or, with `keep_latents`, the whole video's latents,
    which `scope generate --latents` returns) cannot fit in the memory this machine has."""
    available = available_memory_bytes()
    need = segment_bytes(plan)
    if keep_latents:
        h, w = plan.latent_size
        need += plan.channels * plan.latent_frames * h * w * 4
    if need > available:
        what = "the whole video's latents (--latents)" if keep_latents else "one segment"
        raise SpecError(f"spec: {what} needs about {need / 2**30:.1f} GiB, this machine has "
                        f"{available / 2**30:.1f} GiB available; "
                        + ("drop --latents or make a shorter video" if keep_latents
                           else "lower base_frames (latent frames per segment)"))


# ------------------------------------------------------------------------------------ loading

@dataclass
class LoadedVideo:
    """The heavy half: weights, text embeddings, reference prefix, decoder."""

    model: torch.nn.Module | None      # None on the driver of a Ray-backend checkpoint run
    context: torch.Tensor              # [1, L, text_dim]
    negative: torch.Tensor             # [1, L, text_dim]
    reference: torch.Tensor | None     # [C, skip, h, w] clean latents that start the video
    decoder: FrameDecoder
    extra: dict[str, Any] = field(default_factory=dict)


def load(plan: VideoPlan, models: dict[str, Any] | None = None) -> LoadedVideo:
    """The heavy half of a plan. `models` (source -> loaded weights) lets a worker that makes
    many videos load each model once; the text, prefix and decoder are per video."""
    if plan.kind == "procedural":
        return _load_procedural(plan, models if models is not None else {})
    return _load_skyreels(plan, models if models is not None else {})


def _load_procedural(plan: VideoPlan, models: dict[str, Any]) -> LoadedVideo:
    from pipelines.procedural.bundle import check_prompt, load_bundle

    key = f"{plan.source}@{plan.device}"
    if key not in models:
        models[key] = load_bundle(plan.source)
        models[key].transformer.to(plan.device)
    bundle = models[key]
    spec = plan.spec
    check_prompt(bundle, spec.prompt)
    if spec.negative_prompt:
        check_prompt(bundle, spec.negative_prompt)
    with torch.no_grad():
        context = bundle.text_encoder([spec.prompt]).to(plan.device)
        negative = bundle.text_encoder([spec.negative_prompt]).to(plan.device)
    reference = bundle.reference_latents(plan.args.causal_block_size)
    reference = None if reference is None else reference.to(plan.device)
    decoder = FrameDecoder(lambda latents, _: bundle.codec.decode(latents), plan.frames, skip=plan.skip, temporal=1)
    return LoadedVideo(bundle.transformer, context, negative, reference, decoder,
                       {"decode": "procedural codec"})


def _load_skyreels(plan: VideoPlan, models: dict[str, Any]) -> LoadedVideo:
    from pipelines.skyreels_v2.checkpoint import load_transformer
    from pipelines.skyreels_v2.model import WanDFTransformer
    from pipelines.skyreels_v2.sizes import config_for

    spec = plan.spec
    if spec.backend == "ray" and plan.kind == "checkpoint":
        # the stages hold the weights: the driver needs only the config (a 14B model would
        # otherwise sit in the driver's memory for nothing)
        from pipelines.skyreels_v2.parallelize import checkpoint_config

        model, config = None, checkpoint_config(plan.source)
    else:
        key = f"{plan.source}@{plan.device}"
        if key not in models:
            if plan.kind == "tiny":
                torch.manual_seed(0)   # seeded random weights: the same "model" every run
                models[key] = WanDFTransformer(config_for("tiny")).eval().to(plan.device)
            else:
                models[key] = load_transformer(plan.source, device=plan.device).eval()
        model = models[key]
        config = model.config
    context, negative = _load_context(spec, config.text_len, config.text_dim)
    context, negative = context.to(plan.device), negative.to(plan.device)
    decoder = FrameDecoder(latent_preview, plan.frames, skip=0,
                           temporal=WAN_TEMPORAL, kind="latent preview (no VAE yet)")
    return LoadedVideo(model, context, negative, None, decoder, {"decode": "latent preview (no VAE yet)"})


def _load_context(spec: JobSpec, text_len: int, text_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings for a checkpoint without a built-in text encoder (checked finite)."""
    if spec.context is None:
        # tiny random model: a deterministic embedding of the prompt text
        digest = int.from_bytes(__import__("hashlib").sha256(spec.prompt.encode()).digest()[:8], "little")
        context = torch.randn(1, text_len, text_dim, generator=torch.Generator().manual_seed(digest % 2**63))
        return context, torch.zeros_like(context)
    tensors = _read_context_file(spec)
    if "context" not in tensors:
        raise SpecError(f"spec field 'context': {short(spec.context)} has no tensor 'context' "
                        f"(found {sorted(tensors)[:8]})")
    context = tensors["context"].float()
    context = context[None] if context.dim() == 2 else context
    if context.dim() != 3 or context.shape[-1] != text_dim:
        raise SpecError(f"spec field 'context': shape {tuple(context.shape)}, the model expects "
                        f"[L, {text_dim}]")
    negative = tensors.get("negative_context", torch.zeros_like(context)).float()
    negative = negative[None] if negative.dim() == 2 else negative
    for name, tensor in (("context", context), ("negative_context", negative)):
        if not torch.isfinite(tensor).all():
            raise SpecError(f"spec field 'context': tensor {name!r} in {short(spec.context)} holds NaN or "
                            f"inf values; recompute the embeddings")
    return context, negative


def _read_context_file(spec: JobSpec) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_bytes

    if "://" in spec.context and not spec.context.startswith("file://"):
        from jobs.storage import StorageError, read_bytes

        try:
            data = read_bytes(spec.context, spec.storage_options, spec.storage_timeout_s)
        except StorageError as err:
            raise SpecError(f"spec field 'context': {err}") from None
    else:
        path = Path(spec.context.removeprefix("file://"))
        data = path.read_bytes() if path.is_file() else None
    if data is None:
        raise SpecError(f"spec field 'context': {short(spec.context)}: no such file (a safetensors file "
                        f"with 'context' [L, text_dim] and optionally 'negative_context')")
    try:
        return load_bytes(data)
    except Exception as err:   # safetensors raises its own error types
        raise SpecError(f"spec field 'context': {short(spec.context)} is not a readable safetensors file "
                        f"({short(str(err), 80)})") from None

