"""`scope generate`: prompt -> video file (+ stats, + latents), one validated spec at the boundary.

Models:
- no `--model`: the embedded procedural model (pipelines/procedural/weights), text encoder and
  codec included: the video shows the prompt;
- `--model tiny`: a tiny SkyReels-V2 DF transformer with seeded random weights (plumbing demo);
- `--model DIR_OR_URL`: a folder (local or fsspec URL) with `config.json` + `*.safetensors`:
  a procedural bundle when it has `pipeline.json`, else an official SkyReels-V2 DF checkpoint,
  which needs `--context` (precomputed umT5 embeddings) until the text encoder and VAE land;
  the video is then a latent preview.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ACCEL_METHODS = ("none", "scope", "teacache", "flowcache", "taylorseer", "fbcache", "magcache")
# Wan VAE: 4x temporal, 8x spatial compression; the preview of a latent is upsampled back
WAN_TEMPORAL, WAN_SPATIAL = 4, 8


@dataclass
class GenerateSpec:
    """Everything `scope generate` needs, checked before any model is loaded."""

    prompt: str
    frames: int
    seed: int
    model: str | None = None
    negative_prompt: str = ""
    context: str | None = None
    steps: int | None = None
    shift: float | None = None
    guidance: float | None = None
    ar_step: int | None = None
    causal_block_size: int | None = None
    base_frames: int | None = None
    overlap: int | None = None
    accel: str = "none"
    accel_config: str | None = None
    out: str = "out/video.mp4"
    stats: str | None = None
    latents: str | None = None
    fps: int | None = None
    backend: str = "local"
    stages: int = 1
    replicas: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise ValueError("--prompt is empty; describe the video, e.g. 'a red circle moves right'")
        if self.frames < 1:
            raise ValueError(f"--frames must be >= 1 (e.g. 48); got {self.frames}")
        if self.accel not in ACCEL_METHODS:
            raise ValueError(f"--accel must be one of {', '.join(ACCEL_METHODS)}; got {self.accel!r}")
        if self.accel_config is not None and not Path(self.accel_config).is_file():
            raise FileNotFoundError(f"--accel-config {self.accel_config}: no such file "
                                    "(write one with `scope calibrate --out accel.json`)")
        if self.context is not None and "://" not in self.context and not Path(self.context).is_file():
            raise FileNotFoundError(f"--context {self.context}: no such file (a safetensors file with "
                                    "'context' [L, text_dim] and optionally 'negative_context')")
        for name in ("steps", "ar_step", "causal_block_size", "base_frames", "overlap", "fps"):
            value = getattr(self, name)
            low = 0 if name in ("ar_step", "overlap") else 1
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}; got {value}")
        if self.stages < 1 or self.replicas < 1:
            raise ValueError(f"--stages and --replicas must be >= 1; got {self.stages}, {self.replicas}")
        if self.backend == "local" and (self.stages > 1 or self.replicas > 1):
            raise ValueError("--stages/--replicas need --backend ray (the local backend is one process)")
        if not self.out.endswith(".mp4"):
            raise ValueError(f"--out must name an .mp4 file; got {self.out!r}")
        for flag, path in (("--out", self.out), ("--stats", self.stats), ("--latents", self.latents)):
            _check_writable(flag, path)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerateSpec:
        return cls(prompt=args.prompt, frames=args.frames, seed=args.seed, model=args.model,
                   negative_prompt=args.negative_prompt, context=args.context, steps=args.steps,
                   shift=args.shift, guidance=args.guidance, ar_step=args.ar_step,
                   causal_block_size=args.causal_block_size, base_frames=args.base_frames,
                   overlap=args.overlap, accel=args.accel, accel_config=args.accel_config,
                   out=args.out, stats=args.stats, latents=args.latents, fps=args.fps,
                   backend=args.backend, stages=args.stages, replicas=args.replicas,
                   progress=not args.no_progress)


def _check_writable(flag: str, path: str | None) -> None:
    """A local output's folder must exist or be creatable, and be writable: fail before sampling."""
    if path is None or ("://" in path and not path.startswith("file://")):
        return
    import tempfile

    folder = Path(path.removeprefix("file://")).resolve().parent
    try:   # the folder is made now anyway; a probe file is the only test root cannot fool
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write there ({err.strerror}: {folder}); pick a "
                         f"writable path, e.g. out/video.mp4") from None


