"""The shipped procedural model as one object, and prompt -> video with the DF pipeline.

    bundle = load_bundle()                     # pipelines/procedural/weights
    frames, latents, info = generate_video(bundle, "a red circle moves right", frames=48, seed=0)

`generate_video` encodes the prompt (and the empty caption for CFG), draws the noise from the
seed, runs `DFPipeline` with the bundle's defaults (asynchronous schedule, block-causal
attention; a video longer than `base_num_frames` is made of segments that overlap by
`overlap_frames` latents, kept in latent space), and decodes with the codec. One latent frame
is one video frame (the codec has no temporal compression).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from pipelines.procedural.codec import PatchCodec
from pipelines.procedural.data import ClipConfig, empty_scene
from pipelines.procedural.text import EOS, TextEncoder, tokenize
from pipelines.skyreels_v2.checkpoint import (REDOWNLOAD, CheckpointError, excerpt, load_transformer,
                                              parse_json_object, read_safetensors, state_dict_mismatch,
                                              unreadable_safetensors)
from pipelines.skyreels_v2.model import WanDFTransformer
from pipelines.skyreels_v2.pipeline import DFPipeline, DFResult, ScheduleArgs

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
EXAMPLE_PROMPT = "a red circle moves right"

# pipeline.json key -> ScheduleArgs field (the keys the sampler reads)
_SCHEDULE_KEYS = {"num_inference_steps": "num_steps", "shift": "shift", "guidance_scale": "guidance_scale",
                  "ar_step": "ar_step", "causal_block_size": "causal_block_size",
                  "base_num_frames": "base_num_frames", "overlap_frames": "overlap_frames",
                  "addnoise_condition": "addnoise_condition", "causal_attention": "causal_attention"}
_OTHER_OVERRIDES = ("negative_prompt", "progress", "on_row", "request_id")


@dataclass
class ProceduralBundle:
    """Transformer, text encoder, codec and sampling defaults (`pipeline.json`) of one weights folder."""

    transformer: WanDFTransformer
    text_encoder: TextEncoder
    codec: PatchCodec
    defaults: dict[str, Any]
    path: Path

    @property
    def vocabulary(self) -> list[str]:
        return sorted(self.text_encoder.vocab[1:])

    def reference_latents(self, causal_block_size: int) -> torch.Tensor | None:
        """Clean latents [C, cbs, h, w] of the empty scene that start every video, or None when
        the weights were trained without a reference block (`pipeline.json` "reference_block")."""
        if not self.defaults.get("reference_block", False):
            return None
        scene = empty_scene(ClipConfig(height=self.defaults.get("height", 64), width=self.defaults.get("width", 64),
                                       num_frames=causal_block_size,
                                       background_style=self.defaults.get("background_style", "position")))
        return self.codec.encode(scene[None])[0]

    def latent_size(self) -> tuple[int, int]:
        return self.defaults.get("height", 64) // self.codec.patch, self.defaults.get("width", 64) // self.codec.patch

    def schedule_args(self, **overrides: Any) -> ScheduleArgs:
        """ScheduleArgs from the defaults; overrides by pipeline.json or ScheduleArgs name (None = default)."""
        return schedule_from_defaults(self.defaults, **overrides)


def schedule_from_defaults(defaults: dict[str, Any], **overrides: Any) -> ScheduleArgs:
    """ScheduleArgs from a `pipeline.json` dict; overrides by pipeline.json or ScheduleArgs name
    (None = the default). Needs no weights: a job checks its schedule before loading them."""
    values = {field: defaults[key] for key, field in _SCHEDULE_KEYS.items() if key in defaults}
    valid = {f.name for f in fields(ScheduleArgs)}
    for key, value in overrides.items():
        name = _SCHEDULE_KEYS.get(key, key)
        if name not in valid:
            raise ValueError(f"unknown sampling setting {key!r}; valid: "
                             f"{sorted(set(_SCHEDULE_KEYS) | valid | set(_OTHER_OVERRIDES))}")
        if value is not None:
            values[name] = value
    return ScheduleArgs(**values)


def default_accel_config(method: str, folder: str | Path | None = None,
                         schedule: dict[str, Any] | None = None) -> Any:
    """The calibrated accelerator config a weights folder ships for `method`, or None.

    `<folder>/accel/<method>.json` and `<folder>/accel/<method>.<label>.json` (written by
    `scope calibrate`, each recording the schedule it was calibrated for); with `schedule`, the
    one whose calibration schedule differs from it in the fewest keys (ties: file name order)."""
    from scope.config import load_config

    root = (WEIGHTS_DIR if folder is None else Path(folder)) / "accel"
    paths = sorted(root.glob(f"{method}.json")) + sorted(root.glob(f"{method}.*.json"))
    configs = [load_config(p) for p in paths]
    if not configs:
        return None
    if schedule is None:
        return configs[0]
    return min(configs, key=lambda c: len(c.schedule_mismatch(schedule)))


# files of a weights folder, in the order train.py writes them
BUNDLE_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "text_encoder.json",
                "text_encoder.safetensors", "codec.json", "codec.safetensors", "pipeline.json"]
TEXT_ENCODER_KEYS = {"vocab", "text_len", "text_dim"}

# pipeline.json keys the loader and sampler read -> the JSON value they need (others are notes, e.g. "training")
_INT, _NUMBER, _BOOL, _STR, _INT_OR_NULL = "an integer", "a number", "true/false", "a string", "an integer or null"
_PIPELINE_TYPES = {"num_inference_steps": _INT, "shift": _NUMBER, "guidance_scale": _NUMBER, "ar_step": _INT,
                   "causal_block_size": _INT, "base_num_frames": _INT_OR_NULL, "overlap_frames": _INT_OR_NULL,
                   "addnoise_condition": _INT, "causal_attention": _BOOL, "reference_block": _BOOL,
                   "height": _INT, "width": _INT, "fps": _INT, "background_style": _STR}


def load_bundle(path: str | Path | None = None) -> ProceduralBundle:
    """Load a weights folder written by `train.py` (None = the shipped one); strict everywhere.

    Any fault of the folder (missing, empty, truncated or invalid file, parts that do not fit
    together) is one line: a CheckpointError (a ValueError) or, for absent files, FileNotFoundError.
    """
    folder = WEIGHTS_DIR if path is None else Path(path)
    fix = _retrain_hint(folder, shipped=path is None)
    _check_files_present(folder, fix)
    # the small JSON files first: a typo there fails before megabytes of weights are read
    text_settings = _read_text_encoder_settings(folder / "text_encoder.json", fix)
    _read_codec_settings(folder / "codec.json", fix)
    defaults = _read_pipeline_defaults(folder / "pipeline.json", fix)
    transformer = load_transformer(str(folder))
    text_encoder = _load_text_encoder(folder / "text_encoder.safetensors", text_settings, fix)
    codec = _load_codec(folder / "codec", fix)
    cfg = transformer.config
    if (text_encoder.text_dim, text_encoder.text_len) != (cfg.text_dim, cfg.text_len):
        raise CheckpointError(f"{folder}: text encoder gives [{text_encoder.text_len}, {text_encoder.text_dim}] "
                              f"but the transformer expects [{cfg.text_len}, {cfg.text_dim}]; {fix}")
    if codec.channels != cfg.in_dim:
        raise CheckpointError(f"{folder}: codec has {codec.channels} latent channels, transformer in_dim "
                              f"{cfg.in_dim}; {fix}")
    bundle = ProceduralBundle(transformer.eval(), text_encoder.eval(), codec, defaults, folder)
    _check_defaults_fit(bundle, fix)
    return bundle


def _retrain_hint(folder: Path, shipped: bool) -> str:
    """How to get a good folder back: the end of every message about a bad one."""
    command = f"`.venv/bin/python -m pipelines.procedural.train --out {folder}`"
    return f"train it again with {command}" if shipped else f"restore the file or re-train the folder with {command}"


def _check_files_present(folder: Path, fix: str) -> None:
    if not folder.is_dir():
        problem = "a file, not a folder" if folder.exists() else "no such folder"
        raise CheckpointError(f"{folder}: not a procedural weights folder ({problem}); it holds "
                              f"{', '.join(BUNDLE_FILES)}")
    absent = [n for n in BUNDLE_FILES if not (folder / n).is_file()]
    if absent:
        raise FileNotFoundError(f"procedural weights folder {folder} lacks {absent}; {fix}")


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    return parse_json_object(path.read_bytes(), str(path), fix)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_text_encoder_settings(path: Path, fix: str) -> dict[str, Any]:
    """text_encoder.json checked here, so TextEncoder never fails with a TypeError or a long vocab dump."""
    settings = _read_json(path, fix)
    unknown = sorted(set(settings) - TEXT_ENCODER_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {excerpt(', '.join(unknown))}; expected "
                              f"{sorted(TEXT_ENCODER_KEYS)}; {fix}")
    vocab = settings.get("vocab")
    if not (isinstance(vocab, list) and vocab and all(isinstance(w, str) and w for w in vocab)):
        raise CheckpointError(f'{path}: "vocab" must be a non-empty array of words, found '
                              f"{excerpt(json.dumps(vocab))}; {fix}")
    if len(set(vocab)) != len(vocab) or EOS in vocab:
        raise CheckpointError(f'{path}: "vocab" must hold distinct words and not {EOS!r}; {fix}')
    for key, least in (("text_len", 2), ("text_dim", 1)):
        if key in settings and not (_is_int(settings[key]) and settings[key] >= least):
            raise CheckpointError(f'{path}: "{key}" must be an integer >= {least}, found '
                                  f"{excerpt(json.dumps(settings[key]))}; {fix}")
    return settings


def _read_codec_settings(path: Path, fix: str) -> dict[str, Any]:
    """codec.json checked here: PatchCodec.load would fail on it with a bare KeyError or TypeError."""
    settings = _read_json(path, fix)
    for key in ("patch", "channels"):
        if not (_is_int(settings.get(key)) and settings[key] >= 1):
            found = excerpt(json.dumps(settings[key])) if key in settings else "nothing"
            raise CheckpointError(f'{path}: "{key}" must be a positive integer, found {found}; {fix}')
    return settings


def _read_pipeline_defaults(path: Path, fix: str) -> dict[str, Any]:
    """pipeline.json, with the type of every key the sampler reads checked (ranges: `_check_defaults_fit`)."""
    defaults = _read_json(path, fix)
    for key, kind in _PIPELINE_TYPES.items():
        if key in defaults and not _has_json_type(defaults[key], kind):
            raise CheckpointError(f'{path}: "{key}" must be {kind}, found {excerpt(json.dumps(defaults[key]))}; '
                                  f"{fix}")
    return defaults


def _has_json_type(value: Any, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _NUMBER:
        return _is_int(value) or isinstance(value, float)
    return _is_int(value) or (kind == _INT_OR_NULL and value is None)


def _load_text_encoder(path: Path, settings: dict[str, Any], fix: str) -> TextEncoder:
    text_encoder = TextEncoder(**settings)
    state = read_safetensors(path)
    mismatch = state_dict_mismatch(text_encoder, state)
    if mismatch:
        raise CheckpointError(f"{path}: does not fit text_encoder.json ({mismatch}); {fix}")
    text_encoder.load_state_dict(state, strict=True)
    return text_encoder


def _load_codec(stem: Path, fix: str) -> PatchCodec:
    """PatchCodec.load, its library and key errors turned into one line naming codec.safetensors."""
    label = str(stem.with_name(stem.name + ".safetensors"))
    try:
        return PatchCodec.load(stem)
    except SafetensorError as err:
        raise unreadable_safetensors(label, err) from None
    except KeyError as err:   # str(KeyError) would wrap the message in quotes
        raise CheckpointError(f"{err.args[0]}; {REDOWNLOAD}") from None
    except ValueError as err:  # shapes that do not fit codec.json
        raise CheckpointError(f"{err}; {fix}") from None


def _check_defaults_fit(bundle: ProceduralBundle, fix: str) -> None:
    """The sampling defaults make a valid schedule and a frame size the codec can encode."""
    label = bundle.path / "pipeline.json"
    try:
        bundle.schedule_args()
    except ValueError as err:
        raise CheckpointError(f"{label}: {err}; {fix}") from None
    patch = bundle.codec.patch
    for key in ("height", "width"):
        size = bundle.defaults.get(key, 64)
        if size < patch or size % patch:
            raise CheckpointError(f'{label}: "{key}" must be a positive multiple of the codec patch {patch}, '
                                  f"found {size}; {fix}")


def check_prompt(bundle: ProceduralBundle, prompt: str) -> None:
    """Raise ValueError naming any word the model does not know, with its vocabulary."""
    if not isinstance(prompt, str) or not tokenize(prompt):
        raise ValueError(f"prompt is empty; describe one object, e.g. {EXAMPLE_PROMPT!r}")
    known = set(bundle.vocabulary)
    unknown = [w for w in tokenize(prompt) if w not in known]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: the procedural model does not know the word(s) "
                         f"{', '.join(repr(w) for w in unknown)}; its vocabulary is {bundle.vocabulary} "
                         f"(captions look like {EXAMPLE_PROMPT!r}, 'a blue square bounces', "
                         f"'a white triangle stays still')")
    limit = bundle.text_encoder.text_len - 1
    if len(tokenize(prompt)) > limit:
        raise ValueError(f"prompt {prompt!r} has {len(tokenize(prompt))} words; the model reads at most {limit}")


@torch.no_grad()
def generate_video(bundle: ProceduralBundle, prompt: str, frames: int, seed: int, accel: Any = None,
                   **overrides: Any) -> tuple[np.ndarray, torch.Tensor, dict[str, Any]]:
    """prompt -> (uint8 frames [T, H, W, 3], latents [C, T, h, w], info).

    Overrides: any pipeline.json sampling key (num_inference_steps, shift, guidance_scale, ar_step,
    causal_block_size, base_num_frames, overlap_frames, addnoise_condition) or ScheduleArgs name
    (None keeps the default), plus negative_prompt (default ''), progress(done, total), on_row,
    request_id. info: the ScheduleArgs used, segment and model-call counts, seconds, DFResult.
    """
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive number of video frames, e.g. 48; got {frames!r}")
    check_prompt(bundle, prompt)
    negative_prompt = overrides.pop("negative_prompt", None) or ""
    if negative_prompt:
        check_prompt(bundle, negative_prompt)
    progress: Callable[[int, int], None] | None = overrides.pop("progress", None)
    on_row = overrides.pop("on_row", None)
    request_id = overrides.pop("request_id", None) or f"procedural-{seed}"
    args = bundle.schedule_args(**overrides)

    # 1. text, reference block and noise; latent frames rounded up to whole causal blocks,
    #    the reference block and the rounding trimmed before decoding
    context = bundle.text_encoder([prompt])                       # [1, L, text_dim]
    negative = bundle.text_encoder([negative_prompt])             # '' = the null caption
    cbs = args.causal_block_size
    reference = bundle.reference_latents(cbs)                     # [C, cbs, h, w] or None
    skip = 0 if reference is None else reference.shape[1]
    latent_frames = skip + math.ceil(frames / cbs) * cbs
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(bundle.codec.channels, latent_frames, *bundle.latent_size(), generator=gen)
    # 2. sample (segments overlap in latent space), 3. decode
    pipe = DFPipeline(bundle.transformer, accel=accel)
    result: DFResult = pipe.generate(noise, context, negative, args, prefix_latents=reference, addnoise_eps=gen,
                                     request_id=request_id, progress=progress, on_row=on_row)
    latents = result.latents[:, skip:skip + frames]
    video = bundle.codec.decode(latents)                          # [T, H, W, 3] uint8
    info = {"prompt": prompt, "seed": seed, "frames": frames, "schedule": args,
            "segments": len(result.segments), "model_calls": sum(s.model_calls for s in result.segments),
            "seconds": result.seconds, "result": result}
    return video, latents, info
