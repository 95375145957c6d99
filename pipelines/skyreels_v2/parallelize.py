"""Pipeline and sequence parallelism for the SkyReels-V2 DF transformer, applied from outside.

`parallelize_skyreels(model, stage_index, num_stages, ...)` turns a whole `WanDFTransformer` into
one stage of a replica. Parallelisms are applied in this order:

1. Pipeline split. Blocks are cut into `num_stages` contiguous ranges (`split_blocks`); the stage
   keeps its own range and the blocks of the other stages become empty placeholders, so block
   indices (the keys of K/V entries) stay absolute. The head is kept on the last stage only.
   Every stage keeps the small embedding layers (patch, time, text, RoPE): the conditioning of a
   call (`BlockInputs`: e, e0, text, RoPE) is rebuilt locally from the call's inputs, so only
   the hidden states [B, N, D] travel between stages, never e0 [B, 6, N, D].
2. Sequence parallel (DeepSpeed-Ulysses) inside the stage, when a group of ranks is given. Each
   kept block's self-attention is swapped for one that trades a sequence shard of every head for
   every token of a head shard (all-to-all) around the attention itself. Tokens are sharded only
   inside `WanStage.run_blocks`, which takes and returns the full sequence, so everything around
   the blocks (SCOPE executors, transport) sees whole windows. Cross-attention, norms and the
   FFN are per token and need no traffic.

The model file does not change; `WanStage` only calls `embed`, `run_blocks` and `unembed`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor, nn

from pipelines.skyreels_v2.checkpoint import CheckpointError, check_state_dict, shard_names
from pipelines.skyreels_v2.model import BlockInputs, SelfAttention, WanDFConfig, WanDFTransformer
from pipelines.skyreels_v2.sizes import SIZES

__all__ = ["StageSpec", "UlyssesSelfAttention", "WanStage", "build_stage", "load_stage_model",
           "parallelize_skyreels", "split_blocks"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- 1. pipeline split

def split_blocks(num_layers: int, num_stages: int,
                 counts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Block range [start, end) of each stage: `counts` blocks each, or as even as possible
    (earlier stages take the remainder: the last one also runs the head)."""
    if not isinstance(num_stages, int) or not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be an integer in [1, num_layers={num_layers}]; got {num_stages!r}")
    if counts is None:
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 if s < extra else 0) for s in range(num_stages)]
    counts = list(counts)
    if len(counts) != num_stages or any(not isinstance(c, int) or c < 1 for c in counts) \
            or sum(counts) != num_layers:
        raise ValueError(f"a block split must give each of the {num_stages} stages at least one block "
                         f"and sum to num_layers={num_layers}, e.g. {split_blocks(num_layers, num_stages)}; "
                         f"got counts {counts}")
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


