"""`StageWorker`: one pipeline stage of one replica (a Ray actor per GPU, per CPU slot in tests).

A stage holds a contiguous range of transformer blocks (stage 0 also embeds the latents, the
last stage also runs the head) and, for its own blocks only, the acceleration state: residual
history per (request, CFG branch, chunk) and chunk K/V, its per-rank cache shard. Stage 0
decides each call's plan (a mode per chunk and the frames to run) and the plan travels
downstream with the hidden states, so every stage of a replica always agrees; Cache and Predict
steps need no traffic between stages.

One call through a stage: rebuild the conditioning -> take the hidden states -> plan (decide on
stage 0, follow on the others) -> run this stage's blocks -> hand off (or unembed, last stage).

Exactness across stages. A chunk that runs only as attention context (mode `skip`) leaves the
in-process stack with its input unchanged, but inside that one stack call every block saw its
propagated hidden states. Across stages the next stage must see those too, so a stage hands off
the computed output of such chunks (the sampler discards them anyway). The SCOPE error
estimate needs residuals of the *whole* stack: the last stage returns the stack output of the
chunks that ran (`feedback`), the coordinator passes it (by reference) to stage 0's next call of
that (request, branch), and stage 0 keeps a whole-stack residual mirror from it, so decisions
and stats equal the in-process run.
"""
from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from cluster.families import ModelSpec, family_of
from cluster.messages import GroupSpec, Handoff, ModelCall, StageStats
from cluster.transport import ObjectStoreTransport, TorchDistTransport, Transport

MAX_PARTS = 4096  # chunk micro-batches per call (transport tags are key * MAX_PARTS + part)


@dataclass(frozen=True)
class StageOptions:
    """Per-worker settings (the same for every stage of a replica)."""

    accel: Any = None                          # scope AccelConfig, or None
    counts: tuple[int, ...] | None = None      # blocks per stage (None: even split)
    device: str = "cpu"                        # "cuda" on GPU workers
    num_threads: int | None = None             # torch intra-op threads (None: leave as is)
    feedback: bool = False                     # stage 0 keeps a whole-stack residual mirror


@dataclass
class _Stream:
    """A call streamed as chunk micro-batches: its window conditioning and the K/V of earlier parts."""

    inputs: Any
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


class _Served:
    """K/V entry placeholder in the decision-side mirror (which never runs blocks)."""


SERVED = _Served()


