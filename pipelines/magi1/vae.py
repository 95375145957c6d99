"""MAGI-1 ViT VAE: encoder, decoder, upstream tiling, streaming decode and checkpoint loading.

The official module is `ViTVAE` (SandAI-org/MAGI-1 `inference/model/vae`), driven by `TileProcessor`
(`inference/infra/parallelism/tile_parallel.py`) through `VaeHelper` (`inference/pipeline/video_process.py`).
Facts followed: ../shared/reference/GOLDEN_FORMAT.md section 8.3 and NOTES_magi1.md section 4.

Reads top to bottom:

1. config: `MagiVAEConfig` (the `{"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": {...}}` file),
   named sizes `official` / `tiny`, and `MagiVAETiling` (the TileProcessor arguments);
2. model: per-head q/k/v norm, attention, block, `ViTEncoder`, `ViTDecoder`, `MagiVAE` (one tile in, one out);
3. tiling: `tiled_encode` (tiles blended in place) and `tiled_decode` (tiles blended as clones), plus
   `encode_video` / `decode_video`, the pipeline's `VaeHelper.encode` (x 0.18215) and `VaeHelper.decode`;
4. streaming: `MagiVAEStreamDecoder`, segment by segment, equal to the one-shot `tiled_decode`;
5. loading: a literal key table, strict checks, `from_state_dict`, `load_magi_vae`, `save_magi_vae`.

Layouts: videos are `[B, 3, T, H, W]` in [-1, 1]; latents `[B, 16, T/4, H/8, W/8]`; tokens are
frame-major (`t*h*w + y*w + x`) behind one cls token. Everything runs in the parameter dtype.
"""
from __future__ import annotations

import io
import json
import math
import posixpath
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from pipelines.skyreels_v2.checkpoint import (CheckpointError, excerpt, read_json_object, read_shard,
                                              read_weight_map)

SCALE_FACTOR = 0.18215        # runtime_config.scale_factor: DiT latent = posterior mode * 0.18215
QKV_NORM_EPS = 1e-5           # ManualLayerNorm: (x - mean) / (std_biased + eps)
LAYER_NORM_EPS = 1e-5         # nn.LayerNorm default (norm2, norm)
IMAGE_EXPAND = 4              # patch_vae_encode: a 1-frame tile is repeated to 4 frames (literal upstream)
NO_SPATIAL_TILING = 100000    # tiled_*_3d(allow_spatial_tiling=False) sets both tile sides to this


# ============================================================================= 1. config