class DroppedModule(nn.Module):
    """Placeholder for a part that lives on another stage: no parameters, fails loudly if run."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError(f"{self.what} lives on another pipeline stage")


def prune_to_stage(model: WanDFTransformer, start: int, end: int, keep_head: bool) -> WanDFTransformer:
    """Keep blocks [start, end) (and the head when `keep_head`); the rest become placeholders."""
    for i in range(len(model.blocks)):
        if not start <= i < end:
            model.blocks[i] = DroppedModule(f"block {i}")
    if not keep_head:
        model.head = DroppedModule("the head")
    return model


# ----------------------------------------------------------------------------- 2. sequence parallel

class UlyssesSelfAttention(SelfAttention):
    """Self-attention over a sequence shard: all-to-all to (all tokens, head shard), attention, back.

    Shares the q/k/v/o/norm modules of the attention it replaces, so state-dict keys do not
    change. Uses DeepSpeed's `DistributedAttention` when DeepSpeed's communication is
    initialised (GPU replicas), else the same exchange with `torch.distributed.all_to_all_single`
    (CPU / gloo). The full-sequence mask comes from `WanStage` for the duration of a call.
    """

    def __init__(self, attention: SelfAttention, group: Any):
        nn.Module.__init__(self)
        self.num_heads = attention.num_heads
        for name in ("q", "k", "v", "o", "norm_q", "norm_k"):
            setattr(self, name, getattr(attention, name))
        self.group = group
        self.world = torch.distributed.get_world_size(group)
        if self.num_heads % self.world:
            raise ValueError(f"Ulysses needs num_heads ({self.num_heads}) divisible by the sequence "
                             f"parallel degree ({self.world})")
        self.full_mask: Tensor | None = None  # [N, N] over the padded full sequence, set per call
        self._ds_attention = _deepspeed_attention(group, self._local_attention)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None = None,
                prefix: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if prefix is not None:
            raise NotImplementedError("sequence parallel stages do not take K/V prefixes "
                                      "(kv_cache_finished / chunk streaming): use sequence_parallel=1")
        return super().forward(x, rope, self.full_mask, None)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q, k, v [B, H, n, d] for this rank's n tokens -> output projection [B, n, D]."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                      # [B, n, H, d]
        if self._ds_attention is not None:
            out = self._ds_attention(q, k, v, 0, None, mask)                   # [B, n, H, d]
        else:
            q, k, v = (_all_to_all(t, 2, 1, self.group, self.world) for t in (q, k, v))  # [B, N, H/S, d]
            out = self._local_attention(q, k, v, mask)                         # [B, N, H/S, d]
            out = _all_to_all(out, 1, 2, self.group, self.world)               # [B, n, H, d]
        return self.o(out.flatten(2))

    @staticmethod
    def _local_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention over every token for a shard of heads: [B, N, h, d] -> [B, N, h, d]."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return out.transpose(1, 2)


def _all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: Any, world: int) -> Tensor:
    """Split `scatter_dim` into `world` parts, send part r to rank r, concatenate what arrives on
    `gather_dim` (rank order)."""
    parts = [p.contiguous() for p in x.chunk(world, dim=scatter_dim)]
    send = torch.stack(parts)                      # [world, ...part]
    recv = torch.empty_like(send)
    torch.distributed.all_to_all_single(recv, send, group=group)
    return torch.cat(list(recv.unbind(0)), dim=gather_dim)


def _deepspeed_attention(group: Any, local: Callable[..., Tensor]) -> Any:
    """DeepSpeed's DistributedAttention over `group` when deepspeed.comm is initialised, else None."""
    try:
        import deepspeed.comm as ds_comm
        if not ds_comm.is_initialized():
            return None
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError:
        return None
    return DistributedAttention(local, group, scatter_idx=2, gather_idx=1)


def apply_sequence_parallel(model: WanDFTransformer, start: int, end: int, group: Any) -> None:
    """Swap the self-attention of blocks [start, end) for Ulysses attention over `group`."""
    for i in range(start, end):
        block = model.blocks[i]
        block.self_attn = UlyssesSelfAttention(block.self_attn, group)


# ----------------------------------------------------------------------------- 3. the stage

