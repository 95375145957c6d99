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
from safetensors.torch import load_file

from pipelines.procedural.codec import PatchCodec
from pipelines.procedural.data import ClipConfig, empty_scene
from pipelines.procedural.text import TextEncoder, tokenize
from pipelines.skyreels_v2.checkpoint import load_transformer
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
        values = {field: self.defaults[key] for key, field in _SCHEDULE_KEYS.items() if key in self.defaults}
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


def load_bundle(path: str | Path | None = None) -> ProceduralBundle:
    """Load a weights folder written by `train.py` (None = the shipped one); strict everywhere."""
    folder = WEIGHTS_DIR if path is None else Path(path)
    needed = ["config.json", "model.safetensors", "model.safetensors.index.json", "text_encoder.json", "text_encoder.safetensors",
              "codec.json", "codec.safetensors", "pipeline.json"]
    absent = [n for n in needed if not (folder / n).is_file()]
    if absent:
        hint = ("train them with `.venv/bin/python -m pipelines.procedural.train --out "
                f"{folder}`" if path is None else "is this a folder written by pipelines.procedural.train?")
        raise FileNotFoundError(f"procedural weights folder {folder} lacks {absent}; {hint}")
    transformer = load_transformer(str(folder))
    text_config = json.loads((folder / "text_encoder.json").read_text())
    text_encoder = TextEncoder(**text_config)
    text_encoder.load_state_dict(load_file(str(folder / "text_encoder.safetensors")), strict=True)
    codec = PatchCodec.load(folder / "codec")
    defaults = json.loads((folder / "pipeline.json").read_text())
    cfg = transformer.config
    if (text_encoder.text_dim, text_encoder.text_len) != (cfg.text_dim, cfg.text_len):
        raise ValueError(f"{folder}: text encoder gives [{text_encoder.text_len}, {text_encoder.text_dim}] "
                         f"but the transformer expects [{cfg.text_len}, {cfg.text_dim}]")
    if codec.channels != cfg.in_dim:
        raise ValueError(f"{folder}: codec has {codec.channels} latent channels, transformer in_dim {cfg.in_dim}")
    return ProceduralBundle(transformer.eval(), text_encoder.eval(), codec, defaults, folder)


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
