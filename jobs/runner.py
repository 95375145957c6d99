"""The segment loop, once, for every job and both backends.

    run = VideoRun(plan, loaded, sampler, writer, checkpoints)
    summary = run.run()

For each segment, in order: **plan** it (its noise, its clean prefix, its prefix-noise source),
**denoise** it (`sampler.sample_segment`: the in-process `DFPipeline` or a Ray replica's stages),
**commit** it (the latents it adds to the video, the prefix of the next segment), **decode** its
new latents, **write** its frames (`writer.write_segment`), and **checkpoint** (every
`checkpoint_every` segments and after the last one). Only the overlap latents cross from one
segment to the next: memory is bounded by the window, whatever the video's length. A chunk-wise
backend (MAGI-1's walk, `jobs/magi.py`) calls a segment each chunk that became clean; its own
bounded state between segments (`SamplerState`) goes into the checkpoint and back to it on resume.

Randomness: every draw is named once (`Draws`): the noise of segment i and the prefix noise of
segment i each come from their own generator seeded by (seed, name, i). A resumed run therefore
needs no RNG state beyond the segment index, and the checkpoint records which scheme it used.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from jobs.setup import LoadedVideo, VideoPlan
from jobs.spec import SpecError
from pipelines.skyreels_v2.pipeline import SegmentInfo, SegmentPlan, segment_prefix
from scope.stats import RequestStats, merge_stats

RNG_SCHEME = "sha256(seed/name/segment) -> torch.Generator per draw"
CHECKPOINT_FORMAT = 1


class RunFault(RuntimeError):
    """A run that cannot continue (non-finite latents, a refused resume): one line, exit non-zero."""


# ------------------------------------------------------------------------------------ draws

class Draws:
    """Every random draw of one video, named once: (seed, name, segment) -> its own generator."""

    def __init__(self, seed: int):
        self.seed = seed

    def generator(self, name: str, segment: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}/{name}/{segment}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)

    def segment_noise(self, segment: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The initial noise of segment `segment` [C, F, h, w] (its prefix frames are replaced)."""
        return torch.randn(shape, generator=self.generator("noise", segment))

    def prefix_noise(self, segment: int) -> torch.Generator:
        """Source of the noise that `addnoise_condition` adds to segment `segment`'s clean prefix."""
        return self.generator("prefix-noise", segment)


# ------------------------------------------------------------------------------------ interfaces

class SegmentSampler(Protocol):
    """A backend: `DFPipeline` in this process, or `cluster.segments.RaySegmentSampler`."""

    def sample_segment(self, noise: torch.Tensor, context: torch.Tensor, negative_context: torch.Tensor | None,
                       args: Any, *, plan: SegmentPlan, prefix_latents: torch.Tensor | None,
                       addnoise_eps: Any, request_id: str) -> SegmentInfo: ...


class SegmentWriter(Protocol):
    def has_segment(self, index: int) -> bool: ...
    def write_segment(self, index: int, frames: np.ndarray) -> None: ...


class CheckpointStore(Protocol):
    def load(self) -> RunState | None: ...
    def save(self, state: RunState) -> None: ...


# ------------------------------------------------------------------------------------ state

