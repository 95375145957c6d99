"""MAGI-1 in the jobs: its `VideoPlan`, its loaded parts, and its walk as the segment loop's backend.

MAGI-1 does not sample overlapping segments: it walks the whole video once, a window of chunks at
staggered noise levels, and a chunk is final as soon as it is clean. The shared loop
(`jobs.runner.VideoRun`: plan, denoise, commit, decode, write, checkpoint) is kept by calling a
*segment* what the walk makes between two clean chunks:

    segment i = generated chunk i (chunk_width latents, 4 x chunk_width frames, no overlap)
    sampler.sample_segment(...)  = advance the walk until chunk i is clean (`MagiSegmentSampler`)

so the outputs, the atomic commit of `scope generate`, the long-video folder, the stats and the
metrics are the SkyReels-V2 ones. What differs, all here or in `pipelines/magi1/family.py`:

- `describe_magi`: the schedule is the family's `SamplingDefaults` (steps, window, chunk width, CFG
  passes and scales), the segments are the chunks, the frames map 4:1 without a causal first
  frame; SkyReels-only spec fields are refused in one line, an official folder's missing part is
  named before any weights load.
- `load_magi`: prompt -> T5 (freed before the DiT loads unless a worker keeps it) -> (caption,
  mask); the DiT; the VAE. `LoadedVideo.context` is the caption [1, L, C] and `.negative` its token
  mask [1, L]: MAGI-1's unconditional passes use the model's learned null caption, not a prompt.
  With upstream's `special_tokens.npz` beside the model, the caption is run.sh's
  [DURATION, HQ, T5 tokens]: 8 duration variants [1, 8, L, C] and a chunk -> variant map.
- decoding: each chunk through a fresh `MagiVAEStreamDecoder` with `final=True`, i.e. upstream's
  per-chunk `decode_chunk` (stateless: a resumed run decodes its next chunk exactly as an
  uninterrupted one). With the production tiling a 6-latent chunk is two whole temporal tile rows,
  so this also equals one streamed decode of the whole video.
- noise: chunk k of a video is `Draws(seed).segment_noise(k, ...)`, the same named draw the loop
  makes for segment k; the walk draws it when the chunk starts (W - 1 segments early).
- acceleration: every segment is its own accelerator request (`<fingerprint>/seg<i>`, ended when
  chunk i is clean), as for SkyReels-V2; so no accelerator state outlives a segment.
- resume: after each segment the walk's bounded state (next call, live latents of the window, the
  cached clean-chunk K/V still read: `WalkState`) goes into the checkpoint; a resumed run restores
  it and continues the walk at the next call, bit-exact for every method (tested).
- batches: `run_batch` walks B videos of one shape together (one forward per pass), each with
  its own seed, caption and accelerator request.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from jobs.spec import JobSpec, SpecError, short

FAMILY = "magi-1"


def _family() -> Any:
    from pipelines.families import table

    return table(FAMILY)


# ------------------------------------------------------------------------------------ describe

# spec fields a MAGI-1 run does not read: one line each instead of silently ignoring them
REFUSED_FIELDS = {
    "image": "image-to-video is not wired into the MAGI-1 jobs yet (the pipeline takes a prefix: see "
             "MagiPipeline.stream(prefix=...))",
    "video": "continuation is not wired into the MAGI-1 jobs yet (the pipeline takes a prefix: see "
             "MagiPipeline.stream(prefix=...))",
    "context": "precomputed embeddings are not read for MAGI-1 yet; its T5 runs from the model folder",
    "negative_prompt": "MAGI-1's unconditional passes use the model's learned null caption, not a prompt",
    "ar_step": "MAGI-1 staggers its chunks by steps / window (fixed by the schedule)",
    "causal_block_size": "MAGI-1's chunk width is part of the model's schedule",
    "base_frames": "MAGI-1 walks the whole video in one window of chunks (no segments to size)",
    "overlap": "MAGI-1 generates every chunk once (no overlapping segments)",
    "addnoise_condition": "MAGI-1 has no noised clean prefix",
}


def _refuse_fields(spec: JobSpec) -> None:
    for name, why in REFUSED_FIELDS.items():
        value = getattr(spec, name)
        if value is not None and value != "":
            raise SpecError(f"spec field {name!r}: {why}; remove it for a MAGI-1 model")
    if spec.backend != "local":
        raise SpecError("spec field 'backend': MAGI-1 jobs run in process for now (the Ray path, "
                        "cluster.magi, is not a segment backend yet); set backend: local")


def describe_magi(spec: JobSpec, ref: Any) -> Any:
    """The `VideoPlan` of a MAGI-1 spec (JSON and file names only); SpecError in one line."""
    from jobs.setup import VideoPlan, resolve_accel, resolve_device
    from pipelines.magi1.model import MagiConfig
    from pipelines.skyreels_v2.pipeline import SegmentPlan

    fam = _family()
    _refuse_fields(spec)
    parts, size, config = _describe_model(spec, ref, fam)
    sampling = fam.sampling_defaults(size)
    if parts is not None and parts.runtime:
        sampling = _with_runtime(sampling, parts.runtime)
    overrides: dict[str, Any] = {}
    if spec.steps is not None:
        overrides["num_steps"] = spec.steps
    if spec.shift is not None:
        overrides["shift"] = spec.shift
    if spec.fps is not None:
        overrides["fps"] = spec.fps
    if spec.guidance is not None:
        if sampling.cfg_number != 3:
            raise SpecError(f"spec field 'guidance': the distilled MAGI-1 model ({size}) runs one pass without "
                            f"classifier-free guidance; remove guidance")
        overrides["text_scale"] = spec.guidance
    args = replace(sampling, **overrides)
    try:
        args.sample_args()                                        # the schedule's own checks
        resolution = fam.parse_resolution(spec.resolution or args.resolution)
        MagiConfig.from_dict(config)
    except ValueError as err:
        raise SpecError(f"spec schedule (MAGI-1): {short(str(err), 300)}") from None
    frames = spec.frame_count(args.fps)
    chunks = fam.chunk_count(frames, args.chunk_width)
    width = args.chunk_width
    segments = [SegmentPlan(index=i, start=i * width, num_frames=width, window=args.base_num_frames)
                for i in range(chunks)]
    accel, accel_source, mismatch = resolve_accel(spec, args, frames, None, family=FAMILY, size=size)
    decode = "magi vae" if spec.decode == "vae" else "latent preview"
    defaults = {"size": size or "custom", "resolution": resolution.name, "transformer": config,
                "parts": None if parts is None else {"weights": parts.weights, "vae": parts.vae, "t5": parts.t5,
                                                     "special_tokens": parts.special_tokens}}
    kind = "tiny" if ref.kind == "tiny" else "checkpoint"
    return VideoPlan(spec, kind, ref.source, args, frames, args.fps, fam.LATENT_CHANNELS, resolution.latent_size,
                     chunks * width, 0, fam.VAE_TEMPORAL, segments, accel, accel_source, mismatch, defaults,
                     resolve_device(spec), resolution.size_text, 0, decode, family=FAMILY, vae_causal=fam.VAE_CAUSAL)


def _describe_model(spec: JobSpec, ref: Any, fam: Any) -> tuple[Any, str | None, dict[str, Any]]:
    """(folder parts or None, named size, model_config dict)."""
    from pipelines.magi1.sizes import config_for

    if ref.kind == "size":
        raise SpecError(f"spec field 'model': {ref.source!r} names a MAGI-1 size, not weights (only "
                        f"{fam.MODEL_PREFIX}tiny has built-in random weights); give the model folder, e.g. "
                        f"ckpt/magi/4.5B_distill of sand-ai/MAGI-1 (with ckpt/vae and ckpt/t5/t5-v1_1-xxl, as the "
                        f"release lays them out)")
    if ref.kind == "tiny":
        return None, "tiny", config_for("tiny").to_dict()
    try:
        parts = fam.find_parts(ref.source)
    except ValueError as err:
        raise SpecError(f"spec field 'model': {short(str(err), 300)}") from None
    except Exception as err:   # noqa: BLE001  (storage faults: one line, never a traceback)
        raise SpecError(f"spec field 'model': cannot read {short(ref.source)} ({type(err).__name__}: "
                        f"{short(str(err), 80)})") from None
    missing = fam.missing_files(parts, text_encoder=True, vae=spec.decode == "vae")
    if missing:
        fixes = ["download the missing part(s) as the release lays them out"]
        if spec.decode == "vae" and any("MAGI VAE" in m for m in missing):
            fixes.append("or set decode: preview for a latent preview")
        raise SpecError(f"spec field 'model': missing {'; '.join(missing)}; {', '.join(fixes)}")
    _check_weights(parts.weights)
    size = parts.size or fam.size_of_config(parts.config)
    if parts.config is not None:
        config = dict(parts.config)
    elif size is not None:
        config = config_for(size).to_dict()
    else:
        raise SpecError(f"spec field 'model': {short(parts.root)} has no config.json and its folder names do not "
                        f"say the size (the release's ckpt/magi/4.5B_base, 4.5B_distill, 24B_base, 24B_distill); "
                        f"add config.json with the model_config, or keep the release's folder names")
    if size is None and parts.weights and parts.weights.rstrip("/").endswith(".distill"):
        size = "4.5b-distill" if config.get("num_layers") == 34 else "24b-distill"
    return parts, size, config


def _check_weights(folder: str) -> None:
    from fsspec.core import url_to_fs

    from pipelines.magi1.checkpoint import shard_names

    try:
        fs, root = url_to_fs(folder)
        shard_names(fs, root, where=folder)
    except ValueError as err:
        raise SpecError(f"spec field 'model': {short(str(err), 300)}") from None


def _with_runtime(sampling: Any, runtime: dict[str, Any]) -> Any:
    """A whole official config's runtime_config replaces the size's defaults it names."""
    values: dict[str, Any] = {}
    for key in ("num_steps", "window_size", "chunk_width", "fps", "cfg_number"):
        if isinstance(runtime.get(key), int):
            values[key] = runtime[key]
    h, w = runtime.get("video_size_h"), runtime.get("video_size_w")
    if isinstance(h, int) and isinstance(w, int):
        values["resolution"] = f"{w}x{h}"
    return replace(sampling, **values)


# ------------------------------------------------------------------------------------ load

class MagiFrames:
    """`FrameDecoder.decode_latents` of the MAGI VAE: each chunk decoded on its own (upstream's
    `decode_chunk`), pixels [-1, 1] -> uint8 as upstream ((x * 127.5 + 127.5) clamped, truncated)."""

    def __init__(self, vae: torch.nn.Module, tiling: Any):
        self.vae, self.tiling = vae, tiling

    def __call__(self, latents: torch.Tensor, starts_stream: bool) -> np.ndarray:
        from pipelines.magi1.vae import MagiVAEStreamDecoder, to_uint8

        stream = MagiVAEStreamDecoder(self.vae, self.tiling)
        frames = stream.decode_segment(latents[None].to(self.vae.dtype), final=True)   # [T, 3, H, W]
        return to_uint8(frames.float()).permute(0, 2, 3, 1).cpu().numpy()


def load_magi(plan: Any, models: dict[str, Any], keep_text_encoder: bool = False) -> Any:
    """Text first (T5, then freed: T5-XXL and the DiT never sit in memory together), the DiT, the VAE,
    the frame decoder."""
    from jobs.setup import FrameDecoder, LoadedVideo, _release_memory, latent_preview

    fam = _family()
    parts = plan.defaults.get("parts") or {}
    config = plan.defaults["transformer"]
    tiny = plan.kind == "tiny"
    # 1. text: (caption [1, L, C], mask [1, L])
    key = f"{plan.source}:t5@{plan.device}"
    encoder = models.get(key)
    if encoder is None:
        encoder = fam.build_text_encoder(None if tiny else parts["t5"], config["caption_max_length"], plan.device)
    with torch.no_grad():
        caption, mask = encoder([plan.spec.prompt])
    caption, mask = caption.float(), mask.float()
    if keep_text_encoder:
        models[key] = encoder
    else:
        del encoder
        _release_memory(plan.device)
    if not torch.isfinite(caption).all():
        raise SpecError("spec field 'model': the T5 encoder gave NaN or inf for the prompt; check its weights "
                        "(re-download t5-v1_1-xxl)")
    tokens = "none (no special_tokens.npz beside the model)"
    if parts.get("special_tokens"):                   # upstream's [DURATION, HQ, caption] rows: [1, 8, L, C]
        other = fam.load_other_tokens(parts["special_tokens"])
        if other.shape[-1] != caption.shape[-1]:
            raise SpecError(f"spec field 'model': {short(parts['special_tokens'])} holds {other.shape[-1]}-channel "
                            f"tokens, the T5 captions have {caption.shape[-1]}; it is another model's file")
        caption, mask = fam.special_token_caption(caption[0], mask[0], other, config["caption_max_length"])
        caption, mask = caption[None], mask[None]
        tokens = "HQ + duration (special_tokens.npz)"
    # 2. the DiT
    key = f"{plan.source}@{plan.device}"
    if key not in models:
        models[key] = fam.build_transformer(None if tiny else parts["weights"], plan.defaults["size"],
                                            None if tiny else config, plan.device)
    model = models[key]
    # 3. the VAE and 4. the frame decoder
    if plan.decode == "magi vae":
        key = f"{plan.source}:vae@{plan.device}"
        if key not in models:
            models[key] = fam.build_vae(None if tiny else parts["vae"], plan.device)
        decoder = FrameDecoder(MagiFrames(models[key], fam.vae_tiling(plan.fps)), plan.frames,
                               temporal=fam.VAE_TEMPORAL, kind="MAGI VAE (per chunk)", causal=fam.VAE_CAUSAL)
    else:
        decoder = FrameDecoder(lambda latents, _: latent_preview(latents, False), plan.frames,
                               temporal=fam.VAE_TEMPORAL, kind="latent preview", causal=fam.VAE_CAUSAL)
    text = "tiny T5 (random weights, hashing tokenizer)" if tiny else f"T5 ({parts['t5']})"
    extra = {"decode": decoder.kind, "text": text, "special_tokens": tokens, "resolution": plan.resolution,
             "family": FAMILY,
             "size": plan.defaults.get("size") or "custom", "text_len": config["caption_max_length"],
             "chunks": len(plan.segments), "cfg_passes": plan.args.cfg_number}
    return LoadedVideo(model, caption.to(plan.device), mask.to(plan.device), None, decoder, extra)


# ------------------------------------------------------------------------------------ the sampler

@dataclass
class MagiSegmentInfo:
    """What one segment (one generated chunk) of the walk did, as the loop reads a `SegmentInfo`."""

    plan: Any                       # the loop's SegmentPlan
    latents: torch.Tensor           # [C, chunk_width, h, w] the chunk, clean
    model_calls: int = 0            # forward passes (3 per walk call for base models)
    row_seconds: list[float] = field(default_factory=list)   # one per walk call
    request_id: str = ""
    accel_stats: Any = None
    calls: int = 0                  # walk calls since the previous chunk
    resume_state: Any = None        # `jobs.runner.SamplerState` of the walk after this chunk
    num_prefix: int = 0

    @property
    def rows(self) -> int:
        return self.calls


class MagiSegmentSampler:
    """The MAGI-1 walk as the segment loop's backend (see the module docstring). One walk at a time:
    B videos (`start_videos`) advance together, segment by segment, in order."""

    def __init__(self, plan: Any, loaded: Any, accel: Any = None):
        from pipelines.magi1.pipeline import MagiPipeline

        self.plan, self.model, self.accel = plan, loaded.model, accel
        self.pipeline = MagiPipeline(loaded.model, accel)
        self.seeds = [plan.spec.seed]
        self._walk: Any = None
        self._chunks: Any = None
        self._next_segment = 0
        self._restore: Any = None
        self._seconds: list[float] = []

    # -- the loop's protocol ---------------------------------------------------------------------
    def start_videos(self, plans: list[Any]) -> None:
        """The videos walked together (each draws its noise from its own seed)."""
        self.close()
        self.seeds = [p.spec.seed for p in plans]

    def resume(self, sampler_state: Any, next_segment: int) -> None:
        """Continue at segment `next_segment` from the walk state a checkpoint kept."""
        from jobs.runner import RunFault

        if next_segment > 0 and sampler_state is None:
            raise RunFault("the checkpoint holds no MAGI-1 walk state (written by an older version?); start "
                           "over in a new out folder")
        self.close()
        self._restore, self._next_segment = sampler_state, next_segment

    def sample_segment(self, noise: torch.Tensor, context: torch.Tensor, negative_context: torch.Tensor | None,
                       args: Any, *, plan: Any, prefix_latents: torch.Tensor | None = None, addnoise_eps: Any = None,
                       request_id: str = "magi1") -> MagiSegmentInfo:
        return self.sample_segment_batch([noise], [context], [negative_context], args, plan=plan,
                                         prefixes=[prefix_latents], eps_sources=[addnoise_eps],
                                         request_ids=[request_id])[0]

    def sample_segment_batch(self, noises: list[torch.Tensor], contexts: list[torch.Tensor],
                             negative_contexts: list[torch.Tensor | None], args: Any, *, plan: Any,
                             prefixes: list[Any], eps_sources: list[Any], request_ids: list[str]
                             ) -> list[MagiSegmentInfo]:
        """Advance the walk until generated chunk `plan.index` is clean, for every video."""
        if len(noises) != len(self.seeds):
            raise ValueError(f"{len(noises)} videos in this segment, the walk was started for {len(self.seeds)} "
                             f"(call start_videos with every plan first)")
        if self._walk is None:
            self._open(contexts, negative_contexts, args, first=list(request_ids))
        if plan.index != self._next_segment:
            raise RuntimeError(f"the MAGI-1 walk makes its chunks in order: segment {self._next_segment} is next, "
                               f"{plan.index} was asked for")
        walk = self._walk
        walk.requests = list(request_ids)                 # this segment's accelerator requests
        calls, model_calls, self._seconds = walk.position, walk.model_calls, []
        out = next(self._chunks)
        stats = [self.accel.end_request(r) if self.accel is not None else None for r in request_ids]
        state = self._state()
        info = [MagiSegmentInfo(plan=plan, latents=out.latents[b], model_calls=walk.model_calls - model_calls,
                                row_seconds=list(self._seconds), request_id=request_ids[b], accel_stats=stats[b],
                                calls=walk.position - calls, resume_state=state)
                for b in range(len(request_ids))]
        self._next_segment += 1
        if self._next_segment == len(self.plan.segments):
            self.close()
        return info

    def close(self) -> None:
        if self._walk is not None:
            self._walk.end()
        self._walk = self._chunks = None

    # -- pieces ----------------------------------------------------------------------------------
    def _open(self, contexts: list[torch.Tensor], masks: list[torch.Tensor | None], args: Any,
              first: list[str]) -> None:
        from pipelines.magi1.pipeline import Caption, WalkState

        chunks = len(self.plan.segments)
        # a caption [1, L, C], or its duration variants [1, 8, L, C] (upstream's special tokens)
        captions = [Caption(c[0], m[0], chunk_rows=_family().duration_rows(chunks) if c.dim() == 4 else None)
                    for c, m in zip(contexts, masks)]
        self._walk = self.pipeline.walk(self._noise, captions, args.sample_args(), num_chunks=chunks,
                                        latent_shape=(self.plan.channels, *self.plan.latent_size),
                                        request_ids=first, on_call=lambda record: self._seconds.append(record.seconds))
        start = 0
        if self._restore is not None:
            state = WalkState.from_tensors(int(self._restore.meta["next_call"]), self._restore.tensors,
                                           device=self._walk.device)
            self._walk.restore(state)
            start, self._restore = state.next_call, None
        self._chunks = self._walk.run(start)

    def _noise(self, chunk: int) -> torch.Tensor:
        """Chunk `chunk`'s noise [B, C, cw, h, w]: each video's named draw `segment_noise(chunk)`."""
        from jobs.runner import Draws

        shape = (self.plan.channels, self.plan.args.chunk_width, *self.plan.latent_size)
        return torch.stack([Draws(seed).segment_noise(chunk, shape) for seed in self.seeds])

    def _state(self) -> Any:
        from jobs.runner import SamplerState

        snapshot = self._walk.snapshot()
        return SamplerState({"next_call": snapshot.next_call, "kind": "magi-1 walk"}, snapshot.to_tensors())


def measure_mag_ratios(plan: Any, loaded: Any) -> tuple[dict[str, list[float]], int]:
    """MagCache's calibration step on MAGI-1: one walk of `plan` at full compute (`calibrate=true`),
    segment by segment as the jobs run it (each segment its own request, so a chunk's step index
    restarts with each segment, as it will when MagCache runs); returns ({branch: ratio per step},
    num_steps)."""
    from scope.baselines import mag_ratio_table
    from scope.config import make_config
    from scope.hooks import apply_accel, remove_accel
    from scope.stats import merge_stats

    fam = _family()
    remove_accel(loaded.model)
    accel = apply_accel(loaded.model, make_config("magcache", calibrate=True, **fam.SELECTIVE_EXACT),
                        fam.accel_adapter())
    sampler = MagiSegmentSampler(plan, loaded, accel)
    parts = []
    try:
        with torch.no_grad():
            for segment in plan.segments:
                info = sampler.sample_segment(None, loaded.context, loaded.negative, plan.args, plan=segment,
                                              request_id=f"calibrate/seg{segment.index}")
                parts.append(info.accel_stats)
    finally:
        sampler.close()
        remove_accel(loaded.model)
    merged = merge_stats("calibrate", parts)
    return mag_ratio_table(merged.mag_ratios, plan.args.num_steps), plan.args.num_steps


# ------------------------------------------------------------------------------------ the bench

# `scope bench --model magi-1-...` without --prompts-file: generic captions (the tiny model is random:
# it reads them as distinct token sets, nothing more); the calibration caption is never benched
BENCH_PROMPTS = ("a red car drives along a coastal road at sunset", "a cat sleeps on a windowsill in the rain",
                 "waves crash against black rocks", "a chef slices vegetables in a busy kitchen",
                 "a hot air balloon rises over green hills", "snow falls on a quiet city street at night")
CALIBRATION_PROMPT = "a paper boat floats down a stream"


class _FrameSink:
    """A `SegmentWriter` that keeps the frames in memory (the bench compares whole videos)."""

    def __init__(self) -> None:
        self.parts: dict[int, np.ndarray] = {}

    def has_segment(self, index: int) -> bool:
        return index in self.parts

    def write_segment(self, index: int, frames: np.ndarray) -> None:
        self.parts[index] = frames

    def video(self) -> np.ndarray:
        return np.concatenate([self.parts[i] for i in sorted(self.parts)])


class MagiBenchModel:
    """What `jobs.bench` needs of a model, for MAGI-1: each case is one `scope generate` of the
    prompt through the jobs' own chain (T5 -> walk with the case's accelerator -> MAGI VAE), the
    hooks attached outside the timed region; the reference runs with no hooks at all. Weights,
    T5 and VAE load once (a `models` cache)."""

    supports_floor = False     # identity blocks would leave MAGI's clean-chunk K/V cache unwritten

    def __init__(self, model: str, steps: int | None = None, device: str = "cpu"):
        self.path, self.steps, self.device = model, steps, device
        self.models: dict[str, Any] = {}
        self.calibration_prompt = CALIBRATION_PROMPT
        self.transformer: Any = None

    def _spec(self, prompt: str, frames: int, seed: int) -> JobSpec:
        return JobSpec(prompt=prompt, model=self.path, frames=frames, seed=seed, steps=self.steps, device=self.device)

    def _load(self, prompt: str, frames: int, seed: int) -> tuple[Any, Any]:
        from jobs.setup import describe, load

        plan = describe(self._spec(prompt, frames, seed))
        loaded = load(plan, self.models)
        self.transformer = loaded.model
        return plan, loaded

    def schedule_args(self, **_: Any) -> Any:
        """The schedule every case runs (the bench's ar_step does not apply: MAGI's stagger is fixed)."""
        from jobs.setup import describe

        return describe(self._spec("x", 48, 0)).args

    def describe_schedule(self) -> str:
        a = self.schedule_args()
        return (f"{a.num_steps} steps, window {a.window_size} x {a.chunk_width} latents, "
                f"{a.cfg_number} pass{'es' if a.cfg_number > 1 else ''} per step")

    def prompts(self, prompts_file: str | None, n: int | None) -> list[str]:
        from jobs.bench import DEFAULT_PROMPTS, read_prompts_file

        if prompts_file is not None:
            if n is not None:
                raise ValueError("give either --prompts-file or --prompts, not both")
            captions = [c for _, c in read_prompts_file(prompts_file)]
            if not captions:
                raise ValueError(f"{prompts_file}: no captions (one per line; blank lines and '#' comments skipped)")
            return captions
        n = DEFAULT_PROMPTS if n is None else n
        if not 1 <= n <= len(BENCH_PROMPTS):
            raise ValueError(f"--prompts must be in [1, {len(BENCH_PROMPTS)}] for MAGI-1; got {n}")
        return list(BENCH_PROMPTS[:n])

    def measure_mag_ratios(self, frames: int, seed: int) -> tuple[dict[str, list[float]], int]:
        plan, loaded = self._load(self.calibration_prompt, frames, seed)
        return measure_mag_ratios(plan, loaded)

    def generate_record(self, case: Any, prompt: str, frames: int, seed: int, **_: Any) -> Any:
        """One video of a case (`jobs.bench.RunRecord`; no content check)."""
        import gc
        import time

        from jobs.bench import RunRecord
        from jobs.runner import VideoRun
        from scope.config import AccelConfig
        from scope.hooks import apply_accel, remove_accel

        plan, loaded = self._load(prompt, frames, seed)
        remove_accel(loaded.model)
        accel = None
        if case.config is not None:
            plan.accel = AccelConfig.from_dict(case.config)
            accel = apply_accel(loaded.model, plan.accel, _family().accel_adapter())
        sink = _FrameSink()
        gc.collect()
        try:
            sampler = MagiSegmentSampler(plan, loaded, accel)
            cpu_started, started = time.process_time(), time.perf_counter()
            summary = VideoRun(plan, loaded, sampler, sink, None).run()
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        finally:
            remove_accel(loaded.model)
        stats = summary.state.accel
        record = RunRecord(prompt, seed, wall, sink.video(), cpu)
        if accel is not None:
            record.block_evals, record.block_evals_full = stats.block_evals, stats.block_evals_full
            record.modes, record.reasons = stats.modes.to_dict(), dict(stats.reasons)
        return record


def open_magi_sampler(plan: Any, loaded: Any) -> MagiSegmentSampler:
    """The in-process sampler with the plan's accelerator attached to the DiT from outside."""
    from scope.hooks import apply_accel, remove_accel

    remove_accel(loaded.model)
    accel = apply_accel(loaded.model, plan.accel, _family().accel_adapter())
    return MagiSegmentSampler(plan, loaded, accel)


__all__ = ["MagiBenchModel", "MagiFrames", "MagiSegmentInfo", "MagiSegmentSampler", "describe_magi", "load_magi",
           "measure_mag_ratios", "open_magi_sampler"]

