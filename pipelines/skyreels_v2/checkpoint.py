"""Load and save `WanDFTransformer` checkpoints: `config.json` + safetensors shards, local or any fsspec URL.

Layout (the official one): `config.json` (the `WanModel` fields; `_class_name`-style keys ignored),
then either one `model.safetensors`, or shards listed by a `*.safetensors.index.json` weight map,
or (no index) every `*.safetensors` in the folder. Loading builds the model on the meta device,
checks the state dict against it literally (names and shapes), then assigns the tensors. No pickle.

A bad folder (missing, truncated or corrupt file, config.json that is not a valid config, index
naming absent shards, weights that do not fit the config) raises one `CheckpointError` whose
single line names the file, the problem and the fix: the CLI prints it as is, with no traceback.
"""
from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from pipelines.skyreels_v2.model import WanDFConfig, WanDFTransformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"


# error messages quote file content at most this long: enough to recognise it, never megabytes
QUOTE_CHARS = 80
# messages relayed from other code (config validation) are cut here, as they may echo file content
RELAYED_CHARS = 400
LAYOUT_HINT = (f"a checkpoint folder holds {CONFIG_FILE} and {SINGLE_FILE} "
               f"(or shards listed by {INDEX_FILE})")
REDOWNLOAD = "re-download or re-export it"
FIX_CONFIG = f"fix {CONFIG_FILE} or re-download the checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it claims to be, or a bad checkpoint folder."""


# ----------------------------------------------------------------------------- one-line errors

def excerpt(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` on one line, cut to `limit` characters, quoted."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")


def _cut(text: str, limit: int = RELAYED_CHARS) -> str:
    """A relayed message on one line, cut to `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words (bool before int: True is an int in Python)."""
    for kind, name in ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "true/false"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "null"


def parse_json_object(raw: bytes, label: str, fix: str) -> dict[str, Any]:
    """The JSON object in `raw` (the bytes of file `label`), else a one-line CheckpointError ending in `fix`."""
    if not raw.strip():
        raise CheckpointError(f"{label}: empty file; {fix}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{label}: not JSON (binary, not UTF-8 text); {fix}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        near = excerpt(text[max(0, err.pos - QUOTE_CHARS // 2):err.pos + QUOTE_CHARS // 2])
        raise CheckpointError(f"{label}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}, "
                              f"near {near}); {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{label}: expected a JSON object {{...}}, found {_json_kind(value)} "
                              f"{excerpt(text)}; {fix}")
    return value


def read_json_object(fs: AbstractFileSystem, path: str, label: str, fix: str) -> dict[str, Any]:
    """Read and parse one JSON object file; a missing file is a CheckpointError too."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{label}: missing; {fix}") from None
    return parse_json_object(raw, label, fix)


def unreadable_safetensors(label: str, err: Exception) -> CheckpointError:
    """The error for a safetensors file the library refuses (short reason, without its prefix)."""
    # safetensors says "Error while deserializing header: <reason>"; the reason is what helps
    reason = str(err).split(": ", 1)[-1] if str(err).startswith("Error while") else str(err)
    return CheckpointError(f"{label}: not a readable safetensors file (truncated or corrupt: "
                           f"{_cut(reason, QUOTE_CHARS)}); {REDOWNLOAD}")


def read_config(fs: AbstractFileSystem, root: str, label: str | None = None) -> WanDFConfig:
    """`config.json` of a checkpoint folder as a WanDFConfig; any fault is one CheckpointError line."""
    label = label or _join(root, CONFIG_FILE)
    fields = read_json_object(fs, _join(root, CONFIG_FILE), label, REDOWNLOAD)
    for name in ("patch_size", "window_size"):
        # checked here: the dataclass would turn a number into an unhelpful "not iterable" TypeError
        if name in fields and not isinstance(fields[name], list):
            raise CheckpointError(f"{label}: {name} must be an array, e.g. "
                                  f"{[1, 2, 2] if name == 'patch_size' else [-1, -1]}; found "
                                  f"{_json_kind(fields[name])} {excerpt(json.dumps(fields[name]))}; {FIX_CONFIG}")
    try:
        return WanDFConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{label}: {_cut(str(err))}; {FIX_CONFIG}") from None


# ----------------------------------------------------------------------------- strict check

def compare_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor]
                       ) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, "key: expected [..], found [..]" lines) of a state dict."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    misshaped = [f"{k}: expected {list(expected[k])}, found {list(found[k])}"
                 for k in expected if k in found and found[k] != expected[k]]
    return missing, unexpected, misshaped


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    missing, unexpected, misshaped = compare_state_dict(model, state_dict)
    if not (missing or unexpected or misshaped):
        return
    lines = [f"state dict does not match {type(model).__name__}"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"{len(keys)} {title} key(s):")
            lines.extend(f"  {k}" for k in keys)
    raise CheckpointError("\n".join(lines))


