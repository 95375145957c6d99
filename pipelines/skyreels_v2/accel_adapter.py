"""Where things are in the Wan DF transformer, for `scope.hooks.apply_accel` (STYLE example 4).

The model never knows it is accelerated: the hook wraps `WanDFTransformer.run_blocks` on the
instance and uses this table to cut the stack input into chunks, pick the indicator, run a
frame subset, and serve / capture per-chunk keys and values.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipelines.skyreels_v2.model import BlockInputs, WanDFTransformer
import pipelines.wan.calibration  # noqa: F401  (registers Wan2.1's published TeaCache polynomials)
from scope.hooks import call_original


class WanStackAdapter:
    """`scope.hooks.StackAdapter` for `WanDFTransformer` (ARCHITECTURE 2.1 / 2.2)."""

    stack_method = "run_blocks"

    def __init__(self, num_blocks: int | None = None) -> None:
        self._num_blocks = num_blocks

    def num_blocks(self, model: WanDFTransformer) -> int:
        self._num_blocks = len(model.blocks)
        return self._num_blocks

    def split_stack_args(self, h: Tensor, inputs: BlockInputs, start: int = 0,
                         end: int | None = None) -> tuple[Tensor, BlockInputs]:
        return h, inputs

    def block_range(self, h: Tensor, inputs: BlockInputs, start: int = 0,
                    end: int | None = None) -> tuple[int, int]:
        """The blocks a `run_blocks` call covers; `end=None` means through the last block."""
        return start, (self._num_blocks if end is None else end)

    def tokens_per_frame(self, inputs: BlockInputs) -> int:
        return inputs.tokens_per_frame

    def num_frames(self, inputs: BlockInputs) -> int:
        return inputs.num_frames

    def select_frames(self, inputs: BlockInputs, frames: Tensor) -> BlockInputs:
        return inputs.select_frames(frames)

    def select_rows(self, inputs: BlockInputs, rows: Tensor) -> BlockInputs:
        return inputs.select_rows(rows)

    def probe(self, inputs: BlockInputs, h: Tensor, kind: str = "e0") -> Tensor:
        """Indicator source per token: the modulated time projection e0 (TeaCache's ret-steps
        probe; a function of the chunk's timestep and fps) or the time embedding e: [B, N, *]."""
        if kind == "e":
            return inputs.e
        if kind == "e0":
            b, six, n, d = inputs.e0.shape
            return inputs.e0.permute(0, 2, 1, 3).reshape(b, n, six * d)   # [B, N, 6D]
        if kind == "h":
            return h
        raise ValueError(f"unknown probe kind {kind!r}; the Wan adapter offers 'e0', 'e', 'h'")

    def run_stack(self, model: WanDFTransformer, h: Tensor, inputs: BlockInputs, start: int,
                  end: int | None) -> Tensor:
        return call_original(model, self.stack_method, h, inputs, start, end)

    def run_stack_kv(self, model: WanDFTransformer, h: Tensor, inputs: BlockInputs, start: int,
                     end: int | None, served: list[dict[int, tuple[Tensor, Tensor]]],
                     capture: list[Tensor]) -> tuple[Tensor, list[dict[int, tuple[Tensor, Tensor]]]]:
        """Run blocks [start, end) with extra keys/values of `served` chunks (one dict per chunk:
        block -> (k, v) [B, H, M, d]) and capture the K/V of each frame set in `capture`
        (positions on this input's frame axis): one dict per set."""
        prefix = None
        if served:
            layers = served[0].keys()
            prefix = {layer: (torch.cat([entry[layer][0] for entry in served], dim=2),
                              torch.cat([entry[layer][1] for entry in served], dim=2)) for layer in layers}
        record: dict[int, tuple[Tensor, Tensor]] | None = {} if capture else None
        frames = None
        if capture:
            positions = torch.cat(list(capture)).to(inputs.frame_index.device)
            frames = inputs.frame_index[positions]
        run_inputs = _with_kv(inputs, prefix, record, frames)
        out = call_original(model, self.stack_method, h, run_inputs, start, end)
        return out, _split_record(record, inputs, capture)


def _with_kv(inputs: BlockInputs, prefix, record, frames) -> BlockInputs:
    from dataclasses import replace

    return replace(inputs, kv_prefix=prefix, kv_record=record, kv_record_frames=frames)


def _split_record(record: dict[int, tuple[Tensor, Tensor]] | None, inputs: BlockInputs,
                  capture: list[Tensor]) -> list[dict[int, tuple[Tensor, Tensor]]]:
    """The recorded K/V (tokens of all captured frames, in frame order) split per capture set."""
    if not capture or record is None:
        return []
    tpf = inputs.tokens_per_frame
    frame_numbers = [inputs.frame_index[c.to(inputs.frame_index.device)] for c in capture]
    recorded_frames = torch.cat(frame_numbers).unique(sorted=True)       # record keeps frame order
    entries = []
    for numbers in frame_numbers:
        rank = torch.searchsorted(recorded_frames, numbers)               # frame -> slot
        tok = (rank[:, None] * tpf + torch.arange(tpf, device=rank.device)).flatten()
        entries.append({layer: (k[:, :, tok.to(k.device)], v[:, :, tok.to(v.device)])
                        for layer, (k, v) in record.items()})
    return entries
