"""SkyReels-V2 diffusion-forcing (DF) sampling loop.

`DFPipeline(model, accel).generate(noise, context, negative_context, schedule_args)`:
plan segments -> sample each segment -> stitch. One segment:

1. the timestep matrix (`schedule.generate_timestep_matrix`) and one UniPC state per latent frame;
2. per row: slice the model window (`valid_interval`), optionally noise the clean prefix
   (`addnoise_condition`), run the model for the "cond" and (when guidance > 1) "uncond" branches,
   combine `v = v_u + g * (v_c - v_u)`;
3. step the solver of every frame the row updates.

Long videos (`overlap_frames` set and more latent frames than `base_num_frames`) are made of
segments that overlap by `overlap_frames` latents; upstream's segment count and lengths. The
overlap is kept in latent space by default (the previous segment's last latents become the next
prefix, no VAE round trip); `PixelOverlap` gives the official behaviour (decode, take the last
pixel frames, re-encode).

The model is any callable `model(x [1,C,F,H,W], t=[1,F] int64, context=[1,L,D], fps=[id],
(causal_block_size=cbs)) -> [1,C,F,H,W]`. Acceleration, when given, wraps every model call in
`with accel.call(scope.hooks.CallContext(...))`; without it nothing from `scope` is imported.
A model that also has `submit(x, **same kwargs) -> future` (`.result()` gives the output) gets
every CFG branch of a row submitted before any is awaited, so a remote model (the Ray backend)
has both in flight at once; each submit runs inside its branch's `accel.call`.

`generate(..., resume=[...], on_segment=fn)`: segments already done (their `SegmentInfo`, e.g.
from a checkpoint) are taken as they are instead of sampled again, and `on_segment` is called
with each newly sampled segment, so a failed run resumes at the segment it was in.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.skyreels_v2.schedule import TimestepMatrix, generate_timestep_matrix
from pipelines.skyreels_v2.unipc import FlowUniPCSolver, make_flow_schedule

__all__ = ["DFPipeline", "DFResult", "PixelOverlap", "RowRecord", "ScheduleArgs", "SegmentInfo",
           "SegmentPlan", "fps_embedding_id", "plan_segments", "segment_prefix"]

NoiseSource = torch.Tensor | Sequence[torch.Tensor] | torch.Generator | None


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class ScheduleArgs:
    """Sampling settings, in latent frames. Defaults are `generate_video_df.py`'s."""

    num_steps: int = 30
    shift: float = 8.0
    guidance_scale: float = 6.0          # CFG runs (two calls per row) only when > 1
    ar_step: int = 0                     # 0 = synchronous; README async: 5 with cbs 5
    causal_block_size: int = 1           # latent frames per schedule block (= accel chunk)
    base_num_frames: int | None = None   # latent frames per model window / segment; None = all
    overlap_frames: int | None = None    # latents shared by consecutive segments; None = one segment
    addnoise_condition: int = 0          # > 0: noise the clean prefix to t = this (README: 20)
    fps: int = 24                        # fps embedding id: 0 for 16 fps, else 1
    causal_attention: bool = False       # block-causal attention (released models: off)

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1 (default 30); got {self.num_steps!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0 (8 for T2V, 3-5 for I2V); got {self.shift!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (<= 1 disables CFG; default 6); "
                             f"got {self.guidance_scale}")
        if not isinstance(self.ar_step, int) or self.ar_step < 0:
            raise ValueError(f"ar_step must be an integer >= 0 (0 = synchronous, 5 = README async); "
                             f"got {self.ar_step!r}")
        if not isinstance(self.causal_block_size, int) or self.causal_block_size < 1:
            raise ValueError(f"causal_block_size must be an integer >= 1; got {self.causal_block_size!r}")
        if self.base_num_frames is not None and self.base_num_frames < self.causal_block_size:
            raise ValueError(f"base_num_frames ({self.base_num_frames}) must be None or >= "
                             f"causal_block_size ({self.causal_block_size}); 97 pixel frames = 25 latents")
        if self.overlap_frames is not None:
            if self.base_num_frames is None:
                raise ValueError("overlap_frames needs base_num_frames (the segment length), "
                                 "e.g. base_num_frames=25, overlap_frames=5")
            if not self.causal_block_size <= self.overlap_frames < self.base_num_frames:
                raise ValueError(f"overlap_frames must be in [causal_block_size, base_num_frames) = "
                                 f"[{self.causal_block_size}, {self.base_num_frames}); got "
                                 f"{self.overlap_frames} (17 pixel frames = 5 latents)")
        if not isinstance(self.addnoise_condition, int) or not 0 <= self.addnoise_condition < 1000:
            raise ValueError(f"addnoise_condition must be an integer timestep in [0, 1000) "
                             f"(0 = off, README 20, at most ~50); got {self.addnoise_condition!r}")


def fps_embedding_id(fps: int) -> int:
    """Upstream's fps embedding index: 0 for 16 fps, 1 for anything else."""
    return 0 if fps == 16 else 1


@dataclass(frozen=True)
class PixelOverlap:
    """Official long-video overlap: decode, keep the last `history_frames` pixels, re-encode.

    `encode(video [3,T,H,W] in [-1,1]) -> latents [C,t,h,w]`, `decode(latents) -> video`.
    `history_frames` pixel frames correspond to `(history_frames - 1) // temporal_stride + 1`
    latents, which must equal `ScheduleArgs.overlap_frames`.
    """

    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    history_frames: int = 17
    temporal_stride: int = 4

    @property
    def latent_frames(self) -> int:
        return (self.history_frames - 1) // self.temporal_stride + 1


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class SegmentPlan:
    """Where a segment sits in the video, in latent frames."""

    index: int
    start: int        # first video latent frame of the segment
    num_frames: int   # latent frames the segment samples (prefix included)
    window: int       # model window (base_num_frames of the timestep matrix)


@dataclass(frozen=True)
class RowRecord:
    """One row of a segment, as handed to `on_row` (the golden `trace.*` per row)."""

    segment: int
    row: int
    interval: tuple[int, int]       # (start, end) latent frames of the model window
    t: torch.Tensor                 # int64 [Fv] timesteps given to the model
    model_input: torch.Tensor       # [C, Fv, H, W] after prefix noising
    v_cond: torch.Tensor            # [C, Fv, H, W]
    v_uncond: torch.Tensor | None   # [C, Fv, H, W] when CFG runs
    update_mask: torch.Tensor       # bool [Fv] frames whose solver steps at this row
    seconds: float


@dataclass
class SegmentInfo:
    """What one segment did."""

    plan: SegmentPlan
    num_prefix: int                 # clean prefix latents it was conditioned on
    matrix: TimestepMatrix
    latents: torch.Tensor           # [C, F, H, W] the segment's final latents
    model_calls: int = 0
    row_seconds: list[float] = field(default_factory=list)
    request_id: str = ""
    accel_stats: Any = None         # `accel.end_request(...)`'s RequestStats, if any

    @property
    def rows(self) -> int:
        return self.matrix.rows


@dataclass
class DFResult:
    latents: torch.Tensor                 # [C, L, H, W] the stitched video latents
    segments: list[SegmentInfo]
    video: torch.Tensor | None = None     # [3, T, H, W] in [-1, 1] (PixelOverlap only)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# segment planning


def plan_segments(num_frames: int, base_num_frames: int | None = None,
                  overlap_frames: int | None = None) -> list[SegmentPlan]:
    """Upstream's segments: `1 + ceil((L - b) / (b - o))` of at most b latents, overlapping by o.

    Without an overlap (or when the video fits in b) there is one segment of all L frames,
    whose model window is min(b, L) (a sliding window when b < L).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 latent frame; got {num_frames}")
    base = num_frames if base_num_frames is None else base_num_frames
    if overlap_frames is None or num_frames <= base:
        return [SegmentPlan(index=0, start=0, num_frames=num_frames, window=min(base, num_frames))]
    if not 0 < overlap_frames < base:
        raise ValueError(f"overlap_frames must be in (0, base_num_frames={base}); got {overlap_frames}")
    stride = base - overlap_frames
    count = 1 + (num_frames - base - 1) // stride + 1
    plans = []
    for index in range(count):
        start = index * stride
        length = min(num_frames - start, base)
        plans.append(SegmentPlan(index=index, start=start, num_frames=length, window=length))
    return plans


def _stitch(segments: list[torch.Tensor], overlap: int) -> torch.Tensor:
    """cat(segment 0, segment i[overlap:] ...) along frames, as upstream stitches its pixels."""
    return torch.cat([segments[0]] + [latents[:, overlap:] for latents in segments[1:]], dim=1)


# --------------------------------------------------------------------------------------------
# the pipeline


class DFPipeline:
    """Diffusion-forcing sampler around a Wan DF transformer (or any callable of its signature).

    `faithful_aliasing=True` reproduces upstream's in-place aliasing of the first solver step
    (see `unipc.py`); False gives the corrected, plain-scheduler behaviour.
    """

    def __init__(self, model: Callable[..., torch.Tensor], accel: Any = None, *,
                 dtype: torch.dtype = torch.float32, faithful_aliasing: bool = True):
        self.model = model
        self.accel = accel
        self.dtype = dtype
        self.faithful_aliasing = faithful_aliasing

    @torch.no_grad()
    def generate(self, noise: torch.Tensor | Sequence[torch.Tensor], context: torch.Tensor,
                 negative_context: torch.Tensor | None = None,
                 schedule_args: ScheduleArgs | None = None, *,
                 prefix_latents: torch.Tensor | None = None,
                 addnoise_eps: NoiseSource = None,
                 pixel_overlap: PixelOverlap | None = None,
                 request_id: str = "df",
                 progress: Callable[[int, int], None] | None = None,
                 on_row: Callable[[RowRecord], None] | None = None,
                 resume: Sequence[SegmentInfo] = (),
                 on_segment: Callable[[SegmentInfo], None] | None = None) -> DFResult:
        """Sample a video's latents: plan segments, sample each one, stitch.

        noise: [C, L, H, W] for the whole video (each segment takes its frames), or one tensor
            [C, F_i, H, W] per segment.
        context / negative_context: [1, L_text, D]; negative needed when guidance_scale > 1.
        prefix_latents: [C, P, H, W] clean latents that start the video (I2V, video extension);
            truncated to a multiple of causal_block_size as upstream does.
        addnoise_eps: prefix noise for `addnoise_condition`: a tensor [rows, C, P, H, W] (row k
            feeds the k-th row that noises the prefix, frames [s, P) of it for a window starting
            at s), one such tensor per segment, a torch.Generator, or None (global RNG, upstream).
        progress(rows_done, rows_total) is called after every row; on_row gets each RowRecord.
        resume: the first segments, already sampled (taken as they are); on_segment(info) is
            called after each segment this call samples.
        """
        args = schedule_args or ScheduleArgs()
        started = time.perf_counter()
        plans, noises = self._plan(noise, args)
        if (len(plans) > 1 and pixel_overlap is not None
                and pixel_overlap.latent_frames != args.overlap_frames):
            raise ValueError(f"PixelOverlap.history_frames={pixel_overlap.history_frames} gives "
                             f"{pixel_overlap.latent_frames} latents but overlap_frames is "
                             f"{args.overlap_frames}; make them agree")
        eps_sources = self._eps_sources(addnoise_eps, len(plans), args.addnoise_condition > 0)
        cbs = args.causal_block_size
        expected_prefix = [_aligned(prefix_latents.shape[1], cbs) if prefix_latents is not None else 0]
        expected_prefix += [_aligned(args.overlap_frames or 0, cbs)] * (len(plans) - 1)
        expected_rows = [self._matrix(args, plan, p).rows for plan, p in zip(plans, expected_prefix)]
        counter = _RowCounter(progress, sum(expected_rows))

        segments: list[SegmentInfo] = []
        video = None
        for plan, segment_noise, eps in zip(plans, noises, eps_sources):
            # 1. the segment's clean prefix
            if plan.index == 0:
                prefix = prefix_latents
            elif pixel_overlap is None:
                prefix = segments[-1].latents[:, -args.overlap_frames:]
            else:
                history = video[:, -pixel_overlap.history_frames:]
                prefix = pixel_overlap.encode(history.to(segment_noise.device))
            prefix = _truncate_prefix(prefix, cbs)
            num_prefix = 0 if prefix is None else prefix.shape[1]
            if num_prefix != expected_prefix[plan.index]:   # a re-encoded prefix of another length
                counter.total += self._matrix(args, plan, num_prefix).rows - expected_rows[plan.index]
            # 2. sample it (or take it from `resume`)
            rid = request_id if len(plans) == 1 else f"{request_id}/seg{plan.index}"
            if plan.index < len(resume):
                info = _resumed(resume[plan.index], plan, num_prefix)
                counter.skip(info.rows)
            else:
                info = self.sample_segment(segment_noise, context, negative_context, args, plan=plan,
                                           prefix_latents=prefix, addnoise_eps=eps, request_id=rid,
                                           counter=counter, on_row=on_row)
                if on_segment is not None:
                    on_segment(info)
            segments.append(info)
            # 3. official overlap: decode and stitch in pixel space
            if pixel_overlap is not None:
                pixels = pixel_overlap.decode(info.latents).clamp(-1, 1)
                video = pixels if video is None else torch.cat(
                    [video, pixels[:, pixel_overlap.history_frames:].to(video.device)], dim=1)

        latents = _stitch([s.latents for s in segments], args.overlap_frames or 0)
        return DFResult(latents=latents, segments=segments, video=video,
                        seconds=time.perf_counter() - started)

    @torch.no_grad()
    def sample_segment(self, noise: torch.Tensor, context: torch.Tensor,
                       negative_context: torch.Tensor | None, args: ScheduleArgs, *,
                       plan: SegmentPlan | None = None,
                       prefix_latents: torch.Tensor | None = None,
                       addnoise_eps: torch.Tensor | torch.Generator | None = None,
                       request_id: str = "df", counter: _RowCounter | None = None,
                       on_row: Callable[[RowRecord], None] | None = None) -> SegmentInfo:
        """Sample one segment from `noise` [C, F, H, W] (upstream's short-video loop)."""
        _check_latents("noise", noise, 4)
        return self._sample([noise], [context], [negative_context], args, plan=plan,
                            prefixes=[prefix_latents], eps_sources=[addnoise_eps], request_ids=[request_id],
                            counter=counter, on_row=on_row)[0]

    @torch.no_grad()
    def sample_segment_batch(self, noises: Sequence[torch.Tensor], contexts: Sequence[torch.Tensor],
                             negative_contexts: Sequence[torch.Tensor | None], args: ScheduleArgs, *,
                             plan: SegmentPlan, prefixes: Sequence[torch.Tensor | None],
                             eps_sources: Sequence[Any], request_ids: Sequence[str]) -> list[SegmentInfo]:
        """The same segment of B videos of one shape, denoised together: every model call runs
        the B windows in one forward pass, each video with its own noise, text, prefix and
        prefix-noise source. Every per-video quantity is computed per sample (the solvers are
        elementwise, attention is per sample), so a video's latents do not depend on what it
        is batched with (tested). With an accelerator each video is its own request (one call
        context per row): its own decisions, residuals, K/V and stats; videos whose decisions
        run the same frames share the forward pass."""
        lists = (contexts, negative_contexts, prefixes, eps_sources, request_ids)
        if any(len(v) != len(noises) for v in lists):
            raise ValueError(f"sample_segment_batch needs one context, negative, prefix, prefix-noise source "
                             f"and request id per video; got {len(noises)} noises and {[len(v) for v in lists]}")
        for i, n in enumerate(noises):
            _check_latents(f"noises[{i}]", n, 4)
        return self._sample(list(noises), list(contexts), list(negative_contexts), args, plan=plan,
                            prefixes=list(prefixes), eps_sources=list(eps_sources), request_ids=list(request_ids))

    def _sample(self, noises: list[torch.Tensor], contexts: list[torch.Tensor],
                negatives: list[torch.Tensor | None], args: ScheduleArgs, *, plan: SegmentPlan | None,
                prefixes: list[torch.Tensor | None], eps_sources: list[Any], request_ids: list[str],
                counter: _RowCounter | None = None,
                on_row: Callable[[RowRecord], None] | None = None) -> list[SegmentInfo]:
        """The segment loop over B videos at once (latents [B, C, F, H, W]); B = 1 is upstream's."""
        first = noises[0]
        if any(n.shape != first.shape for n in noises):
            raise ValueError(f"a batch needs noises of one shape; got {[tuple(n.shape) for n in noises]}")
        plan = plan or SegmentPlan(index=0, start=0, num_frames=first.shape[1],
                                   window=min(args.base_num_frames or first.shape[1], first.shape[1]))
        cfg = args.guidance_scale > 1
        if cfg and any(n is None for n in negatives):
            raise ValueError(f"guidance_scale {args.guidance_scale} > 1 runs CFG and needs "
                             f"negative_context; pass it or set guidance_scale <= 1")
        if on_row is not None and len(noises) > 1:
            raise ValueError("on_row traces one video; sample it alone")
        device = first.device
        context = torch.cat([c.to(device, self.dtype) for c in contexts])                  # [B, L, D]
        negative_context = torch.cat([n.to(device, self.dtype) for n in negatives]) if cfg else None

        # 1. latents, prefix, schedule, one solver per frame (elementwise: it serves the batch)
        latents = torch.stack([n.to(self.dtype) for n in noises]).clone()                 # [B, C, F, H, W]
        num_prefix = _place_prefixes(latents, prefixes)
        matrix = self._matrix(args, plan, num_prefix)
        if matrix.num_frames < latents.shape[2]:
            warnings.warn(f"{latents.shape[2] - matrix.num_frames} trailing latent frame(s) do not fill "
                          f"a causal block of {args.causal_block_size} and stay noise (as upstream)",
                          stacklevel=3)
        flow = make_flow_schedule(args.num_steps, args.shift)
        solvers = [FlowUniPCSolver(flow, alias_first_sample=self.faithful_aliasing)
                   for _ in range(latents.shape[2])]
        infos = [SegmentInfo(plan=plan, num_prefix=num_prefix, matrix=matrix, latents=latents[b],
                             request_id=rid) for b, rid in enumerate(request_ids)]
        fps_id = [fps_embedding_id(args.fps)]
        noised_rows = 0

        for row in range(matrix.rows):
            row_started = time.perf_counter()
            start, end = matrix.interval(row)
            t = matrix.step_matrix[row, start:end].clone().to(device)
            update = matrix.update_mask[row, start:end]
            x = latents[:, :, start:end].clone()                                          # [B, C, Fv, H, W]
            # 2. clean prefix -> slightly noised input at t = addnoise_condition
            if args.addnoise_condition > 0 and start < num_prefix:
                for b, source in enumerate(eps_sources):
                    eps = _draw_prefix_noise(source, noised_rows, x[b, :, :num_prefix - start], start)
                    factor = 0.001 * args.addnoise_condition
                    x[b, :, :num_prefix - start] = x[b, :, :num_prefix - start] * (1.0 - factor) + eps * factor
                t[:num_prefix - start] = args.addnoise_condition
                noised_rows += 1
            # 3. model calls (cond, uncond) and guidance
            calls = self._call_contexts(request_ids, row, t, update, args, cfg, start, flow.timesteps)
            branches = [(context, calls.get("cond"))]
            if cfg:
                branches.append((negative_context, calls.get("uncond")))
            outputs = self._run_branches(x, t, branches, fps_id, args)
            v_cond, v_uncond = outputs[0], (outputs[1] if cfg else None)
            velocity = v_cond
            if cfg:
                velocity = v_uncond + args.guidance_scale * (v_cond - v_uncond)
            for info in infos:
                info.model_calls += 2 if cfg else 1
            # 4. step every frame this row updates
            for frame in (start + update.nonzero().flatten()).tolist():
                latents[:, :, frame] = solvers[frame].step(velocity[:, :, frame - start],
                                                           matrix.step_matrix[row, frame],
                                                           latents[:, :, frame]).to(latents.dtype)
            if latents.is_cuda:
                torch.cuda.synchronize(latents.device)
            seconds = time.perf_counter() - row_started
            for info in infos:
                info.row_seconds.append(seconds)
            if on_row is not None:
                on_row(RowRecord(segment=plan.index, row=row, interval=(start, end), t=t,
                                 model_input=x[0], v_cond=v_cond[0],
                                 v_uncond=None if v_uncond is None else v_uncond[0],
                                 update_mask=update, seconds=seconds))
            if counter is not None:
                counter.advance()

        if self.accel is not None and hasattr(self.accel, "end_request"):
            for info, rid in zip(infos, request_ids):
                info.accel_stats = self.accel.end_request(rid)
        return infos

    # ---------------------------------------------------------------------------------------

    def _plan(self, noise: torch.Tensor | Sequence[torch.Tensor],
              args: ScheduleArgs) -> tuple[list[SegmentPlan], list[torch.Tensor]]:
        """Segment plans and each segment's noise."""
        if isinstance(noise, torch.Tensor):
            _check_latents("noise", noise, 4)
            plans = plan_segments(noise.shape[1], args.base_num_frames, args.overlap_frames)
            return plans, [noise[:, p.start:p.start + p.num_frames] for p in plans]
        noises = list(noise)
        for i, n in enumerate(noises):
            _check_latents(f"noise[{i}]", n, 4)
        overlap = args.overlap_frames or 0
        total = sum(n.shape[1] for n in noises) - overlap * (len(noises) - 1)
        plans = plan_segments(total, args.base_num_frames, args.overlap_frames)
        lengths = [p.num_frames for p in plans]
        if [n.shape[1] for n in noises] != lengths:
            raise ValueError(f"per-segment noise lengths {[n.shape[1] for n in noises]} do not match "
                             f"the segment plan {lengths} for {total} latent frames; pass one "
                             f"[C, L, H, W] tensor to let the pipeline split it")
        return plans, noises

    @staticmethod
    def _eps_sources(addnoise_eps: NoiseSource, count: int,
                     used: bool) -> list[torch.Tensor | torch.Generator | None]:
        """One prefix-noise source per segment."""
        if addnoise_eps is None or isinstance(addnoise_eps, torch.Generator):
            return [addnoise_eps] * count
        if isinstance(addnoise_eps, torch.Tensor):
            if used and count > 1:
                raise ValueError(f"a single addnoise_eps tensor cannot feed {count} segments; pass "
                                 f"a list with one tensor per segment, or a torch.Generator")
            return [addnoise_eps] * count
        sources = list(addnoise_eps)
        if len(sources) != count:
            raise ValueError(f"addnoise_eps has {len(sources)} per-segment entries for {count} segments")
        return sources

    @staticmethod
    def _matrix(args: ScheduleArgs, plan: SegmentPlan, num_prefix: int) -> TimestepMatrix:
        template = make_flow_schedule(args.num_steps, args.shift).timesteps
        return generate_timestep_matrix(plan.num_frames, template, plan.window, args.ar_step,
                                        num_prefix, args.causal_block_size)

    def _call_contexts(self, request_ids: list[str], row: int, t: torch.Tensor, update: torch.Tensor,
                       args: ScheduleArgs, cfg: bool, start: int = 0,
                       timesteps: torch.Tensor | None = None) -> dict[str, Any]:
        """Per branch, one `scope.hooks.CallContext` (one video) or a tuple of them (one per
        batch row); nothing without an accelerator."""
        if self.accel is None:
            return {}
        from scope.hooks import CallContext   # lazy: the pipeline runs without scope

        cbs = args.causal_block_size
        chunks = t.shape[0] // cbs
        chunk_sigma = t[::cbs][:chunks].to(torch.float32).cpu() / 1000.0
        chunk_active = update[:chunks * cbs].reshape(chunks, cbs).any(dim=1).cpu()
        chunk_sigma_next = _next_sigmas(chunk_sigma, chunk_active, timesteps)
        branches = ["cond", "uncond"] if cfg else ["cond"]

        def context(rid: str, branch: str) -> Any:
            return CallContext(request=rid, branch=branch, step=row, frames_per_chunk=cbs,
                               chunk_sigma=chunk_sigma, chunk_active=chunk_active,
                               causal=args.causal_attention, chunk_sigma_next=chunk_sigma_next,
                               chunk_offset=start // cbs)

        if len(request_ids) == 1:
            return {branch: context(request_ids[0], branch) for branch in branches}
        return {branch: tuple(context(rid, branch) for rid in request_ids) for branch in branches}

    def _run_branches(self, x: torch.Tensor, t: torch.Tensor, branches: list[tuple[torch.Tensor, Any]],
                      fps_id: list[int], args: ScheduleArgs) -> list[torch.Tensor]:
        """The model calls of one row, one per (context, call context): in turn, or all submitted
        before any is awaited when the model has `submit`."""
        submit = getattr(self.model, "submit", None)
        if submit is None:
            return [self._run_model(x, t, ctx, fps_id, args, call) for ctx, call in branches]
        pending = []
        for ctx, call in branches:
            scope = nullcontext() if call is None else self.accel.call(call)
            with scope:
                pending.append(submit(x, t=t[None].expand(x.shape[0], -1), **self._model_kwargs(ctx, fps_id, args)))
        return [self._check_output(p.result(), x) for p in pending]

    @staticmethod
    def _model_kwargs(context: torch.Tensor, fps_id: list[int], args: ScheduleArgs) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"context": context, "fps": fps_id}
        if args.causal_attention:
            kwargs["causal_block_size"] = args.causal_block_size
        return kwargs

    def _run_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   fps_id: list[int], args: ScheduleArgs, call_context: Any) -> torch.Tensor:
        """One model call on the windows x [B, C, Fv, H, W] -> velocity [B, C, Fv, H, W]."""
        kwargs = self._model_kwargs(context, fps_id, args)
        scope = nullcontext() if call_context is None else self.accel.call(call_context)
        with scope:
            out = self.model(x, t=t[None].expand(x.shape[0], -1), **kwargs)
        return self._check_output(out, x)

    @staticmethod
    def _check_output(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if out.shape != x.shape:
            raise ValueError(f"model returned {tuple(out.shape)} for input {tuple(x.shape)}; "
                             f"expected the input's shape")
        return out


# --------------------------------------------------------------------------------------------
# helpers


class _RowCounter:
    """Rows done / total over all segments, reported to a `progress` callback."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int):
        self.callback = callback
        self.total = total
        self.done = 0

    def advance(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)

    def skip(self, rows: int) -> None:
        """Count rows of a resumed segment as done (no callback)."""
        self.done += rows


def _resumed(info: SegmentInfo, plan: SegmentPlan, num_prefix: int) -> SegmentInfo:
    """A segment handed back through `resume`, checked against the plan it must match."""
    if info.plan != plan or info.num_prefix != num_prefix:
        raise ValueError(f"resume segment {plan.index} was sampled for {info.plan} with "
                         f"{info.num_prefix} prefix latents; this run plans {plan} with {num_prefix}")
    return info


def _next_sigmas(sigma: torch.Tensor, active: torch.Tensor,
                 timesteps: torch.Tensor | None) -> torch.Tensor | None:
    """Noise level of each chunk after this row: the next timestep of its schedule for a chunk
    the row updates (0 after the last one), unchanged otherwise."""
    if timesteps is None:
        return None
    grid = torch.cat([timesteps.to(torch.float32).cpu() / 1000.0, torch.zeros(1)])   # [N + 1]
    nxt = sigma.clone()
    for j in active.nonzero().flatten().tolist():
        k = int(torch.argmin((grid[:-1] - sigma[j]).abs()))
        nxt[j] = grid[k + 1]
    return nxt


def segment_prefix(latents: torch.Tensor, overlap: int, block: int) -> torch.Tensor | None:
    """The clean prefix the next segment starts from: the last `overlap` latents of this one
    [C, F, H, W], cut to whole causal blocks as `generate` does (a copy: the segment can go)."""
    if not overlap:
        return None
    prefix = _truncate_prefix(latents[:, -overlap:], block)
    return None if prefix is None else prefix.clone()


def _aligned(frames: int, block: int) -> int:
    return frames - frames % block


def _truncate_prefix(prefix: torch.Tensor | None, block: int) -> torch.Tensor | None:
    """Upstream keeps only whole causal blocks of a prefix (an I2V image is lost with cbs > 1)."""
    if prefix is None:
        return None
    keep = _aligned(prefix.shape[1], block)
    if keep < prefix.shape[1]:
        warnings.warn(f"prefix of {prefix.shape[1]} latent frames truncated to {keep} to align with "
                      f"causal_block_size {block} (as upstream)", stacklevel=3)
    return prefix[:, :keep] if keep > 0 else None


def _check_latents(name: str, tensor: torch.Tensor, dims: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a [C, F, H, W] latent tensor (batch 1, no batch dim); got {shape}")


def _place_prefixes(latents: torch.Tensor, prefixes: list[torch.Tensor | None]) -> int:
    """Write each video's clean prefix into its latents [B, C, F, H, W]; all must have one length."""
    lengths = {0 if p is None else p.shape[1] for p in prefixes}
    if len(lengths) != 1:
        raise ValueError(f"a batch needs prefixes of one length; got {sorted(lengths)}")
    num_prefix = lengths.pop()
    for b, prefix in enumerate(prefixes):
        if prefix is not None and num_prefix > 0:
            _check_prefix(prefix, latents[b])
            latents[b, :, :num_prefix] = prefix.to(latents)
    return num_prefix


def _check_prefix(prefix: torch.Tensor, latents: torch.Tensor) -> None:
    _check_latents("prefix_latents", prefix, 4)
    channels, frames, height, width = latents.shape
    if (prefix.shape[0], prefix.shape[2], prefix.shape[3]) != (channels, height, width):
        raise ValueError(f"prefix_latents {tuple(prefix.shape)} must match the noise's channels and "
                         f"size {(channels, height, width)}")
    if prefix.shape[1] >= frames:
        raise ValueError(f"prefix_latents has {prefix.shape[1]} frames but the segment has only "
                         f"{frames}; leave at least one frame to generate")


def _draw_prefix_noise(source: torch.Tensor | torch.Generator | None, k: int, like: torch.Tensor,
                       start: int) -> torch.Tensor:
    """Gaussian noise for the noised prefix frames `like` ([C, P - start, H, W])."""
    if isinstance(source, torch.Tensor):
        if k >= source.shape[0]:
            raise ValueError(f"addnoise_eps has {source.shape[0]} rows but row {k} of prefix noise is "
                             f"needed (one per row whose window overlaps the prefix)")
        eps = source[k][:, start:start + like.shape[1]]
        if eps.shape != like.shape:
            raise ValueError(f"addnoise_eps[{k}] gives {tuple(eps.shape)} for prefix frames "
                             f"[{start}, {start + like.shape[1]}); expected {tuple(like.shape)}")
        return eps.to(like)
    if isinstance(source, torch.Generator):
        return torch.randn(like.shape, generator=source, device=source.device,
                           dtype=like.dtype).to(like.device)
    return torch.randn_like(like)
