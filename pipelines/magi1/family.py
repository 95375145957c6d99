"""MAGI-1 facts the jobs need, declared once (the sibling of `pipelines/skyreels_v2/family.py`).

Sources: ../shared/reference/NOTES_magi1.md (sections 1, 2, 4), upstream `example/4.5B/*_config.json`
(runtime_config: 720x720, 24 fps, 64 steps, window 4, chunk width 6, CFG scales) as recorded in the
golden `timestep_matrix` case, and the release layout of `sand-ai/MAGI-1` (`ckpt/magi/<size>/
inference_weight[.distill]`, `ckpt/vae`, `ckpt/t5/t5-v1_1-xxl`).

Reads top to bottom:
  1. latent geometry: VAE strides (non-causal: latent l covers frames [4l, 4l + 4)), channels, patch
  2. resolutions, and the default frame size
  3. sizes and their sampling defaults: base models 3 CFG passes, distilled 1; steps, window, chunk
     width, CFG scales, fps; tiny (tests, the plumbing demo)
  4. the official folder: where the DiT weights, the VAE and T5 are, what `describe` checks exists
  5. builders: the T5 text encoder and the VAE of a folder, or the tiny random ones; the tiny DiT;
     upstream's caption layout [DURATION, HQ, T5 tokens] when the special-token file is present
  6. acceleration: the adapter, per-method defaults, what "exact" selective computation means here,
     and calibration constants (MagCache ratios measured on the tiny model)

Nothing heavy is imported at module import (the job spec and `pipelines.families` read it cheaply).
"""
from __future__ import annotations

import math
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.frame_size import parse_frame_size

NAME = "magi-1"
MODEL_PREFIX = "magi-1-"       # `--model magi-1-<size>` names a size of this family

# ----------------------------------------------------------------------------- 1. geometry

VAE_TEMPORAL = 4          # video frames per latent frame (MAGI's ViT VAE: patch_length 4, no causal first frame)
VAE_SPATIAL = 8           # pixels per latent pixel along H and W (patch_size 8)
VAE_CAUSAL = False        # latent l decodes to frames [4l, 4l + 4) (Wan's causal VAE: 1 + 4(l - 1) ...)
LATENT_CHANNELS = 16      # z_chans: the DiT's latent (the 24B model duplicates it to 32 inputs itself)
PATCH = (1, 2, 2)         # DiT patch (frames, rows, columns)
PIXEL_MULTIPLE = VAE_SPATIAL * PATCH[1]   # a frame side must divide by 16 (upstream issue #69)
FPS = 24                  # runtime_config.fps; the VAE's temporal tile is fps // 2 frames


def latents_for_frames(frames: int) -> int:
    """Latent frames that cover `frames` video frames (4 per latent; upstream floors, we cover)."""
    return math.ceil(max(frames, 0) / VAE_TEMPORAL)


def frames_for_latents(latents: int) -> int:
    return VAE_TEMPORAL * max(latents, 0)


def chunk_count(frames: int, chunk_width: int) -> int:
    """Chunks of `chunk_width` latents a video of `frames` frames needs (upstream `chunk_num`)."""
    return max(1, math.ceil(latents_for_frames(frames) / chunk_width))


# ----------------------------------------------------------------------------- 2. resolutions

@dataclass(frozen=True)
class Resolution:
    name: str
    width: int
    height: int

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_SPATIAL, self.width // VAE_SPATIAL

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height}"


# The names the job spec accepts for every family (the same frame sizes as SkyReels-V2's) and
# upstream's default, the square 720 x 720 of the example configs.
RESOLUTIONS: dict[str, Resolution] = {
    "540p": Resolution("540p", 960, 544),
    "720p": Resolution("720p", 1280, 720),
}
DEFAULT_RESOLUTION = "720x720"
TINY_RESOLUTION = "64x64"      # the tiny sizes: 8 x 8 latents
RESOLUTION_HINT = "720x720 (upstream's default), 540p, 720p, or WxH with W and H multiples of 16"


def parse_resolution(text: str) -> Resolution:
    """'540p' / '720p' or 'WxH' with both multiples of 16; ValueError says what is valid."""
    return parse_frame_size(text, RESOLUTIONS, PIXEL_MULTIPLE, Resolution, RESOLUTION_HINT)