@dataclass
class SamplerState:
    """A backend's own state between two segments, when it keeps one (MAGI-1's walk: the next call,
    the window's live latents, the cached clean-chunk K/V still read): JSON `meta` + named tensors
    (references on their device until a checkpoint writes them)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass
class RunState:
    """What a run needs to continue after segment `next_segment - 1`: the clean prefix of the
    next segment, the last latents a causal frame decoder is warmed on to resume (W of them, not
    its cache: `FrameDecoder.resume`), and the totals so far. No accelerator state outlives a
    segment (each is its own accelerator request), so none is kept."""

    fingerprint: str
    next_segment: int = 0
    prefix: torch.Tensor | None = None          # [C, P, h, w] the next segment's clean prefix
    decode_history: torch.Tensor | None = None  # [C, <=W, h, w] last latents a causal decoder resumes on
    frames_done: int = 0
    model_calls: int = 0
    rows: int = 0
    sample_seconds: float = 0.0
    written_segments: int = 0                   # segment files this run wrote (not found existing)
    device: str = ""                            # where the model ran: another device changes float bits
    accel: RequestStats = field(default_factory=lambda: RequestStats(request="video"))
    sampler: SamplerState | None = None         # the backend's state after the segment (chunk-wise walks)

    def to_bytes(self, seed: int) -> bytes:
        """One safetensors blob (the prefix tensor + JSON metadata): one atomic write."""
        from safetensors.torch import save

        meta = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "device": self.device,
                "next_segment": self.next_segment,
                "frames_done": self.frames_done, "model_calls": self.model_calls, "rows": self.rows,
                "sample_seconds": self.sample_seconds, "accel": self.accel.to_dict(),
                "rng": {"scheme": RNG_SCHEME, "seed": seed, "next_segment": self.next_segment},
                "accel_state": "none: every segment is its own accelerator request"}
        tensors = {} if self.prefix is None else {"prefix": self.prefix.detach().cpu().contiguous().float()}
        if self.decode_history is not None:
            tensors["decode_history"] = self.decode_history.detach().cpu().contiguous().float()
        if self.sampler is not None:
            meta["sampler"] = self.sampler.meta
            tensors.update({f"sampler/{k}": v.detach().cpu().contiguous() for k, v in self.sampler.tensors.items()})
        return save(tensors, metadata={"state": json.dumps(meta, allow_nan=False)})

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> RunState:
        from safetensors.torch import load

        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["state"])
        except Exception as err:   # a torn or foreign file: say so, never a traceback
            raise RunFault(f"checkpoint {where} is unreadable ({type(err).__name__}); delete it to start "
                           f"over, or point out elsewhere") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise RunFault(f"checkpoint {where} has format {meta.get('format')}, this version reads "
                           f"{CHECKPOINT_FORMAT}; finish it with the version that wrote it or start over")
        sampler = None
        if "sampler" in meta:
            sampler = SamplerState(meta["sampler"], {k[len("sampler/"):]: v for k, v in tensors.items()
                                                     if k.startswith("sampler/")})
        return cls(fingerprint=meta["fingerprint"], next_segment=meta["next_segment"], sampler=sampler,
                   prefix=tensors.get("prefix"), decode_history=tensors.get("decode_history"),
                   frames_done=meta["frames_done"],
                   model_calls=meta["model_calls"], rows=meta["rows"], sample_seconds=meta["sample_seconds"],
                   accel=stats_from_dict(meta["accel"]), device=meta.get("device", ""))


def stats_from_dict(data: dict[str, Any]) -> RequestStats:
    """The inverse of `RequestStats.to_dict` for the totals a checkpoint carries."""
    from scope.stats import ErrorSummary, ModeCounts

    def modes(d: dict[str, int]) -> ModeCounts:
        counts = ModeCounts()
        for mode, n in d.items():
            counts.add(mode, n)
        return counts

    def errors(d: dict[str, Any]) -> ErrorSummary:
        summary = ErrorSummary()
        # to_dict gives count / mean / max: the running total is mean x count
        summary.count, summary.max = d.get("count", 0), d.get("max", 0.0)
        summary.total = d.get("mean", 0.0) * summary.count
        return summary

    return RequestStats(
        request=data["request"], method=data["method"], num_blocks=data["num_blocks"], calls=data["calls"],
        chunk_calls=data["chunk_calls"], modes=modes(data["modes"]),
        per_chunk={int(c): modes(m) for c, m in data["per_chunk"].items()}, reasons=dict(data["reasons"]),
        block_evals=data["block_evals"], block_evals_full=data["block_evals_full"],
        context_block_evals=data["context_block_evals"], kv_served_chunks=data["kv_served_chunks"],
        dropped_chunks=data["dropped_chunks"], est_error=errors(data["est_error"]),
        observed_error=errors(data["observed_error"]))


# ------------------------------------------------------------------------------------ progress

class Progress:
    """One line per segment: segments done / total, frames, frames/s of this run, ETA."""

    def __init__(self, total_segments: int, total_frames: int, label: str = "video",
                 stream: Any = None, enabled: bool = True):
        self.total_segments, self.total_frames, self.label = total_segments, total_frames, label
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.started = time.perf_counter()
        self.frames_at_start: int | None = None

    def update(self, segments_done: int, frames_done: int, resumed: bool = False) -> None:
        if self.frames_at_start is None:
            self.frames_at_start = frames_done if resumed else 0
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        made = frames_done - self.frames_at_start
        rate = made / elapsed if elapsed > 0 else 0.0
        eta = (self.total_frames - frames_done) / rate if rate > 0 else float("nan")
        word = "resumed at" if resumed else "segment"
        print(f"{self.label}: {word} {segments_done}/{self.total_segments}, frames {frames_done}/"
              f"{self.total_frames}, {rate:.2f} frames/s, ETA {_duration(eta)}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


# ------------------------------------------------------------------------------------ the loop

@dataclass
class RunSummary:
    state: RunState
    wall_s: float
    segments: int
    resumed_from: int


class VideoRun:
    """One video, segment by segment; see the module docstring."""

    def __init__(self, plan: VideoPlan, loaded: LoadedVideo, sampler: SegmentSampler, writer: SegmentWriter,
                 checkpoints: CheckpointStore | None = None, *, checkpoint_every: int = 1,
                 progress: Progress | None = None,
                 on_latents: Callable[[int, torch.Tensor], None] | None = None,
                 on_segment: Callable[[SegmentInfo, RunState, int], None] | None = None):
        self.plan, self.loaded, self.sampler, self.writer = plan, loaded, sampler, writer
        self.checkpoints, self.checkpoint_every = checkpoints, checkpoint_every
        self.progress = progress
        self.on_latents = on_latents            # (first video latent, new latents): `generate --latents`
        self.on_segment = on_segment            # (info, state, frames added) after each segment: metrics
        self.draws = Draws(plan.spec.seed)
        self.fingerprint = plan.spec.fingerprint()

    @torch.no_grad()   # sampling only: an autograd graph would chain every segment to the next
    def run(self) -> RunSummary:
        started = time.perf_counter()
        state = self._start()
        resumed_from = state.next_segment
        if self.progress is not None and resumed_from > 0:
            self.progress.update(resumed_from, state.frames_done, resumed=True)
        for segment in self.plan.segments[state.next_segment:]:
            frames_before = state.frames_done
            noise, prefix, prefix_noise = self._plan_segment(segment, state)           # 1. plan
            info = self._denoise(segment, noise, prefix, prefix_noise)                  # 2. denoise
            first, new = self._commit(segment, info, state)                             # 3. commit
            frames = self.loaded.decoder.decode(new, first)                             # 4. decode
            self._write(segment.index, frames, state)                                   # 5. write
            self._checkpoint(segment, state)                                            # 6. checkpoint
            if self.progress is not None:
                self.progress.update(state.next_segment, state.frames_done)
            if self.on_segment is not None:                                             # 7. report
                self.on_segment(info, state, state.frames_done - frames_before)
        return RunSummary(state, time.perf_counter() - started, len(self.plan.segments), resumed_from)

    # -- the steps -------------------------------------------------------------------------------
    def _start(self) -> RunState:
        state = self.checkpoints.load() if self.checkpoints is not None else None
        if state is None:
            return RunState(fingerprint=self.fingerprint, prefix=self.loaded.reference, device=self.plan.device)
        if state.fingerprint != self.fingerprint:
            raise RunFault("the checkpoint was written for another spec (fingerprint differs); use a new "
                           "out folder, or delete the old one to start over")
        if state.device and state.device.split(":")[0] != self.plan.device.split(":")[0]:
            raise RunFault(f"the checkpoint was made on {state.device}, this run would continue on "
                           f"{self.plan.device}: the frames would not match an uninterrupted run; set "
                           f"device: {state.device} to resume (or use a new out folder)")
        if state.prefix is not None:
            state.prefix = state.prefix.to(self.plan.device)
        resume_sampler = getattr(self.sampler, "resume", None)
        if resume_sampler is not None and state.next_segment < len(self.plan.segments):
            resume_sampler(state.sampler, state.next_segment)     # a chunk-wise walk continues from its state
        if state.next_segment < len(self.plan.segments):
            # a causal decoder's cache is not checkpointed: warm a fresh one on the kept history
            resume_at = self.plan.new_latents_of(self.plan.segments[state.next_segment])[0]
            try:
                self.loaded.decoder.resume(state.decode_history, resume_at)
            except ValueError as err:
                raise RunFault(str(err)) from None
        return state

    def _plan_segment(self, segment: SegmentPlan, state: RunState
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Generator]:
        h, w = self.plan.latent_size
        # drawn on the CPU whatever the device: the same seed gives the same noise everywhere
        noise = self.draws.segment_noise(segment.index, (self.plan.channels, segment.num_frames, h, w))
        return noise.to(self.plan.device), state.prefix, self.draws.prefix_noise(segment.index)

    def _denoise(self, segment: SegmentPlan, noise: torch.Tensor, prefix: torch.Tensor | None,
                 prefix_noise: torch.Generator) -> SegmentInfo:
        info = self.sampler.sample_segment(
            noise, self.loaded.context, self.loaded.negative, self.plan.args, plan=segment,
            prefix_latents=prefix, addnoise_eps=prefix_noise,
            request_id=f"{self.fingerprint[:12]}/seg{segment.index}")
        if not torch.isfinite(info.latents).all():
            raise RunFault(f"segment {segment.index}: the model produced NaN or inf latents; nothing of it "
                           f"was written (check the weights, the text embeddings and guidance)")
        return info

    def _commit(self, segment: SegmentPlan, info: SegmentInfo, state: RunState
                ) -> tuple[int, torch.Tensor]:
        """Totals, and the next segment's prefix; returns the video latents this segment adds."""
        first, end = self.plan.new_latents_of(segment)
        new = info.latents[:, first - segment.start:]
        if self.on_latents is not None:
            self.on_latents(first, new)
        if info.accel_stats is not None:
            state.accel = merge_stats("video", [state.accel, _without_trace(info.accel_stats)])
        state.model_calls += info.model_calls
        state.rows += info.rows
        state.sample_seconds += sum(info.row_seconds)
        state.next_segment = segment.index + 1
        state.frames_done = self.loaded.decoder.frame_range(0, end)[1]
        state.prefix = segment_prefix(info.latents, self.plan.overlap, self.plan.args.causal_block_size)
        state.decode_history = self.loaded.decoder.history_after(state.decode_history, new)
        state.sampler = getattr(info, "resume_state", None)
        return first, new

    def _write(self, index: int, frames: np.ndarray | None, state: RunState) -> None:
        if frames is None or len(frames) == 0:
            return
        if self.writer.has_segment(index):      # written before a crash, after the last checkpoint
            return
        self.writer.write_segment(index, frames)
        state.written_segments += 1

    def _checkpoint(self, segment: SegmentPlan, state: RunState) -> None:
        last = segment.index == len(self.plan.segments) - 1
        if self.checkpoints is not None and (last or state.next_segment % self.checkpoint_every == 0):
            self.checkpoints.save(state)