@dataclass(frozen=True, kw_only=True)
class MagiVAEConfig:
    """`ddconfig` of the ViTVAE config.json (official names); defaults are upstream's `ViTEncoder` defaults."""

    video_size: int
    video_length: int
    patch_size: int
    patch_length: int
    in_chans: int = 3
    z_chans: int
    double_z: bool = True
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    with_cls_token: bool = True
    norm_code: bool = False
    ln_in_attn: bool = False
    conv_last_layer: bool = False
    use_rope: bool = False
    use_final_proj: bool = False

    # ddconfig keys upstream accepts but that change nothing at inference: qk_scale is never read by
    # upstream's Attention (flash-attn's default 1/sqrt(head_dim) applies); dropouts are off in eval
    INERT_KEYS = ("qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate")

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ file form

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MagiVAEConfig:
        """From the config.json object `{"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": {...}}`."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a MAGI VAE config is a JSON object, got {type(d).__name__}")
        if "_class_name" in d and d["_class_name"] != "ViTVAE":
            raise ValueError(f"_class_name must be 'ViTVAE', got {d['_class_name']!r} "
                             "(this is not a MAGI-1 VAE config)")
        if d.get("model_type", "vit") != "vit":
            raise ValueError(f"model_type must be 'vit', got {d.get('model_type')!r} "
                             "('vit_ncthw' and 'titok' are not the released MAGI-1 VAE)")
        unknown = sorted(k for k in d if k not in ("model_type", "ddconfig") and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}; a MAGI VAE config holds model_type and ddconfig "
                             "(keys starting with '_' are ignored)")
        dd = d.get("ddconfig")
        if not isinstance(dd, Mapping):
            raise ValueError('"ddconfig" must be an object of the ViTEncoder/ViTDecoder arguments, e.g. '
                             '{"video_size": 256, "patch_size": 8, "embed_dim": 1024, ...}; '
                             f"found {'nothing' if dd is None else type(dd).__name__}")
        return cls.from_ddconfig(dd)

    @classmethod
    def from_ddconfig(cls, dd: Mapping[str, Any]) -> MagiVAEConfig:
        """From the `ddconfig` object alone."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in dd if k not in valid and k not in cls.INERT_KEYS)
        if unknown:
            raise ValueError(f"unknown ddconfig key(s) {unknown}; valid keys are {valid} "
                             f"(and {list(cls.INERT_KEYS)}, which do not change inference)")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in dd]
        if missing:
            raise ValueError(f"ddconfig is missing {missing}; the official VAE has video_size 256, video_length 16, "
                             "patch_size 8, patch_length 4, z_chans 16, embed_dim 1024, depth 24, num_heads 16")
        return cls(**{k: v for k, v in dd.items() if k in valid})

    def to_dict(self) -> dict[str, Any]:
        """The config.json object."""
        return {"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": asdict(self)}

    # ------------------------------------------------------------------ derived sizes

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def base_grid(self) -> tuple[int, int, int]:
        """Latent grid (t, h, w) the pos_embed was trained at; other grids resize it trilinearly."""
        return (self.video_length // self.patch_length, self.video_size // self.patch_size,
                self.video_size // self.patch_size)

    @property
    def num_tokens(self) -> int:
        """pos_embed rows: the base grid plus the cls token."""
        t, h, w = self.base_grid
        return t * h * w + int(self.with_cls_token)

    @property
    def unpatch_channels(self) -> int:
        """Channels of the decoder's pixel grid before the last 3x3x3 conv (1024 / (4*8*8) = 4)."""
        return self.embed_dim // (self.patch_length * self.patch_size * self.patch_size)

    @property
    def moment_chans(self) -> int:
        return 2 * self.z_chans if self.double_z else self.z_chans

    # ------------------------------------------------------------------ checks

    def _validate(self) -> None:
        """Raise ValueError saying what a valid value looks like."""
        for name in ("video_size", "video_length", "patch_size", "patch_length", "in_chans", "z_chans",
                     "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ddconfig {name} must be a positive integer, got {value!r}")
        for name in ("double_z", "qkv_bias", "with_cls_token", "norm_code", "ln_in_attn", "conv_last_layer",
                     "use_rope", "use_final_proj"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ddconfig {name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ValueError(f"ddconfig mlp_ratio must be a positive number (official 4), got {self.mlp_ratio!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads} "
                             "(official 1024 / 16)")
        unpatch = self.patch_length * self.patch_size * self.patch_size
        if self.embed_dim % unpatch:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by patch_length*patch_size^2 = {unpatch}: "
                             "the decoder unpatchifies each token into that many pixels (official 1024 = 4 x 256)")
        if self.video_size % self.patch_size or self.video_length % self.patch_length:
            raise ValueError(f"video_size {self.video_size} must be a multiple of patch_size {self.patch_size} and "
                             f"video_length {self.video_length} of patch_length {self.patch_length} "
                             "(official 256/8, 16/4)")
        if not self.double_z:
            raise ValueError("double_z must be true: the encoder's moments are (mean, logvar) and inference keeps the "
                             "mean (with double_z false upstream would split the latent itself in two)")
        if not self.conv_last_layer:
            raise ValueError("conv_last_layer must be true: upstream's ViTDecoder only supports the 3x3x3 conv "
                             "output layer (it asserts conv_last_layer == True)")
        for name, why in (("use_rope", "the 3-D RoPE variant"), ("use_final_proj", "the final projection variant"),
                          ("norm_code", "the normalised-code variant")):
            if getattr(self, name):
                raise ValueError(f"{name} true ({why}) is not implemented; the released MAGI-1 VAE has it false")


_OFFICIAL = dict(video_size=256, video_length=16, patch_size=8, patch_length=4, in_chans=3, z_chans=16, double_z=True,
                 embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True, with_cls_token=True,
                 norm_code=False, ln_in_attn=True, conv_last_layer=True, use_rope=False, use_final_proj=False)

SIZES: dict[str, MagiVAEConfig] = {
    # the third-party converter's ddconfig (vae/config.json is not in the upstream snapshot): 613.8 M params
    "official": MagiVAEConfig(**_OFFICIAL),
    # tests and CPU demos: the golden cases' layout (embed_dim must stay a multiple of 4*8*8 = 256)
    "tiny": MagiVAEConfig(**dict(_OFFICIAL, video_size=32, video_length=8, embed_dim=256, depth=2, num_heads=4,
                                 mlp_ratio=1.0)),
}


def config_for(name: str) -> MagiVAEConfig:
    """The config of a named size (configs are frozen, so sharing them is safe)."""
    if name not in SIZES:
        raise ValueError(f"unknown MAGI VAE size {name!r}; valid names: {sorted(SIZES)}")
    return SIZES[name]


@dataclass(frozen=True, kw_only=True)
class MagiVAETiling:
    """TileProcessor arguments (pixel units). Production: 256 x 256, 0.25 spatial overlap, no temporal
    overlap, length fps // 2 (12 at 24 fps), spatial tiling allowed (VaeHelper passes True)."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_min_length: int = 12
    spatial_tile_overlap_factor: float = 0.25
    temporal_tile_overlap_factor: float = 0.0
    allow_spatial_tiling: bool = True

    def __post_init__(self) -> None:
        for name in ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_min_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"tiling {name} must be a positive integer of pixels/frames, got {value!r}")
        for name in ("spatial_tile_overlap_factor", "temporal_tile_overlap_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"tiling {name} must be in [0, 1) (production 0.25 spatial, 0 temporal), "
                                 f"got {value!r}")
        if not isinstance(self.allow_spatial_tiling, bool):
            raise ValueError(f"tiling allow_spatial_tiling must be true or false, got {self.allow_spatial_tiling!r}")

    @classmethod
    def production(cls, fps: int = 24) -> MagiVAETiling:
        """What MAGI-1's pipeline passes for a video at `fps`."""
        return cls(tile_sample_min_length=fps // 2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MagiVAETiling:
        """From TileProcessor keyword arguments (e.g. a golden case's `call.tiling`)."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in d if k not in valid)
        if unknown:
            raise ValueError(f"unknown tiling argument(s) {unknown}; valid: {valid}")
        return cls(**dict(d))

    def effective(self) -> MagiVAETiling:
        """With allow_spatial_tiling false, upstream widens both tile sides to 100000 pixels."""
        if self.allow_spatial_tiling:
            return self
        return replace(self, tile_sample_min_height=NO_SPATIAL_TILING, tile_sample_min_width=NO_SPATIAL_TILING)


# ============================================================================= 2. model

class QKVNorm(nn.Module):
    """Upstream `ManualLayerNorm` without affine: (x - mean) / (std_biased + 1e-5) over the last dim."""

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True, correction=0)
        return (x - mean) / (std + QKV_NORM_EPS)


class Attention(nn.Module):
    """Self-attention over all tokens (non-causal); with ln_in_attn q, k AND v are normalised per head."""

    def __init__(self, cfg: MagiVAEConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.qkv_norm = QKVNorm() if cfg.ln_in_attn else nn.Identity()
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape                                                  # (B, N, D)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        qkv = self.qkv_norm(qkv)                                           # (B, N, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # 3 x (B, heads, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)                      # scale 1/sqrt(hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))             # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, cfg: MagiVAEConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block; norm1 is Identity when the attention normalises q/k/v itself (ln_in_attn)."""

    def __init__(self, cfg: MagiVAEConfig) -> None:
        super().__init__()
        self.norm1 = nn.Identity() if cfg.ln_in_attn else nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def grid_pos_embed(pos_embed: Tensor, base_grid: tuple[int, int, int], grid: tuple[int, int, int],
                   with_cls_token: bool) -> Tensor:
    """pos_embed for a token grid; the grid part is resized trilinearly (align_corners=False) when it differs.

    The cls entry is kept as is. (Without a cls token upstream would still drop entry 0 and fail to
    reshape; here the whole table is the grid. The released VAE has a cls token.)"""
    if tuple(grid) == tuple(base_grid):
        return pos_embed                                                   # (1, N0, D)
    n_cls = int(with_cls_token)
    d = pos_embed.shape[-1]
    table = pos_embed[:, n_cls:].reshape(1, *base_grid, d).permute(0, 4, 1, 2, 3)    # (1, D, t0, h0, w0)
    table = F.interpolate(table, size=tuple(grid), mode="trilinear", align_corners=False)
    table = table.permute(0, 2, 3, 4, 1).reshape(1, math.prod(grid), d)             # (1, t*h*w, D)
    return torch.cat([pos_embed[:, :n_cls], table], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping (patch_length, patch_size, patch_size) patches -> embed_dim channels."""

    def __init__(self, cfg: MagiVAEConfig) -> None:
        super().__init__()
        kernel = (cfg.patch_length, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class _ViTTrunk(nn.Module):
    """What encoder and decoder share: cls token, pos_embed, blocks, final LayerNorm."""

    def __init__(self, cfg: MagiVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.with_cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)

    def run_tokens(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """(B, t*h*w, D) patch tokens -> (B, t*h*w, D) normed outputs (cls added, run, dropped)."""
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + grid_pos_embed(self.pos_embed, self.cfg.base_grid, grid, self.cfg.with_cls_token)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 1:] if self.cls_token is not None else x


class ViTEncoder(_ViTTrunk):
    """Video [B, 3, T, H, W] -> moments [B, 2*z, T/4, H/8, W/8] (mean then logvar)."""

    def __init__(self, cfg: MagiVAEConfig) -> None:
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg)
        # upstream ignores conv_last_layer in the encoder: its last layer is always a Linear
        self.last_layer = nn.Linear(cfg.embed_dim, cfg.moment_chans)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)                                            # (B, D, t, h, w)
        b, _, t, h, w = x.shape
        x = self.run_tokens(x.flatten(2).transpose(1, 2), (t, h, w))       # (B, t*h*w, D)
        x = self.last_layer(x)                                             # (B, t*h*w, 2z)
        return x.reshape(b, t, h, w, -1).permute(0, 4, 1, 2, 3)            # (B, 2z, t, h, w)


class ViTDecoder(_ViTTrunk):
    """Latent [B, z, t, h, w] -> video [B, 3, 4t, 8h, 8w] (unpatchify to 4 channels, then a 3x3x3 conv)."""

    def __init__(self, cfg: MagiVAEConfig) -> None:
        super().__init__(cfg)
        self.proj_in = nn.Linear(cfg.z_chans, cfg.embed_dim)
        self.last_layer = nn.Conv3d(cfg.unpatch_channels, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        b, c, t, h, w = z.shape
        x = self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c))   # (B, t*h*w, D)
        x = self.run_tokens(x, (t, h, w))                                  # (B, t*h*w, D)
        pt, ps, uc = self.cfg.patch_length, self.cfg.patch_size, self.cfg.unpatch_channels
        x = x.reshape(b, t, h, w, pt, ps, ps, uc)                          # token -> (pt, ph, pw, C) pixels
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, uc, t * pt, h * ps, w * ps)   # (B, C, T, H, W)
        return self.last_layer(x)                                          # (B, 3, T, H, W)


class MagiVAE(nn.Module):
    """`ViTVAE` with the pipeline's deterministic encode (posterior mode); one tile in, one tile out."""

    def __init__(self, cfg: MagiVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = ViTEncoder(cfg)
        self.decoder = ViTDecoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.pos_embed.dtype

    def encode_tile(self, x: Tensor) -> Tensor:
        """`VaeHelper.patch_vae_encode`: [B, 3, T, H, W] -> posterior mode [B, z, T/4, H/8, W/8].

        A 1-frame tile is repeated to 4 frames and only latent frame 0 is kept."""
        single = x.shape[2] == 1
        if single:
            x = x.expand(-1, -1, IMAGE_EXPAND, -1, -1)
        if x.shape[2] < self.config.patch_length:
            raise ValueError(f"a video tile of {x.shape[2]} frames is shorter than one temporal patch "
                             f"({self.config.patch_length}); use 1 or a multiple of {self.config.patch_length} frames")
        moments = self.encoder(x.to(self.dtype))                           # (B, 2z, t, h, w)
        mode = moments[:, :self.config.z_chans]                            # the mean; logvar is unused
        return mode[:, :, :1] if single else mode

    def decode_tile(self, z: Tensor) -> Tensor:
        """`ViTVAE.decode`: [B, z, t, h, w] -> [B, 3, 4t, 8h, 8w]; a 1-latent tile keeps output frame 0 of 4."""
        video = self.decoder(z.to(self.dtype))
        return video[:, :, :1] if z.shape[2] == 1 else video


# ============================================================================= 3. tiling

@dataclass(frozen=True)
class AxisPlan:
    """One axis of a TileProcessor grid: tile starts/size in input units, blend and kept extent in output units."""

    starts: tuple[int, ...]
    stride: int
    size: int
    blend: int
    limit: int

    def ranges(self, length: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.size, length)) for s in self.starts]


def _axis(length: int, in_tile: int, out_tile: int, overlap: float, what: str) -> AxisPlan:
    """Tiles every `stride = int(in_tile*(1-overlap))` input units, ceil(length/stride) of them (ragged last)."""
    stride = int(in_tile * (1 - overlap))
    if in_tile <= 0 or stride <= 0:
        raise ValueError(f"tiling: a {what} tile of {in_tile} units with overlap {overlap} leaves no stride "
                         "(a tile side must span at least one patch); use larger tiles or a smaller overlap")
    count = (length + stride - 1) // stride
    blend = int(out_tile * overlap)
    return AxisPlan(tuple(k * stride for k in range(count)), stride, in_tile, blend, out_tile - blend)


def encode_plan(cfg: MagiVAEConfig, tiling: MagiVAETiling, shape: tuple[int, int, int]) -> tuple[AxisPlan, ...]:
    """(t, h, w) plans of `tiled_encode` for a video of (T, H, W) pixels: tiles in pixels, blends in latents."""
    tiling = tiling.effective()
    pt, ps = cfg.patch_length, cfg.patch_size
    sizes = (tiling.tile_sample_min_length, tiling.tile_sample_min_height, tiling.tile_sample_min_width)
    overlaps = (tiling.temporal_tile_overlap_factor,) + (tiling.spatial_tile_overlap_factor,) * 2
    return tuple(_axis(n, size, size // down, o, what) for n, size, down, o, what in
                 zip(shape, sizes, (pt, ps, ps), overlaps, ("temporal", "height", "width")))


def decode_plan(cfg: MagiVAEConfig, tiling: MagiVAETiling, shape: tuple[int, int, int]) -> tuple[AxisPlan, ...]:
    """(t, h, w) plans of `tiled_decode` for a latent of (t, h, w): tiles in latents, blends in pixels."""
    tiling = tiling.effective()
    pt, ps = cfg.patch_length, cfg.patch_size
    latent = (tiling.tile_sample_min_length // pt, tiling.tile_sample_min_height // ps,
              tiling.tile_sample_min_width // ps)
    overlaps = (tiling.temporal_tile_overlap_factor,) + (tiling.spatial_tile_overlap_factor,) * 2
    return tuple(_axis(n, size, size * up, o, what) for n, size, up, o, what in
                 zip(shape, latent, (pt, ps, ps), overlaps, ("temporal", "height", "width")))


def blend_into(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """TileProcessor.blend_{t,v,h}: b's first e slices along `dim` <- a's last e * (1 - k/e) + b * (k/e), in place."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = e
    ramp = torch.arange(e, dtype=torch.float64) / e                      # k/e, as upstream's Python floats
    keep_b = ramp.to(device=b.device, dtype=b.dtype).reshape(shape)
    keep_a = (1 - ramp).to(device=b.device, dtype=b.dtype).reshape(shape)
    head = b.narrow(dim, 0, e)
    head.copy_(a.narrow(dim, a.shape[dim] - e, e) * keep_a + head * keep_b)
    return b


def _concat_grid(rows: list[list[Tensor]]) -> Tensor:
    """Cropped tiles of one temporal row, [i][j] -> one (B, C, t, H, W) block."""
    return torch.cat([torch.cat(row, dim=4) for row in rows], dim=3)


@torch.no_grad()
def tiled_encode(vae: MagiVAE, video: Tensor, tiling: MagiVAETiling,
                 trace: dict[str, Tensor] | None = None) -> Tensor:
    """`ViTVAE.tiled_encode_3d` with the patched encode: video [B, 3, T, H, W] -> posterior mode (unscaled).

    Tiles are ordered (t, i, j) row-major and blended IN PLACE: blend_t, then blend_v, then blend_h, each
    against a neighbour that was itself already blended. `trace`, when given, receives each tile's mode
    before blending as `tile{kk}_mode`.
    """
    plan_t, plan_h, plan_w = encode_plan(vae.config, tiling, tuple(video.shape[2:]))
    grid = (len(plan_t.starts), len(plan_h.starts), len(plan_w.starts))
    # 1. encode every tile
    tiles: dict[tuple[int, int, int], Tensor] = {}
    for f, (t0, t1) in enumerate(plan_t.ranges(video.shape[2])):
        for i, (h0, h1) in enumerate(plan_h.ranges(video.shape[3])):
            for j, (w0, w1) in enumerate(plan_w.ranges(video.shape[4])):
                tiles[f, i, j] = vae.encode_tile(video[:, :, t0:t1, h0:h1, w0:w1])
                if trace is not None:
                    trace[f"tile{len(tiles) - 1:02d}_mode"] = tiles[f, i, j].clone()
    # 2. blend in place, in tile order, then crop
    crops: dict[tuple[int, int, int], Tensor] = {}
    for (f, i, j), tile in tiles.items():
        if f > 0:
            blend_into(tiles[f - 1, i, j], tile, plan_t.blend, dim=2)
        if i > 0:
            blend_into(tiles[f, i - 1, j], tile, plan_h.blend, dim=3)
        if j > 0:
            blend_into(tiles[f, i, j - 1], tile, plan_w.blend, dim=4)
        crops[f, i, j] = tile[:, :, :plan_t.limit, :plan_h.limit, :plan_w.limit]
    # 3. stitch
    rows = [_concat_grid([[crops[f, i, j] for j in range(grid[2])] for i in range(grid[1])]) for f in range(grid[0])]
    return torch.cat(rows, dim=2)                                          # (B, z, t, h, w)


def _decode_tile_row(vae: MagiVAE, z_row: Tensor, plan_h: AxisPlan, plan_w: AxisPlan,
                     previous: list[list[Tensor]] | None, blend_t: int, limit_t: int
                     ) -> tuple[Tensor, list[list[Tensor]]]:
    """One temporal tile row of `tiled_decode`: (blended, cropped frames; the row's unblended decoded tiles).

    `previous` is the unblended decoded row before this one (needed only when blend_t > 0)."""
    decoded = [[vae.decode_tile(z_row[:, :, :, h0:h1, w0:w1]) for (w0, w1) in plan_w.ranges(z_row.shape[4])]
               for (h0, h1) in plan_h.ranges(z_row.shape[3])]
    crops = []
    for i, row in enumerate(decoded):
        crops.append([])
        for j, tile in enumerate(row):
            tile = tile.clone()                                            # neighbours stay unblended
            if previous is not None:
                blend_into(previous[i][j], tile, blend_t, dim=2)
            if i > 0:
                blend_into(decoded[i - 1][j], tile, plan_h.blend, dim=3)
            if j > 0:
                blend_into(row[j - 1], tile, plan_w.blend, dim=4)
            crops[i].append(tile[:, :, :limit_t, :plan_h.limit, :plan_w.limit])
    return _concat_grid(crops), decoded


@torch.no_grad()
def tiled_decode(vae: MagiVAE, z: Tensor, tiling: MagiVAETiling) -> Tensor:
    """`ViTVAE.tiled_decode_3d`: latent [B, z, t, h, w] (unscaled) -> video [B, 3, T, H, W], not clamped.

    Every decoded tile is CLONED and blended against the UNblended decoded neighbours (blend_t, blend_v,
    blend_h). Temporal rows are decoded one after another; only the previous row is kept (for blend_t).
    """
    plan_t, plan_h, plan_w = decode_plan(vae.config, tiling, tuple(z.shape[2:]))
    rows, previous = [], None
    for t0, t1 in plan_t.ranges(z.shape[2]):
        frames, decoded = _decode_tile_row(vae, z[:, :, t0:t1], plan_h, plan_w, previous, plan_t.blend, plan_t.limit)
        rows.append(frames)
        previous = decoded if plan_t.blend > 0 else None
    return torch.cat(rows, dim=2)


def encode_video(vae: MagiVAE, video: Tensor, tiling: MagiVAETiling, scale_factor: float = SCALE_FACTOR,
                 trace: dict[str, Tensor] | None = None) -> Tensor:
    """The pipeline's prefix/continuation encode: video [B, 3, T, H, W] in [-1, 1] -> DiT latent (x 0.18215)."""
    moments = tiled_encode(vae, video, tiling, trace=trace)
    if trace is not None:
        trace["moments_mode"] = moments
    return moments * scale_factor


def pixels_to_video(pixels: Tensor) -> Tensor:
    """uint8 frames [T, H, W, 3] -> video [1, 3, T, H, W] in [-1, 1] (p / 127.5 - 1)."""
    return (pixels.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5) - 1.0


def decode_video(vae: MagiVAE, latent: Tensor, tiling: MagiVAETiling, scale_factor: float = SCALE_FACTOR) -> Tensor:
    """`VaeHelper.decode(latent / scale, uint8_output=False)`: DiT latent -> frames [B*T, 3, H, W], float, unclamped."""
    return frames_first(tiled_decode(vae, latent / scale_factor, tiling))


def frames_first(video: Tensor) -> Tensor:
    """'b c t h w -> (b t) c h w'."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def to_uint8(frames: Tensor) -> Tensor:
    """`VaeHelper.decode(uint8_output=True)`: (x * 127.5 + 127.5).clamp(0, 255), truncated to uint8."""
    return (frames * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)


# ============================================================================= 4. streaming decode

class MagiVAEStreamDecoder:
    """Decode a long video's DiT latents segment by segment; the frames equal one `decode_video` of the whole.

    MAGI-1's VAE is non-causal: there is no feature cache to carry. Its only coupling along time is the
    tile grid: temporal tile row k covers latent frames [k*s, k*s + L) (L = tile_sample_min_length // 4,
    s = int(L * (1 - temporal overlap))) and, when the temporal overlap is > 0, row k blends its first
    frames with the UNblended decoded tiles of row k-1. The decoder therefore keeps:

    - the latent frames from the start of the next undecoded row on (fewer than L + the segment), and
    - when blend_t > 0, the previous row's unblended decoded tiles (one row; nothing at overlap 0).

    A row is decoded as soon as all its L latent frames have arrived; the rows still open when the last
    segment comes (`final=True`, or `finish()`) are decoded ragged, exactly as the one-shot decode does
    at the video's end (a last row of 1 latent frame gives 1 frame, not 4). So the concatenated frames
    equal `decode_video` of the concatenated latents for ANY segmentation, bit for bit (same code path).

    Segments aligned to tile rows (production: 6-latent chunks, overlap 0, L = 3) return all their
    4 x n frames at once. A segment that ends inside a row returns the frames up to that row, and the
    rest comes with the next segment (lag < L latent frames) -- it is never decoded with a truncated
    tile, which would change the numbers. Upstream MAGI-1 decodes each chunk independently
    (`decode_chunk`); that equals this decoder only for row-aligned chunks. For misaligned chunks with
    upstream's per-chunk numbers, call `decode_video` on each chunk instead.
    """

    def __init__(self, vae: MagiVAE, tiling: MagiVAETiling, scale_factor: float = SCALE_FACTOR) -> None:
        self.vae = vae
        self.tiling = tiling
        self.scale_factor = scale_factor
        self._pending: Tensor | None = None      # unscaled latents from latent frame self._pending_start on
        self._pending_start = 0
        self._received = 0
        self._next_row = 0
        self._previous: list[list[Tensor]] | None = None
        self._finished = False

    @property
    def pending_latent_frames(self) -> int:
        """Latent frames held back (received, not yet fully decoded)."""
        return 0 if self._pending is None else self._pending.shape[2]

    @torch.no_grad()
    def decode_segment(self, latent: Tensor, final: bool = False) -> Tensor:
        """DiT latent segment [B, z, n, h, w] -> the frames [B*T, 3, H, W] that became final (may be 0 frames)."""
        if self._finished:
            raise RuntimeError("this stream decoder is finished; start a new MagiVAEStreamDecoder per video")
        if latent.ndim != 5:
            raise ValueError(f"a latent segment is [B, {self.vae.config.z_chans}, n, h, w], "
                             f"got shape {tuple(latent.shape)}")
        z = latent / self.scale_factor
        if self._pending is None:
            self._pending = z
        elif self._pending.shape[:2] + self._pending.shape[3:] != z.shape[:2] + z.shape[3:]:
            raise ValueError(f"segment shape {tuple(latent.shape)} does not continue the stream "
                             f"(batch, channels, h, w of {tuple(self._pending.shape)})")
        else:
            self._pending = torch.cat([self._pending, z], dim=2)
        self._received += z.shape[2]
        self._finished = final
        return self._decode_ready(final)

    def finish(self) -> Tensor:
        """The frames of the last, ragged rows (call once, after the last segment, unless it had final=True)."""
        if self._pending is None:   # nothing was pushed: no frames
            self._finished = True
            return torch.zeros(0, 3, 0, 0, dtype=self.vae.dtype)
        return self.decode_segment(self._pending[:, :, :0], final=True)

    def _decode_ready(self, final: bool) -> Tensor:
        z = self._pending
        plan_t, plan_h, plan_w = decode_plan(self.vae.config, self.tiling, (self._received, *z.shape[3:]))
        stride = plan_t.stride
        rows = []
        while True:
            start = self._next_row * stride
            end = start + plan_t.size
            if start >= self._received or (end > self._received and not final):
                break
            z_row = z[:, :, start - self._pending_start:min(end, self._received) - self._pending_start]
            frames, decoded = _decode_tile_row(self.vae, z_row, plan_h, plan_w, self._previous,
                                               plan_t.blend, plan_t.limit)
            rows.append(frames)
            self._previous = decoded if plan_t.blend > 0 else None
            self._next_row += 1
        # keep only the latents a later row reads (a copy: a view would pin the whole segment)
        keep_from = min(self._next_row * stride, self._received)
        self._pending = z[:, :, keep_from - self._pending_start:].clone()
        self._pending_start = keep_from
        if not rows:
            h, w = (n * self.vae.config.patch_size for n in z.shape[3:])
            return torch.zeros(0, 3, h, w, dtype=self.vae.dtype, device=z.device)
        return frames_first(torch.cat(rows, dim=2))


# ============================================================================= 5. loading

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"       # ckpt/vae/ in the MAGI-1 release
INDEX_SUFFIX = ".safetensors.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
REDOWNLOAD = "re-download or re-export it"
FIX_CONFIG = f"fix {CONFIG_FILE} or re-download the checkpoint"
LAYOUT_HINT = (f"a MAGI VAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (or one torch checkpoint "
               f"{'/'.join('*' + s for s in TORCH_SUFFIXES)})")

# The official state-dict names, literally: key -> shape as a function of the config. `{i}` is a block index.
TRUNK_KEYS: dict[str, Any] = {
    "cls_token": lambda c: (1, 1, c.embed_dim),
    "pos_embed": lambda c: (1, c.num_tokens, c.embed_dim),
    "norm.weight": lambda c: (c.embed_dim,),
    "norm.bias": lambda c: (c.embed_dim,),
}
BLOCK_KEYS: dict[str, Any] = {
    "blocks.{i}.norm1.weight": lambda c: (c.embed_dim,),       # only without ln_in_attn
    "blocks.{i}.norm1.bias": lambda c: (c.embed_dim,),         # only without ln_in_attn
    "blocks.{i}.attn.qkv.weight": lambda c: (3 * c.embed_dim, c.embed_dim),
    "blocks.{i}.attn.qkv.bias": lambda c: (3 * c.embed_dim,),  # only with qkv_bias
    "blocks.{i}.attn.proj.weight": lambda c: (c.embed_dim, c.embed_dim),
    "blocks.{i}.attn.proj.bias": lambda c: (c.embed_dim,),
    "blocks.{i}.norm2.weight": lambda c: (c.embed_dim,),
    "blocks.{i}.norm2.bias": lambda c: (c.embed_dim,),
    "blocks.{i}.mlp.fc1.weight": lambda c: (c.mlp_hidden, c.embed_dim),
    "blocks.{i}.mlp.fc1.bias": lambda c: (c.mlp_hidden,),
    "blocks.{i}.mlp.fc2.weight": lambda c: (c.embed_dim, c.mlp_hidden),
    "blocks.{i}.mlp.fc2.bias": lambda c: (c.embed_dim,),
}
ENCODER_KEYS: dict[str, Any] = {
    "encoder.patch_embed.proj.weight": lambda c: (c.embed_dim, c.in_chans, c.patch_length, c.patch_size, c.patch_size),
    "encoder.patch_embed.proj.bias": lambda c: (c.embed_dim,),
    "encoder.last_layer.weight": lambda c: (c.moment_chans, c.embed_dim),
    "encoder.last_layer.bias": lambda c: (c.moment_chans,),
}
DECODER_KEYS: dict[str, Any] = {
    "decoder.proj_in.weight": lambda c: (c.embed_dim, c.z_chans),
    "decoder.proj_in.bias": lambda c: (c.embed_dim,),
    "decoder.last_layer.weight": lambda c: (3, c.unpatch_channels, 3, 3, 3),
    "decoder.last_layer.bias": lambda c: (3,),
}


def expected_keys(cfg: MagiVAEConfig) -> dict[str, tuple[int, ...]]:
    """The full official state dict of `cfg`: name -> shape (from the literal tables above)."""
    def wanted(name: str) -> bool:
        if ".norm1." in name:
            return not cfg.ln_in_attn
        if name.endswith("qkv.bias"):
            return cfg.qkv_bias
        if name.endswith("cls_token"):
            return cfg.with_cls_token
        return True

    keys: dict[str, tuple[int, ...]] = {}
    for part, own in (("encoder", ENCODER_KEYS), ("decoder", DECODER_KEYS)):
        table = {f"{part}.{k}": f for k, f in TRUNK_KEYS.items()}
        table.update({f"{part}.{k.format(i=i)}": f for i in range(cfg.depth) for k, f in BLOCK_KEYS.items()})
        table.update(own)
        keys.update({k: tuple(f(cfg)) for k, f in table.items() if wanted(k)})
    return keys


def compare_keys(cfg: MagiVAEConfig, state_dict: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, "key: expected [..], found [..]") against the literal key table."""
    expected = expected_keys(cfg)
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    misshaped = [f"{k}: expected {list(expected[k])}, found {list(found[k])}"
                 for k in expected if k in found and found[k] != expected[k]]
    return missing, unexpected, misshaped


def key_mismatch(cfg: MagiVAEConfig, state_dict: Mapping[str, Tensor]) -> str | None:
    """None when the state dict fits, else one short line: counts and the first names of each kind."""
    parts = []
    for title, names in zip(("missing", "unexpected", "mis-shaped"), compare_keys(cfg, state_dict)):
        if names:
            more = f"; and {len(names) - 2} more" if len(names) > 2 else ""
            parts.append(f"{len(names)} {title} key(s): {'; '.join(n[:120] for n in names[:2])}{more}")
    return "; ".join(parts) or None


def build_on_meta(cfg: MagiVAEConfig) -> MagiVAE:
    with torch.device("meta"):
        return MagiVAE(cfg)


def from_state_dict(cfg: MagiVAEConfig, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", where: str = "state dict") -> MagiVAE:
    """Build on the meta device, check every name and shape against the key table, then assign (cast, moved)."""
    mismatch = key_mismatch(cfg, state_dict)
    if mismatch:
        raise CheckpointError(f"{where}: does not fit the MAGI VAE its config describes ({mismatch}); {FIX_CONFIG}")
    vae = build_on_meta(cfg)
    tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state_dict.items()}
    vae.load_state_dict(tensors, strict=True, assign=True)
    return vae.eval()


def parse_config(value: MagiVAEConfig | str | Mapping[str, Any]) -> MagiVAEConfig:
    """A config given as a MagiVAEConfig, a size name ('official', 'tiny') or the config.json object."""
    if isinstance(value, MagiVAEConfig):
        return value
    if isinstance(value, str):
        return config_for(value)
    return MagiVAEConfig.from_dict(value)


def read_config(fs: AbstractFileSystem, path: str, label: str) -> MagiVAEConfig:
    """config.json of a VAE folder; any fault is one CheckpointError line naming it."""
    raw = read_json_object(fs, path, label, REDOWNLOAD)
    try:
        return MagiVAEConfig.from_dict(raw)
    except ValueError as err:
        raise CheckpointError(f"{label}: {' '.join(str(err).split())[:400]}; {FIX_CONFIG}") from None


def read_torch_file(fs: AbstractFileSystem, path: str, label: str, device: str | torch.device = "cpu"
                    ) -> dict[str, Tensor]:
    """A torch checkpoint via torch.load(weights_only=True): a flat state dict or {"state_dict": {...}}."""
    try:
        if isinstance(fs, LocalFileSystem):
            loaded = torch.load(path, map_location=device, weights_only=True)
        else:
            loaded = torch.load(io.BytesIO(fs.cat_file(path)), map_location=device, weights_only=True)
    except Exception as err:  # zip/pickle/EOF/OS errors all mean the same to the user: the file is bad
        reason = " ".join(str(err).split())[:80] or type(err).__name__
        raise CheckpointError(f"{label}: not a readable torch checkpoint (truncated or corrupt: {reason}); "
                              f"{REDOWNLOAD}") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{label}: holds a {type(loaded).__name__}, not a state dict of tensors; {REDOWNLOAD}")
    bad = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{label}: entry {excerpt(str(bad[0]))} is not a named tensor (a state dict holds "
                              f"only tensors); {REDOWNLOAD}")
    return dict(loaded)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _folder_weight_files(fs: AbstractFileSystem, root: str, where: str) -> list[str]:
    """Weight file names of a folder: the index's shards, else every *.safetensors, else its one torch file."""
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise CheckpointError(f"{where}: more than one index file {indexes}; keep exactly one")
    if indexes:
        shards = sorted(set(read_weight_map(fs, _join(root, indexes[0]), _join(where, indexes[0])).values()))
        absent = [n for n in shards if n not in names]
        if absent:
            raise CheckpointError(f"{_join(where, indexes[0])}: names shard(s) that are not in the folder: "
                                  f"{absent[:3]}; re-download them (or the whole checkpoint)")
        return shards
    shards = [n for n in names if n.endswith(".safetensors")]
    if shards:
        return shards
    torch_files = [n for n in names if n.endswith(TORCH_SUFFIXES)]
    if len(torch_files) == 1:
        return torch_files
    if torch_files:
        raise CheckpointError(f"{where}: several torch checkpoints {torch_files[:4]} and no safetensors; "
                              "keep one, or load the file itself")
    raise CheckpointError(f"{where}: no weights file; {LAYOUT_HINT}")


def _read_weights(fs: AbstractFileSystem, path: str, label: str, device: str | torch.device) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        return read_shard(fs, path, device, label=label)
    return read_torch_file(fs, path, label, device)


def load_magi_vae(path_or_url: str, config: MagiVAEConfig | str | Mapping[str, Any] | None = None,
                  dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  storage_options: dict | None = None) -> MagiVAE:
    """Load the VAE from a folder or one weights file, local or any fsspec URL (file://, s3://, memory://).

    A folder holds config.json and diffusion_pytorch_model.safetensors (or shards with an index, or one
    torch checkpoint). A single file (*.safetensors, or a torch checkpoint read with weights_only=True)
    takes its config from `config` or from a config.json beside it. `config` overrides the folder's.
    Every fault is one CheckpointError line naming the file.
    """
    fs, root = url_to_fs(path_or_url, **(storage_options or {}))
    fs.invalidate_cache(root)
    cfg = parse_config(config) if config is not None else None
    if fs.isdir(root):
        files = [(_join(root, n), _join(path_or_url, n)) for n in _folder_weight_files(fs, root, path_or_url)]
        config_path, config_label = _join(root, CONFIG_FILE), _join(path_or_url, CONFIG_FILE)
    elif fs.exists(root):
        files = [(root, path_or_url)]
        config_path = _join(posixpath.dirname(root.rstrip("/")), CONFIG_FILE)
        config_label = f"{CONFIG_FILE} beside {path_or_url}"
        if cfg is None and not fs.exists(config_path):
            raise CheckpointError(f"{path_or_url}: a single weights file needs its config: pass config= "
                                  f"(e.g. 'official') or put {CONFIG_FILE} beside it")
    else:
        raise CheckpointError(f"{path_or_url}: no such file or folder; {LAYOUT_HINT}")
    if cfg is None:
        cfg = read_config(fs, config_path, config_label)
    state_dict: dict[str, Tensor] = {}
    for path, label in files:
        for key, tensor in _read_weights(fs, path, label, device).items():
            if key in state_dict:
                raise CheckpointError(f"{path_or_url}: key {key[:80]!r} appears in more than one file "
                                      f"(again in {label}); {REDOWNLOAD}")
            state_dict[key] = tensor
    where = files[0][1] if len(files) == 1 else path_or_url
    return from_state_dict(cfg, state_dict, dtype=dtype, device=device, where=where)


def save_magi_vae(vae: MagiVAE, dir_or_url: str, storage_options: dict | None = None) -> list[str]:
    """Write config.json + diffusion_pytorch_model.safetensors (the release layout); returns the file names."""
    fs, root = url_to_fs(dir_or_url, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    fs.pipe_file(_join(root, WEIGHTS_FILE), save_safetensors_bytes(state_dict))
    fs.pipe_file(_join(root, CONFIG_FILE), json.dumps(vae.config.to_dict(), indent=2).encode())
    return [CONFIG_FILE, WEIGHTS_FILE]