# ----------------------------------------------------------------------------- 3. sizes and sampling

SIZE_NAMES = ("4.5b", "4.5b-distill", "24b", "24b-distill", "tiny")   # = pipelines.magi1.sizes.SIZES
# the release's size folders (ckpt/magi/<folder>) -> named size
SIZE_FOLDERS = {"4.5b_base": "4.5b", "4.5b_distill": "4.5b-distill", "24b_base": "24b",
                "24b_distill": "24b-distill"}


@dataclass(frozen=True)
class SamplingDefaults:
    """One MAGI-1 run's sampling settings (the jobs' `plan.args`), upstream runtime_config names in
    comments. The properties at the end answer what the shared job code asks any schedule
    (causal block, window, overlap), in latent frames."""

    num_steps: int             # runtime.num_steps: steps each chunk takes from noise to clean
    window_size: int           # runtime.window_size: chunks denoised together
    chunk_width: int           # runtime.chunk_width: latent frames per chunk (6 = 24 frames)
    shift: float               # t_schedule_config.shift (sd3 schedule)
    cfg_number: int            # 3 = base (text, context, uncond passes), 1 = distilled
    text_scale: float          # runtime.text_scales for t < 0.3 (0 for the two cleanest intervals)
    prev_chunk_scale: float    # runtime.prev_chunk_scales for t < 0.3 (1 for the cleanest)
    distill: bool              # engine.distill: the shortcut step-size embedding
    fps: int
    frames: int                # `scope generate`'s length when none is given
    resolution: str            # frame size when the spec names none

    def sample_args(self) -> Any:
        """`pipelines.magi1.pipeline.SampleArgs` (ValueError names a bad combination)."""
        from pipelines.magi1.pipeline import Guidance, SampleArgs
        from pipelines.magi1.schedule import ChunkSchedule

        guidance = Guidance(cfg_number=self.cfg_number,
                            prev_chunk_scales=(self.prev_chunk_scale,) * 3 + (1.0, 1.0),
                            text_scales=(self.text_scale,) * 3 + (0.0, 0.0))
        schedule = ChunkSchedule(num_steps=self.num_steps, window_size=self.window_size,
                                 chunk_width=self.chunk_width, shift=self.shift)
        return SampleArgs(schedule=schedule, guidance=guidance, distill=self.distill)

    # -- what the shared job code reads of any schedule ---------------------------------------------
    @property
    def causal_block_size(self) -> int:
        return self.chunk_width

    @property
    def base_num_frames(self) -> int:
        return self.window_size * self.chunk_width

    @property
    def overlap_frames(self) -> None:
        return None            # one walk: chunks follow each other, nothing is generated twice

    @property
    def ar_step(self) -> int:
        return self.num_steps // self.window_size    # steps between neighbouring chunks

    @property
    def guidance_scale(self) -> float:
        return self.text_scale if self.cfg_number == 3 else 1.0

    @property
    def addnoise_condition(self) -> int:
        return 0

    @property
    def causal_attention(self) -> bool:
        return True


_BASE = dict(window_size=4, chunk_width=6, shift=3.0, text_scale=7.5, prev_chunk_scale=1.5, fps=FPS,
             frames=96, resolution=DEFAULT_RESOLUTION)
SAMPLING: dict[str, SamplingDefaults] = {
    # example/4.5B/4.5B_base_config.json: 64 steps, 3 passes
    "4.5b": SamplingDefaults(num_steps=64, cfg_number=3, distill=False, **_BASE),
    # the 4.5B distill config keeps 64 steps with one pass (NOTES_magi1 section 2)
    "4.5b-distill": SamplingDefaults(num_steps=64, cfg_number=1, distill=True, **_BASE),
    "24b": SamplingDefaults(num_steps=32, cfg_number=3, distill=False, **_BASE),
    "24b-distill": SamplingDefaults(num_steps=16, cfg_number=1, distill=True, **_BASE),
    # the plumbing demo: 16 steps (4 per stage, so accelerators have calls to reuse), chunks of
    # 3 latents (12 frames = one VAE temporal tile at 24 fps), 64 x 64
    "tiny": SamplingDefaults(num_steps=16, window_size=4, chunk_width=3, shift=3.0, cfg_number=3, text_scale=7.5,
                             prev_chunk_scale=1.5, distill=False, fps=FPS, frames=48, resolution=TINY_RESOLUTION),
}