def run_batch(runs: list[VideoRun], pipeline: Any) -> list[RunSummary]:
    """B videos of one shape (same schedule, segments and latent geometry), each segment
    denoised for all of them in one forward pass per model call
    (`DFPipeline.sample_segment_batch`); every video keeps its own draws, text, prefix, writer,
    totals and, with an accelerator on `pipeline`, its own accelerator request. No checkpoints:
    a batch is the dataset job's unit, committed per video."""
    first = runs[0].plan
    for run in runs[1:]:
        if (run.plan.segments, run.plan.args, run.plan.latent_size) != (first.segments, first.args, first.latent_size):
            raise ValueError("run_batch needs videos of one shape (segments, schedule, latent size)")
    started = time.perf_counter()
    states = [RunState(fingerprint=run.fingerprint, prefix=run.loaded.reference) for run in runs]
    start_videos = getattr(pipeline, "start_videos", None)
    if start_videos is not None:                 # a chunk-wise walk draws each video's noise itself
        start_videos([run.plan for run in runs])
    with torch.no_grad():
        for segment in first.segments:
            planned = [run._plan_segment(segment, state) for run, state in zip(runs, states)]
            infos = pipeline.sample_segment_batch(
                [p[0] for p in planned], [r.loaded.context for r in runs], [r.loaded.negative for r in runs],
                first.args, plan=segment, prefixes=[p[1] for p in planned], eps_sources=[p[2] for p in planned],
                # the batch position keeps two rows of one spec apart (ids never reach the output)
                request_ids=[f"{r.fingerprint[:12]}/seg{segment.index}/b{k}" for k, r in enumerate(runs)])
            for run, state, info in zip(runs, states, infos):
                if not torch.isfinite(info.latents).all():
                    raise RunFault(f"segment {segment.index}: the model produced NaN or inf latents")
                frames_before = state.frames_done
                first_latent, new = run._commit(segment, info, state)
                run._write(segment.index, run.loaded.decoder.decode(new, first_latent), state)
                if run.on_segment is not None:
                    run.on_segment(info, state, state.frames_done - frames_before)
    wall = time.perf_counter() - started
    return [RunSummary(state, wall, len(first.segments), 0) for state in states]