def state_dict_mismatch(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> str | None:
    """None when the state dict fits the model, else one short line: counts and the first keys of each kind."""
    kinds = zip(("missing", "unexpected", "mis-shaped"), compare_state_dict(model, state_dict))
    parts = [f"{len(keys)} {title} key(s): {_first_few(keys)}" for title, keys in kinds if keys]
    return "; ".join(parts) or None


def _first_few(items: list[str], shown: int = 2) -> str:
    """The first `shown` items (each cut short), then how many more; "; " as items may hold commas."""
    text = "; ".join(_cut(item, QUOTE_CHARS) for item in items[:shown])
    return text + (f"; and {len(items) - shown} more" if len(items) > shown else "")


def from_state_dict(config: WanDFConfig, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> WanDFTransformer:
    """Build on the meta device, check strictly, then assign the tensors (cast to dtype, moved to device)."""
    model = _build_on_meta(config)
    check_state_dict(model, state_dict)
    return _assign(model, state_dict, dtype, device)


def _build_on_meta(config: WanDFConfig) -> WanDFTransformer:
    with torch.device("meta"):
        return WanDFTransformer(config)


def _assign(model: WanDFTransformer, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None,
            device: str | torch.device) -> WanDFTransformer:
    """Load a checked state dict into a meta-built model (cast to dtype, moved to device)."""
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
    Every fault of the folder is one CheckpointError line naming the file (as `path_or_url`/name).
    """
    fs, root = url_to_fs(path_or_url, **(storage_options or {}))
    names = shard_names(fs, root, where=path_or_url)
    config = read_config(fs, root, label=_join(path_or_url, CONFIG_FILE))
    state_dict = _read_state_dict(fs, root, names, device, path_or_url)
    model = _build_on_meta(config)
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch:
        # one line for the CLI: counts and first keys (check_state_dict lists them all)
        raise CheckpointError(f"{path_or_url}: the *.safetensors weights do not fit the model {CONFIG_FILE} "
                              f"describes ({mismatch}); {FIX_CONFIG}")
    return _assign(model, state_dict, dtype, device)


def _read_state_dict(fs: AbstractFileSystem, root: str, names: list[str], device: str | torch.device,
                     where: str) -> dict[str, Tensor]:
    """Every shard's tensors in one dict; a key in two shards is an error."""
    state_dict: dict[str, Tensor] = {}
    for name in names:
        for key, tensor in read_shard(fs, _join(root, name), device, label=_join(where, name)).items():
            if key in state_dict:
                raise CheckpointError(f"{where}: key {_cut(key, QUOTE_CHARS)!r} appears in more than one shard "
                                      f"(again in {name}); {REDOWNLOAD}")
            state_dict[key] = tensor
    return state_dict


def shard_names(fs: AbstractFileSystem, root: str, where: str | None = None) -> list[str]:
    """Shard file names: those of the index's weight_map when an index exists, else every *.safetensors.

    `where` is how messages name the folder (default `root`, which has lost any URL scheme)."""
    where = where or root
    fs.invalidate_cache(root)   # listings of object stores are cached per file-system instance
    if not fs.isdir(root):
        problem = "a file, not a folder" if fs.exists(root) else "no such folder"
        raise CheckpointError(f"{where}: not a checkpoint folder ({problem}); {LAYOUT_HINT}")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise CheckpointError(f"{where}: more than one index file {indexes}; keep exactly one")
    if indexes:
        shards = sorted(set(read_weight_map(fs, _join(root, indexes[0]), _join(where, indexes[0])).values()))
        absent = [n for n in shards if n not in names]
        if absent:
            raise CheckpointError(f"{_join(where, indexes[0])}: names shard(s) that are not in the folder: "
                                  f"{_first_few(absent, 3)}; re-download them (or the whole checkpoint)")
        return shards
    shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
        raise CheckpointError(f"{where}: no *.safetensors file; {LAYOUT_HINT}")
    return shards


def read_weight_map(fs: AbstractFileSystem, path: str, label: str) -> dict[str, str]:
    """The index's "weight_map" (tensor name -> shard file name), checked to be just that."""
    index = read_json_object(fs, path, label, REDOWNLOAD)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "nothing" if weight_map is None else f"{_json_kind(weight_map)} {excerpt(json.dumps(weight_map))}"
        raise CheckpointError(f'{label}: "weight_map" must be a non-empty object of tensor name -> shard file, '
                              f"found {found}; {REDOWNLOAD}")
    bad = [v for v in weight_map.values() if not isinstance(v, str) or not v.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f'{label}: "weight_map" values must be shard file names (*.safetensors), '
                              f"found {excerpt(json.dumps(bad[0]))}; {REDOWNLOAD}")
    return weight_map


def read_shard(fs: AbstractFileSystem, path: str, device: str | torch.device = "cpu",
               label: str | None = None) -> dict[str, Tensor]:
    """Every tensor of one safetensors file (memory-mapped when local, read whole when remote).

    A truncated or corrupt file is one CheckpointError naming `label` (default `path`)."""
    try:
        if isinstance(fs, LocalFileSystem):
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        return {k: v.to(device) for k, v in load_safetensors_bytes(fs.cat_file(path)).items()}
    except SafetensorError as err:
        raise unreadable_safetensors(label or path, err) from None
    except OSError as err:
        # a folder named like a shard, no permission, a vanished object: the OS reason is the message
        raise CheckpointError(f"{label or path}: cannot be read ({_cut(str(err), QUOTE_CHARS)}); "
                              f"{REDOWNLOAD}") from None


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of one local safetensors file (CPU); a bad file is one CheckpointError line."""
    return read_shard(LocalFileSystem(), str(path))


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
