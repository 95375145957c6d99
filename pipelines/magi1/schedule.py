"""MAGI-1 noise schedule and chunk-wise call plan (the "timestep matrix" of the AR walk).

Reimplements the schedule side of `SampleTransport` in SandAI-org/MAGI-1 (`6ff822e`,
`inference/pipeline/video_generate.py`): `init_t`, `init_intervel`, `generate_sequences`,
`get_timestep`, the k/v ranges of `generate_kvrange_for_denoising_video` /
`generate_kvrange_for_prefix_video`, prefix padding and the yield rule.

Conventions (upstream's): `t` in [0, 1] with **0 = noise, 1 = clean**; a chunk is `chunk_width`
latent frames; the sampler is Euler on velocity, `x += v * (t[k + 1] - t[k])`.

The walk, in chunks:

- `window_size` W chunks denoise together; `dsps = num_steps // W` steps make a *stage*;
- at stage s (i = s + offset, offset = whole prefix chunks) the chunks
  `[max(offset, i - W + 1), min(chunk_num, i + 1))` are active; the chunk in window slot j
  (0 = newest) is at schedule index `j * dsps + idx` (idx = 0..dsps-1), so neighbours are exactly
  one stage apart and a chunk finishes after W stages;
- at the first step of a stage, the chunk that has just finished is prepended to the call at
  `t = clean_t` (the *extra clean chunk*): its output is discarded, the pass only writes its
  K/V into the cache of clean chunks;
- a v2v prefix: its whole chunks are run once at `clean_t` before the walk (each seeing only
  itself) to fill the cache; a partial last prefix chunk is generated, its prefix frames are
  written back into the model input at every call;
- each query chunk attends to `[k_start, own chunk]`, `k_start = own + 1 - range`, with range
  `noise2clean_kvrange[index // (num_steps / len)]` for a denoising chunk and
  `clean_chunk_kvrange` for a clean one. With the defaults ([5, 4, 3, 2], W = 4) every chunk of
  the window reaches back to exactly one clean chunk before the window (`ChunkPlan.cache_reach`).

Everything here is exact (float32 where upstream computes in float32, so threshold tests such as
`t > 0.3` give upstream's answer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["ChunkCall", "ChunkPlan", "ChunkSchedule", "distill_intervals", "plan_chunk_calls",
           "stage_windows", "t_schedule"]

SHORTCUT_MODES = ("8,16,16", "16,16,8")
T_SCHEDULE_FUNCS = ("sd3", "square", "piecewise", "identity")


# --------------------------------------------------------------------------------------------
# 1. the noise schedule


def t_schedule(num_steps: int, shortcut_mode: str = "8,16,16", func: str = "sd3",
               shift: float = 3.0) -> torch.Tensor:
    """float32 [num_steps + 1] noise levels t (0 = noise, 1 = clean), upstream `init_t`.

    Default: `t = s^2` on a uniform grid s, then SD3's shift in reversed time,
    `t <- (t / shift) / (1 + (1 / shift - 1) t)`. `num_steps == 12` uses the distillation
    shortcut grid: four quarters, each split into intervals of 2, 1, 1 sixteenths ("8,16,16")
    or 1, 1, 2 ("16,16,8").
    """
    _check_steps(num_steps)
    if func not in T_SCHEDULE_FUNCS:
        raise ValueError(f"t schedule function must be one of {T_SCHEDULE_FUNCS} (default 'sd3'); got {func!r}")
    if func == "sd3" and not shift >= 1.0:
        raise ValueError(f"shift must be >= 1 for the sd3 schedule (default 3.0); got {shift!r}")
    if num_steps == 12:
        quarter = torch.linspace(0, 1, 5) / 4                      # 0, 1/16, 2/16, 3/16, 4/16
        starts = torch.linspace(0, 1, 5)
        if shortcut_mode == "16,16,8":
            offsets = quarter[:3]                                  # 0, 1/16, 2/16
        else:
            offsets = torch.cat([quarter[:1], quarter[2:4]])       # 0, 2/16, 3/16
        grid = torch.cat([offsets + start for start in starts])[:num_steps + 1]
    else:
        grid = torch.linspace(0, 1, num_steps + 1)
    if func == "identity":
        return grid
    if func == "piecewise":
        low = grid < 0.875
        out = grid.clone()
        out[low] = grid[low] * (0.5 / 0.875)
        out[~low] = 0.5 + (grid[~low] - 0.875) * (0.5 / (1 - 0.875))
        return out
    t = grid ** 2
    if func == "square":
        return t
    inv = 1.0 / shift
    return inv * t / (1 + (inv - 1) * t)


def distill_intervals(num_steps: int, shortcut_mode: str = "8,16,16") -> torch.Tensor:
    """float32 [num_steps] shortcut interval of each denoise index, upstream `init_intervel`.

    Ones, except when num_steps is a multiple of 3: the pattern [2, 1, 1] ("8,16,16") or
    [1, 1, 2] ("16,16,8") repeated (upstream applies it to every multiple of 3, though only the
    12-step grid is built that way; the model reads it only at 12 steps).
    """
    _check_steps(num_steps)
    if num_steps % 3 != 0:
        return torch.ones(num_steps)
    pattern = [1.0, 1.0, 2.0] if shortcut_mode == "16,16,8" else [2.0, 1.0, 1.0]
    return torch.tensor(pattern * (num_steps // 3))


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1 (64 for 4.5B, 32 for 24B, 12/16 distilled); "
                         f"got {num_steps!r}")


# --------------------------------------------------------------------------------------------
# 2. configuration


@dataclass(frozen=True)
class ChunkSchedule:
    """Schedule settings of the chunk-wise walk (upstream `runtime_config` / `engine_config` names
    in comments). Defaults are the 4.5B base model's."""

    num_steps: int = 64                         # runtime.num_steps
    window_size: int = 4                        # runtime.window_size: chunks denoised together
    chunk_width: int = 6                        # runtime.chunk_width: latent frames per chunk
    shortcut_mode: str = "8,16,16"              # engine.shortcut_mode (12-step grid, intervals)
    t_schedule_func: str = "sd3"                # t_schedule_config.tSchedulerFunc
    shift: float = 3.0                          # t_schedule_config.shift
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)   # chunks seen (incl. itself) per kv stage
    clean_chunk_kvrange: int = 1                # chunks seen by a clean chunk (-1: last of above)
    clean_t: float = 0.9999                     # t of clean chunks run only for their K/V
    nearly_clean_threshold: float = 0.3         # engine.distill_nearly_clean_chunk_threshold

    def __post_init__(self) -> None:
        _check_steps(self.num_steps)
        object.__setattr__(self, "noise2clean_kvrange", tuple(int(r) for r in self.noise2clean_kvrange))
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"window_size must be an integer >= 1 (default 4; 1 = one chunk at a time); "
                             f"got {self.window_size!r}")
        if self.num_steps % self.window_size != 0:
            raise ValueError(f"num_steps ({self.num_steps}) must be a multiple of window_size "
                             f"({self.window_size}): a chunk takes num_steps / window_size steps per stage "
                             f"and would otherwise never reach t = 1 (e.g. 64 steps with window 4)")
        if not isinstance(self.chunk_width, int) or self.chunk_width < 1:
            raise ValueError(f"chunk_width must be an integer >= 1 latent frames (default 6 = 24 frames); "
                             f"got {self.chunk_width!r}")
        if self.shortcut_mode not in SHORTCUT_MODES:
            raise ValueError(f"shortcut_mode must be one of {SHORTCUT_MODES}; got {self.shortcut_mode!r}")
        if self.t_schedule_func not in T_SCHEDULE_FUNCS:
            raise ValueError(f"t_schedule_func must be one of {T_SCHEDULE_FUNCS}; got {self.t_schedule_func!r}")
        ranges = self.noise2clean_kvrange
        if ranges:
            if any(r < 1 for r in ranges):
                raise ValueError(f"noise2clean_kvrange entries are chunk counts >= 1 (a chunk sees "
                                 f"itself); got {list(ranges)}")
            if self.num_steps % len(ranges) != 0:
                raise ValueError(f"num_steps ({self.num_steps}) must be a multiple of "
                                 f"len(noise2clean_kvrange) ({len(ranges)}), e.g. [5, 4, 3, 2] with 64 steps")
        if self.clean_chunk_kvrange != -1 and self.clean_chunk_kvrange < 1:
            raise ValueError(f"clean_chunk_kvrange must be >= 1 chunk or -1 (= the last "
                             f"noise2clean_kvrange entry); got {self.clean_chunk_kvrange!r}")
        if not 0.0 < self.clean_t <= 1.0:
            raise ValueError(f"clean_t must be in (0, 1] (upstream 0.9999); got {self.clean_t!r}")

    @classmethod
    def from_configs(cls, runtime: dict, engine: dict | None = None,
                     t_schedule_config: dict | None = None) -> ChunkSchedule:
        """From upstream's `runtime_config` / `engine_config` dicts (unknown keys ignored)."""
        engine = engine or {}
        tsc = t_schedule_config or {}
        return cls(num_steps=int(runtime["num_steps"]), window_size=int(runtime["window_size"]),
                   chunk_width=int(runtime.get("chunk_width", 6)),
                   shortcut_mode=engine.get("shortcut_mode", "8,16,16"),
                   t_schedule_func=tsc.get("tSchedulerFunc", "sd3"), shift=float(tsc.get("shift", 3.0)),
                   noise2clean_kvrange=tuple(runtime.get("noise2clean_kvrange", (5, 4, 3, 2))),
                   clean_chunk_kvrange=int(runtime.get("clean_chunk_kvrange", 1)),
                   clean_t=float(runtime.get("clean_t", 0.9999)),
                   nearly_clean_threshold=float(engine.get("distill_nearly_clean_chunk_threshold", 0.3)))

    @property
    def steps_per_stage(self) -> int:
        return self.num_steps // self.window_size

    @property
    def clean_range(self) -> int:
        """Chunks a clean chunk attends to, itself included."""
        if self.clean_chunk_kvrange != -1:
            return self.clean_chunk_kvrange
        return self.noise2clean_kvrange[-1] if self.noise2clean_kvrange else 8

    def t(self) -> torch.Tensor:
        return t_schedule(self.num_steps, self.shortcut_mode, self.t_schedule_func, self.shift)

    def intervals(self) -> torch.Tensor:
        return distill_intervals(self.num_steps, self.shortcut_mode)

    def chunk_count(self, generated_frames: int, prefix_frames: int = 0) -> int:
        """Chunks of a video of `generated_frames` new latent frames after a prefix (upstream:
        ceil((num_frames // 4 + prefix) / chunk_width))."""
        return math.ceil((generated_frames + prefix_frames) / self.chunk_width)