def _without_trace(stats: RequestStats) -> RequestStats:
    stats.trace = []
    stats.mag_ratios = {}
    return stats


def segments_with_frames(plan: VideoPlan) -> list[int]:
    """The segments whose new latents hold at least one video frame (the files a video joins)."""
    from jobs.setup import FrameDecoder

    mapping = FrameDecoder(lambda latents, first: None, plan.frames, skip=plan.skip, temporal=plan.temporal,
                           causal=getattr(plan, "vae_causal", True))
    found = []
    for segment in plan.segments:
        f0, f1 = mapping.frame_range(*plan.new_latents_of(segment))
        if f1 > f0:
            found.append(segment.index)
    return found


def summary_stats(plan: VideoPlan, summary: RunSummary, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """stats.json: frames, fps, wall and sample seconds, block evaluations, modes, schedule, accel."""
    from dataclasses import asdict

    state, stats = summary.state, summary.state.accel.to_dict()
    stats.pop("trace", None)
    stats.pop("mag_ratios", None)
    return {
        "frames": state.frames_done, "fps": plan.fps, "duration_s": state.frames_done / plan.fps,
        "wall_s": summary.wall_s, "sample_s_total": state.sample_seconds,
        "segments": summary.segments, "resumed_from_segment": summary.resumed_from,
        "model_calls": state.model_calls, "rows": state.rows,
        "block_evals": state.accel.block_evals, "block_evals_full": state.accel.block_evals_full,
        "block_eval_fraction": state.accel.compute_fraction, "modes": state.accel.modes.to_dict(),
        "seed": plan.spec.seed, "prompt": plan.spec.prompt, "model": plan.spec.model or "procedural (embedded)",
        "schedule": asdict(plan.args), "backend": plan.spec.backend, "stages": plan.spec.stages,
        "accel": plan.accel.method, "accel_config": plan.accel.to_dict(),
        "accel_config_source": plan.accel_source, "accel_schedule_mismatch": plan.accel_mismatch,
        "accel_stats": stats, "rng": {"scheme": RNG_SCHEME, "seed": plan.spec.seed},
        "spec_fingerprint": plan.spec.fingerprint(), "peak_rss_mb": peak_rss_mb(), **(extra or {}),
    }


def peak_rss_mb() -> float:
    """This process's peak resident set size (the driver; Ray stage workers are not included)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dumps_stats(stats: dict[str, Any]) -> bytes:
    """Strict JSON: a non-finite float (an unbounded `eps_error` = inf) is written as the string
    "inf" / "-inf" / "nan", never as the invalid bare tokens Python's json emits by default."""
    buffer = io.StringIO()
    json.dump(_finite_json(stats), buffer, indent=1, default=str, allow_nan=False)
    return buffer.getvalue().encode()


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


__all__ = ["Draws", "Progress", "RunFault", "RunState", "RunSummary", "SegmentSampler", "SegmentWriter",
           "SpecError", "VideoRun", "dumps_stats", "summary_stats"]


# ------------------------------------------------------------------------------------ backends

def _cluster_has_gpus() -> bool:
    """device auto on the Ray backend: each stage takes a GPU when the cluster has any."""
    from cluster.api import ensure_ray

    import ray

    ensure_ray()
    return ray.cluster_resources().get("GPU", 0) > 0

class open_sampler:   # noqa: N801  (used as a context manager)
    """The backend the spec names, as a context manager yielding a `SegmentSampler`:
    local = `DFPipeline` over the in-process model with the accelerator hooks attached from
    outside (MAGI-1: `jobs.magi.MagiSegmentSampler`, its walk chunk by chunk); ray = a
    `RaySegmentSampler` over one replica of `spec.stages` stages ($RAY_ADDRESS, the job's
    cluster under `ray job submit`, or a local Ray)."""

    def __init__(self, plan: VideoPlan, loaded: LoadedVideo):
        self.plan, self.loaded = plan, loaded
        self._ray: Any = None
        self._magi: Any = None

    def __enter__(self) -> SegmentSampler:
        if self.plan.spec.backend == "ray":
            from cluster.families import ModelSpec
            from cluster.replica import ReplicaConfig
            from cluster.segments import RaySegmentSampler

            gpus = 1.0 if self.plan.spec.device.startswith("cuda") or (
                self.plan.spec.device == "auto" and _cluster_has_gpus()) else 0.0
            config = ReplicaConfig(model=ModelSpec(source=self.plan.source), stages=self.plan.spec.stages,
                                   accel=self.plan.accel, gpus_per_worker=gpus)
            self._ray = RaySegmentSampler(config)
            return self._ray
        if getattr(self.plan, "family", "skyreels-v2") == "magi-1":
            from jobs.magi import open_magi_sampler

            self._magi = open_magi_sampler(self.plan, self.loaded)      # the walk, chunk by chunk
            return self._magi
        from pipelines.families import table
        from pipelines.skyreels_v2.pipeline import DFPipeline
        from scope.hooks import apply_accel, remove_accel

        remove_accel(self.loaded.model)
        adapter = table(getattr(self.plan, "family", "skyreels-v2")).accel_adapter()   # the family's table
        accel = apply_accel(self.loaded.model, self.plan.accel, adapter)
        return DFPipeline(self.loaded.model, accel=accel)

    def __exit__(self, *exc: Any) -> None:
        if self._ray is not None:
            self._ray.shutdown()
        else:
            from scope.hooks import remove_accel

            if self._magi is not None:
                self._magi.close()

            remove_accel(self.loaded.model)
