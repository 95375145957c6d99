"""SkyReels-V2 Diffusion-Forcing transformer: the Wan2.1 DiT, with the official state-dict names.

Reads top to bottom: config, small layers, 3-D RoPE, attention, block, head, `BlockInputs`, model.
`WanDFTransformer.forward` is `embed` -> `run_blocks` -> `unembed`. The facts it follows are in
../shared/reference/NOTES_skyreels_v2.md section 1.

Precision follows upstream: the time embedding, its projection (e, e0), the modulation, the norms
and the residual adds run in float32; linear layers and attention run in the parameter dtype; each
block returns the parameter dtype. With float32 parameters everything is float32.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROPE_THETA = 10000.0
NUM_FPS_IDS = 2  # fps-embedding ids: 0 = 16 fps, 1 = any other fps


# ----------------------------------------------------------------------------- 1. config

@dataclass(frozen=True, kw_only=True)
class WanDFConfig:
    """The `WanModel` config.json fields (official names); defaults are upstream's constructor defaults."""

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int
    ffn_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int
    num_layers: int
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    inject_sample_info: bool = False
    eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "window_size", tuple(self.window_size))
        self._validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanDFConfig:
        """Build from a config.json dict; `_`-prefixed keys (`_class_name`, ...) are ignored."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in d if k not in valid and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown WanDFConfig field(s) {unknown}; valid fields are {valid} "
                             "(keys starting with '_', such as _class_name, are ignored)")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"WanDFConfig is missing required field(s) {missing}; "
                             f"e.g. the 1.3B model has dim 1536, ffn_dim 8960, num_heads 12, num_layers 30")
        return cls(**{k: v for k, v in d.items() if k in valid})

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict (official names, JSON types)."""
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["window_size"] = list(self.window_size)
        return d

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex RoPE widths (t, h, w) of one head: halves of d - 4(d//6), 2(d//6), 2(d//6)."""
        d, d6 = self.head_dim, self.head_dim // 6
        return ((d - 4 * d6) // 2, d6, d6)

    def _validate(self) -> None:
        """Raise ValueError with what a valid value looks like."""
        if self.model_type != "t2v":
            raise ValueError(f"model_type must be 't2v', got {self.model_type!r} (DF image-to-video "
                             "feeds the image as prefix latents; i2v/flf2v CLIP conditioning is not implemented)")
        if len(self.patch_size) != 3 or not all(_is_pos_int(p) for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), e.g. [1, 2, 2]; "
                             f"got {list(self.patch_size)}")
        for name in ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
                     "num_heads", "num_layers"):
            if not _is_pos_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (cos and sin halves), e.g. 256; got {self.freq_dim}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim must be a multiple of num_heads, e.g. dim 1536 with 12 heads "
                             f"(head_dim 128); got dim {self.dim}, num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim = dim / num_heads must be even and at least 6 so the 3-D RoPE gives "
                             f"each of t/h/w at least one frequency (official: 128); got {self.head_dim}")
        if self.window_size != (-1, -1):
            raise ValueError(f"window_size must be [-1, -1] (global attention, as released); "
                             f"local windows are not implemented; got {list(self.window_size)}")
        for name in ("qk_norm", "cross_attn_norm", "inject_sample_info"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"eps must be a positive float, e.g. 1e-6; got {self.eps!r}")


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# ----------------------------------------------------------------------------- 2. small layers

def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[cos(t w_k), sin(t w_k)] with w_k = 10000^(-k/(dim/2)), computed in float64: [N] -> [N, dim]."""
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), omega)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift (adaLN)."""
    return x * (1 + scale) + shift


class FP32Sequential(nn.Sequential):
    """nn.Sequential computed in float32 whatever the parameter dtype (upstream's fp32 autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        for layer in self:
            if isinstance(layer, nn.Linear):
                bias = None if layer.bias is None else layer.bias.float()
                x = F.linear(x, layer.weight.float(), bias)
            else:
                x = layer(x)
        return x


class LayerNorm(nn.Module):
    """LayerNorm in float32 (returns float32); `affine` adds weight/bias (norm3), else no parameters."""

    def __init__(self, dim: int, eps: float, affine: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (the full model dim for q/k), computed in float32, same dtype out."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------- 3. 3-D RoPE

def rope_frequencies(head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse frequencies (t, h, w) in float64 on CPU; axis of real width n uses theta^(-2j/n)."""
    d6 = head_dim // 6
    widths = (head_dim - 4 * d6, 2 * d6, 2 * d6)
    return tuple(  # type: ignore[return-value]
        1.0 / ROPE_THETA ** (torch.arange(0, n, 2, dtype=torch.float64, device="cpu") / n) for n in widths)