# --------------------------------------------------------------------------------------------
# 3. the call plan


def stage_windows(chunk_num: int, window_size: int,
                  chunk_offset: int = 0) -> list[tuple[int, int, int, int]]:
    """Per stage: (chunk_start, chunk_end, slot_start, slot_end) (upstream `generate_sequences`).

    Chunks [chunk_start, chunk_end) are active; they occupy window slots [slot_start, slot_end)
    (slot 0 = newest), listed oldest first when reversed.
    """
    if not 0 <= chunk_offset < chunk_num:
        raise ValueError(f"chunk_offset ({chunk_offset}) must leave at least one of {chunk_num} chunks to generate")
    out = []
    for i in range(chunk_offset, chunk_num + window_size - 1):
        slot_end = min(window_size, i - chunk_offset + 1)
        out.append((max(chunk_offset, i - window_size + 1), min(chunk_num, i + 1),
                    max(0, i - chunk_num + 1), slot_end))
    return out


@dataclass(frozen=True)
class ChunkCall:
    """One model call of the walk (upstream: one `forward_dispatcher` call).

    All chunk lists are oldest first and absolute (chunk 0 = first chunk of the video, prefix
    included). `t` is what the model is given (after prefix handling).
    """

    index: int                    # position in the plan (prefix pass = 0 when there is one)
    step: int                     # upstream cur_denoise_step (0 for the prefix pass)
    stage: int                    # denoise stage (-1 for the prefix pass)
    denoise_idx: int              # step within the stage
    chunks: tuple[int, ...]       # chunks given to the model, in order
    t: tuple[float, ...]          # float32 values, one per chunk
    t_index: tuple[int, ...]      # schedule index per chunk (num_steps for a clean chunk)
    kv_start: tuple[int, ...]     # first key chunk of each query chunk (keys end at the chunk itself)
    extra_clean: bool             # chunks[0] is a finished chunk run at clean_t for its K/V
    prefix_pass: bool             # the one call that runs the whole prefix chunks for their K/V
    nearly_clean: bool            # upstream distill_nearly_clean_chunk (oldest denoising t > threshold)
    distill_interval: float
    range_num: int                # upstream range_num (chunk_end)
    prefix_pad: tuple[int, int] = (0, 0)      # (start, count): prefix frames [start, start+count) overwrite
                                              # the call input's first count frames
    finished: int | None = None   # chunk that reaches t = 1 with this call's update (yielded after it)
    t_next: tuple[float, ...] = field(default=())   # t after the update, denoising chunks only

    @property
    def slice_point(self) -> int:
        """First chunk of the call = chunks before it that come from the cache."""
        return self.chunks[0]

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def denoising(self) -> tuple[int, ...]:
        """Chunks the sampler updates after this call."""
        if self.prefix_pass:
            return ()
        return self.chunks[1:] if self.extra_clean else self.chunks

    @property
    def uses_cache(self) -> bool:
        """Upstream reads and writes its K/V buffer only in these calls (else slice_point is 0, no extra chunk)."""
        return self.prefix_pass or self.extra_clean or self.slice_point > 0

    @property
    def cached_chunks(self) -> tuple[int, ...]:
        """Clean chunks before the call that some query reaches (read from the cache)."""
        first = min(self.kv_start)
        return tuple(range(first, self.slice_point))

    @property
    def active(self) -> tuple[bool, ...]:
        """Per chunk: the sampler uses this chunk's output."""
        lead = 1 if self.extra_clean else 0
        return tuple(not self.prefix_pass and j >= lead for j in range(self.num_chunks))

    def kv_range_tokens(self, tokens_per_chunk: int) -> torch.Tensor:
        """int64 [chunks, 2] key token range of each query chunk in [cached clean KV; this call's
        KV] (the upstream `kv_range`, batch 1)."""
        ends = [c + 1 for c in self.chunks]
        return torch.tensor([[s * tokens_per_chunk, e * tokens_per_chunk]
                             for s, e in zip(self.kv_start, ends)], dtype=torch.int64)


