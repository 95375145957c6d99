"""The dataset job: a manifest of prompts -> one video per row and a metadata table, on Ray Data.

    ray job submit --working-dir . -- python -m jobs.dataset --manifest prompts.parquet \\
        --out s3://bucket/run --spec defaults.yaml
    scope dataset --manifest prompts.jsonl --out runs/ds-1           # the same job, local Ray

Layout under `out`:
    job.json                       the base spec (credentials redacted)
    videos/<key>.mp4               one per good row; <key> = `safe_key(id)` (never leaves out)
    rows/<key>.json                one record per row, good or bad, written AFTER its video:
                                   the commit marker (a row with a record is done)
    metadata.parquet               the table of every record (id, prompt, seed, uri, frames,
                                   duration_s, wall_s, modes, block_eval_fraction, status, error)

Exactly once: a row whose record exists is never generated again, neither when the job is
submitted again nor when Ray Data retries a batch on a restarted actor (the worker looks before
it generates); every object is written under a unique temporary name and moved into place.
Bad rows (see `jobs.manifest`) get a record with status "error" and never stop the others.

Ray Data runs it: the manifest's work items -> `map_batches(VideoMaker, concurrency=workers)`,
an actor pool whose actors each hold the model (loaded once per actor), with Ray Data's
backpressure, and actor restarts plus task retries for killed workers. Each actor runs the
segment loop (`jobs.runner.VideoRun`) with the local backend: multi-stage replicas per video
are the long-video job's (`backend: ray`), not a Ray Data actor's (an actor cannot own a
placement group of stage actors under Ray Data's scheduling; docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

from jobs import storage
from jobs.runner import RunFault
from jobs.setup import DeviceError
from jobs.spec import JobSpec, SpecError, short
from monitoring.publish import JobMetrics, attach_to_ray_job, failure_reason, plan_labels
from pipelines.skyreels_v2.checkpoint import CheckpointError

TABLE_COLUMNS = ("id", "prompt", "seed", "uri", "frames", "duration_s", "wall_s", "modes",
                 "block_eval_fraction", "status", "error")
PLACEHOLDER_PROMPT = "(set per row)"
# row faults are recorded for the row; job faults among them are re-raised, so the job fails
# loudly (and a later submission retries) instead of recording every row as an error
ROW_FAULTS = (ValueError, KeyError, RunFault)
JOB_FAULTS = (storage.StorageError, CheckpointError, DeviceError)


# ------------------------------------------------------------------------------------ records

def record_for(row: Any, status: str, *, uri: str | None = None, stats: dict[str, Any] | None = None,
               error: str | None = None) -> dict[str, Any]:
    """One row of the metadata table."""
    spec = row.spec
    stats = stats or {}
    return {"id": row.id, "prompt": None if spec is None else spec.prompt,
            "seed": None if spec is None else spec.seed, "uri": uri,
            "frames": stats.get("frames"), "duration_s": stats.get("duration_s"), "wall_s": stats.get("wall_s"),
            "modes": json.dumps(stats["modes"]) if "modes" in stats else None,
            "block_eval_fraction": stats.get("block_eval_fraction"), "status": status, "error": error}


class Outputs:
    """Paths and commits under `out` (one instance per process)."""

    def __init__(self, out: str, options: dict[str, Any], timeout_s: float):
        self.out, self.options, self.timeout = out.rstrip("/"), options, timeout_s

    def video(self, key: str) -> str:
        return storage.join(self.out, "videos", f"{key}.mp4")

    def record(self, key: str) -> str:
        return storage.join(self.out, "rows", f"{key}.json")

    def committed_keys(self) -> set[str]:
        return {n.removesuffix(".json") for n in storage.list_names(storage.join(self.out, "rows"),
                                                                    self.options, self.timeout)
                if n.endswith(".json")}

    def is_committed(self, key: str) -> bool:
        return storage.exists(self.record(key), self.options, self.timeout)

    def commit_record(self, key: str, record: dict[str, Any]) -> None:
        from jobs.runner import dumps_stats

        storage.write_bytes(self.record(key), dumps_stats(record), self.options, self.timeout)

    def read_record(self, key: str) -> dict[str, Any]:
        return json.loads(storage.read_bytes(self.record(key), self.options, self.timeout))

    def sweep(self) -> list[str]:
        """Temporaries of workers killed mid-upload (the driver calls this while no worker runs):
        a retried row rewrote its object under the final name, so these are orphans."""
        return [name for folder in ("", "videos", "rows")
                for name in storage.sweep_temporaries(storage.join(self.out, folder) if folder else self.out,
                                                      self.options, self.timeout)]


# ------------------------------------------------------------------------------------ the worker

class VideoMaker:
    """A Ray Data actor: holds the models, turns a batch of work items into videos + records."""

    def __init__(self, out: str, options: dict[str, Any], timeout_s: float):
        self.outputs = Outputs(out, options, timeout_s)
        self.models: dict[str, Any] = {}
        self.metrics = JobMetrics("dataset")                # this actor's series, through Ray's agent
        self.metrics.worker_started(restart_kind="video_maker")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        results: dict[str, list[Any]] = {c: [] for c in TABLE_COLUMNS}
        results["key"], results["fresh"] = [], []
        todo, records = [], {}
        for key, item in zip(batch["key"], batch["item"]):
            if self.outputs.is_committed(key):          # a retried batch: this row is done
                records[key] = (self.outputs.read_record(key), False)
            else:
                todo.append((key, json.loads(item)))
        self.metrics.in_flight(len(todo))
        for key, record in self.make_all(todo).items():
            records[key] = (record, True)
        self.metrics.in_flight(0)
        for key in batch["key"]:
            record, fresh = records[key]
            for column in TABLE_COLUMNS:
                results[column].append(record.get(column))
            results["key"].append(key)
            results["fresh"].append(fresh)
        return results

    def make_all(self, todo: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """Plan and load every row (a row that cannot be is recorded as an error); rows of one
        shape and accelerator config are denoised together, up to batch_size at a time."""
        from jobs.setup import describe, load

        records, ready = {}, []
        for key, item in todo:
            row = self._row(key, item)
            try:
                plan = describe(row.spec)
                ready.append((row, plan, load(plan, self._models_for(plan))))
            except ROW_FAULTS as err:       # e.g. a prompt the model cannot take: this row's for good
                if isinstance(err, JOB_FAULTS):
                    raise                   # storage, a model folder, the device: retried, never recorded
                records[key] = self._fail(row, err)
        for group in _batches(ready):
            records.update(self._make_group(group))
        return records

    def _models_for(self, plan: Any) -> dict[str, Any]:
        """One model per actor: rows naming another model replace it (a manifest that names
        several checkpoints must not keep them all in memory)."""
        key = f"{plan.source}@{plan.device}"
        if key not in self.models:
            self.models.clear()
        return self.models

    def _row(self, key: str, item: dict[str, Any]) -> Any:
        from jobs.manifest import Row

        spec = JobSpec.from_mapping(item["spec"], where=f"row {item['index']}")
        return Row(index=item["index"], id=item["id"], spec=spec, error=None, key=key)

    def _fail(self, row: Any, err: BaseException) -> dict[str, Any]:
        record = record_for(row, "error", error=f"row {row.index} (id {short(row.id, 40)}): "
                                                f"{storage.safe_message(err)}")
        self.outputs.commit_record(row.key, record)
        self.metrics.row_failed(failure_reason(err))
        return record

    def _make_group(self, group: list[tuple[Any, Any, Any]]) -> dict[str, dict[str, Any]]:
        """Generate a group (one video, or B of one shape), then commit each video and its record."""
        from jobs.outputs import VideoFolder
        from jobs.runner import VideoRun, open_sampler, run_batch, segments_with_frames, summary_stats

        works = [tempfile.TemporaryDirectory(prefix="scope-dataset-") for _ in group]
        try:
            folders = [VideoFolder(replace(row.spec, storage_options={}), plan.fps, out=work.name)
                       for (row, plan, _), work in zip(group, works)]
            try:
                if len(group) == 1:
                    row, plan, loaded = group[0]
                    with open_sampler(plan, loaded) as sampler:
                        observe = self.metrics.segment_observer(plan, accel=getattr(sampler, "accel", None))
                        summaries = [VideoRun(plan, loaded, sampler, folders[0], None, on_segment=observe).run()]
                else:
                    video_runs = [VideoRun(plan, loaded, None, folder, None,
                                           on_segment=self.metrics.segment_observer(plan))
                                  for (row, plan, loaded), folder in zip(group, folders)]
                    with open_sampler(group[0][1], group[0][2]) as pipeline:   # each video its own request
                        summaries = run_batch(video_runs, pipeline)
            except RunFault as err:
                if len(group) > 1:          # one video's NaN must not fail its batch-mates: alone
                    return {k: v for entry in group for k, v in self._make_group([entry]).items()}
                return {group[0][0].key: self._fail(group[0][0], err)}
            except ROW_FAULTS as err:
                if isinstance(err, JOB_FAULTS):
                    raise
                return {row.key: self._fail(row, err) for row, _, _ in group}
            records = {}
            for (row, plan, _), folder, work, summary in zip(group, folders, works, summaries):
                local = os.path.join(work.name, "video.mp4")
                folder.assemble(segments_with_frames(plan), target=local)
                uri = self.outputs.video(row.key)
                storage.put_file(local, uri, self.outputs.options, self.outputs.timeout)
                record = record_for(row, "done", uri=uri, stats=summary_stats(plan, summary))
                self.outputs.commit_record(row.key, record)       # the commit marker, last
                self.metrics.video_done(model=plan_labels(plan)[0])
                records[row.key] = record
            return records
        finally:
            for work in works:
                work.cleanup()


def _batches(ready: list[tuple[Any, Any, Any]]) -> list[list[tuple[Any, Any, Any]]]:
    """Rows that can share forward passes: the same model, device, schedule, segments, latent
    size and accelerator config (each video still decides on its own accelerator state)."""
    groups: dict[Any, list] = {}
    for entry in ready:
        _, plan, _ = entry
        shape = (plan.source, plan.device, repr(plan.args), repr(plan.segments), plan.latent_size,
                 plan.channels, plan.accel.to_json(), plan.reference_latents)   # image rows: a prefix
        groups.setdefault(shape, []).append(entry)
    return list(groups.values())


# ------------------------------------------------------------------------------------ the driver

def run_dataset(manifest: str, out: str, base: JobSpec, *, workers: int = 1, batch_size: int = 1,
                progress: bool = True, gpus_per_worker: float | None = None) -> dict[str, Any]:
    """Read and check the manifest, record bad rows, generate the rest on Ray Data, write the
    table. Returns a summary (rows, done, failed, skipped, videos/s)."""
    from jobs.manifest import plan_rows, read_manifest

    started = time.perf_counter()
    if base.backend != "local" or base.stages > 1 or base.replicas > 1:
        raise SpecError("the dataset job runs each video in one Ray Data actor: set backend: local, stages: 1, "
                        "replicas: 1 and scale with --workers (multi-stage replicas are the long-video job's)")
    rows = plan_rows(read_manifest(manifest, base.storage_options, base.storage_timeout_s), base)
    storage.check_writable(out, base.storage_options, base.storage_timeout_s, what="out")
    outputs = Outputs(out, base.storage_options, base.storage_timeout_s)
    _claim(outputs, base, manifest)
    attach_to_ray_job()                                   # the driver's series go out through Ray's agent
    committed = outputs.committed_keys()
    todo = [r for r in rows if r.key not in committed]
    bad = [r for r in todo if r.error is not None]
    for row in bad:                                       # bad rows: a record now, never generated
        outputs.commit_record(row.key, record_for(row, "error", error=row.error))
    JobMetrics("dataset").row_failed("invalid_row", len(bad))
    good = [r for r in todo if r.error is None]
    _say(f"dataset: {len(rows)} rows in {manifest}: {len(committed)} already done, {len(bad)} bad, "
         f"{len(good)} to generate with {workers} worker(s) -> {out}")
    gpus = _gpus_per_worker(base, gpus_per_worker) if good else 0.0
    if good and base.device.startswith("cuda") and gpus == 0:
        raise SpecError(f"spec field 'device': {base.device!r} but the workers reserve no GPU (the cluster "
                        f"has none, or --gpus-per-worker 0); use device: auto or cpu")
    outputs.sweep()                                       # a crashed earlier submission's leftovers
    made = _generate_on_ray_data(good, outputs, workers, batch_size, progress, started, gpus) if good else 0
    swept = outputs.sweep()                               # workers killed mid-upload during this one
    if swept:
        _say(f"dataset: removed {len(swept)} temporary object(s) left by killed workers")
    wrote_table = _write_table(outputs, rows, fresh=bool(good or bad))
    elapsed = time.perf_counter() - started
    summary = {"rows": len(rows), "already_done": len(committed & {r.key for r in rows}), "generated": made,
               "bad_rows": len(bad), "wall_s": elapsed, "videos_per_s": made / elapsed if elapsed else 0.0,
               "table": storage.join(outputs.out, "metadata.parquet") if wrote_table else None}
    _say(f"dataset: done: {json.dumps(summary)}")
    return summary


def _claim(outputs: Outputs, base: JobSpec, manifest: str) -> None:
    """job.json: the base spec of the first submission. A later one with another base spec is
    refused (its rows would mix with these)."""
    path = storage.join(outputs.out, "job.json")
    found = storage.read_bytes(path, outputs.options, outputs.timeout)
    mine = {"fingerprint": base.fingerprint(), "spec": base.to_dict(redacted=True), "manifest": manifest}
    if found is None:
        storage.write_bytes(path, json.dumps(mine, indent=1).encode(), outputs.options, outputs.timeout)
        return
    theirs = json.loads(found)
    if theirs.get("fingerprint") != mine["fingerprint"]:
        diff = "; ".join(base.differences(theirs.get("spec", {}))[:4]) or "the base spec differs"
        raise SpecError(f"out {outputs.out} holds a dataset made with another base spec ({diff}); use the "
                        f"same --spec or another out")


def _gpus_per_worker(base: JobSpec, asked: float | None) -> float:
    """GPUs each actor reserves: as asked, else one when the cluster has GPUs and the spec's
    device is not the CPU (each actor then runs its model on its GPU: device auto)."""
    if asked is not None:
        return asked
    if base.device == "cpu":
        return 0.0
    import ray

    from cluster.api import ensure_ray

    ensure_ray()
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _generate_on_ray_data(rows: list[Any], outputs: Outputs, workers: int, batch_size: int, progress: bool,
                          started: float, gpus: float = 0.0) -> int:
    import ray

    from cluster.api import ensure_ray

    ensure_ray()
    items = [{"key": r.key, "item": json.dumps({"index": r.index, "id": r.id,
                                                 "spec": _row_spec(r.spec)})} for r in rows]
    dataset = ray.data.from_items(items).map_batches(
        VideoMaker, fn_constructor_kwargs={"out": outputs.out, "options": outputs.options,
                                           "timeout_s": outputs.timeout},
        batch_size=batch_size, concurrency=workers, num_cpus=1, num_gpus=gpus,
        ray_remote_args_fn=_restartable)        # a killed actor is restarted and its batch retried
    done = failed = made = 0
    meter = _Meter(len(rows), started, progress)
    for result in dataset.iter_rows():
        done += 1
        failed += result["status"] != "done"
        made += bool(result["fresh"]) and result["status"] == "done"
        meter.update(done, failed)
    return made


def _restartable() -> dict[str, Any]:
    """Actor options: a killed worker is restarted and the batch it held is retried there."""
    return {"max_restarts": 3, "max_task_retries": 3}


def _row_spec(spec: JobSpec) -> dict[str, Any]:
    """What travels to the actors: the row's spec without storage settings (they get the job's)."""
    values = spec.to_dict(redacted=False)
    values["storage_options"] = {}
    return values


def _write_table(outputs: Outputs, rows: list[Any], fresh: bool) -> bool:
    """metadata.parquet from every row's record, in manifest order; skipped when this run
    committed nothing and the table exists (a re-run writes nothing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = storage.join(outputs.out, "metadata.parquet")
    if not fresh and storage.exists(target, outputs.options, outputs.timeout):
        return False
    records = [outputs.read_record(row.key) for row in rows]   # keys are unique per row (plan_rows)
    table = pa.Table.from_pylist(records, schema=_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(target, buffer.getvalue(), outputs.options, outputs.timeout)
    return True


def _schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("uri", pa.string()),
                      ("frames", pa.int64()), ("duration_s", pa.float64()), ("wall_s", pa.float64()),
                      ("modes", pa.string()), ("block_eval_fraction", pa.float64()), ("status", pa.string()),
                      ("error", pa.string())])