def rope_table(freqs: tuple[Tensor, Tensor, Tensor], frame_index: Tensor, h: int, w: int,
               device: torch.device) -> Tensor:
    """Per-token rotations [F*h*w, head_dim/2] complex64 from each token's (frame, row, column)."""
    positions = (frame_index.detach().to("cpu", torch.float64),
                 torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64))
    t_rot, h_rot, w_rot = (torch.polar(torch.ones(len(p), len(f), dtype=torch.float64), torch.outer(p, f))
                           .to(device=device, dtype=torch.complex64) for p, f in zip(positions, freqs))
    f = len(frame_index)
    table = torch.cat([t_rot[:, None, None, :].expand(f, h, w, -1),
                       h_rot[None, :, None, :].expand(f, h, w, -1),
                       w_rot[None, None, :, :].expand(f, h, w, -1)], dim=-1)  # [F, h, w, d/2]
    return table.reshape(f * h * w, -1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) of x [B, N, H, d] by rope [N, d/2], in float32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, N, H, d/2]
    return torch.view_as_real(pairs * rope[:, None, :]).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- 4. attention

class Attention(nn.Module):
    """q/k/v/o projections with optional full-dim q/k RMSNorm (keys `q,k,v,o,norm_q,norm_k`)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def heads(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, H, d]."""
        return x.unflatten(-1, (self.num_heads, -1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """SDPA on [B, H, N, d] inputs, then the output projection: -> [B, N, D]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, d]
        return self.o(out.transpose(1, 2).flatten(2))


class SelfAttention(Attention):
    """Self-attention over video tokens with 3-D RoPE, optional block mask and extra prefix K/V."""

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None = None,
                prefix: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, N, D] -> (out [B, N, D], k, v [B, H, N, d]: this call's RoPE-rotated keys/values)."""
        q = apply_rope(self.heads(self.norm_q(self.q(x))), rope).transpose(1, 2)  # [B, H, N, d]
        k = apply_rope(self.heads(self.norm_k(self.k(x))), rope).transpose(1, 2)  # [B, H, N, d]
        v = self.heads(self.v(x)).transpose(1, 2)                                 # [B, H, N, d]
        keys, values = k, v
        if prefix is not None:  # every query also attends to the prefix tokens
            keys = torch.cat([prefix[0].to(k.dtype), k], dim=2)     # [B, H, M+N, d]
            values = torch.cat([prefix[1].to(v.dtype), v], dim=2)   # [B, H, M+N, d]
            if mask is not None:
                mask = F.pad(mask, (prefix[0].shape[2], 0), value=True)  # [N, M+N]
        return self.attend(q, keys, values, mask), k, v


class CrossAttention(Attention):
    """Cross-attention from video tokens to the text context: no RoPE, no padding mask."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, N, D], context [B, L, D] -> [B, N, D]."""
        q = self.heads(self.norm_q(self.q(x))).transpose(1, 2)        # [B, H, N, d]
        k = self.heads(self.norm_k(self.k(context))).transpose(1, 2)  # [B, H, L, d]
        v = self.heads(self.v(context)).transpose(1, 2)               # [B, H, L, d]
        return self.attend(q, k, v)


# ----------------------------------------------------------------------------- 5. block and head

class AttentionBlock(nn.Module):
    """One Wan block: modulated self-attention, cross-attention (no gate), modulated FFN."""

    def __init__(self, cfg: WanDFConfig):
        super().__init__()
        dim = cfg.dim
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.norm1 = LayerNorm(dim, cfg.eps)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))

    def forward(self, h: Tensor, inputs: BlockInputs, layer: int, mask: Tensor | None = None) -> Tensor:
        """h [B, N, D] -> [B, N, D]; `layer` keys this block's entries in inputs.kv_prefix / kv_record."""
        dtype = h.dtype
        mod = self.modulation.float().unsqueeze(2) + inputs.e0.float()  # [B, 6, N, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)     # each [B, N, D]
        x = h.float()
        # 1. self-attention, gated
        y = modulate(self.norm1(x), shift1, scale1).to(dtype)
        y, k, v = self.self_attn(y, inputs.rope, mask, inputs.prefix_for(layer))
        inputs.record(layer, k, v)
        x = x + y.float() * gate1
        # 2. cross-attention to the text, not gated
        x = x + self.cross_attn(self.norm3(x).to(dtype), inputs.context).float()
        # 3. feed-forward, gated
        y = self.ffn(modulate(self.norm2(x), shift2, scale2).to(dtype))
        x = x + y.float() * gate2
        return x.to(dtype)


