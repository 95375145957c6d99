"""SkyReels-V2 DF facts the jobs need, declared once: geometry, resolutions, sampling defaults,
the official folder's files, and the builders of its VAE and text encoder.

Sources: ../shared/reference/NOTES_skyreels_v2.md (sections 1, 3, 6), upstream `generate_video_df.py`
(defaults, negative prompt) and README (540P / 720P, overlap 17, addnoise 20).

Reads top to bottom:
  1. latent geometry: VAE strides, channels, patch; the decoder's measured temporal receptive field
  2. resolutions, and which named size defaults to which
  3. sampling defaults: official (upstream's script + README) and tiny (tests, the plumbing demo)
  4. the official folder: file names, what `describe` checks exists, optional sidecar configs
  5. builders: the VAE and the text encoder of a folder, or the tiny random ones
  6. acceleration: the adapter, per-method defaults (Wan2.1's published constants), what "exact"
     selective computation means here

This module imports nothing heavy at import time (the job spec reads its resolution names); the
builders import the VAE / umT5 modules when called.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.frame_size import parse_frame_size

NAME = "skyreels-v2"

# ----------------------------------------------------------------------------- 1. geometry

VAE_TEMPORAL = 4          # video frames per latent frame after the first (Wan causal VAE)
VAE_SPATIAL = 8           # pixels per latent pixel along H and W
VAE_CAUSAL = True         # latent 0 decodes to frame 0 alone, latent l > 0 to frames [4l - 3, 4l + 1)
LATENT_CHANNELS = 16      # z_dim = the transformer's in_dim / out_dim
PATCH = (1, 2, 2)         # transformer patch (frames, rows, columns)
PIXEL_MULTIPLE = VAE_SPATIAL * PATCH[1]   # a frame side must divide by 16 (VAE x patch)
FPS = 24                  # upstream's default; the 1.3B fps embedding is 0 for 16 fps, 1 otherwise

# The decoder's temporal receptive field in latent frames, measured on the tiny VAE (same depth and
# strides as the official one; only the channel width differs, so the field is the same): perturbing
# latent frame k changes decoded frames up to those of latent k + 38 and none after (exactly zero).
# A decoder warmed on the last DECODER_HISTORY latents before a point decodes every later latent
# exactly as the uninterrupted stream (tested; 38 suffices on the tiny VAE, one more covers the warm
# stream's own first frame, which the causal VAE decodes alone). See `jobs.setup.FrameDecoder`.
DECODER_RECEPTIVE_FIELD = 38
DECODER_HISTORY = DECODER_RECEPTIVE_FIELD + 1


def latents_for_frames(frames: int) -> int:
    """Latent frames that cover `frames` video frames: frame 0 alone, then 4 per latent."""
    return 1 + math.ceil(max(frames - 1, 0) / VAE_TEMPORAL)


def frames_for_latents(latents: int) -> int:
    """Video frames decoded from `latents` latent frames (from the start of a stream)."""
    return 0 if latents <= 0 else 1 + VAE_TEMPORAL * (latents - 1)


# ----------------------------------------------------------------------------- 2. resolutions

@dataclass(frozen=True)
class Resolution:
    """A frame size; `base_frames` is the model window in video frames where upstream names one."""

    name: str
    width: int
    height: int
    base_frames: int | None = None

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_SPATIAL, self.width // VAE_SPATIAL

    @property
    def base_latents(self) -> int | None:
        return None if self.base_frames is None else latents_for_frames(self.base_frames)

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height}"


# 540P = 544 x 960 with base_num_frames 97 (25 latents), 720P = 720 x 1280 with 121 (31 latents)
RESOLUTIONS: dict[str, Resolution] = {
    "540p": Resolution("540p", 960, 544, base_frames=97),
    "720p": Resolution("720p", 1280, 720, base_frames=121),
}
TINY_RESOLUTION = "64x64"   # the tiny sizes: 8 x 8 latents, fast on a CPU
# the resolution each named size makes when the spec names none; a 14B folder is 720P when its
# name says so (the two 14B checkpoints share one config), any other size 540P (upstream's default)
SIZE_RESOLUTION = {"1.3b-540p": "540p", "14b-540p": "540p", "14b-720p": "720p", "tiny": TINY_RESOLUTION}
RESOLUTION_HINT = "540p, 720p, or WxH with W and H multiples of 16 (e.g. 960x544)"


def parse_resolution(text: str) -> Resolution:
    """'540p' / '720p' or 'WxH' with both multiples of 16; ValueError says what is valid."""
    return parse_frame_size(text, RESOLUTIONS, PIXEL_MULTIPLE, Resolution, RESOLUTION_HINT)


def size_name(config: Any, folder: str = "") -> str | None:
    """The named size a transformer config is ('1.3b-540p', '14b-540p', '14b-720p', 'tiny'), else None.

    `config` is a WanDFConfig or its dict; the 14B checkpoints share one config, so the folder's
    name decides between them (e.g. 'SkyReels-V2-DF-14B-720P')."""
    from dataclasses import asdict, is_dataclass

    from pipelines.skyreels_v2.sizes import SIZES

    values = asdict(config) if is_dataclass(config) else dict(config)
    keys = ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len", "in_dim", "inject_sample_info")
    for name, size in SIZES.items():
        if name == "14b-720p":
            continue
        if all(values.get(k) == getattr(size, k) for k in keys):
            if name == "14b-540p" and "720p" in folder.rstrip("/").rsplit("/", 1)[-1].lower():
                return "14b-720p"
            return name
    return None


def default_resolution(size: str | None) -> str:
    return SIZE_RESOLUTION.get(size or "", "540p")


# ----------------------------------------------------------------------------- 3. sampling defaults

@dataclass(frozen=True)
class SamplingDefaults:
    """What a run uses for every schedule field the spec leaves unset (windows in latent frames)."""

    num_steps: int
    shift: float
    guidance_scale: float
    ar_step: int
    causal_block_size: int
    base_latents: int          # model window when the resolution names none (WxH)
    overlap_latents: int       # latents shared by consecutive segments; also a continuation's prefix
    addnoise_condition: int    # noise level of a clean prefix (0 = off)
    fps: int
    frames: int                # `scope generate`'s length when none is given (a named resolution's
                               # base_frames wins: 97 at 540p, 121 at 720p)


# upstream's script (steps 30, shift 8, guidance 6, synchronous, block 1, 97 frames at 24 fps), with
# README's long-video settings: overlap_history 17 frames (5 latents), addnoise_condition 20
OFFICIAL_SAMPLING = SamplingDefaults(num_steps=30, shift=8.0, guidance_scale=6.0, ar_step=0, causal_block_size=1,
                                     base_latents=25, overlap_latents=5, addnoise_condition=20, fps=FPS, frames=97)
# the plumbing demo: few steps, asynchronous blocks of 2, short windows (many segments on a short video)
TINY_SAMPLING = SamplingDefaults(num_steps=8, shift=8.0, guidance_scale=6.0, ar_step=2, causal_block_size=2,
                                 base_latents=8, overlap_latents=4, addnoise_condition=0, fps=FPS, frames=48)

# upstream's negative prompt (Wan's standard one), used when the spec gives none
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                   "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def sampling_defaults(size: str | None) -> SamplingDefaults:
    return TINY_SAMPLING if size == "tiny" else OFFICIAL_SAMPLING


# ----------------------------------------------------------------------------- 4. the official folder

CONFIG_FILE = "config.json"                          # transformer config; weights: model.safetensors or shards
VAE_FILE = "Wan2.1_VAE.pth"                          # = pipelines.wan.vae.VAE_FILE
UMT5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"        # = pipelines.wan.umt5.WEIGHTS_FILE
TOKENIZER_DIR = "google/umt5-xxl"                    # = pipelines.wan.umt5.TOKENIZER_DIR
TOKENIZER_VOCAB = ("tokenizer.json", "spiece.model")  # one of them holds the vocabulary
# optional sidecars for non-official (tiny, test) folders: the part's config fields as JSON; an
# official folder has none, and the official sizes apply
VAE_CONFIG_FILE = "vae_config.json"                  # WanVAEConfig fields, e.g. {"dim": 4}
TEXT_ENCODER_CONFIG_FILE = "text_encoder_config.json"  # UMT5Config fields


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def missing_files(folder: str, *, text_encoder: bool, vae: bool) -> list[str]:
    """'<path> (<what>)' for each needed file of the folder that does not exist (cheap: fs.exists).

    Local paths and fsspec URLs alike; the transformer's own files are checked by
    `checkpoint.shard_names` (it reads the shard index when there is one)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(folder)
    fs.invalidate_cache(root)
    missing = []
    if vae and not fs.exists(_join(root, VAE_FILE)):
        missing.append(f"{_join(folder, VAE_FILE)} (the Wan VAE)")
    if text_encoder:
        if not fs.exists(_join(root, UMT5_FILE)):
            missing.append(f"{_join(folder, UMT5_FILE)} (the umT5 text encoder)")
        tokenizer = _join(root, TOKENIZER_DIR)
        if not any(fs.exists(_join(tokenizer, name)) for name in TOKENIZER_VOCAB):
            missing.append(f"{_join(_join(folder, TOKENIZER_DIR), TOKENIZER_VOCAB[0])} or {TOKENIZER_VOCAB[1]} "
                           f"(the umT5 tokenizer)")
    return missing


