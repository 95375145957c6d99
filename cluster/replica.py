"""`Replica`: P stage workers (x S sequence-parallel ranks) placed together, and calls through them.

A call is submitted to every stage at once, each stage's call taking the previous stage's
output by reference, so Ray moves the hidden states actor to actor and the coordinator only
waits for the last stage's velocity. Ray runs the tasks one submitter sends to one actor in
submission order, so every stage sees the calls (and the chunk micro-batches of a call) in the
same order: stage 0 works on the next micro-batch while stage 1 works on the current one.

Micro-batches that fill the pipeline: the other CFG branch (`DFPipeline` submits both before
awaiting either), other requests on the same replica (the coordinator runs several at once),
and, under block-causal attention without acceleration, the chunks of one call: chunk c+1 enters
stage 0 while chunk c is in stage 1, each stage attending to the K/V of earlier chunks it holds.

Faults: workers restart (`max_restarts`); `recover` waits for every worker, rejoins them all
(fresh group, every stage drops its state) and bumps the replica's epoch, so every request that
was running on it replays its current segment.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.families import ModelSpec, family_of
from cluster.messages import GroupSpec, ModelCall, StageStats
from cluster.stage import MAX_PARTS, StageOptions, StageWorker
from cluster.transport import TRANSPORTS

PLACEMENTS = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
WORKER_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}


class ReplicaReset(RuntimeError):
    """The replica was recovered after a fault while this request ran on it: replay the segment."""


@dataclass(frozen=True)
class ReplicaConfig:
    """How one replica is built and placed; checked once, before any actor starts.

    stages: pipeline stages P (blocks split by `counts`, or evenly).
    sequence_parallel: Ulysses ranks S inside each stage (P x S workers); needs a group.
    transport: "object_store" (Ray moves the hidden states; CPU and GPU) or "torch_dist"
        (P2P over the replica's torch.distributed group: NCCL on GPUs, gloo on CPU).
    backend: torch.distributed backend (None: "nccl" when workers have GPUs, else "gloo").
    use_deepspeed: initialise DeepSpeed's communication so Ulysses uses its
        DistributedAttention (None: on GPUs only; on CPU it builds a C++ op first, 22-40 s).
    placement: placement-group strategy; STRICT_PACK keeps a replica on one node (NVLink).
    num_threads: torch threads per worker (1 on a shared CPU box).
    stream_chunks: stream block-causal calls chunk by chunk through the stages (no accel).
    """

    model: ModelSpec = ModelSpec()
    stages: int = 1
    sequence_parallel: int = 1
    counts: tuple[int, ...] | None = None
    accel: Any = None
    transport: str = "object_store"
    backend: str | None = None
    use_deepspeed: bool | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    placement: str = "PACK"
    num_threads: int | None = 1
    stream_chunks: bool = True
    max_restarts: int = 4
    recover_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        for name in ("stages", "sequence_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ReplicaConfig.{name} must be an integer >= 1; got {value!r}")
        layers = family_of(self.model).num_layers(self.model)
        if self.stages > layers:
            raise ValueError(f"ReplicaConfig.stages ({self.stages}) cannot exceed the model's "
                             f"{layers} blocks (each stage needs at least one)")
        if self.counts is not None:
            object.__setattr__(self, "counts", tuple(self.counts))
            if len(self.counts) != self.stages or sum(self.counts) != layers or min(self.counts) < 1:
                raise ValueError(f"ReplicaConfig.counts must give each of the {self.stages} stages "
                                 f">= 1 block, summing to {layers}; got {list(self.counts)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"ReplicaConfig.transport must be one of {TRANSPORTS}; got {self.transport!r}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"ReplicaConfig.backend must be None, 'gloo' or 'nccl'; got {self.backend!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ReplicaConfig.placement must be one of {PLACEMENTS}; got {self.placement!r}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("ReplicaConfig.cpus_per_worker / gpus_per_worker must be >= 0")
        family = family_of(self.model)
        if family.check_replica is not None:
            family.check_replica(self)
        self._check_accel()

    def _check_accel(self) -> None:
        cfg = self.accel
        if cfg is None:
            return
        if self.stages > 1 and cfg.needs_whole_stack:
            raise ValueError(f"{cfg.method} decides from block 0's output and skips the rest of the "
                             f"stack: it needs the whole stack in one stage (stages=1)")
        if self.stages > 1 and not cfg.reuse_context_outputs:
            raise ValueError("with stages > 1 an active chunk that runs as context must take its computed "
                             "output (the next stage attends to it): set reuse_context_outputs=true")
        if self.sequence_parallel > 1 and (cfg.kv_cache_finished or cfg.kv_cache_stale):
            raise ValueError("K/V serving (kv_cache_finished / kv_cache_stale) is not supported with "
                             "sequence_parallel > 1; set both to false")

    @property
    def workers(self) -> int:
        return self.stages * self.sequence_parallel

    @property
    def needs_group(self) -> bool:
        return self.sequence_parallel > 1 or self.transport == "torch_dist"

    @property
    def feedback(self) -> bool:
        """Stage 0 needs whole-stack residuals for SCOPE's embedded error estimate."""
        cfg = self.accel
        return self.stages > 1 and cfg is not None and cfg.needs_stack_feedback

    def stage_options(self) -> StageOptions:
        return StageOptions(accel=self.accel, counts=self.counts,
                            device="cuda" if self.gpus_per_worker > 0 else "cpu",
                            num_threads=self.num_threads, feedback=self.feedback)


class CallFuture:
    """A call in flight through a replica; `result()` gives the velocity [1, C, F, H, W]."""

    def __init__(self, replica: Replica, velocities: list[Any], feedback: Any, others: list[Any],
                 epoch: int):
        self.replica, self.velocities, self.feedback = replica, velocities, feedback
        self.others, self.epoch = others, epoch
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def discard(self, timeout_s: float) -> None:
        """Wait a little for an abandoned call and swallow its outcome (failed calls included)."""
        if self._done:
            return
        self._done = True
        self._swallow(timeout_s)

    def _swallow(self, timeout_s: float = 0.0) -> None:
        refs = [*self.velocities, *self.others]
        if self.feedback is not None:
            refs.append(self.feedback)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass

    def result(self) -> torch.Tensor:
        self._done = True
        try:
            parts = ray.get(self.velocities)
            ray.get(self.others)
        except ray.exceptions.RayError:
            self._swallow(5.0)  # the other outcomes of a failed call are read, not left unhandled
            if self.replica.epoch != self.epoch:
                raise ReplicaReset(f"{self.replica.name} was recovered during this call") from None
            raise
        if self.replica.epoch != self.epoch:
            raise ReplicaReset(f"{self.replica.name} was recovered during this call")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class Replica:
    """P x S `StageWorker` actors in one placement group; see the module docstring."""

    def __init__(self, config: ReplicaConfig, name: str = "replica-0"):
        self.config, self.name = config, name
        self.epoch = 0
        self._keys = itertools.count()
        self._lock = threading.Lock()
        bundle = {"CPU": config.cpus_per_worker}
        if config.gpus_per_worker:
            bundle["GPU"] = config.gpus_per_worker
        self.pg = placement_group([dict(bundle) for _ in range(config.workers)], strategy=config.placement)
        ray.get(self.pg.ready(), timeout=config.recover_timeout_s)
        S = config.sequence_parallel
        self.workers: list[list[Any]] = [[self._start_worker(s, r) for r in range(S)]
                                         for s in range(config.stages)]
        self.pids: list[list[int]] = []
        self._connect()

    # -- workers ---------------------------------------------------------------------------------
    def _start_worker(self, stage: int, sp_rank: int) -> Any:
        cfg = self.config
        actor = ray.remote(StageWorker).options(
            num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
            max_restarts=cfg.max_restarts, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=stage * cfg.sequence_parallel + sp_rank),
            runtime_env={"env_vars": dict(WORKER_ENV)},
            name=None)
        return actor.remote(cfg.model, stage, cfg.stages, cfg.stage_options(), sp_rank)

    def _all(self) -> list[Any]:
        return [w for ranks in self.workers for w in ranks]

    def _connect(self) -> None:
        cfg = self.config
        group = None
        if cfg.needs_group:
            address, port = ray.get(self.workers[0][0].free_port.remote())
            gpu = cfg.gpus_per_worker > 0
            group = GroupSpec(address=address, port=port, world_size=cfg.workers,
                              backend=cfg.backend or ("nccl" if gpu else "gloo"),
                              sequence_parallel=cfg.sequence_parallel, transport=cfg.transport,
                              use_deepspeed=gpu if cfg.use_deepspeed is None else cfg.use_deepspeed)
        pids = ray.get([w.connect.remote(group) for w in self._all()], timeout=cfg.recover_timeout_s)
        S = cfg.sequence_parallel
        self.pids = [pids[s * S:(s + 1) * S] for s in range(cfg.stages)]

    # -- calls -----------------------------------------------------------------------------------
    def submit(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, fps: list[int] | None,
               causal_block_size: int | None, *, request: str, ctx: Any = None,
               feedback: Any = None, epoch: int | None = None) -> CallFuture:
        """Send one model call through every stage; nothing waits here."""
        epoch = self.epoch if epoch is None else epoch
        if epoch != self.epoch:
            raise ReplicaReset(f"{self.name} was recovered since this request's segment began")
        parts = self._parts(x, causal_block_size, ctx)
        call = ModelCall(key=next(self._keys), request=request, x=x.detach().cpu(), t=t.detach().cpu(),
                         context=context.detach().cpu(), fps=None if fps is None else list(fps),
                         causal_block_size=causal_block_size, ctx=ctx, parts=parts)
        with warnings.catch_warnings():  # tensors in the object store are read-only by contract
            warnings.filterwarnings("ignore", message="Zero-copy tensor serialization")
            call_ref = ray.put(call)
        last = self.config.stages - 1
        velocities, others, feedback_ref = [], [], None
        for part in range(parts):
            upstream = None
            for s, ranks in enumerate(self.workers):
                fb = feedback if (s == 0 and part == 0) else None
                refs = []
                for worker in ranks:
                    method = worker.forward.options(num_returns=2) if s == last else worker.forward
                    refs.append(method.remote(call_ref, part, upstream, fb))
                for extra in refs[1:]:
                    others.extend(extra if isinstance(extra, list) else [extra])
                upstream = refs[0]
            velocities.append(upstream[0])
            feedback_ref = upstream[1]
        return CallFuture(self, velocities, feedback_ref, others, epoch)

    def submit_call(self, call: Any, *, epoch: int | None = None) -> CallFuture:
        """Send one whole call of a family whose stages run calls themselves (MAGI-1's `MagiCall`,
        `StageWorker.run_call`) through every stage; nothing waits here. The call gets this
        replica's next key (its transport tag)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch != self.epoch:
            raise ReplicaReset(f"{self.name} was recovered since this request began")
        call = replace(call, key=next(self._keys))
        with warnings.catch_warnings():  # tensors in the object store are read-only by contract
            warnings.filterwarnings("ignore", message="Zero-copy tensor serialization")
            call_ref = ray.put(call)
        upstream = None
        for ranks in self.workers:       # one rank per stage: such families run without sequence parallel
            upstream = ranks[0].run_call.remote(call_ref, upstream)
        return CallFuture(self, [upstream], None, [], epoch)

    def _parts(self, x: torch.Tensor, causal_block_size: int | None, ctx: Any) -> int:
        """Chunk micro-batches: one per causal block under block-causal attention without
        acceleration on a multi-stage replica, else the whole window."""
        cfg = self.config
        if (causal_block_size is None or ctx is not None or cfg.accel is not None or cfg.stages == 1
                or cfg.sequence_parallel > 1 or not cfg.stream_chunks):
            return 1
        parts = math.ceil(x.shape[2] / causal_block_size)
        if parts > MAX_PARTS:
            raise ValueError(f"{parts} chunk micro-batches exceed {MAX_PARTS}; set stream_chunks=False")
        return parts

    def end_request(self, request: str, feedback: dict[str, Any] | None = None) -> Any:
        """Drop a request's state on every stage; stage 0's RequestStats (None without accel)."""
        branches = list(feedback or {})
        refs = [feedback[b] for b in branches]
        outs = ray.get([w.end_request.remote(request, branches, *refs) for w in self._all()])
        return outs[0]

    def set_accel(self, accel: Any) -> None:
        """Serve with another acceleration config (None: plain); every stage drops its state.
        Call between requests, not while any runs."""
        with self._lock:
            self.config = replace(self.config, accel=accel)
            ray.get([w.configure.remote(self.config.stage_options()) for w in self._all()])

    # -- faults ----------------------------------------------------------------------------------
    def recover(self, seen_epoch: int) -> None:
        """After a fault seen in `seen_epoch`: wait for every worker (restarted or replaced), rejoin
        them all with fresh state, and move to a new epoch. Idempotent per epoch."""
        with self._lock:
            if self.epoch != seen_epoch:
                return  # another request already recovered this replica
            self.epoch += 1  # first: calls finishing from now on belong to a dead epoch
            deadline = time.monotonic() + self.config.recover_timeout_s
            for s, ranks in enumerate(self.workers):
                for r, worker in enumerate(ranks):
                    ranks[r] = self._await_worker(worker, s, r, deadline)
            self._connect()

    def _await_worker(self, worker: Any, stage: int, sp_rank: int, deadline: float) -> Any:
        """The worker once it answers (Ray restarts it), or a new one in its bundle."""
        failures = 0
        while True:
            try:
                ray.get(worker.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return worker
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                failures += 1
                if time.monotonic() > deadline or failures >= 3:
                    ray.kill(worker, no_restart=True)
                    from monitoring.publish import JobMetrics

                    JobMetrics("long_video").restart_seen("stage_worker", reconstructed=True)   # replaced
                    return self._start_worker(stage, sp_rank)
                time.sleep(0.5)

    # -- observation -----------------------------------------------------------------------------
    def layout(self) -> list[list[dict[str, Any]]]:
        """Each worker's `StageWorker.layout()`, by stage then sequence-parallel rank."""
        return [ray.get([w.layout.remote() for w in ranks]) for ranks in self.workers]

    def stage_stats(self) -> list[StageStats]:
        """Counters of each stage's lead worker."""
        return ray.get([ranks[0].get_stats.remote() for ranks in self.workers])

    def reset_stats(self) -> None:
        ray.get([w.reset_stats.remote() for w in self._all()])

    def shutdown(self) -> None:
        for worker in self._all():
            ray.kill(worker, no_restart=True)
        remove_placement_group(self.pg)