def sampling_defaults(size: str | None) -> SamplingDefaults:
    """A named size's defaults; an unknown size (a folder with its own config) gets the 4.5B base's."""
    return SAMPLING.get(size or "", SAMPLING["4.5b"])


def size_of_model_name(model: str) -> str | None:
    """'magi-1-4.5b-distill' -> '4.5b-distill' (None for anything else)."""
    if not model.startswith(MODEL_PREFIX):
        return None
    size = model[len(MODEL_PREFIX):]
    return size if size in SIZE_NAMES else None


# ----------------------------------------------------------------------------- 4. the official folder

WEIGHTS_FOLDERS = ("inference_weight.distill", "inference_weight")   # bf16 DiT weights, preferred order
FP8_FOLDERS = ("inference_weight.fp8.distill", "inference_weight.fp8")
CONFIG_FILE = "config.json"          # optional: {"model_config": ...} or a whole official config
VAE_FOLDER = "vae"                   # ckpt/vae: config.json + diffusion_pytorch_model.safetensors
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
T5_FOLDERS = ("t5/t5-v1_1-xxl", "t5-v1_1-xxl")  # ckpt/t5/t5-v1_1-xxl (upstream t5_pretrained + t5-v1_1-xxl)
T5_FILES = ("config.json",)
T5_VOCAB = ("spiece.model", "tokenizer.json")   # one of them holds the vocabulary
SEARCH_UP = 3                        # ancestors searched for vae/ and t5/ (ckpt/magi/<size>/inference_weight)
# upstream's learned special tokens (caption_token, logo_token, other_tokens [100, 4096]), a data file of
# its repository, not of the weights release: put it in the model folder (or an ancestor) and the
# captions get run.sh's PAD_HQ=1 / PAD_DURATION=1 tokens; without it they are the T5 tokens alone
SPECIAL_TOKENS_FILE = "special_tokens.npz"


@dataclass(frozen=True)
class MagiFolder:
    """Where a MAGI-1 model's parts are (paths as given, local or URL); None = not found."""

    root: str                       # what `--model` names
    weights: str | None             # the DiT's bf16 weights folder
    size: str | None                # the named size its config is (folder names or config.json)
    config: dict[str, Any] | None   # config.json's model_config, when the folder has one
    runtime: dict[str, Any] | None  # config.json's runtime_config (a whole official config), if any
    vae: str | None
    t5: str | None
    fp8_only: str | None = None     # an fp8 weights folder found instead of bf16 ones
    special_tokens: str | None = None   # SPECIAL_TOKENS_FILE, when found


def _fs(url: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url)
    fs.invalidate_cache(root)
    return fs, root


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _names(fs: Any, path: str) -> list[str]:
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except (FileNotFoundError, NotADirectoryError, OSError):
        return []


def looks_like_magi(folder: str) -> bool:
    """Cheap recognition (names only): the folder is a MAGI-1 weights folder or holds one."""
    fs, root = _fs(folder)
    name = posixpath.basename(root.rstrip("/")).lower()
    if name.startswith("inference_weight") or name in SIZE_FOLDERS:
        return True
    return any(n.startswith("inference_weight") for n in _names(fs, root))


