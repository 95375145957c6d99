"""`RaySegmentSampler`: the Ray backend of the segment loop (`jobs.runner.VideoRun`).

    sampler = RaySegmentSampler(ReplicaConfig(model=ModelSpec(source), stages=2, accel=cfg))
    info = sampler.sample_segment(noise, context, negative, args, plan=segment,
                                  prefix_latents=prefix, addnoise_eps=generator, request_id="abc/seg3")

The driver runs the sampler (`DFPipeline.sample_segment`: solver steps, CFG); each model call
goes through the replica's stages (`RemoteModel`). The loop that calls it owns the segments:
this class denoises one and returns it, and only ever returns a segment whose every call ran
on the same replica epoch. A call that fails (a stage worker died, or the replica was recovered
under it) recovers the replica and samples the segment again from its start, with the prefix
noise source rewound: the replay is deterministic, and the loop never sees the fault, so a
segment is committed and written once.
"""
from __future__ import annotations

from typing import Any

import ray
import torch

from cluster.api import ensure_ray
from cluster.coordinator import RemoteModel
from cluster.replica import Replica, ReplicaConfig, ReplicaReset
from pipelines.skyreels_v2.pipeline import DFPipeline, ScheduleArgs, SegmentInfo, SegmentPlan


class RaySegmentSampler:
    """One replica (P stages) that samples segments; see the module docstring."""

    def __init__(self, config: ReplicaConfig, *, max_attempts: int = 3, name: str = "replica-0"):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1; got {max_attempts}")
        ensure_ray()
        self.config, self.max_attempts = config, max_attempts
        self.replica = Replica(config, name=name)
        self.faults: list[tuple[str, str]] = []          # (request, error) of every replayed attempt

    def sample_segment(self, noise: torch.Tensor, context: torch.Tensor, negative_context: torch.Tensor | None,
                       args: ScheduleArgs, *, plan: SegmentPlan, prefix_latents: torch.Tensor | None,
                       addnoise_eps: Any, request_id: str) -> SegmentInfo:
        rewind = addnoise_eps.get_state() if isinstance(addnoise_eps, torch.Generator) else None
        for attempt in range(1, self.max_attempts + 1):
            model = RemoteModel(self.replica, request_id)
            accel = model if self.config.accel is not None else None
            if rewind is not None:
                addnoise_eps.set_state(rewind)
            try:
                info = DFPipeline(model, accel).sample_segment(
                    noise, context, negative_context, args, plan=plan, prefix_latents=prefix_latents,
                    addnoise_eps=addnoise_eps, request_id=request_id)
                model.check_epoch()          # never hand back what a recovered replica computed
                return info
            except (ray.exceptions.RayError, ReplicaReset) as err:
                self.faults.append((request_id, f"{type(err).__name__}: {err}"[:300]))
                model.drain()
                if attempt == self.max_attempts:
                    raise
                self.replica.recover(model.epoch)
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        self.replica.shutdown()

    def __enter__(self) -> RaySegmentSampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
