"""MAGI-1 DiT (upstream `VideoDiTModel`), with the official state-dict names.

Reads top to bottom: config, small layers, conditioning embedders, 3-D RoPE, attention, layer,
`BlockInputs`, the model, caption helpers. `MagiDiT.forward` is `embed` -> `run_blocks` -> `unembed`.
The facts it follows are in ../shared/reference/NOTES_magi1.md section 1.

Call (one upstream `VideoDiTModel.forward`, cache handled by the caller)::

    out = model(x, t, y, caption_dropout_mask, xattn_mask, kv_range, *,
                slice_point=0, distill_dt=None,
                kv_cache=None, kv_capture=None, capture_chunks=None)

    x      [B, C, T, H, W]  latent window; C = 16 (the 24B model duplicates it to its 32 inputs and
                            scales it by x_rescale_factor itself); T = R chunks of T/R latent frames
    t      [B, R]           noise level of each chunk: 0 = pure noise, 1 = clean (clean context 0.9999)
    y      [B*R, L, C_cap]  caption embedding per (item, chunk) row, row b*R+i ([B*R, 1, L, C_cap] too);
                            text enters ONLY through cross-attention
    caption_dropout_mask [B] bool   AdaLN token: True = null_caption_embedding[-1] ("dropped"),
                            False = null_caption_embedding[-2]; the AdaLN path never sees the prompt
    xattn_mask [B*R, L]     1 = valid caption token ([B*R, 1, L] too); a row of zeros = no text
                            (that chunk's cross-attention output is 0)
    kv_range [B*R, 2] or [R, 2] int   key token range [start, end) of each chunk's queries, in tokens
                            of THAT ITEM's key sequence [cached K/V (M tokens); this call's S tokens]
                            (block-causal attention = chunk i's range ends at the end of chunk i)
    slice_point int         number of chunk-widths of clean video before x: temporal RoPE positions
                            are absolute, T + (T/R)*slice_point in total, the last T used
    distill_dt float|None   distill models: the shortcut step-size conditioning,
                            `distill_dt_factor(num_steps, distill_interval)`; None for base models
    kv_cache {layer: (k, v)} each [B, M, G, head_dim]: post-RoPE keys / values of earlier clean
                            tokens (upstream `key_value_memory_dict[layer][:slice_point*tokens_per_chunk]`)
    kv_capture dict         when given, layer i stores its post-RoPE (k, v) [B, n, G, head_dim] of ...
    capture_chunks (a, b)   ... this call's chunks a..b-1 (None = all); the caller files them by chunk
    -> velocity [B, C, T, H, W] float32 (C = 16 for the 24B model too)

Tokens are frame-major, (T H W) after 1x2x2 patching; chunk i holds tokens
[i*tokens_per_chunk, (i+1)*tokens_per_chunk). With a cache of M tokens, upstream's k ranges are simply
offset by M (e.g. steady state: chunk i of the window sees [M - tokens_per_chunk, M + (i+1)*tpc)).
Upstream's uncond CFG pass puts each denoising chunk in its own batch item (B = chunks, R = 1, no
cache, slice_point 0): here every item's kv_range row is then [0, tokens_per_chunk).

Upstream `forward(..., inference_params, **kwargs)` maps onto this call as follows:
denoising_range_num = t.shape[1]; range_num does not enter the math; slice_point is passed as is;
engine_config.distill + kwargs num_steps / distill_interval give distill_dt. The KV cache
(`InferenceParams.key_value_memory_dict`) is the caller's: when upstream would read it
(fwd_extra_1st_chunk, extract_prefix_video_feature or slice_point > 0) pass the K/V of the first
slice_point chunks as kv_cache; when it would write it (update_kv_cache: the cond_pre pass of 3-way
CFG, i.e. caption_dropout_mask True with the null caption, or the single distill pass) pass
kv_capture={} and file the captured K/V as chunks slice_point, slice_point+1, ... (upstream writes every
chunk of the call from slice_point*tokens_per_chunk on, except the appended copy of the nearly clean
chunk when distill_nearly_clean_chunk: capture_chunks=(0, R-1)). Only chunks that were re-run clean
(t = clean_t, the prepended extra chunk or a prefix chunk) are ever read back.

The golden `forward` cases feed: B = 1, R = 2 chunks of 6 frames, t = [[0.3, 0.05]], y [2, 1, L, C],
xattn_mask [2, 1, L], caption_dropout_mask [False], kv_range [[0, 96], [0, 192]] (block-causal, no
cache), slice_point 0, distill_dt = num_steps/4*2 for the distill case (engine_config.distill).

Precision follows upstream (`_high_precision_promoter` + its fp32 autocast regions): embedders,
RoPE, q/k LayerNorms, the output projection, the gated residual (post-norms) and the final
LayerNorm / linear run in float32; the rest in the parameter dtype. With float32 parameters
everything is float32.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TIME_FREQ_DIM = 256            # sinusoid width of the noise-level embedding
TIME_SCALE = 1000.0            # t in [0, 1] is embedded as t * 1000
MAX_PERIOD = 10000.0
ROPE_TEMPERATURE = 10000.0
ROPE_BASE_TOKENS = 16          # RoPE spatial rescale: positions as if the latent grid were 16 x 16 tokens
PROJ_GROUPS = 8                # the attention output interleave is hard-coded to 8 groups (TP8 legacy)
GATE_SOFTCAP = 1.0
PARAMS_DTYPES = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}
# state-dict entries upstream keeps in float32 whatever params_dtype is (`_high_precision_promoter`)
HIGH_PRECISION = ("x_embedder.", "t_embedder.", "y_embedder.", "final_linear.", "rope.",
                  ".q_layernorm.", ".k_layernorm.", ".self_attn_post_norm.", ".mlp_post_norm.",
                  "videodit_blocks.final_layernorm.")


# ----------------------------------------------------------------------------- 1. config

@dataclass(frozen=True, kw_only=True)
class MagiConfig:
    """The `model_config` section of the official MAGI-1 config.json (official names and defaults).

    Distillation and fp8 are engine settings, not model config: see `distill_dt_factor` and
    `pipelines.magi1.checkpoint`.
    """

    model_name: str = "videodit_ardf"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int = 1           # GQA: K/V heads
    kv_channels: int                    # head dim
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = False    # LayerNorm weight stored as (w - 1)
    x_rescale_factor: float = 1.0       # input * f, output / f (24B: 0.1)
    half_channel_vae: bool = False      # 24B: the 16-channel latent is duplicated to 32 inputs
    params_dtype: str = "torch.bfloat16"
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 4
    out_channels: int = 4
    cond_hidden_ratio: float = 0.25     # AdaLN condition width = hidden * ratio
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False     # SwiGLU MLP (24B, fc1 out = 2 * ffn) instead of exact GELU

    def __post_init__(self) -> None:
        if isinstance(self.params_dtype, torch.dtype):
            object.__setattr__(self, "params_dtype", str(self.params_dtype))
        self._validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MagiConfig:
        """From a `model_config` dict, or a whole official config.json dict (its `model_config` is used)."""
        if "model_config" in d and isinstance(d["model_config"], Mapping):
            d = d["model_config"]
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in d if k not in valid and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown MagiConfig field(s) {unknown}; valid fields are {valid} "
                             "(the model_config section of the official config; keys starting with '_' are ignored)")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"MagiConfig is missing required field(s) {missing}; e.g. the 4.5B model has "
                             "num_layers 34, hidden_size 3072, ffn_hidden_size 12288, num_attention_heads 24, "
                             "kv_channels 128")
        return cls(**{k: v for k, v in d.items() if k in valid})

    def to_dict(self) -> dict[str, Any]:
        """The `model_config` dict (official names, JSON types)."""
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return PARAMS_DTYPES[self.params_dtype]

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the caller passes (the 24B model duplicates it)."""
        return self.in_channels // 2 if self.half_channel_vae else self.in_channels

    @property
    def cond_dim(self) -> int:
        """Width of the AdaLN condition (t embedding + caption token)."""
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def xattn_dim(self) -> int:
        """Width of the projected caption that feeds cross-attention K/V."""
        return int(self.hidden_size * self.xattn_cond_hidden_ratio)

    @property
    def rope_bands(self) -> int:
        """Learned RoPE frequencies per axis: (hidden / heads) // 8 (16 for the released models)."""
        return (self.hidden_size // self.num_attention_heads) // 8

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.t_patch_size, self.patch_size, self.patch_size)

    def _validate(self) -> None:
        """Raise ValueError with what a valid value looks like."""
        if self.model_name != "videodit_ardf":
            raise ValueError(f"model_name must be 'videodit_ardf' (the only released MAGI-1 DiT); "
                             f"got {self.model_name!r}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "patch_size", "t_patch_size", "in_channels", "out_channels",
                     "caption_channels", "caption_max_length"):
            if not _is_pos_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("apply_layernorm_1p", "half_channel_vae", "gated_linear_unit"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params_dtype must be one of {sorted(PARAMS_DTYPES)}, got {self.params_dtype!r}")
        for name in ("layernorm_epsilon", "x_rescale_factor", "cond_hidden_ratio", "xattn_cond_hidden_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        heads, groups = self.num_attention_heads, self.num_query_groups
        if heads % groups:
            raise ValueError(f"num_attention_heads must be a multiple of num_query_groups (GQA: head i uses K/V "
                             f"group i // (heads/groups)), e.g. 24 heads with 8 groups; got {heads} and {groups}")
        if (heads * self.kv_channels) % PROJ_GROUPS:
            raise ValueError(f"num_attention_heads * kv_channels must be a multiple of {PROJ_GROUPS}: the attention "
                             f"output is interleaved in {PROJ_GROUPS} groups before linear_proj; "
                             f"got {heads} * {self.kv_channels}")
        if self.rope_bands < 1 or 6 * self.rope_bands > self.kv_channels:
            raise ValueError(f"RoPE needs (hidden_size // num_attention_heads) // 8 >= 1 bands per axis and rotates "
                             f"6 * bands dims of each kv_channels-wide head (released: 16 bands, 96 of 128); got "
                             f"hidden_size {self.hidden_size}, {heads} heads, kv_channels {self.kv_channels}")
        if self.cond_gating_ratio != 1.0:
            raise ValueError(f"cond_gating_ratio must be 1.0 (each gate multiplies the hidden state); "
                             f"got {self.cond_gating_ratio!r}")
        for name in ("cond_dim", "xattn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"hidden_size * the ratio behind {name} must be at least 1; got {getattr(self, name)}")
        if self.half_channel_vae and (self.in_channels % 2 or self.out_channels != self.in_channels):
            raise ValueError(f"half_channel_vae duplicates the latent: in_channels must be even and equal "
                             f"out_channels (24B: 32 and 32); got {self.in_channels} and {self.out_channels}")
        if not self.half_channel_vae and self.out_channels != self.in_channels:
            raise ValueError(f"out_channels must equal in_channels (a velocity of the latent); "
                             f"got {self.in_channels} and {self.out_channels}")


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def distill_dt_factor(num_steps: int, distill_interval: float = 1.0) -> float:
    """Shortcut step size the distill models are conditioned on (upstream `distill_dt`).

    num_steps / 4 * 2; the 12-step shortcut schedule uses 4 / distill_interval * 2 instead.
    """
    if num_steps == 12:
        return 4 / distill_interval * 2
    return num_steps / 4 * 2


# ----------------------------------------------------------------------------- 2. small layers

class LayerNorm1p(nn.Module):
    """Upstream FusedLayerNorm: LayerNorm with weight + 1 when `one_p` (weight stored zero-centred)."""

    def __init__(self, dim: int, eps: float, one_p: bool):
        super().__init__()
        self.eps, self.one_p = eps, one_p
        self.weight = nn.Parameter(torch.zeros(dim) if one_p else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight + 1 if self.one_p else self.weight  # in the weight's dtype, as upstream
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def linear_fp32(x: Tensor, layer: nn.Linear) -> Tensor:
    """A bias-free Linear computed in float32 (upstream's fp32 autocast regions)."""
    return F.linear(x.float(), layer.weight.float())


def softcap(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap), computed in float32, same dtype out."""
    return (cap * torch.tanh(x.float() / cap)).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA with GQA (query head i uses K/V head i // (H/G)): q [N, H, Lq, d], k/v [N, G, Lk, d] -> [N, H, Lq, d]."""
    if k.shape[2] == 0:
        return torch.zeros_like(q)      # no keys (e.g. an empty caption): flash-attn returns 0
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------- 3. conditioning embedders

def timestep_sinusoid(t: Tensor, dim: int = TIME_FREQ_DIM) -> Tensor:
    """[cos, sin] of t * 1000 * exp(-ln(1e4) i / (dim/2)), float32: [N] -> [N, dim] (upstream op order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None] * TIME_SCALE
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Noise level t in [0, 1] (0 = noise) -> condition vector [N, cond_dim] (keys `mlp.0`, `mlp.2`)."""

    def __init__(self, cond_dim: int, params_dtype: torch.dtype):
        super().__init__()
        self.params_dtype = params_dtype
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: Tensor) -> Tensor:
        # upstream rounds the sinusoid to params_dtype before its float32 MLP
        x = timestep_sinusoid(t.float()).to(self.params_dtype).float()
        x = F.silu(F.linear(x, self.mlp[0].weight.float(), self.mlp[0].bias.float()))
        return F.linear(x, self.mlp[2].weight.float(), self.mlp[2].bias.float())


class CaptionEmbedder(nn.Module):
    """Caption -> cross-attention K/V source; learned null caption -> AdaLN token (never the prompt)."""

    def __init__(self, caption_channels: int, xattn_dim: int, cond_dim: int, caption_max_length: int):
        super().__init__()
        self.y_proj_xattn = nn.Sequential(nn.Linear(caption_channels, xattn_dim), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(caption_channels, cond_dim))
        self.null_caption_embedding = nn.Parameter(torch.randn(caption_max_length, caption_channels) * 0.02)

    def forward(self, y: Tensor, caption_dropout_mask: Tensor) -> tuple[Tensor, Tensor]:
        """y [rows, L, C], mask [B] bool -> (y_xattn [rows, L, Dx], y_adaln [B, 1, Dc]) in float32."""
        lin = self.y_proj_xattn[0]
        y_xattn = F.silu(F.linear(y.float(), lin.weight.float(), lin.bias.float()))
        null = self.null_caption_embedding.float()
        token = torch.where(caption_dropout_mask[:, None, None], null[None, -1:], null[None, -2:-1])  # [B, 1, C]
        lin = self.y_proj_adaln[0]
        return y_xattn, F.linear(token, lin.weight.float(), lin.bias.float())


class FinalLinear(nn.Module):
    """Hidden -> patch values, no bias (key `linear`)."""

    def __init__(self, hidden: int, patch_values: int):
        super().__init__()
        self.linear = nn.Linear(hidden, patch_values, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear_fp32(x, self.linear)


# ----------------------------------------------------------------------------- 4. 3-D RoPE

class LearnedRope(nn.Module):
    """3-D RoPE with learned frequencies `bands` [n] shared by the t, h, w axes (upstream `rope`)."""

    def __init__(self, num_bands: int):
        super().__init__()
        exponent = torch.arange(0, num_bands, dtype=torch.int64).to(torch.float32) / num_bands
        self.bands = nn.Parameter(1.0 / ROPE_TEMPERATURE ** exponent)

    def table(self, t: int, h: int, w: int, t_offset: int = 0) -> tuple[Tensor, Tensor]:
        """(sin, cos) [t*h*w, 3n] float32 of the window's tokens; temporal positions start at t_offset.

        Upstream builds the table for t_offset + t frames and keeps the last t*h*w rows; positions are
        arange(T_total) (t), arange(h) - (h-1)/2, arange(w) - (w-1)/2, each rescaled by x/(f-1)*(r-1) to a
        reference grid (T_total, h/s, w/s), s = sqrt(h*w/256), in float32 with upstream's op order.
        """
        bands = self.bands.float()
        t_total = t_offset + t
        scale = math.sqrt(h * w / ROPE_BASE_TOKENS**2)
        axes = []
        for size, ref, centre in ((t_total, t_total, False), (h, h / scale, True), (w, w / scale, True)):
            pos = torch.arange(size, dtype=torch.int64, device=bands.device).to(torch.float32)
            if centre:
                pos = pos - (size - 1) / 2
            if size != 1:
                pos = pos / (size - 1) * (ref - 1)
            axes.append(pos)
        axes[0] = axes[0][t_offset:]
        angles = [p[:, None] * bands[None] for p in axes]          # [t, n], [h, n], [w, n]
        n = len(bands)
        grid = torch.cat([angles[0][:, None, None].expand(t, h, w, n),
                          angles[1][None, :, None].expand(t, h, w, n),
                          angles[2][None, None, :].expand(t, h, w, n)], dim=-1).reshape(t * h * w, 3 * n)
        return grid.sin(), grid.cos()


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate-half (non-interleaved) RoPE on the first 2*len(cos) dims of each head, rest unchanged.

    x [B, S, heads, d] float32, sin/cos [S, r] -> same shape; dim j pairs with dim j + r.
    """
    r = cos.shape[-1]
    x1, x2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    sin, cos = sin[None, :, None, :], cos[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


# ----------------------------------------------------------------------------- 5. attention

class QKVProjection(nn.Module):
    """Pre-attention LayerNorm + bias-free projections q, qx (cross-attn query), k, v (key `linear_qkv`)."""

    def __init__(self, hidden: int, q_size: int, kv_size: int, eps: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.q = nn.Linear(hidden, q_size, bias=False)
        self.qx = nn.Linear(hidden, q_size, bias=False)
        self.k = nn.Linear(hidden, kv_size, bias=False)
        self.v = nn.Linear(hidden, kv_size, bias=False)


class ParallelAttention(nn.Module):
    """Self-attention (RoPE, GQA, block-causal ranges, K/V cache) and cross-attention from the same input.

    Returns linear_proj of the two outputs interleaved in 8 groups of heads (upstream
    `FullyParallelAttention` + `attn_linear_proj`).
    """

    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.heads, self.groups, self.head_dim = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        q_size, kv_size = self.heads * self.head_dim, self.groups * self.head_dim
        eps, one_p = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        self.linear_qkv = QKVProjection(cfg.hidden_size, q_size, kv_size, eps)
        self.linear_kv_xattn = nn.Linear(cfg.xattn_dim, 2 * kv_size, bias=False)  # per head [K_h | V_h]
        self.linear_proj = nn.Linear(2 * q_size, cfg.hidden_size, bias=False)
        self.q_layernorm = LayerNorm1p(self.head_dim, eps, one_p)
        self.q_layernorm_xattn = LayerNorm1p(self.head_dim, eps, one_p)
        self.k_layernorm = LayerNorm1p(self.head_dim, eps, one_p)
        self.k_layernorm_xattn = LayerNorm1p(self.head_dim, eps, one_p)

    def forward(self, x: Tensor, inputs: BlockInputs, layer: int) -> Tensor:
        """x [B, S, D] (params dtype) -> [B, S, D] float32."""
        h = self.linear_qkv.layer_norm(x)                                     # [B, S, D]
        core = self.self_attention(h, inputs, layer)                          # [B, S, H*d]
        cross = self.cross_attention(h, inputs)                               # [B, S, H*d]
        # [self | cross] -> [self group g | cross group g] for g = 0..7, then the fp32 projection
        out = torch.stack([core, cross], dim=-2).unflatten(-1, (PROJ_GROUPS, -1))  # [B, S, 2, 8, H*d/8]
        return linear_fp32(out.transpose(-3, -2).flatten(-3), self.linear_proj)

    def rotated(self, proj: nn.Linear, norm: LayerNorm1p, h: Tensor, inputs: BlockInputs) -> Tensor:
        """Per-head LN1p then RoPE, in float32, back to the input dtype: [B, S, D] -> [B, S, heads, d]."""
        x = proj(h).unflatten(-1, (-1, self.head_dim))
        return apply_rope(norm(x.float()), inputs.rope_sin, inputs.rope_cos).to(h.dtype)

    def self_attention(self, h: Tensor, inputs: BlockInputs, layer: int) -> Tensor:
        """Each chunk's queries attend to keys [start, end) of [cached K/V; this call's K/V]."""
        q = self.rotated(self.linear_qkv.q, self.q_layernorm, h, inputs)     # [B, S, H, d]
        k = self.rotated(self.linear_qkv.k, self.k_layernorm, h, inputs)     # [B, S, G, d]
        v = self.linear_qkv.v(h).unflatten(-1, (-1, self.head_dim))          # [B, S, G, d]
        inputs.capture(layer, k, v)
        cached = inputs.cached(layer)
        if cached is not None:
            want = (k.shape[0], self.groups, self.head_dim)
            if cached[0].dim() != 4 or (cached[0].shape[0], *cached[0].shape[2:]) != want \
                    or cached[1].shape != cached[0].shape:
                raise ValueError(f"kv_cache[{layer}] must be (k, v), each [B={want[0]}, M, {want[1]}, {want[2]}]; "
                                 f"got {tuple(cached[0].shape)} and {tuple(cached[1].shape)}")
            k = torch.cat([cached[0].to(device=k.device, dtype=k.dtype), k], dim=1)  # [B, M+S, G, d]
            v = torch.cat([cached[1].to(device=v.device, dtype=v.dtype), v], dim=1)
        if inputs.kv_range_max > k.shape[1]:
            raise ValueError(f"kv_range reaches token {inputs.kv_range_max} but layer {layer} has "
                             f"{k.shape[1]} keys ({k.shape[1] - h.shape[1]} cached + {h.shape[1]} in this call)")
        n, out = inputs.tokens_per_chunk, torch.empty_like(q)
        ranges = inputs.kv_range.view(h.shape[0], inputs.num_chunks, 2).tolist()  # [B][R] = [start, end]
        for i in range(inputs.num_chunks):
            rows = slice(i * n, (i + 1) * n)
            shared = all(r[i] == ranges[0][i] for r in ranges)    # one call for the batch when ranges agree
            for b in ([None] if shared else range(h.shape[0])):
                items = slice(None) if b is None else slice(b, b + 1)
                start, end = ranges[0 if b is None else b][i]
                out[items, rows] = attend(q[items, rows].transpose(1, 2), k[items, start:end].transpose(1, 2),
                                          v[items, start:end].transpose(1, 2)).transpose(1, 2)
        return out.flatten(-2)

    def cross_attention(self, h: Tensor, inputs: BlockInputs) -> Tensor:
        """Each (item, chunk) row's queries attend to that row's valid caption tokens only."""
        batch, rows, n = h.shape[0], inputs.y_xattn.shape[0], inputs.tokens_per_chunk
        q = self.q_layernorm_xattn(self.linear_qkv.qx(h).unflatten(-1, (-1, self.head_dim)))  # [B, S, H, d]
        q = q.reshape(rows, n, self.heads, self.head_dim).transpose(1, 2)       # [B*R, H, n, d]
        kv = self.linear_kv_xattn(inputs.y_xattn).unflatten(-1, (self.groups, 2 * self.head_dim))  # [B*R, L, G, 2d]
        k = self.k_layernorm_xattn(kv[..., :self.head_dim]).transpose(1, 2)  # [B*R, G, L, d]
        v = kv[..., self.head_dim:].transpose(1, 2)                          # [B*R, G, L, d]
        valid = inputs.xattn_mask                                            # [B*R, L] bool
        out = attend(q, k, v, valid[:, None, None, :])                        # [B*R, H, n, d]
        out = torch.where(valid.any(-1)[:, None, None, None], out, torch.zeros_like(out))
        return out.transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim)


# ----------------------------------------------------------------------------- 6. layer

class MLP(nn.Module):
    """LayerNorm, fc1, exact GELU or SwiGLU (silu(first half) * second half), fc2; no biases."""

    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.glu = cfg.gated_linear_unit
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        fc1_out = 2 * cfg.ffn_hidden_size if self.glu else cfg.ffn_hidden_size
        self.linear_fc1 = nn.Linear(cfg.hidden_size, fc1_out, bias=False)
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear_fc1(self.layer_norm(x))
        if self.glu:
            a, b = x.chunk(2, dim=-1)
            x = F.silu(a) * b
        else:
            x = F.gelu(x)
        return self.linear_fc2(x)


class AdaModulate(nn.Module):
    """Condition -> (attention gate, MLP gate) logits (key `proj.0`)."""

    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cfg.cond_dim, 2 * cfg.hidden_size))

    def forward(self, c: Tensor) -> Tensor:
        return self.proj(F.silu(c))


class TransformerLayer(nn.Module):
    """Parallel self+cross attention, then MLP; each output gated per chunk, post-normed, added (sandwich norm)."""

    def __init__(self, cfg: MagiConfig):
        super().__init__()
        eps, one_p = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        self.ada_modulate_layer = AdaModulate(cfg)
        self.self_attention = ParallelAttention(cfg)
        self.self_attn_post_norm = LayerNorm1p(cfg.hidden_size, eps, one_p)
        self.mlp = MLP(cfg)
        self.mlp_post_norm = LayerNorm1p(cfg.hidden_size, eps, one_p)

    def forward(self, x: Tensor, inputs: BlockInputs, layer: int) -> Tensor:
        """x [B, S, D] -> [B, S, D] in the input dtype; `layer` keys this layer's K/V cache entries."""
        dtype = x.dtype
        gates = softcap(self.ada_modulate_layer(inputs.condition), GATE_SOFTCAP)  # [B, R, 2D]
        gate_attn, gate_mlp = (inputs.per_token(g.float()) for g in gates.chunk(2, dim=-1))  # [B, S, D]
        # 1. attention: x + LN1p(o * gate), in float32
        o = self.self_attention(x, inputs, layer)                          # [B, S, D] float32
        x = (self.self_attn_post_norm(o * gate_attn) + x.float()).to(dtype)
        # 2. MLP: x + LN1p(mlp(x) * gate), in float32
        m = self.mlp(x).float()
        return (self.mlp_post_norm(m * gate_mlp) + x.float()).to(dtype)


class TransformerBlock(nn.Module):
    """The layer stack and the final LayerNorm (key `videodit_blocks`)."""

    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_epsilon, cfg.apply_layernorm_1p)


# ----------------------------------------------------------------------------- 7. block inputs

@dataclass
class BlockInputs:
    """Everything a layer needs; tokens are frame-major (T H W) and chunk i holds tokens [i*n, (i+1)*n)."""

    tokens: Tensor                   # [B, S, D] patch embeddings (the stack input), params dtype
    condition: Tensor                # [B, R, cond_dim] per-chunk AdaLN condition (t emb + null-caption token)
    rope_sin: Tensor                 # [S, 3*bands] float32
    rope_cos: Tensor                 # [S, 3*bands] float32
    y_xattn: Tensor                  # [B*R, L, xattn_dim] projected caption per (item, chunk) row
    xattn_mask: Tensor               # [B*R, L] bool, True = valid caption token
    kv_range: Tensor                 # [B*R, 2] long: key token range of each chunk in [cached; this call]
    grid: tuple[int, int, int]       # (T, h, w) in tokens
    num_chunks: int                  # R (upstream denoising_range_num)
    # per layer: post-RoPE (k, v) [B, M, G, d] of cached clean tokens that precede this call's tokens
    kv_cache: Mapping[int, tuple[Tensor, Tensor]] | None = None
    # when not None, each layer stores its (k, v) [B, n, G, d] of `capture_chunks` here under its index
    kv_capture: dict[int, tuple[Tensor, Tensor]] | None = None
    capture_chunks: tuple[int, int] | None = None

    @property
    def tokens_per_chunk(self) -> int:
        t, h, w = self.grid
        return t // self.num_chunks * h * w

    @property
    def frames_per_chunk(self) -> int:
        return self.grid[0] // self.num_chunks

    @property
    def kv_range_max(self) -> int:
        return int(self.kv_range[:, 1].max()) if self.kv_range.numel() else 0

    def rope_table(self) -> Tensor:
        """[S, 6*bands] = [sin | cos] (upstream's concatenated layout)."""
        return torch.cat([self.rope_sin, self.rope_cos], dim=-1)

    def per_token(self, v: Tensor) -> Tensor:
        """Per-chunk values [B, R, ...] -> per-token [B, S, ...] (upstream condition_map)."""
        n = self.tokens_per_chunk
        return v.unsqueeze(2).expand(v.shape[0], v.shape[1], n, *v.shape[2:]).flatten(1, 2)

    def cached(self, layer: int) -> tuple[Tensor, Tensor] | None:
        return None if self.kv_cache is None else self.kv_cache.get(layer)

    def capture(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store layer `layer`'s post-RoPE (k, v) [B, n, G, d] of capture_chunks, when capturing."""
        if self.kv_capture is None:
            return
        a, b = self.capture_chunks if self.capture_chunks is not None else (0, self.num_chunks)
        n = self.tokens_per_chunk
        self.kv_capture[layer] = (k[:, a * n:b * n], v[:, a * n:b * n])


# ----------------------------------------------------------------------------- 8. the model

class MagiDiT(nn.Module):
    """MAGI-1 DiT: latent chunks [B, C, T, H, W] + per-chunk noise level + captions -> velocity."""

    def __init__(self, config: MagiConfig):
        super().__init__()
        cfg = self.config = config
        self.x_embedder = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch, stride=cfg.patch,
                                    bias=False)
        self.t_embedder = TimestepEmbedder(cfg.cond_dim, cfg.torch_dtype)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, cfg.xattn_dim, cfg.cond_dim, cfg.caption_max_length)
        self.rope = LearnedRope(cfg.rope_bands)
        self.videodit_blocks = TransformerBlock(cfg)
        self.final_linear = FinalLinear(cfg.hidden_size, math.prod(cfg.patch) * cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the layers (params_dtype unless the loader chose another)."""
        return self.layers[0].self_attention.linear_qkv.q.weight.dtype

    @property
    def layers(self) -> nn.ModuleList:
        return self.videodit_blocks.layers

    def forward(self, x: Tensor, t: Tensor, y: Tensor, caption_dropout_mask: Tensor, xattn_mask: Tensor,
                kv_range: Tensor, *, slice_point: int = 0, distill_dt: float | None = None,
                kv_cache: Mapping[int, tuple[Tensor, Tensor]] | None = None,
                kv_capture: dict[int, tuple[Tensor, Tensor]] | None = None,
                capture_chunks: tuple[int, int] | None = None) -> Tensor:
        """Velocity [B, C, T, H, W] float32; see the module docstring for every argument."""
        # 1. embed latents, noise levels, captions; RoPE table and attention ranges
        inputs = self.embed(x, t, y, caption_dropout_mask, xattn_mask, kv_range, slice_point=slice_point,
                            distill_dt=distill_dt, kv_cache=kv_cache, kv_capture=kv_capture,
                            capture_chunks=capture_chunks)            # BlockInputs
        # 2. the transformer layers
        h = self.run_blocks(inputs.tokens, inputs)                      # [B, S, D]
        # 3. final norm, linear, unpatchify
        return self.unembed(h, inputs)                                  # [B, C, T, H, W]

    def embed(self, x: Tensor, t: Tensor, y: Tensor, caption_dropout_mask: Tensor, xattn_mask: Tensor,
              kv_range: Tensor, *, slice_point: int = 0, distill_dt: float | None = None,
              kv_cache: Mapping[int, tuple[Tensor, Tensor]] | None = None,
              kv_capture: dict[int, tuple[Tensor, Tensor]] | None = None,
              capture_chunks: tuple[int, int] | None = None) -> BlockInputs:
        """Everything before the layers (upstream `forward_pre_process`), in float32 then cast."""
        cfg, dtype = self.config, self.dtype
        y = y.squeeze(1) if y.dim() == 4 else y
        xattn_mask = xattn_mask.squeeze(1) if xattn_mask.dim() == 3 else xattn_mask
        batch, chunks = self._check_inputs(x, t, y, caption_dropout_mask, xattn_mask, kv_range, slice_point,
                                           capture_chunks)
        # 1. latents: rescale, duplicate (24B), patchify: [B, C, T, H, W] -> [B, D, T, h, w] -> [B, S, D]
        x = x * cfg.x_rescale_factor
        if cfg.half_channel_vae:
            x = torch.cat([x, x], dim=1)
        patches = self.x_embedder(x.float().to(self.x_embedder.weight.dtype)).float()  # float32 once loaded
        grid = tuple(patches.shape[2:])
        tokens = patches.flatten(2).transpose(1, 2).to(dtype)
        # 2. RoPE: absolute temporal positions after slice_point clean chunks
        rope_sin, rope_cos = self.rope.table(*grid, t_offset=grid[0] // chunks * slice_point)  # [S, 3n] each
        # 3. noise level per chunk (+ the distill shortcut step), + AdaLN null-caption token: [B, R, Dc]
        t_emb = self.t_embedder(t.flatten())                                   # [B*R, Dc]
        if distill_dt is not None:
            t_emb = t_emb + self.t_embedder(torch.full_like(t.flatten(), float(distill_dt)))
        y_xattn, y_adaln = self.y_embedder(y, caption_dropout_mask.bool())     # [B*R, L, Dx], [B, 1, Dc]
        condition = t_emb.view(batch, chunks, -1) + y_adaln
        # 4. attention ranges: one row per (item, chunk)
        kv_range = kv_range.to(device=x.device, dtype=torch.long)
        if kv_range.shape[0] != batch * chunks:
            kv_range = kv_range.repeat(batch, 1)                              # [R, 2] shared by every item
        return BlockInputs(tokens=tokens, condition=condition.to(dtype), rope_sin=rope_sin, rope_cos=rope_cos,
                           y_xattn=y_xattn.to(dtype), xattn_mask=xattn_mask.bool(), kv_range=kv_range,
                           grid=grid, num_chunks=chunks, kv_cache=kv_cache, kv_capture=kv_capture,
                           capture_chunks=capture_chunks)

    def run_blocks(self, h: Tensor, inputs: BlockInputs, start: int = 0, end: int | None = None) -> Tensor:
        """Run layers[start:end] on h [B, S, D]; layer i reads/writes inputs' K/V entries under key i."""
        for i in range(len(self.layers))[start:end]:
            h = self.layers[i](h, inputs, i)
        return h

    def unembed(self, h: Tensor, inputs: BlockInputs) -> Tensor:
        """Final LayerNorm and linear in float32, unpatchify, undo the 24B duplication and rescale."""
        out = self.final_linear(self.videodit_blocks.final_layernorm(h.float()))  # [B, S, pt*p*p*C]
        out = self.unpatchify(out, inputs.grid)
        if self.config.half_channel_vae:
            out = out[:, :self.config.latent_channels]
        return out / self.config.x_rescale_factor

    def unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, S, pt*ph*pw*C] -> [B, C, T*pt, h*ph, w*pw]; patch value (i, j, k, c) = ((i*ph+j)*pw+k)*C+c."""
        t, h, w = grid
        pt, ph, pw = self.config.patch
        c = self.config.out_channels
        out = out.view(out.shape[0], t, h, w, pt, ph, pw, c)
        out = torch.einsum("bthwpqrc->bctphqwr", out)
        return out.reshape(out.shape[0], c, t * pt, h * ph, w * pw)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor, caption_dropout_mask: Tensor, xattn_mask: Tensor,
                      kv_range: Tensor, slice_point: int, capture_chunks: tuple[int, int] | None) -> tuple[int, int]:
        """(B, R); raise ValueError naming the bad argument and the shape it should have."""
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.latent_channels:
            raise ValueError(f"x must be [B, {cfg.latent_channels}, T, H, W]; got {tuple(x.shape)}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch)):
            raise ValueError(f"x's T, H, W must be multiples of the patch {list(cfg.patch)}; got {tuple(x.shape[2:])}")
        batch = x.shape[0]
        if t.dim() != 2 or t.shape[0] != batch:
            raise ValueError(f"t must be [B={batch}, chunks] (one noise level per chunk); got {tuple(t.shape)}")
        chunks = t.shape[1]
        frames = x.shape[2] // cfg.t_patch_size
        if chunks < 1 or frames % chunks:
            raise ValueError(f"x's {frames} (patched) frames must split evenly into the {chunks} chunks of t")
        rows = batch * chunks
        if y.dim() != 3 or y.shape[0] != rows or y.shape[2] != cfg.caption_channels:
            raise ValueError(f"y must be [B*chunks={rows}, L, caption_channels={cfg.caption_channels}] "
                             f"(or [B*chunks, 1, L, C]); got {tuple(y.shape)}")
        if xattn_mask.shape != y.shape[:2]:
            raise ValueError(f"xattn_mask must be [B*chunks, L] = {list(y.shape[:2])} (or [B*chunks, 1, L]); "
                             f"got {tuple(xattn_mask.shape)}")
        if caption_dropout_mask.shape != (batch,):
            raise ValueError(f"caption_dropout_mask must be bool [B={batch}] (True = AdaLN uses the dropped-caption "
                             f"token); got {tuple(caption_dropout_mask.shape)}")
        if kv_range.dim() != 2 or kv_range.shape[1] != 2 or kv_range.shape[0] not in (rows, chunks):
            raise ValueError(f"kv_range must be [B*chunks={rows}, 2] or [chunks={chunks}, 2] key token ranges "
                             f"[start, end); got {tuple(kv_range.shape)}")
        if kv_range.numel() and (bool((kv_range[:, 0] < 0).any()) or bool((kv_range[:, 1] < kv_range[:, 0]).any())):
            raise ValueError(f"kv_range rows must be [start, end) with 0 <= start <= end; got {kv_range.tolist()}")
        if isinstance(slice_point, bool) or not isinstance(slice_point, int) or slice_point < 0:
            raise ValueError(f"slice_point must be an int >= 0 (clean chunks before x); got {slice_point!r}")
        if capture_chunks is not None:
            a, b = capture_chunks
            if not 0 <= a <= b <= chunks:
                raise ValueError(f"capture_chunks must be (a, b) with 0 <= a <= b <= {chunks}; got {capture_chunks}")
        return batch, chunks


def high_precision(key: str) -> bool:
    """Whether upstream keeps this state-dict entry in float32 whatever params_dtype is."""
    return any(key.startswith(p) if not p.startswith(".") else p in key for p in HIGH_PRECISION)


# ----------------------------------------------------------------------------- 9. caption helpers

DURATION_TOKEN_FIRST = 7     # other_tokens[7 + k] = "k + 1 chunks left", k = 0..7
HQ_TOKEN_INDEX = 1
SPECIAL_TOKEN_MAX_LENGTH = 800


def load_special_tokens(path: str) -> dict[str, Tensor]:
    """The official special_tokens.npz (caption_token, logo_token, other_tokens [100, 4096]) as float16 tensors.

    Upstream rounds every special token to float16 before use; so does this.
    """
    with np.load(path, allow_pickle=False) as data:
        return {name: torch.from_numpy(data[name].astype(np.float16)) for name in data.files}


def pad_special_tokens(caption: Tensor, mask: Tensor, other_tokens: Tensor, *, hq: bool = True,
                       duration: bool = True, max_length: int = SPECIAL_TOKEN_MAX_LENGTH) -> tuple[Tensor, Tensor]:
    """Prepend upstream's special tokens (run.sh: PAD_HQ=1, PAD_DURATION=1) to per-chunk captions.

    caption [N, chunks, L, C], mask [N, chunks, L] -> [N, chunks, L', C], [N, chunks, L'], with rows
    [DURATION_k, HQ, caption...] cut to max_length; chunk i of n gets DURATION for min(n-1-i, 7) + 1
    chunks left (other_tokens[7 + min(n-1-i, 7)]), HQ is other_tokens[1]. Tokens are float16-rounded.
    """
    def prepend(token: Tensor, cap: Tensor, msk: Tensor) -> tuple[Tensor, Tensor]:
        n, c, _, d = cap.shape
        token = token.to(torch.float16).to(device=cap.device, dtype=cap.dtype).view(1, 1, 1, d).expand(n, c, 1, d)
        ones = torch.ones(n, c, 1, dtype=msk.dtype, device=msk.device)
        return torch.cat([token, cap], dim=2)[:, :, :max_length], torch.cat([ones, msk], dim=2)[:, :, :max_length]

    if hq:
        caption, mask = prepend(other_tokens[HQ_TOKEN_INDEX], caption, mask)
    if duration:
        chunks = caption.shape[1]
        parts = [prepend(other_tokens[DURATION_TOKEN_FIRST + min(chunks - 1 - i, 7)],
                         caption[:, i:i + 1], mask[:, i:i + 1]) for i in range(chunks)]
        caption, mask = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
    return caption, mask
