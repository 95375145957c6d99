"""Pipeline parallelism for the MAGI-1 DiT, applied from outside; each stage keeps the K/V of its layers.

`parallelize_magi1(model, stage_index, num_stages, ...)` turns a whole `MagiDiT` into one stage of a
replica. Parallelisms are applied in this order:

1. Pipeline split. The layer list is cut into `num_stages` contiguous ranges (`split_blocks`, shared
   with SkyReels-V2); the stage keeps its own range and the other layers become empty placeholders,
   so layer indices (the keys of K/V entries) stay absolute. The final LayerNorm and linear are kept
   on the last stage only. Only stage 0's patch embedding feeds the layers, but every stage keeps the
   embedders (patch, time, caption, RoPE: < 0.1 % of one layer's weights): the conditioning of a
   call (`BlockInputs`: per-chunk AdaLN condition, projected caption rows, RoPE, key ranges) is
   rebuilt locally from the call's arguments, so only the hidden states [B, S, D] travel between
   stages.
2. Sequence parallel is refused (`sp_group` of more than one rank), see `SEQUENCE_PARALLEL_REFUSED`.

The model file does not change: `MagiStage` only calls `embed`, `run_blocks` and `unembed`.

**K/V of clean chunks, one shard per stage.** In process, `MagiPipeline` owns the K/V cache: it
passes `kv_capture={}` to the model, files what each layer wrote per chunk, and passes the cached
chunks back as `kv_cache`. On a replica the K/V of layer i is produced on the stage that holds layer
i and is only ever read there, so it stays there: a `MagiCall` names K/V instead of carrying it.
`capture=e` asks every stage to keep its layers' K/V of `capture_chunks` as entries e, e+1, ...
(one per chunk, as the pipeline files them); `kv_read` lists (entry, start, end) token runs whose
concatenation is the call's cache; `release` lists entries no later call reads. `KVShard` is one
stage's store of those entries, for its own layers only. The driver side (`cluster.magi`) hands the
pipeline small handles in place of K/V tensors, so the pipeline's own bookkeeping (which chunks are
cached, when each is released) decides what every stage keeps.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from torch import Tensor, nn

from pipelines.magi1.checkpoint import fp8_keys, resolve_config, shard_names
from pipelines.magi1.model import MagiConfig, MagiDiT, TransformerLayer, high_precision
from pipelines.magi1.sizes import SIZES
from pipelines.skyreels_v2.checkpoint import CheckpointError, read_shard, state_dict_mismatch
from pipelines.skyreels_v2.parallelize import DroppedModule, split_blocks

__all__ = ["KVShard", "MagiCall", "MagiStage", "MagiStageSpec", "SEQUENCE_PARALLEL_REFUSED", "build_stage",
           "load_stage_model", "parallelize_magi1", "split_blocks", "stage_config"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEQUENCE_PARALLEL_REFUSED = (
    "MAGI-1 stages do not run sequence parallel: a MAGI-1 layer maps every token to its chunk (per-chunk "
    "AdaLN gates, one caption row per chunk for cross-attention, per-chunk key ranges over the K/V cache of "
    "clean chunks), so a Ulysses token shard would need those maps cut at shard boundaries and the cache "
    "split by K/V head group; that is not implemented. Use sequence_parallel=1 (pipeline stages and "
    "replicas scale MAGI-1 on Ray)")


# ----------------------------------------------------------------------------- 1. pipeline split

class StageDiT(MagiDiT):
    """A `MagiDiT` that holds only some layers.

    Identical state-dict keys and forward; only `dtype` differs: `MagiDiT` reads its compute dtype
    from layer 0, which a later stage does not hold, so this reads it from the first layer held.
    The class of a pruned model is swapped to this one (as `torch.nn.utils.parametrize` swaps a
    module's class), so the model file does not know about stages.
    """

    @property
    def dtype(self) -> torch.dtype:
        for layer in self.layers:
            if isinstance(layer, TransformerLayer):
                return layer.self_attention.linear_qkv.q.weight.dtype
        raise RuntimeError("this MAGI-1 stage holds no layer")


def prune_to_stage(model: MagiDiT, start: int, end: int, keep_final: bool) -> StageDiT:
    """Keep layers [start, end) (and the final LayerNorm / linear when `keep_final`); the rest become
    placeholders. Idempotent: a stage that rejoins its replica is pruned again."""
    layers = model.videodit_blocks.layers
    for i in range(len(layers)):
        if not start <= i < end:
            layers[i] = DroppedModule(f"layer {i}")
    if not keep_final:
        model.videodit_blocks.final_layernorm = DroppedModule("the final LayerNorm")
        model.final_linear = DroppedModule("the final linear")
    model.__class__ = StageDiT
    return model


# ----------------------------------------------------------------------------- 2. what a stage runs

@dataclass
class MagiCall:
    """One MAGI-1 model call as every stage of a replica sees it: the model's arguments, with K/V named
    instead of carried (see the module docstring). Put into the object store once per call."""

    key: int                                     # unique per replica: transport tag
    request: str                                 # owner of the K/V entries (one per walk)
    x: Tensor                                    # [B, C, T, H, W]
    t: Tensor                                    # [B, R]
    y: Tensor                                    # [B*R, L, C_cap]
    caption_dropout_mask: Tensor                 # [B] bool
    xattn_mask: Tensor                           # [B*R, L]
    kv_range: Tensor                             # [B*R, 2] or [R, 2]
    slice_point: int = 0
    distill_dt: float | None = None
    kv_read: tuple[tuple[int, int, int], ...] = ()   # (entry, start, end): token runs forming the cache
    capture: int | None = None                   # keep capture_chunks' K/V as entries capture, capture+1, ...
    capture_chunks: tuple[int, int] | None = None
    release: tuple[int, ...] = ()                # entries no later call reads: dropped before this call

    def model_kwargs(self, device: torch.device) -> dict[str, Any]:
        """The arguments of `MagiDiT.embed` except the K/V ones, on `device`."""
        return dict(x=self.x.to(device), t=self.t.to(device), y=self.y.to(device),
                    caption_dropout_mask=self.caption_dropout_mask.to(device),
                    xattn_mask=self.xattn_mask.to(device), kv_range=self.kv_range.to(device),
                    slice_point=self.slice_point, distill_dt=self.distill_dt)


class KVShard:
    """One stage's K/V of clean chunks: entry -> {layer: (k, v)} per request, for its own layers only.

    An entry is one captured chunk: k, v [B, tokens_per_chunk, G, head_dim], post-RoPE, each with its
    own storage (never a view that keeps a whole call's K/V alive).
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[int, dict[int, tuple[Tensor, Tensor]]]] = {}

    def put(self, request: str, first: int, captured: Mapping[int, tuple[Tensor, Tensor]], chunks: int) -> None:
        """File a call's captured K/V ([B, chunks * n, G, d] per layer) as entries first .. first+chunks-1."""
        store = self.entries.setdefault(request, {})
        for j in range(chunks):
            entry: dict[int, tuple[Tensor, Tensor]] = {}
            for layer, (k, v) in captured.items():
                n = k.shape[1] // chunks
                entry[layer] = (_own(k[:, j * n:(j + 1) * n]), _own(v[:, j * n:(j + 1) * n]))
            store[first + j] = entry

    def gather(self, request: str, runs: Sequence[tuple[int, int, int]],
               layers: Iterable[int]) -> dict[int, tuple[Tensor, Tensor]] | None:
        """`kv_cache` of a call for `layers`: each layer's runs concatenated on the token axis."""
        if not runs:
            return None
        store = self.entries.get(request, {})
        missing = sorted({e for e, _, _ in runs if e not in store})
        if missing:
            raise RuntimeError(f"request {request!r}: K/V entries {missing} are not held by this stage "
                               f"(released, or lost when the replica was recovered)")
        out = {}
        for layer in layers:
            parts = [(store[e][layer][0][:, a:b], store[e][layer][1][:, a:b]) for e, a, b in runs]
            out[layer] = (parts[0] if len(parts) == 1 else
                          (torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)))
        return out

    def release(self, request: str, entries: Iterable[int]) -> None:
        store = self.entries.get(request)
        if store is not None:
            for entry in entries:
                store.pop(entry, None)

    def end_request(self, request: str) -> None:
        self.entries.pop(request, None)

    def clear(self) -> None:
        self.entries.clear()

    def summary(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Per request and entry: the layers held, tokens and bytes (tests, logs)."""
        return {request: {e: {"layers": sorted(kv), "tokens": next(iter(kv.values()))[0].shape[1] if kv else 0,
                              "bytes": sum(k.nbytes + v.nbytes for k, v in kv.values())}
                          for e, kv in store.items()}
                for request, store in self.entries.items()}

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for store in self.entries.values() for kv in store.values()
                   for k, v in kv.values())


def _own(t: Tensor) -> Tensor:
    """`t` with storage of its own (a slice of a larger tensor is copied)."""
    return t.clone() if t.untyped_storage().nbytes() > t.nbytes else t


class MagiStage(nn.Module):
    """One stage of a replica: embedders (every stage), layers [start, end) and their K/V shard,
    final layers (last stage)."""

    def __init__(self, model: StageDiT, stage_index: int, num_stages: int, block_range: tuple[int, int]):
        super().__init__()
        self.model = model
        self.stage_index, self.num_stages = stage_index, num_stages
        self.start, self.end = block_range
        self.sp_world = 1
        self.kv = KVShard()

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def num_blocks(self) -> int:
        """Layers of the whole model (indices are absolute)."""
        return len(self.model.layers)

    @property
    def device(self) -> torch.device:
        return self.model.x_embedder.weight.device

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        """`MagiDiT.embed`: the call's conditioning (and, used on stage 0 only, its input tokens)."""
        return self.model.embed(*args, **kwargs)

    def run_blocks(self, h: Tensor, inputs: Any, start: int | None = None, end: int | None = None) -> Tensor:
        """This stage's layers on h [B, S, D] -> [B, S, D]."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"stage {self.stage_index} holds layers [{self.start}, {self.end}); "
                             f"asked for [{start}, {end})")
        return self.model.run_blocks(h, inputs, start, end)

    def unembed(self, h: Tensor, inputs: Any) -> Tensor:
        if not self.is_last:
            raise RuntimeError(f"stage {self.stage_index} has no final layers: only the last stage unembeds")
        return self.model.unembed(h, inputs)

    @torch.no_grad()
    def run_call(self, call: MagiCall, h: Tensor | None) -> Tensor:
        """One call through this stage: hidden states out, or the velocity on the last stage.

        Forget released entries -> rebuild the conditioning with this stage's K/V of the cached
        tokens -> run this stage's layers (capturing when asked) -> keep the captured K/V.
        """
        self.kv.release(call.request, call.release)
        capture = {} if call.capture is not None else None
        inputs = self.model.embed(**call.model_kwargs(self.device),
                                  kv_cache=self.kv.gather(call.request, call.kv_read, range(self.start, self.end)),
                                  kv_capture=capture, capture_chunks=call.capture_chunks)
        h = inputs.tokens if self.is_first else h.to(self.device)
        h = self.run_blocks(h, inputs)
        if capture is not None:
            a, b = call.capture_chunks if call.capture_chunks is not None else (0, inputs.num_chunks)
            self.kv.put(call.request, call.capture, capture, b - a)
        return self.unembed(h, inputs) if self.is_last else h

    def end_request(self, request: str) -> None:
        self.kv.end_request(request)

    def reset(self) -> None:
        self.kv.clear()


# ----------------------------------------------------------------------------- 3. the entry point

def parallelize_magi1(model: MagiDiT, stage_index: int, num_stages: int, *, counts: Sequence[int] | None = None,
                      sp_group: Any = None) -> MagiStage:
    """One stage of a replica from a whole model (modified in place), in the documented order:
    1. pipeline split, 2. sequence parallel (refused for more than one rank)."""
    if not isinstance(stage_index, int) or not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index must be in [0, {num_stages}); got {stage_index!r}")
    start, end = split_blocks(model.config.num_layers, num_stages, counts)[stage_index]
    # 1. pipeline split
    stage_model = prune_to_stage(model, start, end, keep_final=stage_index == num_stages - 1)
    # 2. sequence parallel
    if sp_group is not None and torch.distributed.get_world_size(sp_group) > 1:
        raise NotImplementedError(SEQUENCE_PARALLEL_REFUSED)
    return MagiStage(stage_model, stage_index, num_stages, (start, end))


# ----------------------------------------------------------------------------- 4. loading a stage

@dataclass(frozen=True)
class MagiStageSpec:
    """Where a stage's weights come from.

    source: a named size of `pipelines.magi1.sizes` (random weights drawn from `seed`: every stage then
        holds exactly the weights of an in-process model of the same spec; `overrides` replace config
        fields, e.g. (("num_layers", 3),)) or a weights folder (local path or fsspec URL). A folder's
        config is its config.json, or the named size in `overrides` (("size", "4.5b-distill"),): the
        official folders carry no config.
    dtype: the layers' dtype; the entries upstream keeps in float32 stay float32.
    """

    source: str = "tiny"
    seed: int = 0
    dtype: str = "float32"
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        keys = [k for k, _ in self.overrides]
        if self.source in SIZES:
            if "size" in keys:
                raise ValueError(f"overrides ('size', ...) name the config of a weights folder; {self.source!r} "
                                 f"is a named size already")
            self.config()                    # unknown or bad fields raise here, naming the valid ones
        elif keys and keys != ["size"]:
            raise ValueError(f"a MAGI-1 weights folder takes only the override ('size', <named size>) (its "
                             f"config when the folder has no config.json); got {keys} for {self.source!r}")

    def config(self) -> MagiConfig | None:
        """The config of a named size with overrides; None for a weights folder."""
        if self.source not in SIZES:
            return None
        return MagiConfig.from_dict({**SIZES[self.source].config.to_dict(), **dict(self.overrides)})

    @property
    def size(self) -> str | None:
        """The named size a weights folder's config comes from (None: its config.json)."""
        return dict(self.overrides).get("size")


def stage_config(spec: MagiStageSpec) -> MagiConfig:
    """The config of a spec: the named size's, or the weights folder's (one-line CheckpointError)."""
    config = spec.config()
    if config is not None:
        return config
    fs, root = url_to_fs(spec.source)
    root = root.rstrip("/")
    if spec.size is None and fs.isdir(root) and not fs.exists(f"{root}/config.json"):
        raise CheckpointError(f"{spec.source}: no config.json; the official MAGI-1 weights folders carry no model "
                              f"config: name its size in the spec, overrides=(('size', '4.5b-distill'),) "
                              f"(one of {sorted(SIZES)})")
    return resolve_config(spec.size, fs, root, where=spec.source)


def load_stage_model(spec: MagiStageSpec, block_range: tuple[int, int] | None = None, keep_final: bool = True,
                     device: str | torch.device = "cpu") -> MagiDiT:
    """The model with only layers `block_range` (all when None) and, if `keep_final`, the final layers.

    A named size is built whole from `seed`, cast as the loader casts a checkpoint, then pruned. A
    weights folder is built on the meta device, pruned, and only the kept tensors are read (checked
    strictly against the pruned model).
    """
    dtype = DTYPES[spec.dtype]
    config = spec.config()
    if config is not None:
        torch.manual_seed(spec.seed)
        model = MagiDiT(config)
        _cast(model, dtype)
        if block_range is not None:
            model = prune_to_stage(model, *block_range, keep_final=keep_final)
        return model.to(device).eval()
    config = stage_config(spec)
    with torch.device("meta"):
        model = MagiDiT(config)
    if block_range is not None:
        model = prune_to_stage(model, *block_range, keep_final=keep_final)
    state = _read_kept(spec.source, model, device)
    problem = state_dict_mismatch(model, state)
    if problem is not None:
        raise CheckpointError(f"{spec.source}: {problem}; the weights do not fit the MAGI-1 config "
                              f"({config.num_layers} layers, hidden {config.hidden_size})")
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32 if high_precision(k) else dtype)
                           for k, v in state.items()}, strict=True, assign=True)
    model.t_embedder.params_dtype = dtype      # upstream rounds the t sinusoid to the compute dtype
    return model.eval()