class StageWorker:
    """Blocks [start, end) of one replica, their SCOPE shard and K/V; see the module docstring."""

    def __init__(self, spec: ModelSpec, stage_index: int, num_stages: int, options: StageOptions,
                 sp_rank: int = 0):
        if options.num_threads:
            torch.set_num_threads(options.num_threads)
        quiet_zero_copy_warnings()
        self.spec, self.index, self.num_stages = spec, stage_index, num_stages
        self.options, self.sp_rank = options, sp_rank
        self.family = family_of(spec)
        self.device = torch.device(options.device)
        # rebuilding a lost stage = this constructor again: weights from the spec
        self._model = self.family.load_stage_model(spec, stage_index, num_stages, options.counts,
                                                   options.device)
        self.stage: Any = None
        self.transport: Transport = ObjectStoreTransport()
        self.stats = StageStats()
        self._group: GroupSpec | None = None
        from monitoring.publish import JobMetrics

        self.metrics = JobMetrics("long_video")             # published at request ends, never per call
        self.metrics.restart_seen("stage_worker")            # counts one when Ray rebuilt this actor

    # -- lifecycle -------------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> bool:
        return True

    def free_port(self) -> tuple[str, int]:
        """An address of this node and a free TCP port on it (for the replica's group)."""
        address = "127.0.0.1" if self.options.device == "cpu" else _node_address()
        with socket.socket() as s:
            s.bind((address, 0))
            return address, s.getsockname()[1]

    def connect(self, group: GroupSpec | None) -> int:
        """(Re)join the replica: torch.distributed group if any, parallelize, fresh state. -> pid."""
        self.transport.close(wait=False)
        sp_group = self._join(group) if group is not None else None
        self.stage = self.family.parallelize(self._model, self.index, self.num_stages,
                                             counts=self.options.counts, sp_group=sp_group)
        self.transport = self._transport(group)
        self.reset()
        return os.getpid()

    def configure(self, options: StageOptions) -> None:
        """New per-worker settings (another acceleration config); drops every request's state."""
        if options.counts != self.options.counts or options.device != self.options.device:
            raise ValueError("configure cannot change the block split or the device of a stage")
        self.options = options
        if options.num_threads:
            torch.set_num_threads(options.num_threads)
        self.reset()

    def reset(self) -> None:
        """Drop every request's state (after a fault, the replica replays)."""
        cfg = self.options.accel
        self.decider = self.executor = None
        self._awaiting: dict[tuple[str, str], tuple[Any, Tensor, Any]] = {}
        self._streams: dict[int, _Stream] = {}
        self._last_subset: Tensor | None = None
        if hasattr(self.stage, "reset"):
            self.stage.reset()                 # state the stage object keeps itself (MAGI-1: its K/V shard)
        if cfg is None:
            return
        from scope.executor import StageExecutor
        from scope.hooks import make_accelerator
        self.adapter = self.family.accel_adapter()
        L, (start, end) = self.stage.num_blocks, (self.stage.start, self.stage.end)
        if self.whole:
            self.decider = make_accelerator(cfg, self.adapter, L)
            self.executor = self.decider.executor
            return
        if self.stage.is_first and self.options.feedback:
            # decisions need whole-stack residuals: decide on a whole-stack mirror fed back by
            # the last stage; this stage executes its own range on its own unit states
            self.decider = make_accelerator(cfg, self.adapter, L, block_range=(0, L))
        elif self.stage.is_first:
            # decide on this stage's own unit states (one object per unit, nothing mirrored)
            self.decider = make_accelerator(cfg, self.adapter, L, block_range=(start, end))
            self.executor = self.decider.executor
            return
        self.executor = StageExecutor(cfg, self.adapter, start, end)

    @property
    def whole(self) -> bool:
        """This stage holds every block (one-stage replica)."""
        return self.num_stages == 1

    def end_request(self, request: str, branches: list[str] | None = None, *feedback: Tensor) -> Any:
        """Drop a request's state; stage 0 returns its RequestStats (after the final feedback)."""
        if hasattr(self.stage, "end_request"):
            self.stage.end_request(request)
        if self.options.accel is None:
            self._publish_stats()
            return None
        for branch, fb in zip(branches or [], feedback):
            self._apply_feedback(request, branch, fb)
        for key in [k for k in self._awaiting if k[0] == request]:
            del self._awaiting[key]
        self.executor.end_request(request)
        stats = None if self.decider is None else self.decider.end_request(request)
        self._publish_stats()
        return stats

    def _publish_stats(self) -> None:
        """Plain stats out at a request's end (a segment boundary): calls, busy seconds, and the
        bytes this rank's accelerator state held when the request ended."""
        held = None
        if self.executor is not None:
            held = self.executor.bytes_at_end or 0
            mirror = getattr(self.decider, "executor", None)
            if mirror is not None and mirror is not self.executor:
                held += mirror.bytes_at_end or 0
        self.metrics.stage_done(self.stats, stage=self.index, sp_rank=self.sp_rank, cache_bytes=held)

    def layout(self) -> dict[str, Any]:
        """What this worker runs (for tests and logs)."""
        blocks = getattr(self.stage.model, "blocks", None)
        module = (blocks[self.stage.start].self_attn if blocks is not None           # Wan
                  else self.stage.model.layers[self.stage.start].self_attention)    # MAGI-1
        attn = type(module).__name__
        if getattr(module, "_ds_attention", None) is not None:
            attn += "(deepspeed)"
        return {"stage": self.index, "sp_rank": self.sp_rank, "blocks": (self.stage.start, self.stage.end),
                "sp_world": self.stage.sp_world, "transport": type(self.transport).__name__,
                "attention": attn, "accel": None if self.options.accel is None else self.options.accel.method,
                "pid": os.getpid()}

    def get_stats(self) -> StageStats:
        return self.stats

    def reset_stats(self) -> None:
        self.stats = StageStats()

    def tensor(self, key: str) -> Tensor:
        """One tensor of this stage's model by state-dict key (e.g. a driver's default null caption)."""
        return self.stage.model.state_dict()[key].detach().cpu()

    def kv_summary(self) -> dict[str, Any]:
        """The K/V this stage keeps itself, per request and entry (layers, tokens, bytes)."""
        kv = getattr(self.stage, "kv", None)
        return {} if kv is None else kv.summary()

    # -- the hot path ----------------------------------------------------------------------------
    @torch.no_grad()
    def run_call(self, call: Any, upstream: Handoff | None = None) -> Any:
        """One call of a family whose stage object runs whole calls (MAGI-1: `MagiStage.run_call`, on
        the stage's own K/V shard). Hidden states come and go as in `forward`; the last stage returns
        the model output [B, C, T, H, W]."""
        started = time.perf_counter()
        h = None if self.stage.is_first else self.transport.recv(upstream.payload).to(self.device)
        out = self.stage.run_call(call, h)
        if self.stage.is_last:
            result = out.cpu()
        else:
            result = Handoff(self.transport.send(out, call.key * MAX_PARTS))
        self.stats.add(started, time.perf_counter())
        return result

    @torch.no_grad()
    def forward(self, call: ModelCall, part: int = 0, upstream: Handoff | None = None,
                feedback: Tensor | None = None) -> Any:
        """One call (or one chunk micro-batch of it) through this stage.

        Returns a `Handoff` for the next stage, or on the last stage (velocity [1, C, F, H, W],
        feedback) where feedback is the stack output of the chunks that ran (or None).
        """
        started = time.perf_counter()
        # 1. the call's conditioning, rebuilt here; stage 0 also embeds the latents
        inputs = self._inputs(call, part)
        h = inputs.tokens if self.stage.is_first else self.transport.recv(upstream.payload).to(self.device)
        # 2. the plan: decided once on stage 0, followed by every later stage
        plan = None
        if call.ctx is not None and self.options.accel is not None and not self.whole:
            plan = upstream.plan if upstream is not None else self._decide(call, h, inputs, feedback)
        # 3. this stage's blocks
        out = self._run(call, plan, h, inputs)
        # 4. hand off, or unembed on the last stage
        result = self._emit(call, part, plan, out, inputs)
        self.stats.add(started, time.perf_counter())
        return result

    def _inputs(self, call: ModelCall, part: int) -> Any:
        """BlockInputs of the call (or of micro-batch `part`, with the K/V of earlier parts)."""
        if call.parts == 1:
            return self._embed(call)
        stream = self._streams.get(call.key)
        if stream is None:
            if part != 0:
                raise RuntimeError(f"call {call.key}: part {part} arrived before part 0 "
                                   f"(stages must see micro-batches in order)")
            stream = self._streams[call.key] = _Stream(self._embed(call))
        inputs = stream.inputs.select_frames(call.part_frames(part).to(self.device))
        inputs.kv_prefix = dict(stream.kv) if stream.kv else None
        inputs.kv_record = {}
        return inputs

    def _embed(self, call: ModelCall) -> Any:
        return self.stage.embed(call.x.to(self.device), call.t.to(self.device),
                                call.context.to(self.device), call.fps, call.causal_block_size)

    def _decide(self, call: ModelCall, h: Tensor, inputs: Any, feedback: Tensor | None) -> Any:
        """Stage 0: fold in the previous call's feedback, then decide this call."""
        ctx = call.ctx
        if feedback is not None:
            self._apply_feedback(ctx.request, ctx.branch, feedback)
        policy = self.decider.policy
        probe = None
        if policy.needs_probe:
            kind = policy.probe_kind
            probe = (self.adapter.probe(inputs, h) if kind == "default"
                     else self.adapter.probe(inputs, h, kind=kind))
        plan = self.decider.plan(ctx, probe=probe, h=h)
        if self.options.feedback:
            self._awaiting[(ctx.request, ctx.branch)] = (plan, h, inputs)
        return plan

    def _apply_feedback(self, request: str, branch: str, feedback: Tensor) -> None:
        """Record the whole-stack residuals of the last call of (request, branch) in the mirror."""
        entry = self._awaiting.pop((request, branch), None)
        if entry is None or self.decider is None:
            return
        plan, h, inputs = entry
        stack_out = feedback.to(self.device)

        def replay(h_sub, in_sub, start, end, served, capture):
            return stack_out, [SERVED] * len(capture)

        self.decider.executor.execute(plan, h, inputs, replay)
        self.decider.record_report(plan, self.decider.executor.last_report)

    def _run(self, call: ModelCall, plan: Any, h: Tensor, inputs: Any) -> Tensor:
        """This stage's blocks on the window: plain, accelerated whole stack, or one stage of a plan."""
        if call.ctx is None or self.options.accel is None:
            return self.stage.run_blocks(h, inputs)
        if self.whole:
            return self.decider.run(call.ctx, h, inputs, self._run_fn)
        out = self.executor.execute(plan, h, inputs, self._run_fn)
        self._pass_context_chunks(plan, out, inputs)
        return out

    def _run_fn(self, h: Tensor, inputs: Any, start: int, end: int, served: list[Any],
                capture: list[Tensor]) -> tuple[Tensor, list[Any]]:
        """scope RunFn over this stage (sequence parallel inside `run_blocks`)."""
        if not served and not capture:
            out, captured = self.stage.run_blocks(h, inputs, start, end), []
        else:
            if self.stage.sp_world > 1:
                raise NotImplementedError("K/V serving (kv_cache_finished / kv_cache_stale) is not "
                                          "supported with sequence parallel stages")
            out, captured = self.adapter.run_stack_kv(self.stage.model, h, inputs, start, end,
                                                      served, capture)
        self._last_subset = out
        return out, captured

    def _pass_context_chunks(self, plan: Any, out: Tensor, inputs: Any) -> None:
        """Chunks that ran only as context hand their computed states to the next stage."""
        from scope.scheduler import SKIP
        run = plan.selective.run
        if not run or self._last_subset is None:
            return
        tpc = plan.frames_per_chunk * inputs.tokens_per_frame
        for i, j in enumerate(run):
            if plan.decisions[j].mode == SKIP:
                out[:, j * tpc:(j + 1) * tpc] = self._last_subset[:, i * tpc:(i + 1) * tpc]
        self._last_subset = None

    def _emit(self, call: ModelCall, part: int, plan: Any, out: Tensor, inputs: Any) -> Any:
        if call.parts > 1:
            self._record_part(call, part, inputs)
        lead = self.sp_rank == 0
        if not self.stage.is_last:
            sends = lead or isinstance(self.transport, TorchDistTransport)
            payload = self.transport.send(out, call.key * MAX_PARTS + part) if sends else None
            return Handoff(payload, plan)
        if not lead:
            return None, None
        velocity = self.stage.unembed(out, inputs).cpu()
        feedback = None
        if plan is not None and self.options.feedback:
            tpc = plan.frames_per_chunk * inputs.tokens_per_frame
            run = plan.selective.run
            feedback = (torch.cat([out[:, j * tpc:(j + 1) * tpc] for j in run], dim=1) if run
                        else out[:, :0]).cpu()
        return velocity, feedback

    def _record_part(self, call: ModelCall, part: int, inputs: Any) -> None:
        """Keep this part's K/V for the later parts of the call; forget the call after its last part."""
        stream = self._streams[call.key]
        for layer, (k, v) in inputs.kv_record.items():
            if layer in stream.kv:
                pk, pv = stream.kv[layer]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            stream.kv[layer] = (k, v)
        if part == call.parts - 1:
            del self._streams[call.key]

    # -- group -----------------------------------------------------------------------------------
    def _join(self, group: GroupSpec) -> Any:
        """Join the replica's torch.distributed group; returns this stage's sequence-parallel group."""
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        rank = self.index * group.sequence_parallel + self.sp_rank
        init = f"tcp://{group.address}:{group.port}"
        timeout = timedelta(seconds=group.timeout_s)
        dist.init_process_group(group.backend, init_method=init, rank=rank, world_size=group.world_size,
                                timeout=timeout)
        if group.use_deepspeed:  # DeepSpeed wraps the group just made (DistributedAttention needs it)
            import deepspeed.comm as ds_comm
            ds_comm.init_distributed(dist_backend=group.backend, auto_mpi_discovery=False, verbose=False,
                                     timeout=timeout)
        self._group = group
        sp_group = None
        size = group.sequence_parallel
        if size > 1:
            for s in range(self.num_stages):  # every rank creates every group, in the same order
                g = dist.new_group([s * size + r for r in range(size)])
                if s == self.index:
                    sp_group = g
        return sp_group

    def _transport(self, group: GroupSpec | None) -> Transport:
        if group is None or group.transport == "object_store":
            return ObjectStoreTransport()
        size = group.sequence_parallel
        rank = self.index * size + self.sp_rank
        prev_rank = rank - size if self.index > 0 else None
        next_rank = rank + size if self.index < self.num_stages - 1 else None
        return TorchDistTransport(prev_rank, next_rank, self.device)


def quiet_zero_copy_warnings() -> None:
    """Tensors read from Ray's object store are read-only views; stages never write into them."""
    warnings.filterwarnings("ignore", message="Zero-copy tensor serialization")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _node_address() -> str:
    import ray
    return ray.util.get_node_ip_address()
