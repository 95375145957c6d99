"""Wan2.1 causal 3-D VAE (the VAE of SkyReels-V2) with the official state-dict names and a streaming decoder.

Facts followed: ../shared/reference/NOTES_skyreels_v2.md section 6 and GOLDEN_FORMAT.md section 8.1
(upstream `skyreels_v2_infer/modules/vae.py`, the same code as Wan2.1 `wan/modules/vae.py`).

Reads top to bottom:
  1. config and the published latent statistics
  2. the causal cache: explicit per-stream state (upstream keeps it on the model)
  3. layers: RMSNorm, CausalConv3d, ResidualBlock, AttentionBlock, Resample
  4. Encoder3d, Decoder3d
  5. WanVAE: encode (video in [-1, 1] -> normalised latent) and decode (latent -> video in [-1, 1])
  6. streaming: VAEStreamDecoder (latents -> frames, chunk by chunk), VAEStreamEncoder
  7. loading: `Wan2.1_VAE.pth` (torch.load with weights_only) or `.safetensors`, local or fsspec, strict

Time is causal everywhere. Every 3-D conv sees the current and the two previous frames of its input
stream (zeros before the first), so a video can be processed in chunks if each such conv keeps the last
CACHE_T frames of its input. Two layers are not plain causal convs, and they fix the chunking:

- decoder `upsample3d` doubles time, except for the very first frame of the stream (upstream marks its
  slot 'Rep' and skips the time conv). Latent frame 0 gives 1 frame, every later latent frame 4 (official
  strides). Latent frame 0 must therefore be decoded alone: given two latent frames on its first call,
  the layer skips the time conv for both, and 2 frames come out, not 5. The time conv's zero padding starts
  after frame 0: frame 0 is never inside its window.
- encoder `downsample3d` halves time with a stride-2 conv over [last frame of the previous chunk, chunk]
  and passes the very first frame through. Upstream encodes frames [0,1), [1,5), [5,9), ... and drops
  trailing frames that do not fill a chunk: 13 frames -> 4 latent frames, 15 frames -> also 4.

Checkpoint layout: the official key names (shapes at dim 96 in ../shared/reference/wan-vae_keys.json, 194
tensors, 126.9 M parameters). nn.Sequential indices are part of the names, so the layer order is literal:

  encoder.conv1.{weight,bias}                                   CausalConv3d 3 -> dim, 3x3x3
  encoder.downsamples.{n}.residual.{0,3}.gamma                  ResidualBlock: RMSNorm at 0 and 3,
  encoder.downsamples.{n}.residual.{2,6}.{weight,bias}            CausalConv3d at 2 and 6 (1, 4 SiLU; 5 Dropout)
  encoder.downsamples.{n}.shortcut.{weight,bias}                  1x1x1 conv, only where channels change
  encoder.downsamples.{n}.resample.1.{weight,bias}              Resample: Conv2d at 1 (0 = pad / upsample)
  encoder.downsamples.{n}.time_conv.{weight,bias}                 only in the '3d' modes
  encoder.middle.{0,2}.*                                        ResidualBlock
  encoder.middle.1.{norm.gamma,to_qkv.*,proj.*}                 AttentionBlock
  encoder.head.0.gamma, encoder.head.2.{weight,bias}            RMSNorm, SiLU, CausalConv3d -> 2 z_dim
  conv1.{weight,bias}                                           1x1x1, 2 z_dim -> (mu, log_var)
  conv2.{weight,bias}                                           1x1x1, z_dim -> z_dim, before the decoder
  decoder.conv1.*, decoder.middle.*, decoder.upsamples.{n}.*, decoder.head.*   the mirror image
"""
from __future__ import annotations

import io
import pickle
import posixpath
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor, nn

from pipelines.skyreels_v2.checkpoint import CheckpointError, read_shard, state_dict_mismatch

# ----------------------------------------------------------------------------- 1. config