@dataclass(frozen=True)
class ChunkPlan:
    """Every call of one walk, and what the walk yields."""

    schedule: ChunkSchedule
    chunk_num: int
    prefix_frames: int
    calls: tuple[ChunkCall, ...]
    t: torch.Tensor               # float32 [num_steps + 1]
    intervals: torch.Tensor       # float32 [num_steps]

    @property
    def chunk_offset(self) -> int:
        """Whole prefix chunks (run once for their K/V, never generated)."""
        return self.prefix_frames // self.schedule.chunk_width

    @property
    def num_frames(self) -> int:
        return self.chunk_num * self.schedule.chunk_width

    @property
    def yield_order(self) -> list[int]:
        """Chunks in the order they finish, numbered from the first generated chunk."""
        return [c.finished - self.chunk_offset for c in self.calls if c.finished is not None]

    def yield_span(self, chunk: int) -> tuple[int, int]:
        """Latent frames [start, end) of the video the walk yields for absolute `chunk` (frames
        of the prefix are cut, except a 1-latent i2v prefix, which keeps its whole chunk)."""
        width = self.schedule.chunk_width
        start, end = chunk * width, (chunk + 1) * width
        if self.prefix_frames and not (chunk == 0 and self.prefix_frames == 1):
            start = max(start, self.prefix_frames)
        return start, end

    @property
    def yield_frames(self) -> list[int]:
        spans = [self.yield_span(c.finished) for c in self.calls if c.finished is not None]
        return [e - s for s, e in spans]

    @property
    def cache_reach(self) -> int:
        """Most clean chunks before a call that one call reads: the K/V cache a pipeline needs."""
        return max((len(c.cached_chunks) for c in self.calls), default=0)

    def last_read(self) -> dict[int, int]:
        """Per chunk: index of the last call reading it from the cache (release it after)."""
        last: dict[int, int] = {}
        for call in self.calls:
            for chunk in call.cached_chunks:
                last[chunk] = call.index
        return last


