"""The Ray backend's entry points: same arguments and result as the in-process `DFPipeline`.

    result = generate_on_ray("tiny", noise, context, negative, ScheduleArgs(...),
                             stages=2, replicas=1, accel=make_config("scope"))
    result.latents  # the same DFResult as DFPipeline(model, accel).generate(...)

`RayCluster` keeps replicas up between calls (tests, benches, a job over many videos):

    with RayCluster(ReplicaConfig(model=ModelSpec("tiny"), stages=2), replicas=2) as cluster:
        results = cluster.generate([VideoRequest(...), ...])
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")  # before ray is imported

import ray  # noqa: E402
import torch  # noqa: E402

from cluster.coordinator import Coordinator, SegmentOutput, VideoRequest  # noqa: E402
from cluster.families import ModelSpec, family_of  # noqa: E402
from cluster.replica import Replica, ReplicaConfig  # noqa: E402
from cluster.stage import quiet_zero_copy_warnings  # noqa: E402
from pipelines.skyreels_v2.pipeline import DFResult, ScheduleArgs  # noqa: E402


def accel_config(accel: Any) -> Any:
    """None, an AccelConfig, a method name ("none", "scope", ...) or a {"method": ...} dict."""
    if accel is None:
        return None
    from scope.config import AccelConfig, make_config
    if isinstance(accel, AccelConfig):
        return accel
    if isinstance(accel, str):
        return make_config(accel)
    if isinstance(accel, dict):
        return AccelConfig.from_dict(accel)
    raise ValueError(f"accel must be None, an AccelConfig, a method name or a dict; got {type(accel).__name__}")


def model_spec(model: ModelSpec | str) -> ModelSpec:
    """A ModelSpec, or a named size / checkpoint path or URL."""
    return model if isinstance(model, ModelSpec) else ModelSpec(source=model)


def ensure_ray() -> None:
    """Connect to $RAY_ADDRESS, or start a local Ray, unless Ray is already up."""
    quiet_zero_copy_warnings()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)


class RayCluster:
    """R replicas of one `ReplicaConfig` and a coordinator over them."""

    def __init__(self, config: ReplicaConfig, replicas: int = 1, *,
                 decode: Callable[[SegmentOutput], Any] | Any | None = None,
                 requests_per_replica: int = 2, max_attempts: int = 3,
                 progress: Callable[[str, int, int], None] | None = None):
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1; got {replicas!r}")
        ensure_ray()
        self.config = config
        self.replicas: list[Replica] = []
        try:
            for i in range(replicas):
                self.replicas.append(Replica(config, name=f"replica-{i}"))
        except BaseException:
            self.shutdown()
            raise
        family = family_of(config.model)
        coordinator = Coordinator if family.coordinator is None else family.coordinator()
        self.coordinator = coordinator(self.replicas, decode, requests_per_replica=requests_per_replica,
                                       max_attempts=max_attempts, progress=progress)

    def generate(self, requests: Sequence[Any]) -> list[Any]:
        """`VideoRequest`s -> `DFResult`s (SkyReels-V2); `cluster.magi.MagiRequest`s -> `MagiResult`s (MAGI-1)."""
        return self.coordinator.run(requests)

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()
        self.replicas = []

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def generate_on_ray(model: ModelSpec | str, noise: torch.Tensor | Sequence[torch.Tensor],
                    context: torch.Tensor, negative_context: torch.Tensor | None = None,
                    schedule_args: ScheduleArgs | None = None, *, stages: int = 1, replicas: int = 1,
                    accel: Any = None, sequence_parallel: int = 1, prefix_latents: torch.Tensor | None = None,
                    addnoise_eps: Any = None, request_id: str = "df", seed: int = 0,
                    decode: Callable[[SegmentOutput], Any] | Any | None = None,
                    cluster: RayCluster | None = None, **replica_options: Any) -> DFResult:
    """One video on Ray; the same `DFResult` as `DFPipeline(model, accel).generate(...)`.

    `replica_options` are further `ReplicaConfig` fields (transport, gpus_per_worker, ...). With
    `cluster` given, its replicas are used (and kept); otherwise a cluster is built and torn down.
    With addnoise_condition > 0, `addnoise_eps=None` draws prefix noise from a generator seeded
    by `seed` (the in-process default draws from the global RNG, which concurrent requests
    cannot share deterministically).
    """
    request = VideoRequest(request_id=request_id, noise=noise, context=context,
                           negative_context=negative_context, schedule=schedule_args or ScheduleArgs(),
                           prefix_latents=prefix_latents, addnoise_eps=addnoise_eps, seed=seed)
    return generate_batch_on_ray(model, [request], stages=stages, replicas=replicas, accel=accel,
                                 sequence_parallel=sequence_parallel, decode=decode, cluster=cluster,
                                 **replica_options)[0]


def generate_batch_on_ray(model: ModelSpec | str, requests: Sequence[VideoRequest], *, stages: int = 1,
                          replicas: int = 1, accel: Any = None, sequence_parallel: int = 1,
                          decode: Callable[[SegmentOutput], Any] | Any | None = None,
                          cluster: RayCluster | None = None, **replica_options: Any) -> list[DFResult]:
    """Many videos over `replicas` data-parallel replicas of `stages` stages each."""
    if cluster is not None:
        if decode is not None:
            cluster.coordinator.sink.decode = decode
        return cluster.generate(requests)
    config = ReplicaConfig(model=model_spec(model), stages=stages, sequence_parallel=sequence_parallel,
                           accel=accel_config(accel), **replica_options)
    with RayCluster(config, replicas, decode=decode) as owned:
        return owned.generate(requests)


def with_accel(config: ReplicaConfig, accel: Any) -> ReplicaConfig:
    """The same replica layout with another acceleration config."""
    return replace(config, accel=accel_config(accel))