# Per-channel statistics of mu over the training data (WanVAE.__init__); encode returns (mu - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

CACHE_T = 2        # frames of history a causal conv with a temporal kernel of 3 needs
ENCODE_CHUNK = 4   # frames per encoder call after the first frame (upstream's fixed chunking)
VAE_FILE = "Wan2.1_VAE.pth"   # the official file name, inside the SkyReels-V2 / Wan2.1 model folders


@dataclass(frozen=True, kw_only=True)
class WanVAEConfig:
    """The `WanVAE_` kwargs as `_video_vae` passes them (official names and values), plus the latent statistics.

    The defaults are the released model's (`_video_vae`), not `WanVAE_`'s own constructor defaults.
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # (sic): upstream's spelling
    dropout: float = 0.0
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latent_mean", "latent_std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, e.g. {list(getattr(WanVAEConfig(), name))}; "
                                 f"got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self._validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WanVAEConfig:
        """Build from a `WanVAE_` kwargs dict (e.g. a golden case's model_config); `_`-prefixed keys are ignored."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in d if k not in valid and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown WanVAEConfig field(s) {unknown}; valid fields are {valid} "
                             "(keys starting with '_', such as _class_name, are ignored)")
        return cls(**{k: v for k, v in d.items() if k in valid})

    @classmethod
    def named(cls, name: str) -> WanVAEConfig:
        """A named size: 'official' (the released Wan2.1_VAE.pth) or 'tiny' (tests, CPU demos)."""
        if name not in SIZES:
            raise ValueError(f"unknown Wan VAE size {name!r}; valid names: {sorted(SIZES)}")
        return SIZES[name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, official names)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel along H and W: one x2 per level but the last (official 8)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        """Frames per latent frame after the first (official 4)."""
        return 2 ** sum(self.temperal_downsample)

    def num_frames(self, latent_frames: int) -> int:
        """Video frames decoded from `latent_frames` latent frames: 1 + stride * (F - 1)."""
        return 0 if latent_frames <= 0 else 1 + self.temporal_stride * (latent_frames - 1)

    def num_latent_frames(self, frames: int) -> int:
        """Latent frames encoded from `frames` frames (upstream drops frames that do not fill a chunk)."""
        return 0 if frames <= 0 else 1 + (frames - 1) // ENCODE_CHUNK * (ENCODE_CHUNK // self.temporal_stride)

    def _validate(self) -> None:
        """Raise ValueError saying what a valid value looks like."""
        for name in ("dim", "z_dim", "num_res_blocks"):
            if not _is_pos_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int (official: {getattr(WanVAEConfig(), name)}); "
                                 f"got {getattr(self, name)!r}")
        if not self.dim_mult or not all(_is_pos_int(m) for m in self.dim_mult):
            raise ValueError(f"dim_mult must be a non-empty list of positive ints, one per level "
                             f"(official: [1, 2, 4, 4]); got {list(self.dim_mult)}")
        if self.attn_scales:
            # upstream passes the feature cache to every block of `downsamples`/`upsamples`, and
            # AttentionBlock.forward takes no cache: any scale here crashes the reference code
            raise ValueError(f"attn_scales must be [] (as released): upstream cannot run attention blocks "
                             f"inside the down/up-sampling path; got {list(self.attn_scales)}")
        levels = len(self.dim_mult) - 1
        if len(self.temperal_downsample) != levels or not all(isinstance(b, bool) for b in self.temperal_downsample):
            raise ValueError(f"temperal_downsample must be {levels} true/false values, one per downsampling "
                             f"level (len(dim_mult) - 1; official: [false, true, true]); "
                             f"got {list(self.temperal_downsample)}")
        if self.temporal_stride > ENCODE_CHUNK:
            raise ValueError(f"temperal_downsample halves time {sum(self.temperal_downsample)} times, but the "
                             f"encoder reads {ENCODE_CHUNK} frames per call: at most 2 levels may be true "
                             f"(official: [false, true, true])")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1) (official: 0.0; inactive in eval); got {self.dropout!r}")
        for name in ("latent_mean", "latent_std"):
            values = getattr(self, name)
            if len(values) != self.z_dim or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"{name} must hold z_dim = {self.z_dim} numbers (the published 16-channel "
                                 f"values fit z_dim 16; give your own for another z_dim); got {len(values)}")
        if not all(s > 0 for s in self.latent_std):
            raise ValueError(f"latent_std values must be positive; got {list(self.latent_std)}")


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


