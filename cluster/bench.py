"""Bench of the Ray layer (a function, not a timed test): overhead, pipeline fill, data parallel.

    python -m cluster.bench            # prints the report as JSON

`bench_cluster` measures, side by side on one machine:
1. `ray_over_in_process`: wall clock of one video on a one-stage, one-replica Ray cluster over
   the same video in process (same torch thread count): the Ray layer's overhead;
2. `stage_busy`: busy fraction of each stage of a P-stage replica (time inside `forward` over
   the wall clock) with k requests in flight at once (each also has its two CFG branches in
   flight), i.e. how well micro-batches fill the pipeline;
3. `videos_per_s_per_replica`: throughput per replica as replicas are added (data parallel).
On a machine with fewer cores than workers, (2) and (3) are bounded by the cores, not the design.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cluster.api import RayCluster, ensure_ray
from cluster.coordinator import VideoRequest
from cluster.families import ModelSpec, load_model
from cluster.replica import ReplicaConfig
from pipelines.skyreels_v2.pipeline import DFPipeline, ScheduleArgs

# big enough that a stage call costs more than Ray's per-call overhead on a CPU
BENCH_SPEC = ModelSpec("tiny", overrides=(("dim", 256), ("ffn_dim", 1024), ("num_heads", 4), ("num_layers", 4)))


@dataclass
class BenchReport:
    in_process_s: float
    ray_one_stage_s: float
    ray_over_in_process: float
    stages: int
    stage_busy: dict[int, list[float]] = field(default_factory=dict)       # in flight -> per stage
    pipelined_s: dict[int, float] = field(default_factory=dict)            # in flight -> wall per video
    videos_per_s_per_replica: dict[int, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def bench_requests(count: int, model_cfg: Any, frames: int, size: tuple[int, int], args: ScheduleArgs,
                   prefix: str = "bench") -> list[VideoRequest]:
    """`count` videos of random noise and text embeddings (seeded by their index)."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        noise = torch.randn(model_cfg.in_dim, frames, *size, generator=g)
        context = torch.randn(1, model_cfg.text_len, model_cfg.text_dim, generator=g)
        negative = torch.randn(1, model_cfg.text_len, model_cfg.text_dim, generator=g)
        out.append(VideoRequest(f"{prefix}-{i}", noise, context, negative, args))
    return out


def bench_cluster(spec: ModelSpec = BENCH_SPEC, *, frames: int = 8, size: tuple[int, int] = (8, 8),
                  steps: int = 4, stages: int = 2, in_flight: tuple[int, ...] = (1, 2, 4),
                  replicas: tuple[int, ...] = (1, 2), videos_per_replica: int = 2, num_threads: int = 1,
                  cpus_per_worker: float = 0.5, causal: bool = True) -> BenchReport:
    """Measure the three numbers of the module docstring; see `BenchReport`."""
    ensure_ray()
    torch.set_num_threads(num_threads)
    args = ScheduleArgs(num_steps=steps, guidance_scale=5.0, ar_step=1, causal_block_size=2,
                        causal_attention=causal)
    model = load_model(spec)
    model_cfg = model.config
    requests = lambda n, prefix: bench_requests(n, model_cfg, frames, size, args, prefix)  # noqa: E731
    settings = {"model": {"dim": model_cfg.dim, "num_layers": model_cfg.num_layers}, "frames": frames,
                "size": list(size), "steps": steps, "num_threads": num_threads, "causal": causal,
                "cpu_count": os.cpu_count()}

    # 1. one video in process vs on a one-stage replica
    video = requests(1, "overhead")[0]
    DFPipeline(model).generate(video.noise, video.context, video.negative_context, args)  # warm-up
    started = time.perf_counter()
    DFPipeline(model).generate(video.noise, video.context, video.negative_context, args)
    in_process_s = time.perf_counter() - started
    base = ReplicaConfig(model=spec, stages=1, num_threads=num_threads, cpus_per_worker=cpus_per_worker)
    with RayCluster(base) as cluster:
        cluster.generate(requests(1, "warm"))
        started = time.perf_counter()
        cluster.generate([video])
        ray_s = time.perf_counter() - started
    report = BenchReport(in_process_s, ray_s, ray_s / in_process_s, stages, settings=settings)

    # 2. pipeline fill: k requests in flight on one P-stage replica
    config = ReplicaConfig(model=spec, stages=stages, num_threads=num_threads, cpus_per_worker=cpus_per_worker)
    with RayCluster(config, requests_per_replica=max(in_flight)) as cluster:
        cluster.generate(requests(1, "warm"))
        replica = cluster.replicas[0]
        for k in in_flight:
            cluster.coordinator.requests_per_replica = k
            replica.reset_stats()
            started = time.perf_counter()
            cluster.generate(requests(k, f"fill{k}"))
            wall = time.perf_counter() - started
            report.stage_busy[k] = [round(s.busy_s / wall, 3) for s in replica.stage_stats()]
            report.pipelined_s[k] = round(wall / k, 4)

    # 3. data parallel: throughput per replica as replicas are added
    for r in replicas:
        with RayCluster(base, replicas=r, requests_per_replica=1) as cluster:
            cluster.generate(requests(r, "warm"))
            n = videos_per_replica * r
            started = time.perf_counter()
            cluster.generate(requests(n, f"dp{r}"))
            wall = time.perf_counter() - started
            report.videos_per_s_per_replica[r] = round(n / wall / r, 4)
    return report


if __name__ == "__main__":
    print(bench_cluster().to_json())