class _Meter:
    """Rows done / failed / total, videos/s and ETA: a bar on a terminal, else (`ray job logs`)
    a line every few seconds and at the end."""

    def __init__(self, total: int, started: float, enabled: bool, every_s: float = 5.0):
        self.total, self.started, self.enabled, self.every_s = total, started, enabled, every_s
        self.last = 0.0
        self.bar = None
        self.metrics = JobMetrics("dataset")               # progress, queue depth, last progress
        self.metrics.progress(0, total)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="dataset", unit="video")

    def update(self, done: int, failed: int) -> None:
        self.metrics.progress(done, self.total)
        if self.bar is not None:
            self.bar.set_postfix(failed=failed)
            self.bar.update(done - self.bar.n)
            if done >= self.total:
                self.bar.close()
            return
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every_s and done < self.total):
            return
        self.last = now
        rate = done / (now - self.started) if now > self.started else 0.0
        eta = (self.total - done) / rate if rate else float("nan")
        _say(f"dataset: rows {done}/{self.total} done, {failed} failed, {rate:.2f} videos/s, "
             f"ETA {'?' if eta != eta else f'{eta:.0f}s'}")


def _say(line: str) -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------------------ CLI

def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m jobs.dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="Parquet, JSONL or CSV of rows (id, prompt, ...)")
    parser.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    parser.add_argument("--spec", default=None, help="YAML base spec: every row's defaults (prompt optional)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Data actors, each holding the model")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="videos of one shape per forward pass (default: the spec's batch_size, 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs each actor reserves (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def base_spec(path: str | None, out: str, batch_size: int | None = None) -> JobSpec:
    """The base spec: the YAML (prompt optional: rows give it) with `out` (and `--batch-size`)
    set; default 48 frames."""
    extra = {} if batch_size is None else {"batch_size": batch_size}
    if path is None:
        return JobSpec.from_mapping({"prompt": PLACEHOLDER_PROMPT, "frames": 48, "out": out, **extra}, where="flags")
    import yaml

    from jobs.spec import _read_text

    try:
        values = yaml.safe_load(_read_text(path, None)) or {}
    except yaml.YAMLError:
        raise SpecError(f"spec {path}: not valid YAML; fix the file") from None
    if not isinstance(values, dict):
        raise SpecError(f"spec {path}: must be a mapping of fields")
    values.setdefault("prompt", PLACEHOLDER_PROMPT)
    if "frames" not in values and "duration_s" not in values:
        values["frames"] = 48
    values["out"] = out
    values.update(extra)
    return JobSpec.from_mapping(values, where=f"spec {path}")


def run_cli(args: argparse.Namespace) -> int:
    try:
        if args.workers < 1:
            raise SpecError(f"--workers must be >= 1; got {args.workers}")
        base = base_spec(args.spec, args.out, args.batch_size)
        if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
            raise SpecError(f"--gpus-per-worker must be >= 0; got {args.gpus_per_worker}")
        run_dataset(args.manifest, args.out, base, workers=args.workers, batch_size=base.batch_size,
                    progress=not args.no_progress, gpus_per_worker=args.gpus_per_worker)
    except ValueError as err:
        print(f"dataset: error: {storage.safe_message(err)}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