@dataclass
class GenerateResult:
    frames: np.ndarray            # uint8 [T, H, W, 3]
    latents: torch.Tensor         # [C, F, h, w]
    stats: dict[str, Any]


# ------------------------------------------------------------------------------------ accel

@dataclass
class ResolvedAccel:
    """The accelerator config a run uses, where it came from, and how its calibration schedule
    differs from this run's (empty = calibrated for this schedule, or not calibrated)."""

    config: Any
    source: str
    mismatch: list[str]


def build_accel_config(spec: GenerateSpec, causal: bool = False, args: Any = None,
                       model_folder: str | None = None) -> ResolvedAccel:
    """The accelerator config, resolved once before sampling:
    1. `--accel-config FILE` (its method must agree with `--accel` unless `--accel` is none);
    2. else, for the embedded / a procedural model, the calibrated config its weights folder
       ships for `--accel` (`weights/accel/<method>.json`: `--accel scope` really accelerates);
    3. else the method's defaults, plus exact selective computation on a block-causal model
       (drop chunks that cannot influence the active ones, serve finished chunks' K/V: outputs
       stay equal to full compute, tested).
    MagCache takes the schedule's step count (its ratio table is resampled to it)."""
    from scope.config import load_config, make_config

    if spec.accel_config is not None:
        config, source = load_config(spec.accel_config), spec.accel_config
        if spec.accel not in ("none", config.method):
            raise ValueError(f"--accel {spec.accel} disagrees with --accel-config {spec.accel_config} "
                             f"(method {config.method!r}); drop one of them")
    else:
        config, source = _shipped_config(spec.accel, model_folder, _schedule_of(args, spec.frames)), "shipped"
        if config is None:
            extra = {"selective": "exact", "kv_cache_finished": True} if causal and spec.accel != "none" else {}
            config, source = make_config(spec.accel, **extra), "defaults"
    if config.method == "magcache" and args is not None:
        config = config.replace(num_steps=args.num_steps)
    mismatch = config.schedule_mismatch(_schedule_of(args, spec.frames)) if args is not None else []
    if source == "shipped":
        source = "shipped with the model (pipelines/procedural/weights/accel)"
    return ResolvedAccel(config, source, mismatch)


def _shipped_config(method: str, folder: str | None, schedule: dict[str, Any] | None) -> Any:
    if method == "none" or folder is None:
        return None
    from pipelines.procedural.bundle import default_accel_config

    return default_accel_config(method, folder, schedule)


def _schedule_of(args: Any, frames: int) -> dict[str, Any] | None:
    if args is None:
        return None
    return {"num_steps": args.num_steps, "shift": float(args.shift), "ar_step": args.ar_step,
            "guidance_scale": float(args.guidance_scale), "causal_block_size": args.causal_block_size,
            "base_num_frames": args.base_num_frames, "overlap_frames": args.overlap_frames, "frames": frames}


def attach_accel(model: torch.nn.Module, config: Any):
    """Apply the accelerator hooks to a Wan DF transformer (always, so stats are counted)."""
    from pipelines.skyreels_v2.accel_adapter import WanStackAdapter
    from scope.hooks import apply_accel, remove_accel

    remove_accel(model)
    return apply_accel(model, config, WanStackAdapter())


