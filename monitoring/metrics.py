"""Every metric of the system, defined once: name, type, help, labels, buckets.

Names are what Prometheus stores. The series are exported through Ray's metrics agent
(`ray.util.metrics`, one endpoint per node on `--metrics-export-port`), which puts Ray's
namespace in front (`ray_`) and the `_total` suffix after a counter's base name; `ray_name`
is the name handed to `ray.util.metrics`, `series` the name Prometheus sees. Ray also adds
`NodeAddress`, `WorkerId` (one per process), `SessionName`, `Component` and `Version` to every
series: recording rules group by `NodeAddress` + `WorkerId` when they need a process.

Conventions (Prometheus): counters end in `_total`, times are `_seconds`, sizes `_bytes`,
ratios `_ratio` in [0, 1], base units only; every label takes values from a bounded set
(`LABEL_VALUES`, or bounded by construction: a model per deployment, a stage index per
replica, a job id per running job).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

NAMESPACE = "ray"                 # what Ray's agent puts in front of application metrics
METRICS_EXPORT_PORT = 8080        # `ray start --metrics-export-port` in every shipped manifest
DASHBOARD_PORT = 8265             # Ray job API (`ray job submit --address http://head:8265`)
GCS_PORT = 6379
CLIENT_PORT = 10001

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

# bounded label values (a value outside its set is a bug: `check_labels` refuses it)
JOB_KINDS = ("long_video", "dataset")
MODES = ("recompute", "cache", "predict", "skip")           # scope.scheduler.MODES
FAIL_REASONS = ("invalid_row", "rejected", "non_finite")   # manifest/spec, input the model refuses, NaN
RESTART_KINDS = ("stage_worker", "video_maker")
LABEL_VALUES: dict[str, tuple[str, ...]] = {"job_kind": JOB_KINDS, "mode": MODES, "reason": FAIL_REASONS,
                                            "kind": RESTART_KINDS}
MAX_LABEL_CHARS = 64               # free-form labels (model, method, job_id) are cut to this

# denoising-step latency: a tiny CPU model (~10 ms) up to a 14B model's step on one GPU (~1 min)
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)


@dataclass(frozen=True)
class MetricDef:
    name: str                       # Prometheus name without the namespace
    kind: str                       # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def ray_name(self) -> str:
        """The name given to `ray.util.metrics` (Ray appends `_total` to a counter)."""
        return self.name.removesuffix("_total") if self.kind == COUNTER else self.name

    @property
    def series(self) -> str:
        """The series name Prometheus stores (histograms add `_bucket`, `_sum`, `_count`)."""
        return f"{NAMESPACE}_{self.name}"

    def series_names(self) -> tuple[str, ...]:
        if self.kind == HISTOGRAM:
            return tuple(f"{self.series}_{part}" for part in ("bucket", "sum", "count"))
        return (self.series,)


# ------------------------------------------------------------------------------------ the table

FRAMES_GENERATED = MetricDef(
    "scope_frames_generated_total", COUNTER,
    "Video frames generated (decoded from committed latents), by the process that ran the segment loop",
    ("job_kind", "model"))
SEGMENTS_FINISHED = MetricDef(
    "scope_segments_finished_total", COUNTER, "Segments denoised, committed and written",
    ("job_kind", "model"))
VIDEOS_FINISHED = MetricDef(
    "scope_videos_finished_total", COUNTER, "Videos completed (long video: joined; dataset: row committed)",
    ("job_kind", "model"))
MODEL_CALLS = MetricDef(
    "scope_model_calls_total", COUNTER, "Transformer calls (one per CFG branch per denoising step)",
    ("job_kind", "model"))
BLOCK_EVALS_RUN = MetricDef(
    "scope_block_evals_run_total", COUNTER,
    "Transformer block evaluations run (one block on one chunk's frames in one call)",
    ("job_kind", "model", "method"))
BLOCK_EVALS_SAVED = MetricDef(
    "scope_block_evals_saved_total", COUNTER,
    "Block evaluations the accelerator did not run (full compute minus run)",
    ("job_kind", "model", "method"))
CHUNK_CALLS = MetricDef(
    "scope_chunk_calls_total", COUNTER, "Chunk calls: one per window chunk per model call (each gets one mode)",
    ("job_kind", "model", "method"))
CHUNK_MODES = MetricDef(
    "scope_chunk_modes_total", COUNTER, "Chunk calls by the mode SCOPE (or a baseline) chose; sums to chunk calls",
    ("job_kind", "model", "method", "mode"))
STEP_SECONDS = MetricDef(
    "scope_denoising_step_seconds", HISTOGRAM,
    "Wall time of one denoising step (one row of the timestep matrix: every CFG branch)",
    ("job_kind", "model"), STEP_SECONDS_BUCKETS)
WORKER_GPUS = MetricDef(
    "scope_worker_gpus", GAUGE,
    "GPUs the videos of this process run on (a replica's stages, or the actor's own); 0 on CPU",
    ("job_kind",))
QUEUE_DEPTH = MetricDef(
    "scope_queue_depth", GAUGE, "Work items of a job not finished yet (dataset: rows; long video: segments)",
    ("job_kind", "job_id"))
IN_FLIGHT = MetricDef(
    "scope_requests_in_flight", GAUGE, "Videos this process is generating right now", ("job_kind",))
CACHE_BYTES = MetricDef(
    "scope_accel_cache_bytes", GAUGE,
    "Accelerator state one rank holds (residual history, K/V, indicator inputs), read at each segment's end",
    ("job_kind", "stage", "sp_rank"))
STAGE_BUSY = MetricDef(
    "scope_stage_busy_seconds_total", COUNTER, "Seconds a pipeline-stage worker spent in forward calls",
    ("stage", "sp_rank"))
STAGE_CALLS = MetricDef(
    "scope_stage_calls_total", COUNTER, "Forward calls (or chunk micro-batches) a pipeline-stage worker ran",
    ("stage", "sp_rank"))
JOB_PROGRESS = MetricDef(
    "scope_job_progress_ratio", GAUGE, "Fraction of a job done (long video: segments; dataset: rows)",
    ("job_kind", "job_id"))
JOB_LAST_PROGRESS = MetricDef(
    "scope_job_last_progress_timestamp_seconds", GAUGE,
    "Unix time of the job's last finished work item (or its start)", ("job_kind", "job_id"))
ROWS_FAILED = MetricDef(
    "scope_rows_failed_total", COUNTER, "Dataset rows recorded as errors, by reason", ("reason",))
WORKER_RESTARTS = MetricDef(
    "scope_worker_restarts_total", COUNTER,
    "Worker actors restarted by Ray or replaced after a fault", ("kind",))

METRICS: tuple[MetricDef, ...] = (
    FRAMES_GENERATED, SEGMENTS_FINISHED, VIDEOS_FINISHED, MODEL_CALLS, BLOCK_EVALS_RUN, BLOCK_EVALS_SAVED,
    CHUNK_CALLS, CHUNK_MODES, STEP_SECONDS, WORKER_GPUS, QUEUE_DEPTH, IN_FLIGHT, CACHE_BYTES, STAGE_BUSY,
    STAGE_CALLS, JOB_PROGRESS, JOB_LAST_PROGRESS, ROWS_FAILED, WORKER_RESTARTS)
BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}


def exported_series() -> set[str]:
    """Every series name Prometheus can hold for this project's metrics."""
    return {s for m in METRICS for s in m.series_names()}


_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]+")


def free_label(value: object) -> str:
    """A free-form label value (model, method, job id) made safe and short: never a path with
    credentials or an unbounded string."""
    text = _UNSAFE.sub("_", str(value)).strip("_") or "unknown"
    return text[:MAX_LABEL_CHARS]


def check_labels(metric: MetricDef, labels: dict[str, str]) -> dict[str, str]:
    """The labels of one observation, checked: exactly the metric's keys, bounded values."""
    if set(labels) != set(metric.labels):
        raise ValueError(f"{metric.name} takes labels {list(metric.labels)}; got {sorted(labels)}")
    for key, value in labels.items():
        allowed = LABEL_VALUES.get(key)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{metric.name}: label {key}={value!r} is not one of {list(allowed)}")
    return {k: str(v) for k, v in labels.items()}