def build_stage(spec: MagiStageSpec, stage_index: int, num_stages: int, *, counts: Sequence[int] | None = None,
                device: str | torch.device = "cpu") -> MagiStage:
    """Load only what stage `stage_index` keeps, then parallelize it."""
    block_range = split_blocks(stage_config(spec).num_layers, num_stages, counts)[stage_index]
    model = load_stage_model(spec, block_range, keep_final=stage_index == num_stages - 1, device=device)
    return parallelize_magi1(model, stage_index, num_stages, counts=counts)


def _cast(model: MagiDiT, dtype: torch.dtype) -> None:
    """Layers in `dtype`, the entries upstream promotes in float32 (as `checkpoint.from_state_dict`)."""
    if dtype == torch.float32:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not high_precision(name):
                p.data = p.data.to(dtype)
    model.t_embedder.params_dtype = dtype


def _read_kept(source: str, model: MagiDiT, device: str | torch.device) -> dict[str, Tensor]:
    """The tensors of a weights folder that `model` keeps (local shards: only those are read)."""
    fs, root = url_to_fs(source)
    root = root.rstrip("/")
    wanted = set(model.state_dict())
    state: dict[str, Tensor] = {}
    for name in shard_names(fs, root, where=source):
        path, label = f"{root}/{name}", f"{source.rstrip('/')}/{name}"
        if isinstance(fs, LocalFileSystem):
            with safe_open(path, framework="pt", device=str(device)) as f:
                keys = list(f.keys())
                _refuse_fp8(keys, label)
                state.update({k: f.get_tensor(k) for k in keys if k in wanted})
        else:
            tensors = read_shard(fs, path, device, label=label)
            _refuse_fp8(list(tensors), label)
            state.update({k: v for k, v in tensors.items() if k in wanted})
    return state


def _refuse_fp8(keys: Sequence[str], label: str) -> None:
    scales = fp8_keys({k: torch.empty(0) for k in keys})
    if scales:
        raise CheckpointError(f"{label}: fp8-quantised MAGI-1 weights (e.g. {scales[0]!r}) are not supported; "
                              f"load the bf16 weights of the same model instead (the 'inference_weight.distill' "
                              f"folder next to 'inference_weight.fp8.distill')")
