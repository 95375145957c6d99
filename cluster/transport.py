"""Moving hidden states [B, N, D] from one pipeline stage to the next.

Two transports behind one interface: the sending stage calls `send(h, key)` and puts what it
returns (the payload) into its Ray return value; the coordinator passes that ObjectRef straight
to the next stage's call (actor to actor, never through the coordinator), whose `recv(payload)`
gives the tensor back.

- `ObjectStoreTransport` (CPU, tests, any cluster): the payload *is* the tensor, stored once in
  Ray's object store. On one node the next stage maps it without a copy
  (`RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`; such tensors are read-only and stages never write
  into their inputs).
- `TorchDistTransport` (GPUs: NCCL; also gloo on CPU, which is how it is tested): the tensor goes
  point-to-point over the replica's torch.distributed group (`isend` / `recv`, matched by a
  per-call tag); the Ray payload is only a small header (shape, dtype, tag).

Why torch.distributed rather than Ray Compiled Graphs channels for GPUs: the coordinator
interleaves requests, CFG branches and chunk micro-batches of varying shapes dynamically, and
rebuilds one stage after a fault; a compiled graph is a static DAG over a fixed actor set that
would have to be recompiled for each of those. The stages also need a torch.distributed group
anyway for Ulysses sequence parallel, and Ray's per-submitter ordering of actor tasks already
guarantees that both ends of a pair process calls in the same order, which is all that P2P
matching needs. Control (the call, the plan) always travels through Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

TRANSPORTS = ("object_store", "torch_dist")
MAX_TAG = 2**31 - 1


class Transport(Protocol):
    def send(self, h: Tensor, key: int) -> Any: ...
    def recv(self, payload: Any) -> Tensor: ...
    def close(self, wait: bool = True) -> None: ...


class ObjectStoreTransport:
    """The payload is the tensor itself (Ray's object store moves it)."""

    def send(self, h: Tensor, key: int) -> Tensor:
        return h.detach().contiguous().cpu()

    def recv(self, payload: Tensor) -> Tensor:
        if not isinstance(payload, Tensor):
            raise TypeError(f"object-store transport expected a tensor payload, got {type(payload).__name__}")
        return payload

    def close(self, wait: bool = True) -> None:
        pass


@dataclass(frozen=True)
class TensorHeader:
    """What travels through Ray when the tensor itself goes over torch.distributed."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    tag: int


class TorchDistTransport:
    """Point-to-point over torch.distributed: this rank sends to `next_rank`, receives from `prev_rank`.

    Sends are asynchronous (`isend`) so a stage starts its next micro-batch at once; the send
    buffers are kept until their work completes (checked at every later send, drained on close).
    """

    def __init__(self, prev_rank: int | None, next_rank: int | None, device: torch.device | str,
                 group: Any = None):
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.device = torch.device(device)
        self.group = group
        self._pending: list[tuple[Any, Tensor]] = []

    def send(self, h: Tensor, key: int) -> TensorHeader:
        if self.next_rank is None:
            raise RuntimeError("the last stage has no next rank to send to")
        self._reap()
        buf = h.detach().contiguous().to(self.device)
        tag = key % MAX_TAG
        work = torch.distributed.isend(buf, dst=self.next_rank, group=self.group, tag=tag)
        self._pending.append((work, buf))
        return TensorHeader(tuple(buf.shape), buf.dtype, tag)

    def recv(self, payload: TensorHeader) -> Tensor:
        if not isinstance(payload, TensorHeader):
            raise TypeError(f"torch.distributed transport expected a TensorHeader, got {type(payload).__name__}")
        if self.prev_rank is None:
            raise RuntimeError("the first stage has no previous rank to receive from")
        buf = torch.empty(payload.shape, dtype=payload.dtype, device=self.device)
        torch.distributed.recv(buf, src=self.prev_rank, group=self.group, tag=payload.tag)
        return buf

    def close(self, wait: bool = True) -> None:
        """Drain pending sends (`wait=False` after a fault: a dead peer never receives them)."""
        if wait:
            for work, _ in self._pending:
                work.wait()
        self._pending.clear()

    def _reap(self) -> None:
        self._pending = [(w, b) for w, b in self._pending if not w.is_completed()]