# ----------------------------------------------------------------------------- 5. builders

TINY_SEED = 0   # the tiny parts' random weights: the same "model" every run


def build_vae(folder: str | None, device: Any = "cpu", config: Mapping[str, Any] | None = None) -> Any:
    """The Wan VAE of a folder (`Wan2.1_VAE.pth`, float32 as released; `config` from its sidecar, else
    the official size), or with `folder` None the tiny VAE with seeded random weights (a plumbing
    stand-in: it decodes latents to frames of the right size and timing, not to pictures)."""
    from pipelines.wan.vae import WanVAE, WanVAEConfig, init_random_weights_, load_wan_vae

    vae_config = WanVAEConfig.from_dict(config) if config else None
    if folder is None:
        vae = init_random_weights_(WanVAE(vae_config or WanVAEConfig.named("tiny")), seed=TINY_SEED)
        return vae.eval().requires_grad_(False).to(device)
    return load_wan_vae(_join(folder, VAE_FILE), config=vae_config, device=device)


def text_dtype(device: Any, config: Any) -> Any:
    """umT5's dtype: bf16 on a GPU (upstream) and for the XXL size on a CPU (23 GB in float32);
    float32 for smaller (test) sizes on a CPU."""
    import torch

    from pipelines.wan.umt5 import UMT5Config

    if str(device).startswith("cuda") or config == UMT5Config.named("xxl"):
        return torch.bfloat16
    return torch.float32


