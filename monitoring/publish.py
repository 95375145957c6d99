"""Publishers: plain stats objects in, metric series out, at segment / row / job boundaries.

The hot path never sees this module: the segment loop, the stage workers and the dataset
workers fill their plain stats (`scope.stats.RequestStats`, a segment's `SegmentInfo`, a
stage's `StageStats`) and call `JobMetrics` once per segment, row or job event, which turns
them into the series of `monitoring.metrics`.

    metrics = JobMetrics("long_video")              # per process; the sink is found at first use
    metrics.segment_done(info, frames=16, model="procedural", method="scope")
    metrics.progress(done=3, total=10)

The sink: Ray's metrics agent (`ray.util.metrics`) when this process is connected to Ray (a
job driver, an actor), else nothing (a plain CLI run, or `SCOPE_METRICS=off`). `MemorySink`
records what would be exported (tests).
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from monitoring import metrics as M


class Sink(Protocol):
    def inc(self, metric: M.MetricDef, value: float, labels: dict[str, str]) -> None: ...
    def set(self, metric: M.MetricDef, value: float, labels: dict[str, str]) -> None: ...
    def observe(self, metric: M.MetricDef, value: float, labels: dict[str, str]) -> None: ...
    def touch(self, metric: M.MetricDef, labels: dict[str, str]) -> None: ...


class NullSink:
    def inc(self, metric, value, labels): pass
    def set(self, metric, value, labels): pass
    def observe(self, metric, value, labels): pass
    def touch(self, metric, labels): pass


class MemorySink:
    """What would be exported, by (series name, labels): counters and gauges their value,
    histograms the list of observations."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}

    @staticmethod
    def _key(metric: M.MetricDef, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return metric.series, tuple(sorted(M.check_labels(metric, labels).items()))

    def inc(self, metric, value, labels):
        key = self._key(metric, labels)
        self.values[key] = self.values.get(key, 0.0) + value

    def set(self, metric, value, labels):
        self.values[self._key(metric, labels)] = float(value)

    def observe(self, metric, value, labels):
        self.values.setdefault(self._key(metric, labels), []).append(value)

    def touch(self, metric, labels):
        self.values.setdefault(self._key(metric, labels), 0.0)

    def get(self, metric: M.MetricDef, **labels: str) -> Any:
        return self.values.get(self._key(metric, labels))


class RaySink:
    """`ray.util.metrics` objects, made once per process and metric.

    Gauges are kept alive: Ray's agent drops a gauge that was not set again within two export
    intervals (measured on Ray 2.60: a value set once is gone after ~2 s at a 1 s interval, in
    a live process), so a daemon thread sets every gauge's last value again each half interval. A
    process that exits or freezes stops doing so, and its gauges disappear: `ScopeJobLost`."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[M.MetricDef, float]] = {}
        self._keeper: threading.Thread | None = None
        self._warned: set[str] = set()

    def _metric(self, metric: M.MetricDef) -> Any:
        with self._lock:
            found = self._made.get(metric.name)
            if found is None:
                from ray.util import metrics as ray_metrics

                keys = tuple(metric.labels)
                if metric.kind == M.COUNTER:
                    found = ray_metrics.Counter(metric.ray_name, metric.help, tag_keys=keys)
                elif metric.kind == M.GAUGE:
                    found = ray_metrics.Gauge(metric.ray_name, metric.help, tag_keys=keys)
                else:
                    found = ray_metrics.Histogram(metric.ray_name, metric.help, boundaries=list(metric.buckets),
                                                  tag_keys=keys)
                self._made[metric.name] = found
            return found

    def _failed(self, metric: M.MetricDef, err: Exception) -> None:
        """Metrics are on the side: a failing export is reported once per metric, never raised."""
        if metric.name not in self._warned:
            self._warned.add(metric.name)
            warnings.warn(f"metrics: {metric.name} not exported ({type(err).__name__}: {err})", stacklevel=3)

    def inc(self, metric, value, labels):
        if value > 0:
            try:
                self._metric(metric).inc(value, tags=M.check_labels(metric, labels))
            except Exception as err:   # noqa: BLE001
                self._failed(metric, err)

    def set(self, metric, value, labels):
        try:
            tags = M.check_labels(metric, labels)
            self._metric(metric).set(float(value), tags=tags)
        except Exception as err:   # noqa: BLE001
            self._failed(metric, err)
            return
        with self._lock:
            self._gauges[(metric.name, tuple(sorted(tags.items())))] = (metric, float(value))
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep_gauges, name="scope-metrics-gauges",
                                                daemon=True)
                self._keeper.start()

    def _keep_gauges(self) -> None:
        import ray

        period = export_interval_s() / 2          # the agent keeps a gauge for two intervals
        while True:
            time.sleep(period)
            if not ray.is_initialized():          # disconnected (ray.shutdown): nothing to keep now
                continue
            with self._lock:
                kept = list(self._gauges.items())
            for (_, tags), (metric, value) in kept:
                try:
                    self._metric(metric).set(value, tags=dict(tags))
                except Exception:   # noqa: BLE001  (Ray shutting down)
                    break

    def observe(self, metric, value, labels):
        try:
            self._metric(metric).observe(float(value), tags=M.check_labels(metric, labels))
        except Exception as err:   # noqa: BLE001
            self._failed(metric, err)

    def touch(self, metric, labels):
        """A counter series at 0, so that `rate()` sees its first increment. Ray's public `inc`
        refuses 0; its `_record` takes it (measured on Ray 2.60). Without it the series is born
        at its first value, which the alert rules tolerate (`scope:*:increase15m`)."""
        try:
            self._metric(metric)._record(0, tags=M.check_labels(metric, labels))
        except Exception:   # noqa: BLE001  (a Ray without `_record`: the series is born at its first value)
            pass


NULL = NullSink()
_RAY_SINK: RaySink | None = None


def export_interval_s() -> float:
    """How often this process's metrics go to the node's agent (Ray's `metrics_report_interval_ms`,
    at least 1 s)."""
    try:
        import ray

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
    except Exception:   # noqa: BLE001  (not connected; Ray's default)
        return 10.0


def metrics_enabled() -> bool:
    return os.environ.get("SCOPE_METRICS", "on").strip().lower() not in ("0", "off", "false", "no")


def process_sink() -> Sink:
    """Ray's agent when this process is connected to Ray and metrics are on, else nothing."""
    global _RAY_SINK
    if not metrics_enabled():
        return NULL
    try:
        import ray
    except ImportError:
        return NULL
    if not ray.is_initialized():
        return NULL
    if _RAY_SINK is None:
        _RAY_SINK = RaySink()
    return _RAY_SINK


def current_job_id() -> str:
    """Ray's id of the job this process belongs to (drivers and their actors share it)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:   # noqa: BLE001  (a label, never a reason to fail a job)
        pass
    return "local"


def model_label(kind: str, source: str) -> str:
    """A bounded model label: the embedded model's kind, a named size, or a checkpoint's folder
    name (never its full path or URL, which may carry a bucket or credentials)."""
    if kind == "procedural":
        return "procedural"
    name = str(source).split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    return M.free_label(name or kind)


def plan_labels(plan: Any) -> tuple[str, str]:
    """(model, method) labels of a `VideoPlan`."""
    accel = getattr(plan, "accel", None)
    return model_label(plan.kind, plan.source), M.free_label(getattr(accel, "method", "none"))


def attach_to_ray_job() -> bool:
    """A job driver started by `ray job submit` that does not use Ray itself (the local
    backend) connects to its cluster, so that its series go out through the node's agent.
    Returns whether this process now exports to Ray."""
    if not metrics_enabled() or not os.environ.get("RAY_ADDRESS"):
        return False
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], include_dashboard=False)   # as cluster.api.ensure_ray
    return True


def failure_reason(err: BaseException) -> str:
    """The bounded reason of a row recorded as an error, from its exception class (by name:
    this module imports nothing of `jobs`)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if "RunFault" in names:
        return "non_finite"
    if "SpecError" in names:
        return "invalid_row"
    return "rejected"


# ------------------------------------------------------------------------------------ publisher

class JobMetrics:
    """The series one process publishes for one kind of job; see the module docstring.

    `sink`: fixed (tests), or None = `process_sink()` looked up at each event (a driver connects
    to Ray after its metrics object exists)."""

    def __init__(self, job_kind: str, *, sink: Sink | None = None, job_id: str | None = None,
                 clock: Any = time.time):
        if job_kind not in M.JOB_KINDS:
            raise ValueError(f"job_kind must be one of {M.JOB_KINDS}; got {job_kind!r}")
        self.job_kind, self._sink, self._job_id, self.clock = job_kind, sink, job_id, clock
        self._done: int | None = None
        self._stage_seen: dict[tuple[int, int], tuple[int, float]] = {}
        self._lock = threading.Lock()

    @property
    def sink(self) -> Sink:
        return self._sink if self._sink is not None else process_sink()

    @property
    def job_id(self) -> str:
        if self._job_id is None:
            found = current_job_id()
            if found == "local":
                return found             # not connected yet: look again next time
            self._job_id = found
        return M.free_label(self._job_id)

    # -- where videos are generated (the segment loop) ------------------------------------------
    def segment_done(self, info: Any, frames: int, *, model: str, method: str) -> None:
        """One committed segment: `info` is the loop's `SegmentInfo` (model_calls, row_seconds,
        accel_stats: the segment's own `RequestStats`, or None), `frames` the frames it added."""
        sink, base = self.sink, {"job_kind": self.job_kind, "model": model}
        sink.inc(M.FRAMES_GENERATED, frames, base)
        sink.inc(M.SEGMENTS_FINISHED, 1, base)
        sink.inc(M.MODEL_CALLS, getattr(info, "model_calls", 0), base)
        for seconds in getattr(info, "row_seconds", ()) or ():
            sink.observe(M.STEP_SECONDS, seconds, base)
        stats = getattr(info, "accel_stats", None)
        if stats is not None:
            self.request_stats(stats, model=model, method=method)

    def request_stats(self, stats: Any, *, model: str, method: str) -> None:
        """One finished accelerator request (`scope.stats.RequestStats`): modes, block evaluations."""
        sink = self.sink
        labels = {"job_kind": self.job_kind, "model": model, "method": M.free_label(method)}
        for mode, count in stats.modes.to_dict().items():
            sink.touch(M.CHUNK_MODES, {**labels, "mode": mode})
            sink.inc(M.CHUNK_MODES, count, {**labels, "mode": mode})
        sink.inc(M.CHUNK_CALLS, stats.chunk_calls, labels)
        sink.inc(M.BLOCK_EVALS_RUN, stats.block_evals, labels)
        sink.inc(M.BLOCK_EVALS_SAVED, max(stats.block_evals_full - stats.block_evals, 0), labels)

    def segment_observer(self, plan: Any, *, accel: Any = None, job_progress: bool = False
                         ) -> Callable[[Any, Any, int], None]:
        """The segment loop's `on_segment(info, state, frames)` for one video of `plan` (a
        `VideoPlan`: kind, source, segments, accel.method): its segment series, the bytes
        `accel` (an in-process accelerator) held and, with `job_progress` (the video is the
        job), the job's progress in segments."""
        model, method = plan_labels(plan)
        base = {"job_kind": self.job_kind, "model": model}
        for metric in (M.FRAMES_GENERATED, M.SEGMENTS_FINISHED, M.MODEL_CALLS):
            self.sink.touch(metric, base)          # so that rate() sees this video's first segment

        def observe(info: Any, state: Any, frames: int) -> None:
            self.segment_done(info, frames, model=model, method=method)
            held = accel_cache_bytes(accel)
            if held is not None:
                self.cache_bytes(held)
            if job_progress:
                self.progress(int(state.next_segment), len(plan.segments))

        return observe

    def video_done(self, *, model: str) -> None:
        self.sink.inc(M.VIDEOS_FINISHED, 1, {"job_kind": self.job_kind, "model": model})

    def cache_bytes(self, nbytes: int, *, stage: int = 0, sp_rank: int = 0) -> None:
        self.sink.set(M.CACHE_BYTES, nbytes, {"job_kind": self.job_kind, "stage": str(stage),
                                              "sp_rank": str(sp_rank)})

    # -- a worker process --------------------------------------------------------------------------
    def worker_started(self, *, gpus: float | None = None, restart_kind: str | None = None) -> None:
        """At a worker's start: its GPUs (None: those Ray gave this process), zeroed failure /
        restart counters, and one restart when Ray reconstructed this actor (`restart_kind`:
        what kind of actor this is)."""
        sink = self.sink
        sink.set(M.WORKER_GPUS, _ray_gpus() if gpus is None else gpus, {"job_kind": self.job_kind})
        sink.set(M.IN_FLIGHT, 0, {"job_kind": self.job_kind})
        if self.job_kind == "dataset":
            for reason in M.FAIL_REASONS:
                sink.touch(M.ROWS_FAILED, {"reason": reason})
        if restart_kind is not None:
            self.restart_seen(restart_kind)

    def restart_seen(self, kind: str, *, reconstructed: bool | None = None) -> None:
        """An actor of `kind` starting: one restart when it was reconstructed (None: ask Ray
        whether this actor was), else its restart series at zero."""
        if reconstructed is None:
            reconstructed = _was_reconstructed()
        self.sink.touch(M.WORKER_RESTARTS, {"kind": kind})
        if reconstructed:
            self.sink.inc(M.WORKER_RESTARTS, 1, {"kind": kind})

    def in_flight(self, n: int) -> None:
        self.sink.set(M.IN_FLIGHT, n, {"job_kind": self.job_kind})

    def row_failed(self, reason: str, n: int = 1) -> None:
        self.sink.inc(M.ROWS_FAILED, n, {"reason": reason})

    # -- a job's driver ----------------------------------------------------------------------------
    def progress(self, done: int, total: int) -> None:
        """Work items done of `total` (long video: frames; dataset: rows): the progress ratio,
        the queue, and the time of the last progress (moves only when `done` grows)."""
        labels = {"job_kind": self.job_kind, "job_id": self.job_id}
        sink = self.sink
        with self._lock:
            moved = self._done is None or done > self._done
            self._done = done if self._done is None else max(self._done, done)
        sink.set(M.JOB_PROGRESS, done / total if total > 0 else 1.0, labels)
        sink.set(M.QUEUE_DEPTH, max(total - done, 0), labels)
        if moved:
            sink.set(M.JOB_LAST_PROGRESS, self.clock(), labels)

    # -- a pipeline-stage worker -------------------------------------------------------------------
    def stage_done(self, stats: Any, *, stage: int, sp_rank: int, cache_bytes: int | None) -> None:
        """A stage worker at a request's end: its `StageStats` (cumulative calls, busy seconds;
        published as increments) and the bytes its accelerator state held."""
        key = (stage, sp_rank)
        labels = {"stage": str(stage), "sp_rank": str(sp_rank)}
        calls, busy = int(getattr(stats, "calls", 0)), float(getattr(stats, "busy_s", 0.0))
        with self._lock:
            seen_calls, seen_busy = self._stage_seen.get(key, (0, 0.0))
            if calls < seen_calls:           # the stats were reset: count from zero again
                seen_calls, seen_busy = 0, 0.0
            self._stage_seen[key] = (calls, busy)
        sink = self.sink
        sink.inc(M.STAGE_CALLS, calls - seen_calls, labels)
        sink.inc(M.STAGE_BUSY, busy - seen_busy, labels)
        if cache_bytes is not None:
            self.cache_bytes(cache_bytes, stage=stage, sp_rank=sp_rank)


def _ray_gpus() -> float:
    try:
        import ray

        return float(len(ray.get_gpu_ids())) if ray.is_initialized() else 0.0
    except Exception:   # noqa: BLE001
        return 0.0


def _was_reconstructed() -> bool:
    """Whether Ray restarted this actor (its restart count is not 0); False outside an actor."""
    try:
        import ray

        if not ray.is_initialized():
            return False
        with warnings.catch_warnings():     # Ray's own implementation reads a deprecated property
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:   # noqa: BLE001  (not an actor: Ray asserts)
        return False


def accel_cache_bytes(accel: Any) -> int | None:
    """Bytes an in-process accelerator's executors held when their last request ended
    (`StageExecutor.bytes_at_end`, plain numbers), or None without one."""
    if accel is None:
        return None
    found = None
    for part in _executors(accel):
        value = getattr(part, "bytes_at_end", None)
        if value is not None:
            found = (found or 0) + int(value)
    return found


def _executors(accel: Any) -> Iterable[Any]:
    executor = getattr(accel, "executor", None)
    if executor is not None:
        yield executor
    head = getattr(accel, "head", None)
    if head is not None and getattr(head, "executor", None) is not None:
        yield head.executor
