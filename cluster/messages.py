"""What travels between the coordinator and the stages of a replica (plain dataclasses)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class ModelCall:
    """One model call (one CFG branch of one row) as every stage of a replica sees it.

    Put into the object store once and handed to every stage: each stage rebuilds the call's
    conditioning from it, so only the hidden states travel from stage to stage.
    """

    key: int                           # unique per replica: transport tag, stream key
    request: str                       # request id of the segment (state is keyed by it)
    x: Tensor                          # [1, C, F, H, W] latent window
    t: Tensor                          # [1, F] timesteps
    context: Tensor                    # [1, L, text_dim] text embedding
    fps: list[int] | None
    causal_block_size: int | None      # block-causal attention when set
    ctx: Any = None                    # scope CallContext; None: no acceleration
    parts: int = 1                     # chunk micro-batches the call streams as

    def part_frames(self, part: int) -> torch.Tensor:
        """Window frames of micro-batch `part` (one causal block each; the whole window if 1 part)."""
        frames = self.x.shape[2]
        if self.parts == 1:
            return torch.arange(frames)
        size = self.causal_block_size
        return torch.arange(part * size, min((part + 1) * size, frames))


@dataclass
class Handoff:
    """A stage's output for the next stage: the hidden states' transport payload and the plan."""

    payload: Any                       # tensor (object store) or header (torch.distributed)
    plan: Any = None                   # scope CallPlan decided on stage 0, or None


@dataclass(frozen=True)
class GroupSpec:
    """How the actors of one replica join one torch.distributed group.

    Rank of (stage s, sequence-parallel rank r) = s * sequence_parallel + r.
    """

    address: str
    port: int
    world_size: int
    backend: str                       # "gloo" or "nccl"
    sequence_parallel: int
    transport: str                     # "object_store" or "torch_dist"
    use_deepspeed: bool = False        # deepspeed.init_distributed (DeepSpeed-Ulysses attention)
    timeout_s: float = 120.0


@dataclass
class StageStats:
    """Plain counters a stage fills on its hot path (read by the bench)."""

    calls: int = 0
    busy_s: float = 0.0
    first_start: float | None = None
    last_end: float | None = None

    def add(self, started: float, ended: float) -> None:
        self.calls += 1
        self.busy_s += ended - started
        self.first_start = started if self.first_start is None else self.first_start
        self.last_end = ended
