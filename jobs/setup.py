"""From a `JobSpec` to what the segment loop needs, in two phases:

1. `describe(spec) -> VideoPlan`: cheap (reads the model folder's JSON files and checks that the
   other files exist): the schedule, the video's length in frames and latents, the segments, the
   latent geometry, the decoder kind, the accelerator config. Everything a bad spec can get wrong
   fails here, before any weights load or worker starts (`check_memory` too).
2. `load(plan) -> LoadedVideo`: the text embeddings (checked finite), the transformer, the clean
   reference prefix, the frame decoder.

Models: None = the embedded procedural model (pipelines/procedural/weights); "tiny" = the tiny
SkyReels-V2 chain with seeded random weights (transformer, umT5 with a hashing tokenizer, Wan VAE:
the plumbing demo); "magi-1-tiny" = the tiny MAGI-1 chain likewise; a folder (local or fsspec URL):
a procedural bundle when it has `pipeline.json`, a MAGI-1 model when it is or holds an
`inference_weight*` folder, else an official SkyReels-V2 DF folder: `config.json` + safetensors,
`Wan2.1_VAE.pth`, and (unless `context` gives precomputed embeddings) `models_t5_umt5-xxl-enc-bf16.pth`
+ `google/umt5-xxl/`. `pipelines.families.detect` says which family a model is; each family's facts
(resolutions, defaults, file names, the parts' builders, accelerator defaults) come from its table,
`pipelines/<family>/family.py`. MAGI-1's plan, parts and walk-as-segments backend are `jobs/magi.py`.

SkyReels-V2 chain in `load`: prompt -> umT5 (then the encoder is freed, unless the caller keeps a
`models` cache for many videos) -> transformer -> per video one `VAEStreamDecoder` fed each
segment's new latents once, in order (`FrameDecoder`). Image-to-video / continuation: the image
(1 latent) or the video's last frames (`overlap` latents) are VAE-encoded into segment 0's prefix.
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

from jobs.media import check_media
from jobs.spec import JobSpec, SpecError, short
from pipelines.skyreels_v2 import family as sky
from pipelines.skyreels_v2.pipeline import ScheduleArgs, SegmentPlan, plan_segments


# ------------------------------------------------------------------------------------ decoding

@dataclass
class FrameDecoder:
    """Latents -> uint8 frames, segment by segment, so no whole-video buffer is ever needed.

    Latents are indexed along the sampled sequence, the `skip` leading reference latents included.
    Latent `l` covers stream frames [first_frame(l), first_frame(l + 1)): frame l when `temporal`
    is 1; for Wan's causal VAE (`temporal` 4) frame 0 for l = 0 and [4l - 3, 4l + 1) after it. The
    video is the stream from first_frame(skip) on, cropped at `frames` (the rounding of the last
    causal block).

    `decode_latents(latents [C, n, h, w], starts_stream) -> uint8 [T, H, W, 3]` gives the frames
    of those latents. A stateless one (`history` 0: the procedural codec, the latent preview) sees
    only video latents. A causal one (`history` W > 0: the Wan VAE stream) is fed every latent once,
    in order, reference latents included (they warm its causal cache; their frames are dropped);
    `starts_stream` resets it. A resumed run warms a fresh stream on the last W latents before the
    resume point (`resume`, with `history_after` kept in the checkpoint): the decoder's receptive
    field is < W latents, so the frames equal the uninterrupted run's.
    """

    decode_latents: Callable[[torch.Tensor, bool], np.ndarray]
    frames: int
    skip: int = 0
    temporal: int = 1
    kind: str = "procedural codec"
    history: int = 0
    causal: bool = True        # Wan: latent 0 is frame 0 alone; False (MAGI-1): latent l is [4l, 4l + 4)
    _next: int | None = field(default=None, repr=False)   # the latent a causal stream expects next

    def first_frame(self, latent: int) -> int:
        """First stream frame of latent `latent` (uncropped, reference latents counted)."""
        if self.temporal == 1 or latent == 0:
            return latent
        if not self.causal:
            return self.temporal * latent
        return self.temporal * latent - (self.temporal - 1)

    def frame_range(self, start: int, end: int) -> tuple[int, int]:
        """Video frames [f0, f1) of latents [start, end) (latent indices count the reference)."""
        base = self.first_frame(self.skip)
        f0 = self.first_frame(max(start, self.skip)) - base
        f1 = self.first_frame(max(end, self.skip)) - base
        return min(f0, self.frames), min(max(f1, f0), self.frames)

    def decode(self, latents: torch.Tensor, start: int) -> np.ndarray | None:
        """Frames of the latents [start, start + n) (`latents` [C, n, h, w]); None when they hold
        no video frame (the reference prefix, or the rounding past the end)."""
        f0, f1 = self.frame_range(start, start + latents.shape[1])
        if self.history:
            if start != 0 and start != self._next:
                raise RuntimeError(f"the causal decoder expects latent {self._next}, got {start}: a stream "
                                   f"is fed in order, once (resume it with FrameDecoder.resume)")
            frames = self.decode_latents(latents, start == 0)
            self._next, offset = start + latents.shape[1], self.first_frame(start)
        else:
            if f1 <= f0:
                return None
            begin = max(start, self.skip)
            frames = self.decode_latents(latents[:, begin - start:], begin == 0)
            offset = self.first_frame(begin)
        if f1 <= f0:
            return None
        shift = self.first_frame(self.skip) - offset       # stream frame of video frame 0, in `frames`
        return frames[f0 + shift:f1 + shift]

    def history_after(self, previous: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor | None:
        """The last `history` latents of the stream once `new` [C, n, h, w] follows `previous`
        (None for a stateless decoder): what a checkpoint keeps to resume the stream."""
        if not self.history:
            return None
        joined = new if previous is None else torch.cat([previous.to(new.device, new.dtype), new], dim=1)
        return joined[:, -self.history:].detach().clone()

    def resume(self, history: torch.Tensor | None, next_latent: int) -> None:
        """Continue the stream at latent `next_latent`: a causal decoder is reset and warmed on
        `history` (the latents just before it; their frames are dropped)."""
        if not self.history:
            return
        self._next = next_latent
        if next_latent == 0:
            return
        if history is None or history.shape[1] < min(self.history, next_latent):
            have = 0 if history is None else history.shape[1]
            raise ValueError(f"the checkpoint keeps {have} decoder history latent(s), {self.kind} needs "
                             f"{min(self.history, next_latent)} to resume at latent {next_latent}; start over "
                             f"in a new out folder")
        self.decode_latents(history, True)


def latent_preview(latents: torch.Tensor, first_is_single: bool) -> np.ndarray:
    """A viewable stand-in for a VAE decode: 3 latent channels -> RGB through a fixed sigmoid
    (no whole-video statistics: segments decode alike), 4x in time, 8x in space. The video's
    first latent gives one frame, as Wan's causal VAE does."""
    rgb = torch.sigmoid(latents[:3].detach().cpu().float() * 0.5)  # [3, n, h, w]
    repeats = torch.full((rgb.shape[1],), sky.VAE_TEMPORAL, dtype=torch.long)
    if first_is_single:
        repeats[0] = 1
    rgb = rgb.repeat_interleave(repeats, dim=1)
    rgb = rgb.repeat_interleave(sky.VAE_SPATIAL, 2).repeat_interleave(sky.VAE_SPATIAL, 3)
    return (rgb.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()


class VAEFrames:
    """`FrameDecoder.decode_latents` of the Wan VAE: one `VAEStreamDecoder` per video; pixels in
    [-1, 1] -> uint8 as upstream ((x / 2 + 0.5) clamped, x 255, truncated)."""

    def __init__(self, vae: torch.nn.Module):
        from pipelines.wan.vae import VAEStreamDecoder

        self.stream = VAEStreamDecoder(vae)

    def __call__(self, latents: torch.Tensor, starts_stream: bool) -> np.ndarray:
        if starts_stream:
            self.stream.reset()
        video = self.stream.decode_next(latents[None])[0]                 # [3, T, H, W] in [-1, 1]
        pixels = ((video / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)   # truncation, as upstream
        return pixels.permute(1, 2, 3, 0).cpu().numpy()


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
    resolution: str = ""               # frame size "WxH" (SkyReels-V2: also the named one, in `defaults`)
    reference_latents: int = 0         # clean latents segment 0 starts from (reference block, image, video)
    decode: str = "procedural codec"   # "wan vae" | "magi vae" | "latent preview" | "procedural codec"
    family: str = "skyreels-v2"        # the model family (`pipelines.families`): whose table and backend
    vae_causal: bool = True            # frames per latent as Wan's causal VAE (False: MAGI-1, 4 each)

    @property
    def overlap(self) -> int:
        return self.args.overlap_frames or 0

    def new_latents_of(self, segment: SegmentPlan) -> tuple[int, int]:
        """Video latents [start, end) a segment adds (the overlap with the previous one excluded)."""
        first = segment.start + (0 if segment.index == 0 else self.overlap)
        return first, segment.start + segment.num_frames


def describe(spec: JobSpec) -> VideoPlan:
    """The plan of a spec; raises SpecError (one line) on anything that cannot run."""
    ref = _detect(spec.model)
    if ref.family == "magi-1":
        from jobs.magi import describe_magi

        return describe_magi(spec, ref)
    kind, source, defaults, model_config = _describe_model(spec)
    if kind == "procedural":
        from pipelines.procedural.bundle import schedule_from_defaults

        _refuse_skyreels_fields(spec)
        args = _schedule(lambda **o: schedule_from_defaults(defaults, **o), spec)
        fps = spec.fps or int(defaults.get("fps", 8))
        channels = int(defaults.get("latent_channels", model_config.get("in_dim", 16)))
        patch = 4
        height, width = int(defaults.get("height", 64)), int(defaults.get("width", 64))
        latent_size = (height // patch, width // patch)
        frames = spec.frame_count(fps)
        skip = args.causal_block_size if defaults.get("reference_block", False) else 0
        latent_frames = skip + math.ceil(frames / args.causal_block_size) * args.causal_block_size
        temporal, reference, decode, frame_size = 1, skip, "procedural codec", f"{width}x{height}"
    else:
        args, fps, frames, latent_frames, skip, reference, resolution = _describe_skyreels(
            spec, kind, source, defaults, model_config)
        channels = int(model_config.get("in_dim", sky.LATENT_CHANNELS))
        latent_size, frame_size = resolution.latent_size, resolution.size_text
        temporal, decode = sky.VAE_TEMPORAL, ("wan vae" if spec.decode == "vae" else "latent preview")
    _check_block_multiples(args)
    segments = plan_segments(latent_frames, args.base_num_frames, args.overlap_frames)
    accel, accel_source, mismatch = resolve_accel(spec, args, frames, source if kind == "procedural" else None,
                                                  family="skyreels-v2", size=defaults.get("size"))
    return VideoPlan(spec, kind, source, args, frames, fps, channels, latent_size, latent_frames, skip,
                     temporal, segments, accel, accel_source, mismatch, defaults, resolve_device(spec),
                     frame_size, reference, decode)


def _detect(model: str | None) -> Any:
    """The model's family and kind (`pipelines.families.detect`); an unknown name is a spec error."""
    from pipelines.families import detect

    try:
        return detect(model)
    except ValueError as err:
        raise SpecError(f"spec field 'model': {err}") from None


def _refuse_skyreels_fields(spec: JobSpec) -> None:
    """Fields only a SkyReels-V2 model reads: one line instead of silently ignoring them."""
    for name, why in (("image", "image-to-video"), ("video", "continuation"), ("resolution", "another frame size")):
        if getattr(spec, name) is not None:
            raise SpecError(f"spec field {name!r}: the procedural model makes 64x64 videos from text only; "
                            f"{why} needs a SkyReels-V2 model (model: tiny or an official folder)")
    if spec.decode != "vae":
        raise SpecError("spec field 'decode': the procedural model decodes with its own codec; decode: preview "
                        "is for SkyReels-V2 models")


def _describe_skyreels(spec: JobSpec, kind: str, source: str, defaults: dict[str, Any],
                       model_config: dict[str, Any]) -> tuple[ScheduleArgs, int, int, int, int, int, sky.Resolution]:
    """(schedule, fps, frames, latent frames, skip, reference latents, resolution) of a SkyReels-V2
    run, from `family` defaults and the spec; `defaults` gets the named size and resolution."""
    size = "tiny" if kind == "tiny" else sky.size_name(model_config, source)
    named = spec.resolution or sky.default_resolution(size)
    resolution = sky.parse_resolution(named)
    sampling = sky.sampling_defaults(size)
    fps = spec.fps or sampling.fps
    frames = spec.frame_count(fps)
    cbs = spec.causal_block_size or (1 if spec.image is not None else sampling.causal_block_size)
    if spec.image is not None and cbs != 1:
        raise SpecError(f"spec field 'causal_block_size': {cbs}, but image-to-video conditions on one latent "
                        f"frame (the image): use causal_block_size 1 (upstream silently drops the image)")
    if spec.video is not None:
        # the prefix: `overlap` latents of the video's last frames, whole causal blocks; not in the output
        reference = spec.overlap if spec.overlap is not None else sampling.overlap_latents
        reference = max(cbs, reference - reference % cbs)
        skip = reference
        latent_frames = reference + _round_up(math.ceil(frames / sky.VAE_TEMPORAL), cbs)
    else:
        reference = 1 if spec.image is not None else 0     # the image is the video's first latent
        skip = 0
        latent_frames = _round_up(sky.latents_for_frames(frames), cbs)   # covers every frame
    window = resolution.base_latents or sampling.base_latents
    base = spec.base_frames or min(latent_frames, max(cbs, window - window % cbs))
    if reference and reference >= base:
        raise SpecError(f"spec field 'base_frames': the first window ({base} latents) must be longer than the "
                        f"clean prefix ({reference} latents); raise base_frames or lower overlap")
    overlap_default = min(_round_up(sampling.overlap_latents, cbs), base - cbs)
    overlap = spec.overlap if spec.overlap is not None else overlap_default
    args = _schedule(ScheduleArgs, spec, defaults={
        "num_steps": sampling.num_steps, "shift": sampling.shift, "guidance_scale": sampling.guidance_scale,
        "ar_step": sampling.ar_step, "causal_block_size": cbs, "base_num_frames": base,
        "overlap_frames": overlap if latent_frames > base else None,
        "addnoise_condition": sampling.addnoise_condition, "fps": fps})
    defaults.update({"size": size, "resolution": resolution.name, "transformer": model_config})
    check_media(spec)                                  # an image / video exists (read in `load`)
    return args, fps, frames, latent_frames, skip, reference, resolution


def _round_up(value: int, block: int) -> int:
    return math.ceil(value / block) * block


def default_frames(model: str | None, resolution: str | None = None) -> int:
    """`scope generate`'s length when the spec gives none: upstream's for a SkyReels-V2 folder (the
    named resolution's window: 97 frames at 540p, 121 at 720p), 48 for the procedural and tiny
    models; a MAGI-1 size's (96 frames, 48 for magi-1-tiny). Reads config.json only; a bad folder
    falls back to 48 (`describe` then says why)."""
    if model is None or model == "tiny":
        return sky.TINY_SAMPLING.frames
    try:
        ref = _detect(model)
    except SpecError:
        return sky.TINY_SAMPLING.frames
    if ref.family == "magi-1":
        from pipelines.families import table

        return table("magi-1").sampling_defaults(ref.size).frames
    try:
        folder = model.rstrip("/")
        if _read_json(folder, "pipeline.json", required=False) is not None:
            return sky.TINY_SAMPLING.frames
        size = sky.size_name(_read_json(folder, "config.json", required=True), folder)
        named = sky.parse_resolution(resolution or sky.default_resolution(size))
    except (SpecError, ValueError):
        return sky.TINY_SAMPLING.frames
    return named.base_frames or sky.sampling_defaults(size).frames


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
                 "base_num_frames": spec.base_frames, "overlap_frames": spec.overlap,
                 "addnoise_condition": spec.addnoise_condition}
    values = dict(defaults or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return build(**values)
    except ValueError as err:
        raise SpecError(f"spec schedule: {err}") from None


def _describe_model(spec: JobSpec) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(kind, source, pipeline defaults, transformer config) from JSON files only."""
    if spec.model == "tiny":
        from pipelines.skyreels_v2.sizes import config_for

        return "tiny", "tiny", {}, {**config_for("tiny").to_dict(), "_vae": None, "_text_encoder": None}
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
    return "checkpoint", folder, {}, _check_skyreels_folder(spec, folder)


def _check_skyreels_folder(spec: JobSpec, folder: str) -> dict[str, Any]:
    """An official SkyReels-V2 folder, checked before any weights load: config.json is a valid
    config, the transformer's safetensors are listed, and every other file this run needs exists
    (the VAE to decode or to encode an image / video, umT5 + tokenizer unless `context` is given).
    Optional sidecars (`vae_config.json`, `text_encoder_config.json`) give non-official part sizes.
    Returns the transformer config (defaults filled in); the sidecars go into it under '_vae' and
    '_text_encoder'."""
    from fsspec.core import url_to_fs

    from pipelines.skyreels_v2.checkpoint import read_config, shard_names

    fs, root = url_to_fs(folder)
    config = read_config(fs, root, label=f"{folder}/{sky.CONFIG_FILE}")       # one line naming the file
    shard_names(fs, root, where=folder)                                       # the weights are there
    need_vae = spec.decode == "vae" or spec.image is not None or spec.video is not None
    missing = sky.missing_files(folder, text_encoder=spec.context is None, vae=need_vae)
    if missing:
        fixes = ["download the missing file(s) into the model folder"]
        if spec.context is None and any(sky.UMT5_FILE in m or sky.TOKENIZER_DIR in m for m in missing):
            fixes.append("or give context: precomputed umT5 embeddings")
        only_decodes = spec.decode == "vae" and spec.image is None and spec.video is None
        if only_decodes and any(sky.VAE_FILE in m for m in missing):
            fixes.append("or set decode: preview for a latent preview")
        raise SpecError(f"spec field 'model': missing {'; '.join(missing)}; {', '.join(fixes)}")
    values = config.to_dict()
    vae = _read_json(folder, sky.VAE_CONFIG_FILE, required=False) if need_vae else None
    text = _read_json(folder, sky.TEXT_ENCODER_CONFIG_FILE, required=False) if spec.context is None else None
    _check_sidecars(folder, config, vae, text)
    values.update({"_vae": vae, "_text_encoder": text})
    return values


def _check_sidecars(folder: str, config: Any, vae: dict[str, Any] | None, text: dict[str, Any] | None) -> None:
    """The parts' configs fit the transformer and the family's latent geometry (one line naming the file)."""
    from pipelines.wan.vae import WanVAEConfig

    if vae is not None:
        where = f"{folder}/{sky.VAE_CONFIG_FILE}"
        try:
            vae_config = WanVAEConfig.from_dict(vae)
        except (TypeError, ValueError) as err:
            raise SpecError(f"{where}: {short(str(err), 300)}") from None
        geometry = (vae_config.z_dim, vae_config.temporal_stride, vae_config.spatial_stride)
        if geometry != (config.in_dim, sky.VAE_TEMPORAL, sky.VAE_SPATIAL):
            raise SpecError(f"{where}: z_dim {geometry[0]}, strides {geometry[1]} x {geometry[2]}; the transformer "
                            f"reads {config.in_dim} channels and SkyReels-V2 latents are 4x in time, 8x in space")
    if text is not None:
        from pipelines.wan.umt5 import UMT5Config

        where = f"{folder}/{sky.TEXT_ENCODER_CONFIG_FILE}"
        try:
            dim = UMT5Config.from_dict(text).dim
        except (TypeError, ValueError) as err:
            raise SpecError(f"{where}: {short(str(err), 300)}") from None
        if dim != config.text_dim:
            raise SpecError(f"{where}: dim {dim}, but the transformer reads text_dim {config.text_dim} "
                            f"({sky.CONFIG_FILE}); the text encoder must match it")


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

def resolve_accel(spec: JobSpec, args: Any, frames: int, model_folder: str | None,
                  family: str = "skyreels-v2", size: str | None = None) -> tuple[Any, str, list[str]]:
    """(config, where it came from, how its calibration schedule differs from this run's):
    1. `accel` names an accel.json (path or URL): that file;
    2. else, for a procedural model, the calibrated config its weights folder ships for the
       method (`weights/accel/<method>.json`, the closest calibration schedule);
    3. else the method's defaults from the model family's table (`accel_defaults(method, size)`:
       published constants, MagCache ratios measured on that size), plus the family's exact
       selective computation on a block-causal model (outputs stay equal to full compute).
    MagCache takes the schedule's step count (its ratio table is resampled to it)."""
    from pipelines.families import table
    from scope.config import AccelConfig, make_config

    accel_defaults = table(family).accel_defaults

    schedule = schedule_dict(args, frames)
    try:
        if spec.accel.endswith(".json"):
            config, source = AccelConfig.from_dict(_read_accel_file(spec)), spec.accel
        else:
            config, source = _shipped_config(spec.accel, model_folder, schedule), "shipped"
            if config is None:
                causal = args.causal_attention and spec.accel != "none"
                extra = dict(table(family).SELECTIVE_EXACT) if causal else {}
                config, source = make_config(spec.accel, **{**accel_defaults(spec.accel, size), **extra}), "defaults"
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
    width is generous for a block), and its decoded frames; with the Wan VAE on the CPU also the
    decoder's working set (one latent frame at a time: ~24 full-resolution frames of its base width,
    activations plus the causal cache; ~8.5 GB at 720P for the official width 96)."""
    h, w = plan.latent_size
    window = max(s.num_frames for s in plan.segments)
    latent = plan.channels * window * h * w * 4
    frames_per_latent = plan.temporal
    pixels = window * frames_per_latent * h * w * (sky.VAE_SPATIAL if plan.temporal > 1 else 4) ** 2 * 3
    decoder = 0
    if plan.decode == "wan vae" and plan.device == "cpu":
        sidecar = plan.defaults.get("transformer", {}).get("_vae") or {}
        vae_dim = int(sidecar.get("dim", 4 if plan.kind == "tiny" else 96))
        decoder = 24 * h * w * sky.VAE_SPATIAL ** 2 * vae_dim * 4
    return 6 * latent + 16 * latent * 8 + pixels + decoder


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
    if plan.family == "magi-1":
        from jobs.magi import load_magi

        return load_magi(plan, models if models is not None else {}, keep_text_encoder=models is not None)
    # one video (models None): the text encoder is freed once the prompts are encoded, before the
    # transformer loads; a worker making many videos keeps it in its cache instead
    return _load_skyreels(plan, models if models is not None else {}, keep_text_encoder=models is not None)


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


def _load_skyreels(plan: VideoPlan, models: dict[str, Any], keep_text_encoder: bool = False) -> LoadedVideo:
    """Text first (umT5, then freed: the XXL encoder and the 14B transformer never sit in memory
    together), then the transformer, the VAE (decoder and, for an image / video, encoder), the
    clean prefix and the frame decoder."""
    spec, config = plan.spec, plan.defaults["transformer"]
    context, negative, text_source = _encode_text(plan, models, keep_text_encoder)       # 1. text
    model = _transformer(plan, models)                                                   # 2. DF transformer
    vae = _vae(plan, models) if plan.decode == "wan vae" or plan.reference_latents else None   # 3. VAE
    reference = _encode_reference(plan, vae) if plan.reference_latents else None         # 4. clean prefix
    if plan.decode == "wan vae":                                                         # 5. decoder
        decoder = FrameDecoder(VAEFrames(vae), plan.frames, skip=plan.skip, temporal=sky.VAE_TEMPORAL,
                               kind="Wan VAE (streaming)", history=sky.DECODER_HISTORY)
    else:
        decoder = FrameDecoder(latent_preview, plan.frames, skip=plan.skip, temporal=sky.VAE_TEMPORAL,
                               kind="latent preview")
    extra = {"decode": decoder.kind, "text": text_source, "resolution": plan.resolution,
             "size": plan.defaults.get("size") or "custom", "text_len": config["text_len"]}
    if spec.image is not None or spec.video is not None:
        what = "image" if spec.image is not None else "video"
        extra["conditioning"] = f"{what} -> {plan.reference_latents} clean latent(s)"
    return LoadedVideo(model, context.to(plan.device), negative.to(plan.device), reference, decoder, extra)


def _transformer(plan: VideoPlan, models: dict[str, Any]) -> torch.nn.Module | None:
    from pipelines.skyreels_v2.checkpoint import load_transformer
    from pipelines.skyreels_v2.model import WanDFTransformer
    from pipelines.skyreels_v2.sizes import config_for

    if plan.spec.backend == "ray" and plan.kind == "checkpoint":
        # the stages hold the weights: the driver needs only the config (a 14B model would
        # otherwise sit in the driver's memory for nothing)
        return None
    key = f"{plan.source}@{plan.device}"
    if key not in models:
        if plan.kind == "tiny":
            torch.manual_seed(0)   # seeded random weights: the same "model" every run
            models[key] = WanDFTransformer(config_for("tiny")).eval().to(plan.device)
        else:
            models[key] = load_transformer(plan.source, device=plan.device).eval()
    return models[key]


def _vae(plan: VideoPlan, models: dict[str, Any]) -> torch.nn.Module:
    key = f"{plan.source}:vae@{plan.device}"
    if key not in models:
        folder = None if plan.kind == "tiny" else plan.source
        models[key] = sky.build_vae(folder, plan.device, plan.defaults["transformer"].get("_vae"))
    return models[key]


def _encode_text(plan: VideoPlan, models: dict[str, Any], keep: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(context, negative [1, text_len, text_dim] float32, where they came from): the spec's
    embeddings file, else the model's umT5 on the prompt and the negative prompt (upstream's when
    the spec gives none; not encoded when guidance <= 1 turns CFG off)."""
    spec, config = plan.spec, plan.defaults["transformer"]
    if spec.context is not None:
        context, negative = _load_context(spec, config["text_len"], config["text_dim"])
        return context, negative, f"context file {short(spec.context)}"
    key = f"{plan.source}:umt5@{plan.device}"
    encoder = models.get(key)
    if encoder is None:
        folder = None if plan.kind == "tiny" else plan.source
        encoder = sky.build_text_encoder(folder, config["text_len"], plan.device, config.get("_text_encoder"))
    negative_prompt = spec.negative_prompt or sky.NEGATIVE_PROMPT
    with torch.no_grad():
        context = encoder([spec.prompt]).float()
        negative = encoder([negative_prompt]).float() if plan.args.guidance_scale > 1 else torch.zeros_like(context)
    if keep:
        models[key] = encoder
    else:
        del encoder
        _release_memory(plan.device)
    for name, tensor in (("prompt", context), ("negative prompt", negative)):
        if not torch.isfinite(tensor).all():
            raise SpecError(f"spec field 'model': the text encoder gave NaN or inf for the {name}; check "
                            f"{sky.UMT5_FILE} (re-download it) or give context: precomputed embeddings")
    source = "tiny umT5 (random weights, hashing tokenizer)" if plan.kind == "tiny" else f"umT5 ({sky.UMT5_FILE})"
    return context, negative, source


def _release_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _encode_reference(plan: VideoPlan, vae: torch.nn.Module) -> torch.Tensor:
    """Segment 0's clean prefix [C, P, h, w]: the image (1 latent, the video's first) or the video's
    last 1 + 4(P - 1) frames (P latents before the video), VAE-encoded as upstream."""
    from jobs.media import read_image, read_last_frames

    spec = plan.spec
    height, width = (side * sky.VAE_SPATIAL for side in plan.latent_size)
    if spec.image is not None:
        pixels = read_image(spec, width, height)                                       # [3, 1, H, W]
    else:
        pixels = read_last_frames(spec, sky.frames_for_latents(plan.reference_latents), width, height)
    with torch.no_grad():
        latents = vae.encode(pixels[None].to(plan.device))[0].float()                  # [16, P, h, w]
    if latents.shape[1] != plan.reference_latents or not torch.isfinite(latents).all():
        raise SpecError(f"spec field {'image' if spec.image is not None else 'video'!r}: the VAE gave "
                        f"{latents.shape[1]} latent(s), expected {plan.reference_latents} finite ones")
    return latents


def _load_context(spec: JobSpec, text_len: int, text_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Precomputed text embeddings from the spec's `context` file (checked finite)."""
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