def _read_config(fs: Any, path: str) -> dict[str, Any] | None:
    import json

    if not fs.isfile(path):
        return None
    try:
        value = json.loads(fs.cat_file(path).decode("utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix or re-export it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object (model_config, or a whole official config)")
    return value


def find_parts(folder: str) -> MagiFolder:
    """The parts of a MAGI-1 model folder: the folder itself when it holds the weights, else its
    `inference_weight[.distill]` subfolder; `vae/` and `t5/t5-v1_1-xxl` in it or in an ancestor
    (the release's ckpt/magi/<size>/ layout puts them in ckpt/). Reads names and config.json only."""
    folder = folder.rstrip("/")
    fs, root = _fs(folder)
    names = _names(fs, root)
    own = posixpath.basename(root).lower()
    weights, fp8 = None, None
    if own.startswith("inference_weight") or any(n.endswith(".safetensors") or n.endswith(".index.json")
                                                  for n in names):
        weights = folder
        if ".fp8" in own:
            weights, fp8 = None, folder
    else:
        weights = next((_join(folder, n) for n in WEIGHTS_FOLDERS if n in names), None)
        fp8 = next((_join(folder, n) for n in FP8_FOLDERS if n in names), None)
    # the size: config.json (root, then the weights folder), else the folder names
    config = runtime = None
    for where in [folder] + ([weights] if weights and weights != folder else []):
        whole = _read_config(fs, _join(_fs(where)[1], CONFIG_FILE))
        if whole is not None:
            model_config = whole.get("model_config", whole)
            config = model_config if isinstance(model_config, dict) else None
            runtime = whole.get("runtime_config") if isinstance(whole.get("runtime_config"), dict) else None
            break
    size = next((SIZE_FOLDERS[p.lower()] for p in reversed(root.split("/")) if p.lower() in SIZE_FOLDERS), None)
    vae, t5 = _find_up(fs, folder, lambda f: fs.isfile(_join(_fs(_join(f, VAE_FOLDER))[1], VAE_FILES[0])),
                       VAE_FOLDER), None
    for sub in T5_FOLDERS:
        t5 = _find_up(fs, folder, lambda f, s=sub: fs.isfile(_join(_fs(_join(f, s))[1], T5_FILES[0])), sub)
        if t5 is not None:
            break
    special = _find_up(fs, folder, lambda f: fs.isfile(_join(_fs(f)[1], SPECIAL_TOKENS_FILE)), SPECIAL_TOKENS_FILE)
    return MagiFolder(root=folder, weights=weights, size=size, config=config, runtime=runtime, vae=vae, t5=t5,
                      fp8_only=fp8 if weights is None else None, special_tokens=special)


def _find_up(fs: Any, folder: str, found: Any, sub: str) -> str | None:
    """`<ancestor>/<sub>` for the nearest of folder and its SEARCH_UP ancestors where `found` holds."""
    here = folder
    for _ in range(SEARCH_UP + 1):
        if found(here):
            return _join(here, sub)
        parent = here.rsplit("/", 1)[0] if "/" in here.split("://", 1)[-1] else None
        if not parent or parent == here:
            return None
        here = parent
    return None


def missing_files(parts: MagiFolder, *, text_encoder: bool, vae: bool) -> list[str]:
    """'<what> (<files>) in <where>' for each needed part of the folder that is not there (names only,
    cheap); the part comes first, so a message cut at its end still says what is missing."""
    missing = []
    if parts.weights is None:
        if parts.fp8_only:
            missing.append(f"bf16 DiT weights (only {posixpath.basename(parts.fp8_only)} is there; fp8 is not "
                           f"supported: get {WEIGHTS_FOLDERS[0]}) in {parts.root}")
        else:
            missing.append(f"the DiT weights ({WEIGHTS_FOLDERS[0]}/ or {WEIGHTS_FOLDERS[1]}/ with model.safetensors "
                           f"or shards + index) in {parts.root}")
    if vae and parts.vae is None:
        missing.append(f"the MAGI VAE ({VAE_FOLDER}/{VAE_FILES[0]} + {VAE_FILES[1]}, the release's ckpt/{VAE_FOLDER}) "
                       f"in {parts.root} or above")
    if vae and parts.vae is not None:
        fs, root = _fs(parts.vae)
        if not fs.exists(_join(root, VAE_FILES[1])) and not any(
                n.endswith((".safetensors", ".index.json", ".pth", ".bin")) for n in _names(fs, root)):
            missing.append(f"the MAGI VAE weights ({VAE_FILES[1]}) in {parts.vae}")
    if text_encoder:
        if parts.t5 is None:
            missing.append(f"the T5 text encoder ({T5_FOLDERS[0]}/{T5_FILES[0]}, the release's ckpt/{T5_FOLDERS[0]}) "
                           f"in {parts.root} or above")
        else:
            fs, root = _fs(parts.t5)
            if not any(fs.exists(_join(root, n)) for n in T5_VOCAB):
                missing.append(f"the T5 tokenizer ({T5_VOCAB[0]} or {T5_VOCAB[1]}) in {parts.t5}")
    return missing


def size_of_config(config: Mapping[str, Any] | None) -> str | None:
    """The named size whose architecture a model_config is ('4.5b' and '4.5b-distill' share one:
    None then; the folder's name decides)."""
    if not config:
        return None
    from pipelines.magi1.sizes import SIZES

    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "caption_channels")
    matches = [n for n, s in SIZES.items() if all(config.get(k) == getattr(s.config, k) for k in keys)]
    return matches[0] if len(matches) == 1 else None


