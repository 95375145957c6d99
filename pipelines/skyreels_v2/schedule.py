"""Diffusion-forcing timestep matrix: which timestep every latent frame has at every row.

Reimplements `DiffusionForcingPipeline.generate_timestep_matrix` of SkyReels-V2 (`abed76f`).
The schedule works on blocks of `causal_block_size` latent frames:

- a block's *step index* runs 0 (not started, t = 999), 1..N (the N solver steps), N+1 (done, t = 0);
- at each row the first block (or a block whose predecessor is at its last step or done) advances
  by one; every other block trails its predecessor by `ar_step` indices (0 = synchronous);
- `num_pre_ready // causal_block_size` leading blocks are a clean prefix (index N+1 from the start);
- rows continue until every block has reached index N.

Rows: N for synchronous; N + (generated blocks - 1) * ar_step for asynchronous. When
`num_frames > base_num_frames` the model sees a sliding window (`valid_interval`) of
`base_num_frames` frames that moves forward whenever the frame just after it starts.
Trailing frames that do not fill a block are dropped, as upstream does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["TimestepMatrix", "generate_timestep_matrix"]

NOT_STARTED_T = 999
DONE_T = 0


@dataclass(frozen=True)
class TimestepMatrix:
    """The per-row schedule of one diffusion-forcing segment (frame-level, F' = frames kept)."""

    step_matrix: torch.Tensor     # int64 [rows, F'] timestep of each latent frame at each row
    step_index: torch.Tensor      # int64 [rows, F'] index into [999] + template + [0]
    update_mask: torch.Tensor     # bool  [rows, F'] True where the frame's solver steps at this row
    valid_interval: torch.Tensor  # int64 [rows, 2]  (start, end) frame window fed to the model

    @property
    def rows(self) -> int:
        return self.step_matrix.shape[0]

    @property
    def num_frames(self) -> int:
        """Frames covered by the schedule (a multiple of the causal block size)."""
        return self.step_matrix.shape[1]

    def interval(self, row: int) -> tuple[int, int]:
        start, end = self.valid_interval[row].tolist()
        return start, end


def _check_arguments(num_frames: int, step_template: torch.Tensor, base_num_frames: int,
                     ar_step: int, num_pre_ready: int, causal_block_size: int) -> None:
    if step_template.dim() != 1 or step_template.numel() == 0:
        raise ValueError("step_template must be a non-empty 1-D tensor of model timesteps (the "
                         f"scheduler's timesteps, e.g. [999, 995, ...]); "
                         f"got shape {tuple(step_template.shape)}")
    if step_template.is_floating_point() or step_template.is_complex():
        raise ValueError(f"step_template must hold integer timesteps (int64); got {step_template.dtype}")
    if causal_block_size < 1:
        raise ValueError(f"causal_block_size must be an integer >= 1 (1 = per-frame schedule); "
                         f"got {causal_block_size}")
    if num_frames < causal_block_size:
        raise ValueError(f"num_frames ({num_frames}) must be at least causal_block_size "
                         f"({causal_block_size}): the schedule works on whole blocks")
    if base_num_frames < causal_block_size:
        raise ValueError(f"base_num_frames ({base_num_frames}) must be at least causal_block_size "
                         f"({causal_block_size}); use num_frames for a window over the whole segment")
    if ar_step < 0:
        raise ValueError(f"ar_step must be >= 0 (0 = synchronous, e.g. 5 for asynchronous); got {ar_step}")
    num_blocks = num_frames // causal_block_size
    if not 0 <= num_pre_ready // causal_block_size < num_blocks:
        raise ValueError(f"num_pre_ready must be >= 0 and leave at least one block to generate: "
                         f"{num_pre_ready} prefix frames with causal_block_size {causal_block_size} "
                         f"and {num_frames} frames leave nothing to generate")
    base_blocks = base_num_frames // causal_block_size
    if base_blocks < num_blocks:
        # a sliding window needs each block to finish before the window has to move past it
        min_ar_step = step_template.numel() / base_blocks
        if ar_step < min_ar_step:
            raise ValueError(f"ar_step must be at least {math.ceil(min_ar_step)} when num_frames "
                             f"({num_frames}) > base_num_frames ({base_num_frames}) with "
                             f"{step_template.numel()} steps; got {ar_step}")


def generate_timestep_matrix(num_frames: int, step_template: torch.Tensor, base_num_frames: int,
                             ar_step: int, num_pre_ready: int, causal_block_size: int,
                             shrink_interval_with_mask: bool = False) -> TimestepMatrix:
    """Build the diffusion-forcing schedule (upstream `generate_timestep_matrix`, same outputs).

    `shrink_interval_with_mask=True` starts the window at the last block updated by the first row
    (upstream's intent; its own code for that flag is broken and never used by its pipeline).
    """
    step_template = torch.as_tensor(step_template)
    _check_arguments(num_frames, step_template, base_num_frames, ar_step, num_pre_ready,
                     causal_block_size)
    num_steps = step_template.numel()
    done = num_steps + 1
    num_blocks = num_frames // causal_block_size
    base_blocks = base_num_frames // causal_block_size
    timestep_of = torch.cat([torch.tensor([NOT_STARTED_T]), step_template.cpu().long(),
                             torch.tensor([DONE_T])])

    # 1. walk the block indices row by row
    indices, masks = [], []
    previous = [0] * num_blocks
    for block in range(num_pre_ready // causal_block_size):
        previous[block] = done
    while min(previous) < num_steps:
        row = [0] * num_blocks
        for block in range(num_blocks):
            if block == 0 or previous[block - 1] >= num_steps:
                row[block] = previous[block] + 1
            else:
                row[block] = row[block - 1] - ar_step
        row = [min(max(index, 0), done) for index in row]
        masks.append([new != old and new != done for new, old in zip(row, previous)])
        indices.append(row)
        previous = row
    step_index = torch.tensor(indices, dtype=torch.int64)        # [rows, blocks]
    update_mask = torch.tensor(masks, dtype=torch.bool)          # [rows, blocks]

    # 2. the model window: grows by one block whenever the block just past its end starts
    end = base_blocks
    if shrink_interval_with_mask:
        end = int(update_mask[0].nonzero()[-1]) + 1
    intervals = []
    for mask in masks:
        if end < num_blocks and mask[end]:
            end += 1
        intervals.append((max(end - base_blocks, 0), end))
    valid_interval = torch.tensor(intervals, dtype=torch.int64) * causal_block_size

    # 3. blocks -> frames
    step_index = step_index.repeat_interleave(causal_block_size, dim=1)
    update_mask = update_mask.repeat_interleave(causal_block_size, dim=1)
    return TimestepMatrix(step_matrix=timestep_of[step_index], step_index=step_index,
                          update_mask=update_mask, valid_interval=valid_interval)
