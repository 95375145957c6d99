"""`Coordinator`: owns requests, drives each one's AR loop on a replica, commits finished segments.

Serve = take a request from the queue -> run `DFPipeline` on a replica whose model is a
`RemoteModel` (each call goes through the replica's stages) -> commit every finished segment to
decode exactly once. Several requests run at once on each replica (their calls interleave in the
stages' pipeline) and many replicas drain one queue (data parallel).

Faults: a call that fails (a stage worker died, or the replica was recovered under it) makes the
request recover the replica (once per epoch) and run `DFPipeline.generate` again with the
segments it already committed as `resume`, its RNG restored to the start of the current
segment: the replay is deterministic, and a committed segment is never sampled or decoded again
(commits are idempotent by (request, segment)).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from cluster.replica import CallFuture, Replica, ReplicaReset
from pipelines.skyreels_v2.pipeline import DFPipeline, DFResult, ScheduleArgs, SegmentInfo


@dataclass
class VideoRequest:
    """One video to generate (the arguments of `DFPipeline.generate`)."""

    request_id: str
    noise: torch.Tensor | Sequence[torch.Tensor]
    context: torch.Tensor
    negative_context: torch.Tensor | None = None
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    prefix_latents: torch.Tensor | None = None
    addnoise_eps: Any = None   # tensor(s) or a torch.Generator; None draws from a generator seeded by `seed`
    seed: int = 0


@dataclass(frozen=True)
class SegmentOutput:
    """A finished segment as decode receives it: the latents it adds to the video."""

    request: str
    segment: int
    latents: torch.Tensor        # [C, new frames, H, W] (the overlap with the previous segment removed)
    info: SegmentInfo


class SegmentSink:
    """Commits finished segments to decode exactly once, keyed by (request, segment).

    `decode` is a callable taking a `SegmentOutput`, or a Ray actor handle with a `decode` method
    (called asynchronously; `wait()` collects what it returned).
    """

    def __init__(self, decode: Callable[[SegmentOutput], Any] | Any | None = None):
        self.decode = decode
        self.committed: dict[tuple[str, int], SegmentOutput] = {}
        self.attempts: dict[tuple[str, int], int] = {}
        self.decoded: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def commit(self, output: SegmentOutput) -> bool:
        """True when this call committed the segment, False when it already was."""
        key = (output.request, output.segment)
        with self._lock:
            self.attempts[key] = self.attempts.get(key, 0) + 1
            if key in self.committed:
                return False
            self.committed[key] = output
        if self.decode is None:
            return True
        if callable(self.decode):
            self.decoded[key] = self.decode(output)
        else:
            self.decoded[key] = self.decode.decode.remote(output)
        return True

    def wait(self) -> dict[tuple[str, int], Any]:
        """Decode results by key (actor results fetched)."""
        return {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in self.decoded.items()}


class RemoteModel:
    """What `DFPipeline` sees as its model and accelerator for one request on one replica.

    As the model: `submit(...)` sends the call through the replica's stages (`__call__` waits for
    it). As the accelerator (only when the replica accelerates): `call(ctx)` scopes the next
    submit, `end_request(rid)` collects the segment's stats from the stages.
    """

    def __init__(self, replica: Replica, request_id: str):
        self.replica, self.request_id = replica, request_id
        self.epoch = replica.epoch
        self._ctx: Any = None
        self._feedback: dict[tuple[str, str], Any] = {}
        self._outstanding: list[CallFuture] = []

    def __call__(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.submit(x, **kwargs).result()

    def submit(self, x: torch.Tensor, *, t: torch.Tensor, context: torch.Tensor,
               fps: list[int] | None = None, causal_block_size: int | None = None) -> _Pending:
        ctx = self._ctx
        key = None if ctx is None else (ctx.request, ctx.branch)
        future = self.replica.submit(x, t, context, fps, causal_block_size,
                                     request=self.request_id if ctx is None else ctx.request, ctx=ctx,
                                     feedback=self._feedback.pop(key, None), epoch=self.epoch)
        self._outstanding = [f for f in self._outstanding if not f.done] + [future]
        return _Pending(self, future, key)

    def drain(self, timeout_s: float = 10.0) -> None:
        """After a fault: collect the calls the pipeline abandoned, so their errors are handled."""
        for future in self._outstanding:
            future.discard(timeout_s)
        self._outstanding = []

    @contextmanager
    def call(self, ctx: Any) -> Iterator[RemoteModel]:
        self._ctx = ctx
        try:
            yield self
        finally:
            self._ctx = None

    def end_request(self, request: str) -> Any:
        self.check_epoch()
        feedback = {branch: ref for (req, branch), ref in self._feedback.items() if req == request}
        for branch in feedback:
            del self._feedback[(request, branch)]
        stats = self.replica.end_request(request, feedback)
        self.check_epoch()
        return stats

    def check_epoch(self) -> None:
        if self.replica.epoch != self.epoch:
            raise ReplicaReset(f"{self.replica.name} was recovered while {self.request_id} ran on it")


class _Pending:
    """One submitted call; keeps its feedback reference for the next call of its branch."""

    def __init__(self, model: RemoteModel, future: CallFuture, key: tuple[str, str] | None):
        self.model, self.future, self.key = model, future, key

    def result(self) -> torch.Tensor:
        out = self.future.result()
        if self.key is not None and self.future.feedback is not None:
            self.model._feedback[self.key] = self.future.feedback
        return out


@dataclass
class _Checkpoint:
    """What a request needs to resume: committed segments and the RNG state at the next one."""

    segments: list[SegmentInfo] = field(default_factory=list)
    rng_state: torch.Tensor | None = None


class Coordinator:
    """Serves a queue of `VideoRequest`s on replicas; see the module docstring."""

    def __init__(self, replicas: Sequence[Replica], decode: Callable[[SegmentOutput], Any] | Any | None = None,
                 *, requests_per_replica: int = 2, max_attempts: int = 3,
                 progress: Callable[[str, int, int], None] | None = None):
        if not replicas:
            raise ValueError("a Coordinator needs at least one replica")
        if requests_per_replica < 1 or max_attempts < 1:
            raise ValueError("requests_per_replica and max_attempts must be >= 1")
        self.replicas = list(replicas)
        self.sink = SegmentSink(decode)
        self.requests_per_replica, self.max_attempts = requests_per_replica, max_attempts
        self.progress = progress
        self.served_by: dict[str, list[str]] = {}   # request -> replica names it ran on (replays included)
        self.faults: list[tuple[str, str]] = []     # (request, error) of every replayed attempt

    # -- serving ---------------------------------------------------------------------------------
    def run(self, requests: Sequence[VideoRequest]) -> list[DFResult]:
        """Generate every request (data parallel over replicas); results in request order."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids must be unique; got {ids}")
        todo: queue.Queue[tuple[VideoRequest, Future]] = queue.Queue()
        futures = []
        for request in requests:
            future: Future = Future()
            todo.put((request, future))
            futures.append(future)
        threads = [threading.Thread(target=self._drain, args=(replica, todo), daemon=True,
                                    name=f"{replica.name}-slot{i}")
                   for replica in self.replicas for i in range(self.requests_per_replica)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [f.result() for f in futures]

    def _drain(self, replica: Replica, todo: queue.Queue) -> None:
        while True:
            try:
                request, future = todo.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(self.serve(replica, request))
            except BaseException as err:  # the caller sees it through the future
                future.set_exception(err)

    def serve(self, replica: Replica, request: VideoRequest) -> DFResult:
        """One request on one replica, to completion: generate, and on a fault recover and resume."""
        generator = request.addnoise_eps
        if generator is None:
            generator = torch.Generator().manual_seed(request.seed)
        checkpoint = _Checkpoint(rng_state=_rng_state(generator))
        for attempt in range(1, self.max_attempts + 1):
            self.served_by.setdefault(request.request_id, []).append(replica.name)
            model = RemoteModel(replica, request.request_id)
            accel = model if replica.config.accel is not None else None
            pipeline = DFPipeline(model, accel)
            _set_rng_state(generator, checkpoint.rng_state)
            try:
                return pipeline.generate(
                    request.noise, request.context, request.negative_context, request.schedule,
                    prefix_latents=request.prefix_latents, addnoise_eps=generator,
                    request_id=request.request_id, progress=self._progress_for(request.request_id),
                    resume=list(checkpoint.segments),
                    on_segment=lambda info: self._commit(request, model, info, checkpoint, generator))
            except (ray.exceptions.RayError, ReplicaReset) as err:
                self.faults.append((request.request_id, f"{type(err).__name__}: {err}"[:300]))
                model.drain()
                if attempt == self.max_attempts:
                    raise
                replica.recover(model.epoch)
        raise AssertionError("unreachable")

    def _commit(self, request: VideoRequest, model: RemoteModel, info: SegmentInfo,
                checkpoint: _Checkpoint, generator: Any) -> None:
        """A segment is final: checkpoint it (latents, RNG at the next segment) and decode it once."""
        model.check_epoch()  # never commit what a recovered replica computed
        overlap = request.schedule.overlap_frames or 0
        new = info.latents if info.plan.index == 0 else info.latents[:, overlap:]
        checkpoint.segments.append(info)
        checkpoint.rng_state = _rng_state(generator)
        self.sink.commit(SegmentOutput(request.request_id, info.plan.index, new, info))

    def _progress_for(self, request_id: str) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None
        return lambda done, total: self.progress(request_id, done, total)


def _rng_state(source: Any) -> torch.Tensor | None:
    return source.get_state() if isinstance(source, torch.Generator) else None


def _set_rng_state(source: Any, state: torch.Tensor | None) -> None:
    if isinstance(source, torch.Generator) and state is not None:
        source.set_state(state)