# ----------------------------------------------------------------------------- 5. builders

TINY_SEED = 0   # the tiny parts' random weights: the same "model" every run


def build_transformer(source: str | None, size: str | None, config: Mapping[str, Any] | None = None,
                      device: Any = "cpu") -> Any:
    """The DiT: with `source` None the tiny size with seeded random weights; else the weights
    folder (config from `config`, else the named size; bf16 blocks on a GPU, float32 on a CPU)."""
    import torch

    from pipelines.magi1.checkpoint import load_transformer
    from pipelines.magi1.parallelize import MagiStageSpec, load_stage_model

    if source is None:
        return load_stage_model(MagiStageSpec(source="tiny", seed=TINY_SEED), None, True, device).eval()
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return load_transformer(source, config=dict(config) if config else size, dtype=dtype, device=device).eval()


def vae_tiling(fps: int) -> Any:
    """Upstream's VAE tiling at `fps` (256-pixel tiles, 0.25 overlap, fps // 2 frames per temporal tile)."""
    from pipelines.magi1.vae import MagiVAETiling

    return MagiVAETiling.production(fps)


def build_vae(folder: str | None, device: Any = "cpu") -> Any:
    """The MAGI VAE of a folder (config.json + diffusion_pytorch_model.safetensors; bf16 on a GPU as
    upstream, float32 on a CPU), or with `folder` None the tiny VAE with seeded random weights (a
    plumbing stand-in: frames of the right size and timing, not pictures)."""
    import torch

    from pipelines.magi1.vae import MagiVAE, config_for, load_magi_vae

    if folder is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            vae = MagiVAE(config_for("tiny"))
        return vae.eval().requires_grad_(False).to(device)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return load_magi_vae(folder, dtype=dtype, device=device).eval().requires_grad_(False)


# the tiny T5: t5-v1_1's layout (gated GELU, relative buckets) at the tiny DiT's caption width
TINY_T5 = dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)


def build_text_encoder(folder: str | None, max_length: int, device: Any = "cpu") -> Any:
    """prompts -> (caption [B, max_length, C], mask [B, max_length]): the folder's T5-v1.1-XXL (fp32
    as upstream), or with `folder` None a tiny T5 with seeded random weights and a
    `HashingTokenizer` (prompts map to fixed, distinct embeddings; it understands nothing)."""
    import torch

    from pipelines.magi1.t5 import MagiT5TextEncoder, load_text_encoder

    if folder is None:
        import transformers

        from pipelines.skyreels_v2.family import HashingTokenizer

        config = transformers.T5Config(**TINY_T5)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = transformers.T5EncoderModel(config).eval().requires_grad_(False)
        return MagiT5TextEncoder(model.to(device), HashingTokenizer(config.vocab_size), max_length)
    return load_text_encoder(folder, max_length=max_length, device=device)


DURATION_VARIANTS = 8      # upstream's duration token says 1..7, or 8 and more, chunks are left


def duration_rows(chunks: int) -> Any:
    """Per chunk c of `chunks`, its row of `special_token_caption`'s 8 variants (LongTensor [chunks])."""
    import torch

    return torch.tensor([DURATION_VARIANTS - 1 - min(chunks - 1 - c, DURATION_VARIANTS - 1) for c in range(chunks)],
                        dtype=torch.long)


def special_token_caption(caption: Any, mask: Any, other_tokens: Any, max_length: int) -> tuple[Any, Any]:
    """Upstream's caption layout [DURATION_k, HQ, T5 tokens...] cut to `max_length` (run.sh: PAD_HQ=1,
    PAD_DURATION=1), for caption [L, C] / mask [L]: its 8 duration variants ([8, L, C], [8, L]); row
    j says 8 - j chunks are left (row 0: 8 or more); `duration_rows` maps chunks to rows."""
    from pipelines.magi1.model import pad_special_tokens

    n, (length, channels) = DURATION_VARIANTS, caption.shape
    y, m = pad_special_tokens(caption[None, None].expand(1, n, length, channels),
                              mask[None, None].expand(1, n, length), other_tokens, max_length=max_length)
    return y[0], m[0]