def build_text_encoder(folder: str | None, text_len: int, device: Any = "cpu",
                       config: Mapping[str, Any] | None = None) -> Any:
    """prompts -> context [B, text_len, dim]: the folder's umT5 (`models_t5_umt5-xxl-enc-bf16.pth` +
    `google/umt5-xxl/`; `config` from its sidecar, else XXL), or with `folder` None the tiny umT5 with
    seeded random weights and a `HashingTokenizer` (a plumbing stand-in: prompts map to fixed,
    distinct embeddings; it understands nothing)."""
    import torch

    from pipelines.wan.umt5 import UMT5Config, UMT5Encoder, UMT5TextEncoder, load_text_encoder

    umt5_config = UMT5Config.from_dict(config) if config else None
    if folder is None:
        umt5_config = umt5_config or UMT5Config.named("tiny")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            encoder = UMT5Encoder(umt5_config).eval().requires_grad_(False)
        encoder = encoder.to(device=device, dtype=text_dtype(device, umt5_config))
        return UMT5TextEncoder(encoder, HashingTokenizer(umt5_config.vocab_size), text_len)
    umt5_config = umt5_config or UMT5Config.named("xxl")
    return load_text_encoder(folder, config=umt5_config, text_len=text_len,
                             dtype=text_dtype(device, umt5_config), device=device)