class WanStage(nn.Module):
    """One stage of a replica: embed (every stage), blocks [start, end), head (last stage)."""

    def __init__(self, model: WanDFTransformer, stage_index: int, num_stages: int,
                 block_range: tuple[int, int], sp_group: Any = None):
        super().__init__()
        self.model = model
        self.stage_index, self.num_stages = stage_index, num_stages
        self.start, self.end = block_range
        self.sp_group = sp_group
        self.sp_world = 1 if sp_group is None else torch.distributed.get_world_size(sp_group)
        self.sp_rank = 0 if sp_group is None else torch.distributed.get_rank(sp_group)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def num_blocks(self) -> int:
        """Blocks of the whole model (indices are absolute)."""
        return len(self.model.blocks)

    def embed(self, x: Tensor, t: Tensor, context: Tensor, fps: list[int] | None = None,
              causal_block_size: int | None = None) -> BlockInputs:
        """The call's conditioning over the whole window (and, on stage 0, its input tokens)."""
        return self.model.embed(x, t, context, fps, causal_block_size)

    def run_blocks(self, h: Tensor, inputs: BlockInputs, start: int | None = None,
                   end: int | None = None) -> Tensor:
        """This stage's blocks on the full sequence h [B, N, D] -> [B, N, D]."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"stage {self.stage_index} holds blocks [{self.start}, {self.end}); "
                             f"asked for [{start}, {end})")
        if self.sp_world == 1:
            return self.model.run_blocks(h, inputs, start, end)
        return self._run_sequence_parallel(h, inputs, start, end)

    def unembed(self, h: Tensor, inputs: BlockInputs) -> Tensor:
        if not self.is_last:
            raise RuntimeError(f"stage {self.stage_index} has no head: only the last stage unembeds")
        return self.model.unembed(h, inputs)

    def _run_sequence_parallel(self, h: Tensor, inputs: BlockInputs, start: int, end: int) -> Tensor:
        """Shard tokens over the group (padded to a multiple of its size), run, gather."""
        if inputs.kv_prefix is not None or inputs.kv_record is not None:
            raise NotImplementedError("sequence parallel stages do not serve or record K/V "
                                      "(kv_cache_finished / chunk streaming): use sequence_parallel=1")
        world, rank = self.sp_world, self.sp_rank
        n = h.shape[1]
        shard = math.ceil(n / world)
        pad = shard * world - n
        # 1. the full-sequence mask: block-causal (or none), padded keys never attended to
        mask = inputs.block_mask()
        if pad:
            mask = torch.ones(n, n, dtype=torch.bool, device=h.device) if mask is None else mask
            mask = F.pad(mask, (0, pad, 0, pad), value=False)
            mask[n:, :n] = True  # padded queries attend to real keys (their rows are discarded)
        for i in range(start, end):
            self.model.blocks[i].self_attn.full_mask = mask
        # 2. this rank's token shard of every per-token field
        local = _token_shard(h, inputs, rank * shard, shard, pad)
        try:
            out = self.model.run_blocks(local[0], local[1], start, end)  # [B, shard, D]
        finally:
            for i in range(start, end):
                self.model.blocks[i].self_attn.full_mask = None
        # 3. every rank gets the whole sequence back
        parts = [torch.empty_like(out) for _ in range(world)]
        torch.distributed.all_gather(parts, out.contiguous(), group=self.sp_group)
        return torch.cat(parts, dim=1)[:, :n]


def _token_shard(h: Tensor, inputs: BlockInputs, begin: int, size: int,
                 pad: int) -> tuple[Tensor, BlockInputs]:
    """Tokens [begin, begin + size) of the zero-padded sequence, with their per-token inputs."""
    def take(t: Tensor, dim: int) -> Tensor:
        if pad:
            shape = list(t.shape)
            shape[dim] = pad
            t = torch.cat([t, t.new_zeros(shape)], dim=dim)
        return t.narrow(dim, begin, size)

    local = replace(inputs, tokens=take(inputs.tokens, 1), e=take(inputs.e, 1), e0=take(inputs.e0, 2),
                    rope=take(inputs.rope, 0), causal_block_size=None)  # the mask is set on the attention
    return take(h, 1), local


# ----------------------------------------------------------------------------- 4. the entry point

def parallelize_skyreels(model: WanDFTransformer, stage_index: int, num_stages: int, *,
                         counts: Sequence[int] | None = None, sp_group: Any = None) -> WanStage:
    """One stage of a replica from a whole model (modified in place), in the documented order:
    1. pipeline split, 2. sequence parallel inside the stage."""
    if not isinstance(stage_index, int) or not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index must be in [0, {num_stages}); got {stage_index!r}")
    ranges = split_blocks(model.config.num_layers, num_stages, counts)
    start, end = ranges[stage_index]
    # 1. pipeline split
    prune_to_stage(model, start, end, keep_head=stage_index == num_stages - 1)
    # 2. sequence parallel
    if sp_group is not None and torch.distributed.get_world_size(sp_group) > 1:
        apply_sequence_parallel(model, start, end, sp_group)
    return WanStage(model, stage_index, num_stages, (start, end), sp_group)


# ----------------------------------------------------------------------------- 5. building a stage

@dataclass(frozen=True)
class StageSpec:
    """Where a stage's weights come from: a named size (random weights from `seed`: tests and
    demos) or a checkpoint folder (local path or fsspec URL)."""

    source: str = "tiny"
    seed: int = 0
    dtype: str = "float32"
    overrides: tuple[tuple[str, Any], ...] = ()   # config overrides for a named size

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.overrides and self.source not in SIZES:
            raise ValueError(f"config overrides apply to named sizes {sorted(SIZES)} only, not to "
                             f"the checkpoint {self.source!r} (its config.json is the config)")

    def config(self) -> WanDFConfig | None:
        """The config of a named size with overrides, or None for a checkpoint."""
        if self.source not in SIZES:
            return None
        return WanDFConfig.from_dict({**SIZES[self.source].to_dict(), **dict(self.overrides)})


def checkpoint_config(path_or_url: str) -> WanDFConfig:
    """The config.json of a checkpoint folder (a bad one: one-line CheckpointError)."""
    from pipelines.skyreels_v2.checkpoint import read_config

    fs, root = url_to_fs(path_or_url)
    return read_config(fs, root.rstrip("/"), f"{path_or_url.rstrip('/')}/config.json")


def load_stage_model(spec: StageSpec, block_range: tuple[int, int] | None = None, keep_head: bool = True,
                     device: str | torch.device = "cpu") -> WanDFTransformer:
    """The model with only blocks `block_range` (all when None) and, if `keep_head`, the head.

    A named size is built whole from `seed` (so every stage holds the same weights as an
    in-process model built from the same spec) and then pruned. A checkpoint is built on the
    meta device, pruned, and only the kept tensors are read (strictly checked).
    """
    dtype = DTYPES[spec.dtype]
    config = spec.config()
    if config is not None:
        torch.manual_seed(spec.seed)
        model = WanDFTransformer(config)
        if block_range is not None:
            prune_to_stage(model, *block_range, keep_head=keep_head)
        return model.to(device=device, dtype=dtype).eval()
    fs, root = url_to_fs(spec.source)
    config = checkpoint_config(spec.source)
    with torch.device("meta"):
        model = WanDFTransformer(config)
    if block_range is not None:
        prune_to_stage(model, *block_range, keep_head=keep_head)
    wanted = set(model.state_dict())
    state: dict[str, Tensor] = {}
    for name in shard_names(fs, root):
        path = f"{root.rstrip('/')}/{name}"
        if isinstance(fs, LocalFileSystem):
            with safe_open(path, framework="pt", device=str(device)) as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
        else:
            tensors = load_safetensors_bytes(fs.cat_file(path))
            state.update({k: v.to(device) for k, v in tensors.items() if k in wanted})
    try:
        check_state_dict(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"{spec.source}: {err}") from None
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                          strict=True, assign=True)
    model.init_rope()
    return model.eval()


def build_stage(spec: StageSpec, stage_index: int, num_stages: int, *, counts: Sequence[int] | None = None,
                sp_group: Any = None, device: str | torch.device = "cpu") -> WanStage:
    """Load only what stage `stage_index` keeps, then parallelize it."""
    config = spec.config() or checkpoint_config(spec.source)
    start, end = split_blocks(config.num_layers, num_stages, counts)[stage_index]
    model = load_stage_model(spec, (start, end), keep_head=stage_index == num_stages - 1, device=device)
    return parallelize_skyreels(model, stage_index, num_stages, counts=counts, sp_group=sp_group)