SIZES: dict[str, WanVAEConfig] = {
    "official": WanVAEConfig(),
    # the goldens' layout at 243 k parameters: every code path of the official model, fast on a CPU
    "tiny": WanVAEConfig(dim=4),
}


# ----------------------------------------------------------------------------- 2. causal cache

# Upstream's marker in an upsample3d slot: frame 0 of the stream went through without the time conv.
FIRST_FRAME_PASSED = "Rep"


class CausalCache:
    """Per-stream state of one Encoder3d or Decoder3d: one slot per causal layer (its `slot` attribute).

    A slot holds the last (at most CACHE_T) frames of that layer's input, None before the stream's first
    frame, or FIRST_FRAME_PASSED (upsample3d after frame 0). The number of slots and the size of each are
    fixed: memory does not grow with the length of the video.
    """

    def __init__(self, num_slots: int):
        self.slots: list[Tensor | str | None] = [None] * num_slots

    def tensors(self) -> list[Tensor]:
        return [s for s in self.slots if isinstance(s, Tensor)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __len__(self) -> int:
        return len(self.slots)


def last_frames(history: Tensor | None, x: Tensor, n: int = CACHE_T) -> Tensor:
    """The last n frames of the stream [history, x] (fewer at its start), as a copy that owns its memory."""
    if x.shape[2] >= n or history is None:
        return x[:, :, -n:].clone()
    return torch.cat([history[:, :, x.shape[2] - n:], x], dim=2)


def number_cache_slots(root: nn.Module) -> int:
    """Give every layer that keeps history its slot index; returns the number of slots."""
    count = 0
    for module in root.modules():
        if getattr(module, "keeps_history", False):
            module.slot = count
            count += 1
    return count


# ----------------------------------------------------------------------------- 3. layers

def frames_to_batch(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [(B T), C, H, W]: per-frame 2-D layers."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def batch_to_frames(x: Tensor, t: int) -> Tensor:
    """[(B T), C, H, W] -> [B, C, T, H, W] (a view, as upstream's rearrange returns)."""
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).permute(0, 2, 1, 3, 4)


class RMSNorm(nn.Module):
    """x / ||x|| over channels * sqrt(C) * gamma (upstream RMS_norm: F.normalize, no bias)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        # gamma [C,1,1,1] broadcasts over [B,C,T,H,W]; [C,1,1] over per-frame [(B T),C,H,W] (AttentionBlock)
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time on the past side only: with a temporal kernel of 3, frame t sees t-2..t.

    `history` holds the last input frames of the stream's previous chunk; missing ones are zeros. Layers with
    temporal padding keep history in a CausalCache slot (`stream`); 1x1x1 convs and the downsampling time
    conv have none.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0):
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pad_t                        # all of it before the first frame
        self.space_pad = (pad_w, pad_w, pad_h, pad_h)    # F.pad order: W, then H
        self.keeps_history = self.time_pad > 0
        self.slot = -1

    def forward(self, x: Tensor, history: Tensor | None = None) -> Tensor:
        # x [B, Cin, T, H, W], history [B, Cin, <=2, H, W] -> [B, Cout, T, H, W] (stride 1)
        missing = self.time_pad
        if history is not None and self.time_pad > 0:
            x = torch.cat([history, x], dim=2)
            missing -= history.shape[2]
        return super().forward(F.pad(x, (*self.space_pad, missing, 0)))

    def stream(self, x: Tensor, cache: CausalCache) -> Tensor:
        """This conv over x as the continuation of the stream in `cache`; remembers x's last frames."""
        history = cache.slots[self.slot]
        cache.slots[self.slot] = last_frames(history, x)
        return self(x, history)


def apply_layers(layers: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    """Run a Sequential whose causal convs continue the cached stream."""
    for layer in layers:
        x = layer.stream(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class ResidualBlock(nn.Module):
    """x + F(x), F = RMSNorm, SiLU, conv, RMSNorm, SiLU, Dropout, conv (causal 3x3x3); 1x1x1 shortcut if C changes."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # [B, Cin, T, H, W] -> [B, Cout, T, H, W]
        return apply_layers(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (frames do not see each other)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # upstream's init: the block starts as the identity

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        # [B, C, T, H, W] -> same; `cache` unused (no history: attention stays inside a frame)
        b, c, t, h, w = x.shape
        y = self.norm(frames_to_batch(x))                                      # [(B T), C, H, W]
        qkv = self.to_qkv(y).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)                                          # [(B T), 1, HW, C] each
        y = F.scaled_dot_product_attention(q, k, v)                             # softmax(q k^T / sqrt(C)) v
        y = self.proj(y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))   # [(B T), C, H, W]
        return batch_to_frames(y, t) + x


class NearestUpsample2x(nn.Module):
    """x2 nearest-exact in H and W, computed in float32 (upstream's bfloat16 fix)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


RESAMPLE_MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")


class Resample(nn.Module):
    """x2 (up) or /2 (down) in H and W per frame; the '3d' modes also change time (see the module docstring)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"Resample mode must be one of {RESAMPLE_MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            # upsampling halves the channels: the decoder's next level starts at dim // 2
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            # pad one zero column/row at the right/bottom, then stride 2: H -> H / 2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            # one causal conv gives both output frames of each input frame: channels [first | second]
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        # the Resample keeps the history (its own rules below), not its time conv
        self.keeps_history = mode.endswith("3d")
        if self.keeps_history:
            self.time_conv.keeps_history = False
        self.slot = -1

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        # up:   [B, C, T, H, W] -> [B, C/2, 2T (T on the stream's first call), 2H, 2W]
        # down: [B, C, T, H, W] -> [B, C, T/2 (T on the first call), H/2, W/2]
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        t = x.shape[2]
        x = batch_to_frames(self.resample(frames_to_batch(x)), t)
        if self.mode == "downsample3d":
            x = self._halve_time(x, cache)
        return x

    def _double_time(self, x: Tensor, cache: CausalCache) -> Tensor:
        """[B, C, T, H, W] -> [B, C, 2T, H, W]; the stream's first call passes through unchanged."""
        state = cache.slots[self.slot]
        if state is None:
            # every frame of the first call passes (upstream: slot <- 'Rep'); the decoders send frame 0 alone
            cache.slots[self.slot] = FIRST_FRAME_PASSED
            return x
        # after the first call the time conv starts afresh on zero padding: frame 0 never enters its window
        history = None if isinstance(state, str) else state
        cache.slots[self.slot] = last_frames(history, x)
        b, c, t, h, w = x.shape
        y = self.time_conv(x, history).reshape(b, 2, c, t, h, w)    # [B, 2, C, T, H, W]
        # interleave: output frame 2i = first half of the channels at i, 2i+1 = second half
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, t * 2, h, w)

    def _halve_time(self, x: Tensor, cache: CausalCache) -> Tensor:
        """[B, C, T, H, W] -> [B, C, T/2, H, W]: stride 2 over [previous last frame, x]; first call unchanged."""
        state = cache.slots[self.slot]
        cache.slots[self.slot] = x[:, :, -1:].clone()
        if state is None:
            return x   # the very first frame passes through (upstream caches it and skips the conv)
        return self.time_conv(torch.cat([state, x], dim=2))


# ----------------------------------------------------------------------------- 4. encoder, decoder

class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> features [B, 2 z_dim, T', H/s, W/s] (mu and log_var before WanVAE.conv1)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]           # official: 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[level] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top, cfg.dropout), AttentionBlock(top),
                                    ResidualBlock(top, top, cfg.dropout))
        self.head = nn.Sequential(RMSNorm(top, images=False), nn.SiLU(),
                                  CausalConv3d(top, cfg.z_dim * 2, 3, padding=1))
        self.num_slots = number_cache_slots(self)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1.stream(x, cache)        # [B, dim, T, H, W]
        for block in self.downsamples:
            x = block(x, cache)                # -> [B, 4 dim, T', H/8, W/8] (official)
        for block in self.middle:
            x = block(x, cache)
        return apply_layers(self.head, x, cache)   # [B, 2 z_dim, T', H/8, W/8]


class Decoder3d(nn.Module):
    """Decoder input [B, z_dim, F, h, w] -> video [B, 3, T, h s, w s] (before the clamp)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]   # official: 384, 384, 384, 192, 96
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], cfg.dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], cfg.dropout))
        blocks: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2   # the previous level's upsampling halved the channels (upstream: `i in (1, 2, 3)`)
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample[level] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))
        self.num_slots = number_cache_slots(self)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1.stream(x, cache)        # [B, 4 dim, F, h, w] (official)
        for block in self.middle:
            x = block(x, cache)
        for block in self.upsamples:
            x = block(x, cache)                # -> [B, dim, T, 8h, 8w]
        return apply_layers(self.head, x, cache)   # [B, 3, T, 8h, 8w]


# ----------------------------------------------------------------------------- 5. the VAE

class WanVAE(nn.Module):
    """Wan2.1 VAE (`WanVAE_` + the `WanVAE` wrapper's normalisation and clamp); official state-dict names.

    The model holds no per-video state: each call (or stream object) owns its CausalCache, so one model
    can serve several streams at once.
    """

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = config or WanVAEConfig()
        z = self.config.z_dim
        self.encoder = Encoder3d(self.config)
        self.conv1 = CausalConv3d(z * 2, z * 2, 1)   # encoder features -> (mu, log_var)
        self.conv2 = CausalConv3d(z, z, 1)           # latent -> decoder input
        self.decoder = Decoder3d(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def new_encoder_cache(self) -> CausalCache:
        return CausalCache(self.encoder.num_slots)

    def new_decoder_cache(self) -> CausalCache:
        return CausalCache(self.decoder.num_slots)

    # -- normalisation (float32, as upstream's `scale = [mean, 1 / std]`)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, mean, 1/std): x in float32 (float64 stays), the statistics as [1, z, 1, 1, 1] float32."""
        mean = torch.tensor(self.config.latent_mean, dtype=torch.float32, device=x.device)
        inv_std = 1.0 / torch.tensor(self.config.latent_std, dtype=torch.float32, device=x.device)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return x, mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    def normalise(self, mu: Tensor) -> Tensor:
        """mu -> latent: (mu - mean) * (1/std)."""
        mu, mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    def denormalise(self, latent: Tensor) -> Tensor:
        """latent -> decoder space: latent / (1/std) + mean (upstream divides by the reciprocal)."""
        latent, mean, inv_std = self._stats(latent)
        return latent / inv_std + mean

    # -- encode

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalised mu [B, z, 1 + (T-1)//4, H/8, W/8] float32 (official)."""
        mu, _ = self.moments(self.encode_features(video))
        return self.normalise(mu)

    @torch.no_grad()
    def encode_features(self, video: Tensor) -> Tensor:
        """The encoder over frames [0,1), [1,5), [5,9), ... with one cache; trailing frames dropped (upstream)."""
        _check_video(video)
        video = video.to(device=self.device, dtype=self.dtype)
        cache = self.new_encoder_cache()
        chunks = [self.encoder(video[:, :, a:b], cache) for a, b in encoder_chunks(video.shape[2])]
        return torch.cat(chunks, dim=2)                               # [B, 2 z, F, h, w]

    def moments(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder features [B, 2z, F, h, w] -> (mu, log_var), each [B, z, F, h, w]; upstream uses only mu."""
        mu, log_var = self.conv1(features).chunk(2, dim=1)
        return mu, log_var

    # -- decode

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent [B, z, F, h, w] -> video [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1] float32 (official)."""
        return self.decode_raw(latent).clamp_(-1, 1)

    @torch.no_grad()
    def decode_raw(self, latent: Tensor) -> Tensor:
        """decode without the final clamp."""
        return VAEStreamDecoder(self, clamp=False).decode_next(latent)


def encoder_chunks(num_frames: int) -> list[tuple[int, int]]:
    """Upstream's encoder calls: [0,1), [1,5), [5,9), ...; frames after the last full chunk are not read."""
    if num_frames < 1:
        return []
    chunks = (num_frames - 1) // ENCODE_CHUNK
    return [(0, 1)] + [(1 + ENCODE_CHUNK * i, 1 + ENCODE_CHUNK * (i + 1)) for i in range(chunks)]


def _check_video(video: Tensor) -> None:
    if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] < 1:
        raise ValueError(f"video must be [B, 3, T >= 1, H, W] in [-1, 1]; got shape {list(video.shape)}")


# ----------------------------------------------------------------------------- 6. streaming

class VAEStreamDecoder:
    """Decode a latent video chunk by chunk; the concatenated outputs equal `WanVAE.decode` of the whole.

    The decoder's CausalCache (at most CACHE_T frames per causal layer) carries across calls and is never
    cleared between them, so memory is bounded by the chunk, not by the video. As upstream, every latent
    frame goes through the decoder alone: latent frame 0 of the stream gives 1 frame, every later one
    `temporal_stride` (4) frames, whatever the chunking. `reset()` starts a new video.
    """

    def __init__(self, vae: WanVAE, clamp: bool = True):
        self.vae = vae
        self.clamp = clamp
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next latent frame is frame 0 of a new video."""
        self.cache = self.vae.new_decoder_cache()
        self.latent_frames_in = 0
        self.frames_out = 0
        self._shape: tuple[int, int, int] | None = None   # (B, h, w) of this stream

    @torch.no_grad()
    def decode_next(self, latent: Tensor) -> Tensor:
        """Normalised latent chunk [B, z, f, h, w] -> its frames [B, 3, n, 8h, 8w] float32 (n = 4f, 4f-3 at first)."""
        self._check(latent)
        b, _, f, h, w = latent.shape
        if f == 0:
            s = self.vae.config.spatial_stride
            return torch.zeros(b, 3, 0, h * s, w * s, device=self.vae.device)
        # 1. denormalise and conv2 over the chunk (pointwise in time, as upstream over the whole latent)
        x = self.vae.conv2(self.vae.denormalise(latent.to(self.vae.device)).to(self.vae.dtype))   # [B, z, f, h, w]
        # 2. one latent frame at a time through the decoder, with the stream's cache
        frames = [self.vae.decoder(x[:, :, i:i + 1], self.cache) for i in range(f)]   # [B, 3, 1 or 4, 8h, 8w] each
        video = torch.cat(frames, dim=2).float()
        self.latent_frames_in += f
        self.frames_out += video.shape[2]
        return video.clamp_(-1, 1) if self.clamp else video

    def _check(self, latent: Tensor) -> None:
        z = self.vae.config.z_dim
        if latent.dim() != 5 or latent.shape[1] != z:
            raise ValueError(f"latent chunk must be [B, {z}, f, h, w]; got shape {list(latent.shape)}")
        shape = (latent.shape[0], latent.shape[3], latent.shape[4])
        if self._shape is not None and shape != self._shape and latent.shape[2] > 0:
            raise ValueError(f"latent chunk has (B, h, w) = {shape}, but this stream started with {self._shape}; "
                             "call reset() before decoding another video")
        if latent.shape[2] > 0:
            self._shape = shape


class VAEStreamEncoder:
    """Encode a video as its frames arrive; the concatenated latents equal `WanVAE.encode` of the whole.

    Frame 0 is encoded alone, then every ENCODE_CHUNK (4) frames, as upstream chunks; frames that do not
    fill a chunk yet wait in `pending` (at the end of a video upstream drops them: so does `encode`).
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next frame is frame 0 of a new video."""
        self.cache = self.vae.new_encoder_cache()
        self.pending: Tensor | None = None     # [B, 3, < 4, H, W] frames waiting for a full chunk
        self.frames_in = 0

    @property
    def pending_frames(self) -> int:
        return 0 if self.pending is None else self.pending.shape[2]

    @torch.no_grad()
    def encode_next(self, frames: Tensor) -> Tensor:
        """Frames [B, 3, t, H, W] in [-1, 1] -> the latent frames they complete [B, z, n, H/8, W/8] (n may be 0)."""
        _check_video(frames)
        x = frames.to(device=self.vae.device, dtype=self.vae.dtype)
        if self.pending is not None:
            x = torch.cat([self.pending, x], dim=2)
        done_before = self.frames_in - self.pending_frames
        self.frames_in += frames.shape[2]
        features, used = [], 0
        while True:
            size = 1 if done_before + used == 0 else ENCODE_CHUNK
            if x.shape[2] - used < size:
                break
            features.append(self.vae.encoder(x[:, :, used:used + size], self.cache))
            used += size
        self.pending = x[:, :, used:].clone() if used < x.shape[2] else None
        if not features:
            b, _, _, h, w = x.shape
            s = self.vae.config.spatial_stride
            return x.new_zeros(b, self.vae.config.z_dim, 0, h // s, w // s, dtype=torch.float32)
        mu, _ = self.vae.moments(torch.cat(features, dim=2))
        return self.vae.normalise(mu)


# ----------------------------------------------------------------------------- 7. loading

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
REDOWNLOAD = "re-download it"


def load_wan_vae(path_or_url: str, config: WanVAEConfig | str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 storage_options: dict | None = None) -> WanVAE:
    """Load the VAE from a weights file or a folder holding one, local or any fsspec URL (s3://, memory://, ...).

    The file is `Wan2.1_VAE.pth` (read with torch.load(weights_only=True), never plain pickle) or a
    `.safetensors`; a folder is searched for `Wan2.1_VAE.pth` first, else its only weights file.
    `config`: a WanVAEConfig or a size name; None = 'official'. `dtype` None keeps the file's dtype
    (float32 for the release). The model is built on the meta device, checked strictly (names and shapes),
    then the tensors are assigned. Every fault is one CheckpointError line naming the file.
    """
    fs, path = url_to_fs(path_or_url, **(storage_options or {}))
    file, label = _find_weights_file(fs, path, path_or_url)
    state_dict = read_vae_state_dict(fs, file, label)
    return vae_from_state_dict(state_dict, config, device=device, dtype=dtype, source=label)


def vae_from_state_dict(state_dict: Mapping[str, Tensor], config: WanVAEConfig | str | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        source: str = "state dict") -> WanVAE:
    """Build on the meta device, check every name and shape, then assign the tensors (cast, moved)."""
    config = _resolve_config(config)
    with torch.device("meta"):
        model = WanVAE(config)
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f"{source}: the weights do not fit the Wan VAE config (dim {config.dim}, z_dim "
                              f"{config.z_dim}, dim_mult {list(config.dim_mult)}) ({mismatch}); pass the "
                              f"matching config= or {REDOWNLOAD}")
    tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def read_vae_state_dict(fs: Any, path: str, label: str) -> dict[str, Tensor]:
    """The tensors of one weights file: safetensors, or a torch checkpoint read with weights_only=True."""
    if path.endswith(".safetensors"):
        return read_shard(fs, path, "cpu", label=label)
    try:
        if isinstance(fs, LocalFileSystem):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        else:
            loaded = torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            # the file asks to build a Python object: it is refused, never executed
            raise CheckpointError(f"{label}: refused by torch.load(weights_only=True), it holds more than "
                                  f"tensors or is corrupt ({_weights_only_reason(err)}); use the official "
                                  f"{VAE_FILE}") from None
        raise CheckpointError(f"{label}: not a readable torch checkpoint (truncated or corrupt: "
                              f"{_first_line(err)}); {REDOWNLOAD}") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{label}: not a readable torch checkpoint (truncated or corrupt: "
                              f"{_first_line(err)}); {REDOWNLOAD}") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                               for k, v in loaded.items()):
        raise CheckpointError(f"{label}: expected a state dict (name -> tensor), found {type(loaded).__name__}"
                              f"{'' if not isinstance(loaded, dict) else ' with non-tensor values'}; "
                              f"use the official {VAE_FILE}")
    return loaded


def _find_weights_file(fs: Any, path: str, where: str) -> tuple[str, str]:
    """(file path, label for messages) of a weights file given as itself or as its folder."""
    if fs.isfile(path):
        if not path.endswith(WEIGHT_SUFFIXES):
            raise CheckpointError(f"{where}: not a VAE weights file (expected {VAE_FILE} or a *.safetensors)")
        return path, where
    if not fs.isdir(path):
        raise CheckpointError(f"{where}: no such file or folder; expected {VAE_FILE} or a *.safetensors VAE file")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    if VAE_FILE in names:
        name = VAE_FILE
    else:
        candidates = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
        if len(candidates) != 1:
            found = "none" if not candidates else f"several: {candidates[:4]}"
            raise CheckpointError(f"{where}: no {VAE_FILE} and not exactly one weights file ({found}); "
                                  f"pass the VAE file's own path")
        name = candidates[0]
    return f"{path.rstrip('/')}/{name}", f"{where.rstrip('/')}/{name}"


def _resolve_config(config: WanVAEConfig | str | None) -> WanVAEConfig:
    if config is None:
        return SIZES["official"]
    return WanVAEConfig.named(config) if isinstance(config, str) else config


def _first_line(err: BaseException, limit: int = 120) -> str:
    text = " ".join(str(err).strip().splitlines()[:1]) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _weights_only_reason(err: BaseException, limit: int = 120) -> str:
    """The useful sentence of torch's long weights_only message ("Unsupported global: GLOBAL x.Y ...")."""
    marker = "WeightsUnpickler error:"
    for line in str(err).splitlines():
        if marker in line:
            reason = line.split(marker, 1)[1].strip().split(". ")[0]
            return reason if len(reason) <= limit else reason[:limit] + "..."
    return _first_line(err, limit)


# ----------------------------------------------------------------------------- untrained weights

@torch.no_grad()
def init_random_weights_(vae: WanVAE, seed: int = 0) -> WanVAE:
    """Untrained weights for tests and benchmarks, drawn like the goldens' (gamma 1 + 0.15 N, biases 0.05 N,
    conv weights N / sqrt(fan_in), including the zero-initialised attention projections)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(vae.named_parameters()):
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("gamma"):
            value = 1 + 0.15 * noise
        elif name.endswith("bias"):
            value = 0.05 * noise
        else:
            value = noise * param[0].numel() ** -0.5   # fan_in = in_channels * kernel volume
        param.copy_(value.to(param.dtype))
    return vae