class HashingTokenizer:
    """A deterministic stand-in for a T5-family tokenizer (tiny models only: umT5 here, MAGI-1's T5 in
    `pipelines/magi1/family.py`): each whitespace-separated word -> 2 + sha256(word) mod (vocab - 2),
    then `</s>` = 1, truncated (keeping `</s>`) and padded with 0 to `max_length`. Called like a
    transformers tokenizer, as `UMT5TextEncoder.tokenize` and `MagiT5TextEncoder.tokenize` do."""

    PAD, EOS = 0, 1

    def __init__(self, vocab_size: int):
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (pad, </s> and one word); got {vocab_size}")
        self.vocab_size = vocab_size

    def word_id(self, word: str) -> int:
        digest = hashlib.sha256(word.encode("utf-8")).digest()
        return 2 + int.from_bytes(digest[:8], "little") % (self.vocab_size - 2)

    def __call__(self, texts: Sequence[str], *, max_length: int, padding: str = "max_length",
                 truncation: bool = True, add_special_tokens: bool = True, return_tensors: str = "pt",
                 return_attention_mask: bool = True) -> dict:
        import torch

        ids, mask = [], []
        for text in texts:
            row = [self.word_id(w) for w in text.split()][:max_length - 1] + [self.EOS]
            ids.append(row + [self.PAD] * (max_length - len(row)))
            mask.append([1] * len(row) + [0] * (max_length - len(row)))
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long)}


# ----------------------------------------------------------------------------- 6. acceleration

# "exact" selective computation on a block-causal Wan DF model (the procedural one; the released
# SkyReels-V2 models are bidirectional, where it equals "off"): drop the tail after the last
# recomputed chunk, serve finished chunks from their cached K/V. Outputs equal full compute.
SELECTIVE_EXACT: dict[str, Any] = {"selective": "exact", "kv_cache_finished": True}


def accel_adapter() -> Any:
    from pipelines.skyreels_v2.accel_adapter import WanStackAdapter

    return WanStackAdapter()


def accel_defaults(method: str, size: str | None = None) -> dict[str, Any]:
    """The published per-method defaults on Wan-based models (a copy; TeaCache: the 1.3B polynomial)."""
    from pipelines.wan.calibration import accel_defaults as wan_defaults

    return wan_defaults(method)


__all__ = ["CONFIG_FILE", "DECODER_HISTORY", "DECODER_RECEPTIVE_FIELD", "FPS", "LATENT_CHANNELS", "NAME",
           "NEGATIVE_PROMPT", "OFFICIAL_SAMPLING", "PATCH", "PIXEL_MULTIPLE", "RESOLUTIONS", "RESOLUTION_HINT",
           "SELECTIVE_EXACT", "SIZE_RESOLUTION", "TEXT_ENCODER_CONFIG_FILE", "TINY_RESOLUTION", "TINY_SAMPLING",
           "TOKENIZER_DIR", "UMT5_FILE", "VAE_CAUSAL", "VAE_CONFIG_FILE", "VAE_FILE", "VAE_SPATIAL", "VAE_TEMPORAL",
           "HashingTokenizer", "Resolution", "SamplingDefaults", "accel_adapter", "accel_defaults",
           "build_text_encoder", "build_vae", "default_resolution", "frames_for_latents", "latents_for_frames",
           "missing_files", "parse_resolution", "sampling_defaults", "size_name", "text_dtype"]