def summarize(spec: GenerateSpec, segments: list, wall_s: float, frames: int,
              extra: dict[str, Any]) -> dict[str, Any]:
    """stats.json: frames, wall_s, block_evals, block_evals_full, modes, per segment details."""
    from scope.stats import merge_stats

    parts = [s.accel_stats for s in segments if s.accel_stats is not None]
    merged = merge_stats(f"generate-{spec.seed}", parts)
    stats = merged.to_dict()
    stats.pop("trace", None)
    return {
        "frames": frames, "wall_s": wall_s, "block_evals": merged.block_evals,
        "block_evals_full": merged.block_evals_full, "block_eval_fraction": merged.compute_fraction,
        "modes": merged.modes.to_dict(), "seed": spec.seed,
        "prompt": spec.prompt, "model": spec.model or "procedural (embedded)",
        "segments": len(segments), "model_calls": sum(s.model_calls for s in segments),
        "rows": sum(s.rows for s in segments), "accel_stats": stats, **extra,
    }


# ------------------------------------------------------------------------------------ models

def _is_procedural(model: str | None) -> bool:
    if model is None:
        return True
    if "://" in model:
        import fsspec

        fs, path = fsspec.core.url_to_fs(model)
        return fs.exists(f"{path.rstrip('/')}/pipeline.json")
    return (Path(model) / "pipeline.json").is_file()


def _progress_bar(spec: GenerateSpec, desc: str):
    if not spec.progress:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=1, desc=desc, unit="row", leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


@dataclass
class PreparedVideo:
    """One video's sampling inputs, the same for the local and the Ray backend."""

    model: torch.nn.Module            # the in-process transformer
    source: str                       # what a Ray stage loads: a named size or a checkpoint folder/URL
    noise: torch.Tensor               # [C, F, h, w]
    context: torch.Tensor             # [1, L, text_dim]
    negative: torch.Tensor            # [1, L, text_dim]
    args: Any                         # ScheduleArgs
    addnoise_seed: int
    decode: Any                       # latents [C, F, h, w] -> uint8 [T, H, W, 3]
    fps: int
    extra: dict[str, Any]
    prefix: torch.Tensor | None = None  # [C, P, h, w] clean latents that start the video (not in the output)


def prepare_procedural(spec: GenerateSpec) -> PreparedVideo:
    """Text, noise and schedule of the procedural model (the same draws as `generate_video`)."""
    from pipelines.procedural.bundle import check_prompt, load_bundle

    bundle = load_bundle(spec.model)
    check_prompt(bundle, spec.prompt)
    if spec.negative_prompt:
        check_prompt(bundle, spec.negative_prompt)
    args = bundle.schedule_args(num_inference_steps=spec.steps, shift=spec.shift,
                                guidance_scale=spec.guidance, ar_step=spec.ar_step,
                                causal_block_size=spec.causal_block_size,
                                base_num_frames=spec.base_frames, overlap_frames=spec.overlap)
    with torch.no_grad():
        context = bundle.text_encoder([spec.prompt])
        negative = bundle.text_encoder([spec.negative_prompt])
    cbs = args.causal_block_size
    reference = bundle.reference_latents(cbs)          # the empty scene that starts the video, or None
    skip = 0 if reference is None else reference.shape[1]
    latent_frames = skip + math.ceil(spec.frames / cbs) * cbs
    noise = torch.randn(bundle.codec.channels, latent_frames, *bundle.latent_size(),
                        generator=torch.Generator().manual_seed(spec.seed))

    def decode(latents: torch.Tensor) -> np.ndarray:
        return bundle.codec.decode(latents[:, skip:skip + spec.frames])

    return PreparedVideo(bundle.transformer, str(bundle.path), noise, context, negative, args,
                         spec.seed + 1, decode, spec.fps or int(bundle.defaults.get("fps", 8)),
                         {"decode": "procedural codec"}, prefix=reference)


