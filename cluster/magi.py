"""MAGI-1 on Ray: `MagiPipeline` drives a replica's stages through a model-like proxy.

    spec = ModelSpec("tiny", family="magi-1", overrides=(("num_layers", 3),))
    with RayCluster(ReplicaConfig(model=spec, stages=3), replicas=2) as cluster:
        results = cluster.generate([MagiRequest("a", noise, caption, args), ...])   # MagiResults
    result = generate_magi_on_ray(spec, noise, caption, args, stages=2)              # one walk

The driver runs `MagiPipeline` unchanged: windows, guidance passes, Euler steps, and the K/V cache
bookkeeping (which clean chunks are captured, which each call reads, when each is dropped). Its
model is a `MagiRemoteModel`; each model call becomes one `MagiCall` through the replica's stages
(`Replica.submit_call` -> `StageWorker.run_call` -> `MagiStage.run_call`), the hidden states
going stage to stage as for SkyReels-V2.

**K/V stays on the stage that made it.** Layer i's K/V of a clean chunk is produced and read only
on the stage holding layer i, so each stage keeps the K/V of its own layers (`KVShard`, one per
stage) and the driver holds none. Where the pipeline expects K/V tensors the proxy hands it
`KVRef`s: token runs of stage-side entries that support exactly what the pipeline does with
captured K/V (slice per chunk, clone, concatenate the cached chunks of a call). Per call the proxy
sends, besides the model's non-K/V arguments: `kv_read` (the (entry, start, end) runs of the
cache the pipeline passed), `capture` (entry ids for the chunks it asked to capture) and `release`
(entries the pipeline dropped since the last call). A run holds its entry's lease; when the
pipeline drops the last reference to an entry (`_Walk._release`, or the end of the walk) the
lease's finalizer queues the entry, and the next call releases it on every stage. So every stage
holds, for its layers, exactly the chunks the in-process pipeline would hold (bounded by the
attention reach: flat in video length); the walk's end drops the rest (`end_request`).

A request runs one call at a time (the pipeline waits for each pass); several requests per
replica (`requests_per_replica`) keep the stages busy together.

Faults: a call that fails (a stage worker died, or the replica was recovered under it) recovers
the replica (fresh stages: every K/V shard is empty) and replays the request's walk from its start
with its noise generators rewound; chunks already committed are not decoded again.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from torch import Tensor

from cluster.coordinator import Coordinator, SegmentOutput
from cluster.families import ModelSpec
from cluster.replica import CallFuture, Replica, ReplicaReset
from pipelines.magi1.parallelize import MagiCall, MagiStageSpec, stage_config
from pipelines.magi1.pipeline import Caption, MagiPipeline, MagiResult, SampleArgs

__all__ = ["KV_ON_STAGES", "KVRef", "MagiCoordinator", "MagiRemoteModel", "MagiRequest", "generate_magi_on_ray"]

KV_ON_STAGES = "kv-on-stages"      # the one key of the K/V dicts the proxy hands the pipeline
NULL_CAPTION_KEY = "y_embedder.null_caption_embedding"


# ----------------------------------------------------------------------------- handles to stage-side K/V

class _Lease:
    """One K/V entry (a captured chunk) on the stages; queued for release when no handle refers to it."""

    def __init__(self, request: str, entry: int, released: deque[int]):
        self.request, self.entry = request, entry
        weakref.finalize(self, released.append, entry)


class KVRef:
    """K or V of cached tokens that live on a replica's stages, as `MagiPipeline`'s cache holds them.

    Stands in for a tensor [B, tokens, G, head_dim] with the three operations the pipeline applies to
    captured K/V: `ref[:, a:b]` (file one chunk), `ref.clone()` and `torch.cat(refs, dim=1)` (the cached
    chunks of a call); anything else raises. It is a tuple of token runs (lease, start, end) of
    stage-side entries; immutable.
    """

    def __init__(self, batch: int, runs: tuple[tuple[_Lease, int, int], ...]):
        self.batch, self.runs = batch, runs

    @property
    def shape(self) -> tuple[int, int]:
        return (self.batch, sum(b - a for _, a, b in self.runs))

    def __getitem__(self, index: Any) -> KVRef:
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)
                and isinstance(index[1], slice) and index[1].step in (None, 1)):
            raise TypeError(f"K/V held on a replica's stages can only be cut on tokens (ref[:, a:b]); got {index!r}")
        start, stop, _ = index[1].indices(self.shape[1])
        runs, offset = [], 0
        for lease, a, b in self.runs:
            lo, hi = a + max(0, start - offset), min(b, a + stop - offset)
            if lo < hi:
                runs.append((lease, lo, hi))
            offset += b - a
        return KVRef(self.batch, tuple(runs))

    def clone(self) -> KVRef:
        return self

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.cat:
            refs = list(args[0])
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim == 1 and refs and all(isinstance(r, KVRef) and r.batch == refs[0].batch for r in refs):
                return KVRef(refs[0].batch, _merge([run for r in refs for run in r.runs]))
        name = getattr(func, "__name__", func)
        raise TypeError(f"K/V held on a replica's stages supports torch.cat(refs, dim=1) only; got {name} "
                        f"(the driver never holds the K/V itself)")

    def entries(self, request: str) -> tuple[tuple[int, int, int], ...]:
        """The (entry, start, end) runs, checked to belong to `request`."""
        foreign = {lease.request for lease, _, _ in self.runs} - {request}
        if foreign:
            raise ValueError(f"kv_cache holds K/V of request(s) {sorted(foreign)}, not of {request!r}")
        return tuple((lease.entry, a, b) for lease, a, b in self.runs)

    def __repr__(self) -> str:
        return f"KVRef(batch={self.batch}, runs={[(lease.entry, a, b) for lease, a, b in self.runs]})"


def _merge(runs: list[tuple[_Lease, int, int]]) -> tuple[tuple[_Lease, int, int], ...]:
    """Adjacent runs of one entry joined."""
    out: list[tuple[_Lease, int, int]] = []
    for lease, a, b in runs:
        if out and out[-1][0] is lease and out[-1][2] == a:
            out[-1] = (lease, out[-1][1], b)
        else:
            out.append((lease, a, b))
    return tuple(out)


# ----------------------------------------------------------------------------- the proxy

class _NullCaption:
    """`model.y_embedder` as `MagiPipeline` reads it (its default null caption), fetched on first use."""

    def __init__(self, fetch: Callable[[], Tensor]):
        self._fetch = fetch

    @property
    def null_caption_embedding(self) -> Tensor:
        return self._fetch()


class MagiRemoteModel:
    """What `MagiPipeline` sees as its model for one request on one replica (see the module docstring).

    Has the `MagiDiT` call signature, `config` and `y_embedder.null_caption_embedding`; K/V goes in and
    out as `KVRef`s under the key `KV_ON_STAGES`.
    """

    def __init__(self, replica: Replica, request_id: str, config: Any, null_caption: Callable[[], Tensor]):
        self.replica, self.request_id, self.config = replica, request_id, config
        self.y_embedder = _NullCaption(null_caption)
        self.epoch = replica.epoch
        self._next_entry = 0
        self._released: deque[int] = deque()           # filled by lease finalizers, sent with the next call
        self._outstanding: CallFuture | None = None

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, caption_dropout_mask: Tensor, xattn_mask: Tensor,
                 kv_range: Tensor, *, slice_point: int = 0, distill_dt: float | None = None,
                 kv_cache: Mapping[Any, Any] | None = None, kv_capture: dict | None = None,
                 capture_chunks: tuple[int, int] | None = None) -> Tensor:
        """One model call through the replica's stages -> velocity [B, C, T, H, W] (float32)."""
        # 1. what the call reads, captures and releases: names of stage-side K/V, never K/V
        reads = self._reads(kv_cache)
        a, b = capture_chunks if capture_chunks is not None else (0, t.shape[1])
        first = None
        if kv_capture is not None:
            first, self._next_entry = self._next_entry, self._next_entry + (b - a)
        release = tuple(self._released.popleft() for _ in range(len(self._released)))
        # 2. the call through every stage
        call = MagiCall(key=0, request=self.request_id, x=_cpu(x), t=_cpu(t), y=_cpu(y),
                        caption_dropout_mask=_cpu(caption_dropout_mask), xattn_mask=_cpu(xattn_mask),
                        kv_range=_cpu(kv_range), slice_point=slice_point, distill_dt=distill_dt, kv_read=reads,
                        capture=first, capture_chunks=capture_chunks, release=release)
        self._outstanding = self.replica.submit_call(call, epoch=self.epoch)
        out = self._outstanding.result()
        # 3. the captured chunks as handles: the pipeline files them like K/V
        if first is not None:
            n = self._tokens_per_chunk(x, t.shape[1])
            leases = [_Lease(self.request_id, first + j, self._released) for j in range(b - a)]
            ref = KVRef(x.shape[0], tuple((lease, 0, n) for lease in leases))
            kv_capture[KV_ON_STAGES] = (ref, ref)
        return out.to(x.device)

    def _reads(self, kv_cache: Mapping[Any, Any] | None) -> tuple[tuple[int, int, int], ...]:
        if kv_cache is None:
            return ()
        entry = kv_cache.get(KV_ON_STAGES) if isinstance(kv_cache, Mapping) else None
        if len(kv_cache) != 1 or entry is None or not all(isinstance(r, KVRef) for r in entry):
            raise ValueError(f"the K/V of a replica lives on its stages: kv_cache must be what this model "
                             f"returned through kv_capture ({{{KV_ON_STAGES!r}: (KVRef, KVRef)}}); got keys "
                             f"{list(kv_cache)[:4]}")
        return entry[0].entries(self.request_id)

    def _tokens_per_chunk(self, x: Tensor, chunks: int) -> int:
        pt, ph, pw = self.config.patch
        return x.shape[2] // pt // chunks * (x.shape[3] // ph) * (x.shape[4] // pw)

    def end_request(self) -> None:
        """Drop this request's K/V on every stage (the walk is over)."""
        self.check_epoch()
        self._released.clear()
        self.replica.end_request(self.request_id)
        self.check_epoch()

    def drain(self, timeout_s: float = 10.0) -> None:
        """After a fault: collect the call the walk abandoned, so its error is handled."""
        if self._outstanding is not None:
            self._outstanding.discard(timeout_s)
            self._outstanding = None

    def check_epoch(self) -> None:
        if self.replica.epoch != self.epoch:
            raise ReplicaReset(f"{self.replica.name} was recovered while {self.request_id} ran on it")


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous()      # one copy here rather than at pickling