def load_other_tokens(path: str) -> Any:
    """`other_tokens` [100, C] of upstream's special_tokens.npz (float16-rounded, as upstream)."""
    import tempfile

    from fsspec.core import url_to_fs

    from pipelines.magi1.model import load_special_tokens

    fs, root = url_to_fs(path)
    with tempfile.NamedTemporaryFile(suffix=".npz") as tmp:
        fs.get_file(root, tmp.name)
        tokens = load_special_tokens(tmp.name)
    if "other_tokens" not in tokens:
        raise ValueError(f"{path}: no 'other_tokens' array (found {sorted(tokens)}); it is not upstream's "
                         f"special_tokens.npz")
    return tokens["other_tokens"]


# ----------------------------------------------------------------------------- 6. acceleration

# "exact" selective computation on MAGI-1: its attention is block-causal, so the tail after the
# last recomputed chunk drops exactly. SCOPE's own finished-chunk K/V serving is left off: MAGI's
# clean-chunk cache already holds it (docs/ARCHITECTURE.md 2.8).
SELECTIVE_EXACT: dict[str, Any] = {"selective": "exact"}

# MagCache's magnitude ratios measured on the tiny size at its default schedule (16 steps, base
# 3-pass CFG, 96 frames, "a red circle moves right"; `jobs.magi.measure_mag_ratios`: one walk at
# `calibrate=true`, each segment its own request as the jobs run it, mean per branch and step): the
# tiny model's calibration constants, so `--accel magcache` runs on it. A random model's ratios
# hover around 1; no real size has measured ratios yet (MagCache then refuses, naming the fix).
TINY_MAG_RATIOS: dict[str, list[float]] = {
    "cond": [1.0, 1.0033, 1.0078, 0.9937, 1.0077, 1.0125, 1.0022, 1.0189, 0.9835, 1.0035, 1.0183, 0.9968, 0.9904,
             0.9768, 1.0098, 0.9825],
    "context": [1.0, 1.0017, 0.9944, 1.003, 1.0051, 1.0219, 0.9842, 1.026, 0.9761, 1.0006, 1.0085, 1.0099, 0.9945,
                0.9651, 0.9917, 1.0074],
    "uncond": [1.0, 0.9949, 1.0041, 1.0023, 1.0083, 1.0168, 0.9965, 1.0166, 0.9818, 0.9958, 1.0173, 1.0139, 0.9945,
               0.9651, 0.9917, 1.0074],
}


def accel_adapter() -> Any:
    from pipelines.magi1.accel_adapter import MagiStackAdapter

    return MagiStackAdapter()


def accel_defaults(method: str, size: str | None = None) -> dict[str, Any]:
    """What a method runs with on MAGI-1 when the user names only the method (a copy): TeaCache on
    the raw AdaLN-condition change (no MAGI polynomial exists), MagCache with the ratios measured
    on the size when there are any."""
    from pipelines.magi1.accel_adapter import accel_defaults as adapter_defaults

    values = adapter_defaults(method)
    if method == "magcache" and size == "tiny" and TINY_MAG_RATIOS:
        values.update(mag_ratios={k: list(v) for k, v in TINY_MAG_RATIOS.items()},
                      num_steps=SAMPLING["tiny"].num_steps)
    return values


__all__ = ["CONFIG_FILE", "DEFAULT_RESOLUTION", "FPS", "LATENT_CHANNELS", "MagiFolder", "NAME", "PATCH",
           "PIXEL_MULTIPLE", "RESOLUTIONS", "SAMPLING", "SELECTIVE_EXACT", "SIZE_NAMES", "SamplingDefaults",
           "TINY_RESOLUTION", "VAE_CAUSAL", "VAE_SPATIAL", "VAE_TEMPORAL", "accel_adapter", "accel_defaults",
           "build_text_encoder", "build_transformer", "build_vae", "chunk_count", "duration_rows", "find_parts",
           "frames_for_latents", "load_other_tokens", "special_token_caption",
           "latents_for_frames", "looks_like_magi", "missing_files", "parse_resolution", "sampling_defaults",
           "size_of_config", "size_of_model_name", "vae_tiling"]