def plan_chunk_calls(chunk_num: int, schedule: ChunkSchedule, prefix_frames: int = 0) -> ChunkPlan:
    """Every model call of the walk over `chunk_num` chunks after `prefix_frames` clean latents."""
    if not isinstance(chunk_num, int) or chunk_num < 1:
        raise ValueError(f"chunk_num must be an integer >= 1; got {chunk_num!r}")
    width = schedule.chunk_width
    if not 0 <= prefix_frames < chunk_num * width:
        raise ValueError(f"prefix_frames ({prefix_frames}) must be in [0, {chunk_num * width}) for "
                         f"{chunk_num} chunks of {width} latents: leave something to generate")
    t = schedule.t()
    intervals = schedule.intervals()
    offset = prefix_frames // width
    dsps = schedule.steps_per_stage
    n = schedule.num_steps
    clean_t = float(torch.tensor(schedule.clean_t, dtype=torch.float32))
    calls: list[ChunkCall] = []

    # 1. the whole prefix chunks, once, at clean_t, each seeing only itself (for the cache)
    if offset > 0:
        chunks = tuple(range(offset))
        calls.append(ChunkCall(
            index=0, step=0, stage=-1, denoise_idx=0, chunks=chunks, t=(clean_t,) * offset,
            t_index=(n,) * offset, kv_start=tuple(max(0, c + 1 - schedule.clean_range) for c in chunks),
            extra_clean=False, prefix_pass=True, nearly_clean=False,
            distill_interval=float(intervals[0]), range_num=offset))

    # 2. the stages
    count = [0] * chunk_num
    step = 0
    for stage, (start, end, slot_start, slot_end) in enumerate(stage_windows(chunk_num, schedule.window_size, offset)):
        slots = list(range(slot_start, slot_end))[::-1]              # oldest chunk first
        for idx in range(dsps):
            extra = start > offset and idx == 0
            chunks = tuple(range(start - 1 if extra else start, end))
            t_index = [j * dsps + idx for j in slots]
            t_call = [float(t[k]) for k in t_index]
            t_next = tuple(float(t[k + 1]) for k in t_index)
            if extra:
                t_index, t_call = [n] + t_index, [clean_t] + t_call
            # prefix frames written into the call's input (a partial prefix chunk, re-padded every call)
            first_frame = chunks[0] * width
            pad = max(0, min(prefix_frames - first_frame, len(chunks) * width))
            for j in range(max(0, prefix_frames - first_frame) // width):
                t_call[j] = 1.0                                       # whole prefix chunks are clean
            kv_start = [_kv_start(schedule, chunk, k) for chunk, k in zip(chunks, t_index)]
            lead = 1 if extra else 0
            nearly = float(torch.tensor(t_call[lead], dtype=torch.float32)) > schedule.nearly_clean_threshold
            for chunk in chunks[lead:]:
                count[chunk] += 1
            finished = start if count[start] == n else None
            if finished is not None and (finished + 1) * width <= prefix_frames:
                finished = None
            calls.append(ChunkCall(
                index=len(calls), step=step, stage=stage, denoise_idx=idx, chunks=chunks,
                t=tuple(t_call), t_index=tuple(t_index), kv_start=tuple(kv_start), extra_clean=extra,
                prefix_pass=False, nearly_clean=nearly, distill_interval=float(intervals[idx]),
                range_num=end, prefix_pad=(first_frame, pad) if pad > 0 else (0, 0),
                finished=finished, t_next=t_next))
            step += 1
    return ChunkPlan(schedule=schedule, chunk_num=chunk_num, prefix_frames=prefix_frames,
                     calls=tuple(calls), t=t, intervals=intervals)


def _kv_start(schedule: ChunkSchedule, chunk: int, t_index: int) -> int:
    """First key chunk of query `chunk` at schedule index `t_index` (num_steps = clean)."""
    n = schedule.num_steps
    ranges = schedule.noise2clean_kvrange
    if not ranges:
        return 0                      # upstream default: every chunk sees the whole video so far
    if t_index == n:
        reach = schedule.clean_range
    else:
        reach = ranges[t_index // (n // len(ranges))]
    return max(0, chunk + 1 - reach)
