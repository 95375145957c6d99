"""Load and save `WanDFTransformer` checkpoints: `config.json` + safetensors shards, local or any fsspec URL.

Layout (the official one): `config.json` (the `WanModel` fields; `_class_name`-style keys ignored),
then either one `model.safetensors`, or shards listed by a `*.safetensors.index.json` weight map,
or (no index) every `*.safetensors` in the folder. Loading builds the model on the meta device,
checks the state dict against it literally (names and shapes), then assigns the tensors. No pickle.
"""
from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping

import torch
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from pipelines.skyreels_v2.model import WanDFConfig, WanDFTransformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it claims to be, or a bad checkpoint folder."""


# ----------------------------------------------------------------------------- strict check

def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    misshaped = [f"{k}: expected {list(expected[k])}, found {list(found[k])}"
                 for k in expected if k in found and found[k] != expected[k]]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"state dict does not match {type(model).__name__}"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"{len(keys)} {title} key(s):")
            lines.extend(f"  {k}" for k in keys)
    raise CheckpointError("\n".join(lines))


def from_state_dict(config: WanDFConfig, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> WanDFTransformer:
    """Build on the meta device, check strictly, then assign the tensors (cast to dtype, moved to device)."""
    with torch.device("meta"):
        model = WanDFTransformer(config)
    check_state_dict(model, state_dict)
    tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.init_rope()
    return model.eval()


# ----------------------------------------------------------------------------- load

def load_transformer(path_or_url: str, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu",
                     storage_options: dict | None = None) -> WanDFTransformer:
    """Load a checkpoint folder (local path or fsspec URL: file://, s3://, memory://, ...).

    storage_options go to the fsspec file system (e.g. s3 `client_kwargs={"endpoint_url": ...}`);
    without them fsspec's own configuration applies (AWS_* and FSSPEC_S3_* environment variables).
    """
    fs, root = url_to_fs(path_or_url, **(storage_options or {}))
    config = WanDFConfig.from_dict(json.loads(fs.cat_file(_join(root, CONFIG_FILE))))
    state_dict: dict[str, Tensor] = {}
    for name in shard_names(fs, root):
        for key, tensor in read_shard(fs, _join(root, name), device).items():
            if key in state_dict:
                raise CheckpointError(f"{path_or_url}: key {key!r} appears in more than one shard (again in {name})")
            state_dict[key] = tensor
    try:
        return from_state_dict(config, state_dict, dtype, device)
    except CheckpointError as err:
        raise CheckpointError(f"{path_or_url}: {err}") from None


def shard_names(fs: AbstractFileSystem, root: str) -> list[str]:
    """Shard file names: those of the index's weight_map when an index exists, else every *.safetensors."""
    fs.invalidate_cache(root)   # listings of object stores are cached per file-system instance
    if not fs.isdir(root):
        raise CheckpointError(f"{root}: not a checkpoint folder (expected {CONFIG_FILE} and *.safetensors)")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise CheckpointError(f"{root}: more than one index file {indexes}; keep exactly one")
    if indexes:
        weight_map = json.loads(fs.cat_file(_join(root, indexes[0])))["weight_map"]
        shards = sorted(set(weight_map.values()))
        absent = [n for n in shards if n not in names]
        if absent:
            raise CheckpointError(f"{root}: {indexes[0]} names shard(s) that are not there: {absent}")
        return shards
    shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
        raise CheckpointError(f"{root}: no *.safetensors file")
    return shards


def read_shard(fs: AbstractFileSystem, path: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of one safetensors file (memory-mapped when local, read whole when remote)."""
    if isinstance(fs, LocalFileSystem):
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    return {k: v.to(device) for k, v in load_safetensors_bytes(fs.cat_file(path)).items()}


# ----------------------------------------------------------------------------- save

def save_transformer(model: WanDFTransformer, dir_or_url: str, max_shard_bytes: int | None = None,
                     storage_options: dict | None = None) -> list[str]:
    """Write config.json + safetensors (+ index when sharded) to an empty folder; returns the file names."""
    fs, root = url_to_fs(dir_or_url, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    # object stores have no empty folders: a new prefix may not list until something is in it
    listing = fs.ls(root, detail=False) if fs.exists(root) else []
    existing = [posixpath.basename(p.rstrip("/")) for p in listing]
    clash = [n for n in existing if n == CONFIG_FILE or n.endswith(".safetensors") or n.endswith(INDEX_SUFFIX)]
    if clash:
        raise CheckpointError(f"{dir_or_url}: already holds {clash}; save into an empty folder")
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards = split_shards(state_dict, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        fs.pipe_file(_join(root, name), save_safetensors_bytes(shard))
    config = {"_class_name": "WanModel", **model.config.to_dict()}
    fs.pipe_file(_join(root, CONFIG_FILE), json.dumps(config, indent=2).encode())
    written = [CONFIG_FILE, *names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(v) for v in state_dict.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        fs.pipe_file(_join(root, INDEX_FILE), json.dumps(index, indent=2).encode())
        written.append(INDEX_FILE)
    return written


def split_shards(state_dict: dict[str, Tensor], max_shard_bytes: int | None) -> list[dict[str, Tensor]]:
    """Greedy split in key order; a shard exceeds max_shard_bytes only when one tensor alone does."""
    if max_shard_bytes is None:
        return [state_dict]
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be None (one file) or a positive byte count, e.g. 5 * 2**30; "
                         f"got {max_shard_bytes}")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        if shards[-1] and size + _nbytes(tensor) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += _nbytes(tensor)
    return shards


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"