def _load_context(spec: GenerateSpec, text_len: int, text_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings for a checkpoint without a built-in text encoder."""
    if spec.context is None:
        if spec.model != "tiny":
            raise ValueError("this checkpoint needs --context embeddings.safetensors (umT5 output "
                             "'context' [L, text_dim]); the umT5 encoder is not built in yet")
        # tiny random model: a deterministic embedding of the prompt text
        gen = torch.Generator().manual_seed(int.from_bytes(spec.prompt.encode()[:8].ljust(8, b"\0"), "little") % 2**63)
        context = torch.randn(1, text_len, text_dim, generator=gen)
        return context, torch.zeros_like(context)
    from safetensors.torch import load as load_bytes
    import fsspec

    with fsspec.open(spec.context, "rb") as f:
        tensors = load_bytes(f.read())
    if "context" not in tensors:
        raise KeyError(f"--context {spec.context} has no tensor 'context' (found {sorted(tensors)})")
    context = tensors["context"].float()
    context = context[None] if context.dim() == 2 else context
    if context.shape[-1] != text_dim:
        raise ValueError(f"--context has text_dim {context.shape[-1]}, the model expects {text_dim}")
    negative = tensors.get("negative_context", torch.zeros_like(context)).float()
    return context, (negative[None] if negative.dim() == 2 else negative)


def latent_preview(latents: torch.Tensor, frames: int) -> np.ndarray:
    """A viewable stand-in for a VAE decode: 3 latent channels -> RGB, upsampled 4x in time and
    8x in space (Wan's compression), so the file has the frame count asked for."""
    rgb = latents[:3].float()                                       # [3, F, h, w]
    rgb = (rgb - rgb.mean()) / (rgb.std() + 1e-6)
    rgb = torch.sigmoid(rgb)
    rgb = rgb.repeat_interleave(WAN_TEMPORAL, 1)[:, :frames]
    rgb = rgb.repeat_interleave(WAN_SPATIAL, 2).repeat_interleave(WAN_SPATIAL, 3)
    return (rgb.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()


def prepare_skyreels(spec: GenerateSpec) -> PreparedVideo:
    """A SkyReels-V2 DF checkpoint (or the tiny random model): latent preview, no VAE yet."""
    from pipelines.skyreels_v2.checkpoint import load_transformer
    from pipelines.skyreels_v2.model import WanDFTransformer
    from pipelines.skyreels_v2.pipeline import ScheduleArgs
    from pipelines.skyreels_v2.sizes import config_for

    if spec.model == "tiny":
        torch.manual_seed(0)   # seeded random weights: the same "model" every run
        model = WanDFTransformer(config_for("tiny")).eval()
        height = width = 8
    else:
        model = load_transformer(spec.model).eval()
        height, width = 68, 120   # 540P latent grid
    cfg = model.config
    cbs = spec.causal_block_size or (2 if spec.model == "tiny" else 1)
    latent_frames = math.ceil(((spec.frames - 1) // WAN_TEMPORAL + 1) / cbs) * cbs
    base = spec.base_frames or min(latent_frames, 8 if spec.model == "tiny" else 25)
    overlap = spec.overlap if spec.overlap is not None else min(2 * cbs, base - cbs)
    args = ScheduleArgs(num_steps=spec.steps or (8 if spec.model == "tiny" else 30),
                        shift=spec.shift or 8.0, guidance_scale=6.0 if spec.guidance is None else spec.guidance,
                        ar_step=spec.ar_step if spec.ar_step is not None else 2, causal_block_size=cbs,
                        base_num_frames=base, overlap_frames=overlap if latent_frames > base else None,
                        fps=spec.fps or 24)
    context, negative = _load_context(spec, cfg.text_len, cfg.text_dim)
    noise = torch.randn(cfg.in_dim, latent_frames, height, width,
                        generator=torch.Generator().manual_seed(spec.seed))
    return PreparedVideo(model, spec.model, noise, context, negative, args, spec.seed + 1,
                         lambda latents: latent_preview(latents, spec.frames), args.fps,
                         {"decode": "latent preview (no VAE yet)"})


def sample_local(spec: GenerateSpec, job: PreparedVideo, accel_config: Any) -> tuple[Any, float]:
    """The DF pipeline in this process, accelerator hooks attached from outside."""
    from pipelines.skyreels_v2.pipeline import DFPipeline

    accel = attach_accel(job.model, accel_config)
    bar, progress = _progress_bar(spec, "denoising")
    started = time.perf_counter()
    try:
        result = DFPipeline(job.model, accel=accel).generate(
            job.noise, job.context, job.negative, job.args, prefix_latents=job.prefix,
            request_id=f"generate-{spec.seed}",
            addnoise_eps=torch.Generator().manual_seed(job.addnoise_seed), progress=progress)
    finally:
        if bar is not None:
            bar.close()
    return result, time.perf_counter() - started


def sample_ray(spec: GenerateSpec, job: PreparedVideo, accel_config: Any) -> tuple[Any, float]:
    """The same sampling on a Ray cluster ($RAY_ADDRESS, or a local one): `--stages` pipeline
    stages per replica, `--replicas` replicas."""
    from cluster.api import generate_on_ray

    started = time.perf_counter()
    result = generate_on_ray(job.source, job.noise, job.context, job.negative, job.args,
                             stages=spec.stages, replicas=spec.replicas,
                             accel=accel_config, prefix_latents=job.prefix,
                             addnoise_eps=torch.Generator().manual_seed(job.addnoise_seed),
                             request_id=f"generate-{spec.seed}", seed=spec.seed)
    return result, time.perf_counter() - started


# ------------------------------------------------------------------------------------ entry

def generate(spec: GenerateSpec) -> GenerateResult:
    """Prepare (model, text, noise, schedule), sample locally or on Ray, decode, summarize."""
    procedural = _is_procedural(spec.model)
    job = prepare_procedural(spec) if procedural else prepare_skyreels(spec)
    accel = build_accel_config(spec, job.args.causal_attention, job.args, job.source if procedural else None)
    for line in accel.mismatch[:1]:
        print(f"scope generate: the accel config ({accel.source}) was calibrated for another schedule "
              f"({'; '.join(accel.mismatch)}): its speed and quality were not measured for this one",
              file=sys.stderr)
    result, wall = (sample_ray if spec.backend == "ray" else sample_local)(spec, job, accel.config)
    frames = job.decode(result.latents)
    stats = summarize(spec, result.segments, wall, int(frames.shape[0]),
                      {"schedule": asdict(job.args), "backend": spec.backend, "stages": spec.stages,
                       "replicas": spec.replicas, **job.extra})
    stats["fps"] = job.fps
    stats["accel"] = accel.config.method          # the method applied, whichever flag chose it
    stats["accel_config"] = accel.config.to_dict()
    stats["accel_config_source"] = accel.source
    stats["accel_schedule_mismatch"] = accel.mismatch
    skip = 0 if job.prefix is None else job.prefix.shape[1]
    return GenerateResult(frames, result.latents[:, skip:skip + spec.frames] if _is_procedural(spec.model)
                          else result.latents, stats)


def write_outputs(spec: GenerateSpec, result: GenerateResult) -> None:
    """Video (atomic), stats JSON, latents safetensors."""
    from jobs.video import write_video

    write_video(result.frames, spec.out, fps=int(result.stats.get("fps") or 16))
    if spec.stats:
        Path(spec.stats).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{spec.stats}.partial"
        with open(tmp, "w") as f:
            json.dump(result.stats, f, indent=1, default=str)
        os.replace(tmp, spec.stats)
    if spec.latents:
        from safetensors.torch import save_file

        Path(spec.latents).parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": result.latents.contiguous().float()}, spec.latents)


def run_generate(args: argparse.Namespace) -> None:
    spec = GenerateSpec.from_args(args)
    result = generate(spec)
    write_outputs(spec, result)
    s = result.stats
    print(f"wrote {spec.out}: {s['frames']} frames in {s['wall_s']:.1f} s, "
          f"accel {s['accel_config']['method']}, "
          f"block evals {s['block_evals']}/{s['block_evals_full']} "
          f"({100 * s['block_eval_fraction']:.0f}%), modes {s['modes']}")