# ----------------------------------------------------------------------------- requests and serving

@dataclass
class MagiRequest:
    """One MAGI-1 walk to generate: the arguments of `MagiPipeline.stream` (B videos of one shape).

    noise: [B, C, frames, H, W], one [C, frames, H, W] per video, or one `torch.Generator` per video
        (rewound when the walk is replayed after a fault).
    options: further `stream` arguments: num_chunks, latent_shape, prefix, null_captions, request_ids.
    """

    request_id: str
    noise: Any
    captions: Caption | Sequence[Caption]
    args: SampleArgs = field(default_factory=SampleArgs)
    options: dict[str, Any] = field(default_factory=dict)


class MagiCoordinator(Coordinator):
    """Serves `MagiRequest`s on MAGI-1 replicas (data parallel, several requests per replica).

    Serve = run `MagiPipeline` on a `MagiRemoteModel` -> commit each finished chunk to decode exactly
    once (a `SegmentOutput` whose segment is the chunk's index and whose info is its `ChunkOutput`)
    -> drop the request's K/V on every stage. A fault recovers the replica and replays the walk.
    """

    def __init__(self, replicas: Sequence[Replica], *args: Any, **kwargs: Any):
        super().__init__(replicas, *args, **kwargs)
        self._configs: dict[str, Any] = {}
        self._nulls: dict[str, Tensor] = {}
        self._cache_lock = threading.Lock()

    def serve(self, replica: Replica, request: MagiRequest) -> MagiResult:
        """One request on one replica, to completion: the walk, and on a fault recover and replay it."""
        rewind = _generator_states(request.noise)
        for attempt in range(1, self.max_attempts + 1):
            self.served_by.setdefault(request.request_id, []).append(replica.name)
            model = MagiRemoteModel(replica, request.request_id, self._config(replica),
                                    lambda: self._null_caption(replica))
            _set_generator_states(request.noise, rewind)
            try:
                result = self._walk(model, request)
            except (ray.exceptions.RayError, ReplicaReset) as err:
                self.faults.append((request.request_id, f"{type(err).__name__}: {err}"[:300]))
                model.drain()
                if attempt == self.max_attempts:
                    raise
                replica.recover(model.epoch)
            except BaseException:
                _end_quietly(model)
                raise
            else:
                # every call ran in one epoch: the result stands even if the replica is recovered now
                _end_quietly(model)
                return result
        raise AssertionError("unreachable")

    def _walk(self, model: MagiRemoteModel, request: MagiRequest) -> MagiResult:
        """`MagiPipeline.generate` on the proxy, committing each chunk as it finishes."""
        started = time.perf_counter()
        stats: dict[str, Any] = {}
        chunks = []
        stream = MagiPipeline(model).stream(request.noise, request.captions, request.args, stats=stats,
                                            on_call=self._progress_of(request.request_id, stats),
                                            **request.options)
        for chunk in stream:
            model.check_epoch()          # never commit what a recovered replica computed
            self.sink.commit(SegmentOutput(request.request_id, chunk.index, chunk.latents, chunk))
            chunks.append(chunk)
        return MagiResult(latents=torch.cat([c.latents for c in chunks], dim=2), chunks=chunks, plan=stats["plan"],
                          model_calls=stats["model_calls"], max_cached_chunks=stats["max_cached_chunks"],
                          max_live_chunks=stats["max_live_chunks"], seconds=time.perf_counter() - started)

    def _progress_of(self, request_id: str, stats: dict[str, Any]) -> Callable[[Any], None] | None:
        if self.progress is None:
            return None
        return lambda record: self.progress(request_id, record.call.index + 1, len(stats["plan"].calls))

    def _config(self, replica: Replica) -> Any:
        with self._cache_lock:
            if replica.name not in self._configs:
                spec = replica.config.model
                self._configs[replica.name] = stage_config(_stage_spec(spec))
            return self._configs[replica.name]

    def _null_caption(self, replica: Replica) -> Tensor:
        """The model's null caption embedding, read once from stage 0 (MagiPipeline's default null caption)."""
        with self._cache_lock:
            if replica.name not in self._nulls:
                self._nulls[replica.name] = ray.get(replica.workers[0][0].tensor.remote(NULL_CAPTION_KEY))
            return self._nulls[replica.name]