class Head(nn.Module):
    """Output head: LayerNorm modulated by the time embedding e (no SiLU), Linear to patch values."""

    def __init__(self, cfg: WanDFConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        """h [B, N, D], e [B, N, D] -> [B, N, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float().unsqueeze(2) + e.float().unsqueeze(1)).unbind(1)
        y = modulate(self.norm(h), shift, scale)  # [B, N, D] float32
        return F.linear(y, self.head.weight.float(), self.head.bias.float())


# ----------------------------------------------------------------------------- 6. block inputs

@dataclass
class BlockInputs:
    """Everything a block needs, per token; tokens are frame-major (f*h*w + y*w + x)."""

    tokens: Tensor                       # [B, N, D] patch embeddings (the stack input)
    e: Tensor                            # [B, N, D] float32 time embedding per token (for the head)
    e0: Tensor                           # [B, 6, N, D] float32 time projection + fps term per token
    context: Tensor                      # [B, L, D] text embedding
    grid: tuple[int, int, int]           # (F, h, w) of these tokens
    frame_index: Tensor                  # [F] long: RoPE temporal position of each frame
    rope: Tensor                         # [N, head_dim/2] complex64 rotation of each token
    causal_block_size: int | None = None  # None: bidirectional; c: mask[q,k] = frame(k)//c <= frame(q)//c
    # per layer (absolute block index): extra RoPE-rotated keys/values [B, H, M, d] every query attends to
    kv_prefix: dict[int, tuple[Tensor, Tensor]] | None = None
    # when not None, each block stores its RoPE-rotated keys/values [B, H, M, d] here under its index ...
    kv_record: dict[int, tuple[Tensor, Tensor]] | None = None
    # ... for the tokens of these frame numbers (values of frame_index); None = every token
    kv_record_frames: Tensor | None = None

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def num_frames(self) -> int:
        return self.grid[0]

    def token_frames(self) -> Tensor:
        """Frame number (value of frame_index) of every token: [N] long."""
        return self.frame_index.repeat_interleave(self.tokens_per_frame)

    def block_mask(self) -> Tensor | None:
        """Self-attention mask [N, N] bool (True = may attend), or None when bidirectional."""
        if self.causal_block_size is None:
            return None
        block = self.token_frames() // self.causal_block_size  # [N]
        return block[None, :] <= block[:, None]                 # [q, k]

    def select_frames(self, frames: Tensor | list[int]) -> BlockInputs:
        """These inputs restricted to `frames` (positions on this input's frame axis), RoPE positions kept."""
        frames = torch.as_tensor(frames, dtype=torch.long, device=self.frame_index.device)
        out_of_range = frames.numel() > 0 and (int(frames.min()) < 0 or int(frames.max()) >= self.num_frames)
        if frames.dim() != 1 or out_of_range:
            raise ValueError(f"frames must be a 1-D list of positions in [0, {self.num_frames}); got {frames.tolist()}")
        hw = self.tokens_per_frame
        idx = (frames[:, None] * hw + torch.arange(hw, device=frames.device)).flatten()  # [n*hw]
        idx = idx.to(self.tokens.device)
        return replace(self, tokens=self.tokens[:, idx], e=self.e[:, idx], e0=self.e0[:, :, idx],
                       rope=self.rope[idx], frame_index=self.frame_index[frames],
                       grid=(len(frames), self.grid[1], self.grid[2]))

    def select_rows(self, rows: Tensor | list[int]) -> BlockInputs:
        """These inputs restricted to some batch rows (samples); per-token tables are shared."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        prefix = None if self.kv_prefix is None else {
            layer: (k[rows.to(k.device)], v[rows.to(v.device)]) for layer, (k, v) in self.kv_prefix.items()}
        return replace(self, tokens=self.tokens[rows], e=self.e[rows], e0=self.e0[rows],
                       context=self.context[rows.to(self.context.device)], kv_prefix=prefix)

    def prefix_for(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """Extra keys/values for block `layer`, if any."""
        return None if self.kv_prefix is None else self.kv_prefix.get(layer)

    def record(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store block `layer`'s keys/values [B, H, N, d] (of kv_record_frames) when recording."""
        if self.kv_record is None:
            return
        if self.kv_record_frames is not None:
            frames = torch.as_tensor(self.kv_record_frames, device=self.frame_index.device)
            keep = torch.isin(self.token_frames(), frames).nonzero().flatten().to(k.device)
            k, v = k[:, :, keep], v[:, :, keep]
        self.kv_record[layer] = (k, v)


# ----------------------------------------------------------------------------- 7. the model

class WanDFTransformer(nn.Module):
    """SkyReels-V2 DF transformer: latents [B, 16, F, H, W] + per-frame t + text -> velocity."""

    def __init__(self, config: WanDFConfig):
        super().__init__()
        cfg = self.config = config
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = FP32Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = FP32Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        if cfg.inject_sample_info:
            self.fps_embedding = nn.Embedding(NUM_FPS_IDS, dim)
            self.fps_projection = FP32Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)build the RoPE frequency tables: plain CPU tensors, not state, valid after meta loading."""
        self.rope_freqs = rope_frequencies(self.config.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def forward(self, x: Tensor, t: Tensor, context: Tensor, fps: list[int] | None = None,
                causal_block_size: int | None = None) -> Tensor:
        """Velocity [B, out_dim, F, H, W] float32 for latents x [B, in_dim, F, H, W] at timesteps t."""
        # 1. embed latents, timesteps, fps and text; per-token RoPE and mask settings
        inputs = self.embed(x, t, context, fps, causal_block_size)  # BlockInputs
        # 2. the transformer blocks
        h = self.run_blocks(inputs.tokens, inputs)                  # [B, N, D]
        # 3. head and unpatchify
        return self.unembed(h, inputs)                              # [B, out_dim, F, H, W]

    def embed(self, x: Tensor, t: Tensor, context: Tensor, fps: list[int] | None = None,
              causal_block_size: int | None = None, frame_index: Tensor | None = None) -> BlockInputs:
        """Everything before the blocks; t is [B, F] (one per latent frame) or [B] (one per sample)."""
        self._check_inputs(x, t, context, causal_block_size)
        batch = x.shape[0]
        # 1. patchify: [B, C, F, H, W] -> [B, D, F, h, w] -> [B, N, D]
        patches = self.patch_embedding(x.to(self.dtype))
        f, h, w = patches.shape[2:]
        tokens = patches.flatten(2).transpose(1, 2)
        if t.dim() == 2 and t.shape[1] != f:
            raise ValueError(f"t [B, F] must have one timestep per latent frame: F = {f}, got t {tuple(t.shape)}")
        # 2. time embedding and projection, per frame (t [B, F]) or per sample (t [B]), plus fps
        e, e0 = self.embed_time(t.to(x.device), batch, fps)  # [B, F or 1, D], [B, F or 1, 6, D]
        # 3. broadcast to tokens: [B, N, D] and [B, 6, N, D]
        e, e0 = per_token(e, f, h * w), per_token(e0, f, h * w).movedim(2, 1)
        # 4. text: [B, L, text_dim] -> [B, L, D]
        context = self.text_embedding(context.to(self.dtype))
        # 5. RoPE: each token rotated by (frame_index[f], row, column)
        if frame_index is None:
            frame_index = torch.arange(f, device=x.device)
        frame_index = torch.as_tensor(frame_index, dtype=torch.long, device=x.device)
        if frame_index.shape != (f,):
            raise ValueError(f"frame_index must hold one position per latent frame ({f}); "
                             f"got shape {tuple(frame_index.shape)}")
        rope = rope_table(self.rope_freqs, frame_index, h, w, x.device)  # [N, d/2]
        return BlockInputs(tokens=tokens, e=e, e0=e0, context=context, grid=(f, h, w),
                           frame_index=frame_index, rope=rope, causal_block_size=causal_block_size)

    def embed_time(self, t: Tensor, batch: int, fps: list[int] | None) -> tuple[Tensor, Tensor]:
        """e [B, T, D] and e0 [B, T, 6, D] in float32, T = frames of t (1 for a 1-D t)."""
        dim = self.config.dim
        sincos = sinusoidal_embedding(t.flatten(), self.config.freq_dim)  # [B*T, freq_dim] float64
        e = self.time_embedding(sincos.float())                           # [B*T, D]
        e0 = self.time_projection(e).unflatten(1, (6, dim))               # [B*T, 6, D]
        e, e0 = e.view(batch, -1, dim), e0.view(batch, -1, 6, dim)
        if self.config.inject_sample_info:
            e0 = e0 + self.embed_fps(fps, batch, t.device)[:, None]        # same fps term on every frame
        return e, e0

    def embed_fps(self, fps: list[int] | None, batch: int, device: torch.device) -> Tensor:
        """fps term of e0 [B, 6, D] from fps-embedding ids (0 = 16 fps, 1 = any other fps)."""
        if fps is None:
            raise ValueError("fps is required when inject_sample_info is true: a list of fps-embedding ids "
                             "per sample, 0 for 16 fps and 1 otherwise (e.g. [1] for the default 24 fps)")
        ids = torch.as_tensor(fps, dtype=torch.long, device=device).flatten()
        if ids.numel() == 1:
            ids = ids.expand(batch)
        if ids.numel() != batch or bool(((ids < 0) | (ids >= NUM_FPS_IDS)).any()):
            raise ValueError(f"fps must hold one id in [0, {NUM_FPS_IDS}) per sample (or one for all) "
                             f"for batch {batch}, e.g. {[1] * batch}; got {list(fps)}")
        return self.fps_projection(self.fps_embedding(ids).float()).unflatten(1, (6, self.config.dim))

    def run_blocks(self, h: Tensor, inputs: BlockInputs, start: int = 0, end: int | None = None) -> Tensor:
        """Run blocks[start:end] on h [B, N, D]; block i reads/writes inputs' K/V entries under key i."""
        mask = inputs.block_mask()  # [N, N] or None
        for i in range(len(self.blocks))[start:end]:
            h = self.blocks[i](h, inputs, i, mask)
        return h

    def unembed(self, h: Tensor, inputs: BlockInputs) -> Tensor:
        """Head and unpatchify: h [B, N, D] -> [B, out_dim, F, H, W] float32."""
        return self.unpatchify(self.head(h, inputs.e), inputs.grid)

    def unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, N, pt*ph*pw*C] -> [B, C, F*pt, h*ph, w*pw]; patch value (i, j, k, c) = channel ((i*ph+j)*pw+k)*C+c."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, c)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        return out.reshape(out.shape[0], c, f * pt, h * ph, w * pw).float()

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor, causal_block_size: int | None) -> None:
        """Raise ValueError naming the bad argument and the shape it should have."""
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x must be [B, {cfg.in_dim}, F, H, W]; got {tuple(x.shape)}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"x's F, H, W must be multiples of patch_size {list(cfg.patch_size)}; "
                             f"got {tuple(x.shape[2:])}")
        if t.dim() not in (1, 2) or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be [B, F] (per frame) or [B] (per sample) with B = {x.shape[0]}; "
                             f"got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B={x.shape[0]}, L, text_dim={cfg.text_dim}]; "
                             f"got {tuple(context.shape)}")
        if causal_block_size is not None and not _is_pos_int(causal_block_size):
            raise ValueError(f"causal_block_size must be None (bidirectional) or a positive int; "
                             f"got {causal_block_size!r}")


def per_token(v: Tensor, num_frames: int, tokens_per_frame: int) -> Tensor:
    """[B, F or 1, ...] per frame -> [B, F*hw, ...] per token (frame-major); a single frame is a view."""
    if v.shape[1] == 1:
        return v.expand(v.shape[0], num_frames * tokens_per_frame, *v.shape[2:])
    return v.repeat_interleave(tokens_per_frame, dim=1)