def _stage_spec(spec: ModelSpec) -> MagiStageSpec:
    return MagiStageSpec(source=spec.source, seed=spec.seed, dtype=spec.dtype, overrides=spec.overrides)


def _end_quietly(model: MagiRemoteModel) -> None:
    """Free the request's K/V on the stages; a replica that failed or was recovered meanwhile lost it
    already."""
    try:
        model.end_request()
    except (ray.exceptions.RayError, ReplicaReset):
        pass


def _generator_states(noise: Any) -> list[Tensor] | None:
    if isinstance(noise, (list, tuple)) and noise and all(isinstance(g, torch.Generator) for g in noise):
        return [g.get_state() for g in noise]
    return None


def _set_generator_states(noise: Any, states: list[Tensor] | None) -> None:
    if states is not None:
        for g, state in zip(noise, states):
            g.set_state(state)


def generate_magi_on_ray(model: ModelSpec | str, noise: Any, captions: Caption | Sequence[Caption],
                         args: SampleArgs | None = None, *, stages: int = 1, replicas: int = 1,
                         request_id: str = "magi1", decode: Callable[[SegmentOutput], Any] | Any | None = None,
                         cluster: Any = None, **options: Any) -> MagiResult:
    """One MAGI-1 walk on Ray; the same `MagiResult` as `MagiPipeline(model).generate(...)`.

    `model`: a ModelSpec of the "magi-1" family, or a named size / weights folder. `options` are
    further `MagiPipeline.stream` arguments (num_chunks, latent_shape, prefix, null_captions). With
    `cluster` given (a `RayCluster` of MAGI-1 replicas) it is used and kept; otherwise one replica
    set is built and torn down.
    """
    from cluster.api import RayCluster
    from cluster.replica import ReplicaConfig

    request = MagiRequest(request_id, noise, captions, args or SampleArgs(), options)
    if cluster is not None:
        if decode is not None:
            cluster.coordinator.sink.decode = decode
        return cluster.generate([request])[0]
    spec = model if isinstance(model, ModelSpec) else ModelSpec(source=model, family="magi-1")
    with RayCluster(ReplicaConfig(model=spec, stages=stages), replicas, decode=decode) as owned:
        return owned.generate([request])[0]
