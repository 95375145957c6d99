"""Load and save `MagiDiT` checkpoints: safetensors shards (+ index), local or any fsspec URL.

Official layout: `<load>/inference_weight[.fp8][.distill]/model.safetensors` or sharded
`model-*.safetensors` listed by `model.safetensors.index.json`. The official folders hold no model
config (it lives in the run's `*_config.json`), so the config is passed in (a `MagiConfig`, a size
name from `pipelines.magi1.sizes`, or a mapping), or read from a `config.json` in the folder (a bare
`model_config` dict or a whole official config), which `save_transformer` writes.

Loading builds the model on the meta device, checks the state dict literally against it (names
and shapes; every fault is one `CheckpointError` line naming the key and the file), then assigns
the tensors: block weights in the requested dtype (default `params_dtype`), and the entries upstream
promotes (`_high_precision_promoter`: embedders, RoPE bands, q/k LayerNorms, post-norms, final
LayerNorm / linear) in float32.

fp8 checkpoints (`inference_weight.fp8.distill`: `weight` float8_e4m3fn [1, out, in] with
`weight_scale` / `input_scale` / `smooth_scale`) are refused with a message naming the bf16 folder
to use instead. They cannot be dequantised faithfully: q/qx/k/v/fc1 divide activations by a
per-input-channel `input_scale` [in] but hand that same vector to flashinfer's per-tensor
`bmm_fp8` as the output scale, so what the GPU computes depends on kernel details, and the
activation quantisation is lossy anyway.
"""
from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Mapping
from typing import Any

import torch
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from pipelines.magi1.model import MagiConfig, MagiDiT, high_precision
from pipelines.magi1.sizes import config_for
# the family-independent file handling (one-line errors, shard reading) is shared with SkyReels-V2
from pipelines.skyreels_v2.checkpoint import (CheckpointError, parse_json_object, read_shard, read_weight_map,
                                              split_shards)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
FP8_SCALES = (".weight_scale", ".input_scale", ".smooth_scale")
LAYOUT_HINT = (f"a MAGI-1 weights folder (e.g. <load>/inference_weight or inference_weight.distill) holds "
               f"{SINGLE_FILE} or shards listed by {INDEX_FILE}")
REDOWNLOAD = "re-download it"
QUOTE = 80


ConfigLike = MagiConfig | str | Mapping[str, Any] | None


# ----------------------------------------------------------------------------- config

def resolve_config(config: ConfigLike, fs: AbstractFileSystem | None = None, root: str | None = None,
                   where: str | None = None) -> MagiConfig:
    """A MagiConfig from a MagiConfig, a size name, a (model_)config mapping, or the folder's config.json."""
    if isinstance(config, MagiConfig):
        return config
    if isinstance(config, str):
        try:
            return config_for(config)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    if config is not None:
        return _config_from_mapping(config, "config")
    if fs is None or root is None or not fs.exists(_join(root, CONFIG_FILE)):
        raise CheckpointError(f"{where or root}: no {CONFIG_FILE}; the official MAGI-1 weights folders carry no "
                              f"model config: pass config= (a size name such as '4.5b' or '24b-distill', "
                              f"a MagiConfig, or the model_config mapping)")
    label = _join(where or root, CONFIG_FILE)
    return _config_from_mapping(parse_json_object(fs.cat_file(_join(root, CONFIG_FILE)), label, REDOWNLOAD), label)


def _config_from_mapping(d: Mapping[str, Any], label: str) -> MagiConfig:
    try:
        return MagiConfig.from_dict(d)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{label}: {_cut(str(err), 400)}") from None


# ----------------------------------------------------------------------------- the key table

def official_keys(cfg: MagiConfig) -> dict[str, tuple[int, ...]]:
    """Every official state-dict key and its shape for a config (bf16 layout; fp8 keys are refused)."""
    d, dc, dx, hd = cfg.hidden_size, cfg.cond_dim, cfg.xattn_dim, cfg.kv_channels
    q, kv, c, ffn = cfg.num_attention_heads * hd, cfg.num_query_groups * hd, cfg.caption_channels, cfg.ffn_hidden_size
    top = {
        "x_embedder.weight": (d, cfg.in_channels, *cfg.patch),           # Conv3d, no bias
        "t_embedder.mlp.0.weight": (dc, 256), "t_embedder.mlp.0.bias": (dc,),
        "t_embedder.mlp.2.weight": (dc, dc), "t_embedder.mlp.2.bias": (dc,),
        "y_embedder.y_proj_xattn.0.weight": (dx, c), "y_embedder.y_proj_xattn.0.bias": (dx,),
        "y_embedder.y_proj_adaln.0.weight": (dc, c), "y_embedder.y_proj_adaln.0.bias": (dc,),
        "y_embedder.null_caption_embedding": (cfg.caption_max_length, c),
        "rope.bands": (cfg.rope_bands,),                                  # learned RoPE frequencies
    }
    layer = {
        "ada_modulate_layer.proj.0.weight": (2 * d, dc), "ada_modulate_layer.proj.0.bias": (2 * d,),
        "self_attention.linear_qkv.layer_norm.weight": (d,), "self_attention.linear_qkv.layer_norm.bias": (d,),
        "self_attention.linear_qkv.q.weight": (q, d), "self_attention.linear_qkv.qx.weight": (q, d),
        "self_attention.linear_qkv.k.weight": (kv, d), "self_attention.linear_qkv.v.weight": (kv, d),
        "self_attention.linear_kv_xattn.weight": (2 * kv, dx),             # per K/V head: [K_h | V_h]
        "self_attention.linear_proj.weight": (d, 2 * q),                  # input: 8 groups of [self | cross]
        **{f"self_attention.{n}.{p}": (hd,) for n in ("q_layernorm", "q_layernorm_xattn", "k_layernorm",
                                                       "k_layernorm_xattn") for p in ("weight", "bias")},
        "self_attn_post_norm.weight": (d,), "self_attn_post_norm.bias": (d,),
        "mlp.layer_norm.weight": (d,), "mlp.layer_norm.bias": (d,),
        "mlp.linear_fc1.weight": (2 * ffn if cfg.gated_linear_unit else ffn, d),
        "mlp.linear_fc2.weight": (d, ffn),
        "mlp_post_norm.weight": (d,), "mlp_post_norm.bias": (d,),
    }
    keys = dict(top)
    for i in range(cfg.num_layers):
        keys.update({f"videodit_blocks.layers.{i}.{k}": shape for k, shape in layer.items()})
    keys.update({"videodit_blocks.final_layernorm.weight": (d,), "videodit_blocks.final_layernorm.bias": (d,),
                 "final_linear.linear.weight": (math.prod(cfg.patch) * cfg.out_channels, d)})
    return keys


# ----------------------------------------------------------------------------- strict check

def fp8_keys(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Keys that belong to upstream's fp8 linears (scale tensors or float8 weights)."""
    return [k for k, v in state_dict.items()
            if k.endswith(FP8_SCALES) or v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]


def check_state_dict(model: MagiDiT, state_dict: Mapping[str, Tensor], files: Mapping[str, str] | None = None,
                     where: str = "state dict") -> None:
    """Check against `official_keys`; raise one CheckpointError line naming the first bad key (and its file)."""
    fp8 = fp8_keys(state_dict)
    if fp8:
        raise CheckpointError(
            f"{where}: fp8-quantised MAGI-1 weights ({len(fp8)} fp8 entries, e.g. {fp8[0]!r} in "
            f"{_file_of(fp8[0], files)}) are not supported; load the bf16 weights of the same model instead: "
            f"the 'inference_weight.distill' folder next to 'inference_weight.fp8.distill' (sand-ai/MAGI-1 "
            f"ckpt/magi/4.5B_distill/ or 24B_distill/)")
    expected = official_keys(model.config)
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    misshaped = [f"{k}: expected {list(expected[k])}, found {list(state_dict[k].shape)}"
                 for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = ([f"missing key {k!r} (expected in {_expected_file(files)})" for k in missing]
                + [f"unexpected key {k!r} in {_file_of(k, files)}" for k in unexpected]
                + [f"key {m.split(':', 1)[0]!r} in {_file_of(m.split(':', 1)[0], files)} is mis-shaped "
                   f"({m.split(': ', 1)[1]})" for m in misshaped])
    if problems:
        more = f" (and {len(problems) - 1} more: {len(missing)} missing, {len(unexpected)} unexpected, " \
               f"{len(misshaped)} mis-shaped)" if len(problems) > 1 else ""
        raise CheckpointError(f"{where}: {problems[0]}{more}; the weights do not fit the MAGI-1 config "
                              f"({model.config.num_layers} layers, hidden {model.config.hidden_size}): "
                              f"pass the matching config or {REDOWNLOAD}")


def _file_of(key: str, files: Mapping[str, str] | None) -> str:
    return files.get(key, "?") if files else "the state dict"


def _expected_file(files: Mapping[str, str] | None) -> str:
    return "any shard" if files else "the state dict"


# ----------------------------------------------------------------------------- build and assign

def build_on_meta(config: MagiConfig) -> MagiDiT:
    with torch.device("meta"):
        return MagiDiT(config)


def from_state_dict(config: ConfigLike, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", files: Mapping[str, str] | None = None,
                    where: str = "state dict") -> MagiDiT:
    """Build on the meta device, check strictly, assign (block weights in dtype, promoted entries in float32).

    dtype None = the config's params_dtype. Meta tensors in `state_dict` give a meta model (key-listing checks).
    """
    config = resolve_config(config)
    model = build_on_meta(config)
    check_state_dict(model, state_dict, files, where)
    dtype = dtype or config.torch_dtype
    tensors = {k: v.to(device=v.device if v.device.type == "meta" else device,
                       dtype=torch.float32 if high_precision(k) else dtype) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.t_embedder.params_dtype = dtype   # upstream rounds the t sinusoid to the compute dtype
    return model.eval()


def meta_state_dict(listing: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
    """Meta tensors from a key listing {key: {"shape": [...], "dtype": "bfloat16"}} (the *_keys.json files)."""
    return {k: torch.empty(v["shape"], dtype=getattr(torch, v.get("dtype", "float32")), device="meta")
            for k, v in listing.items()}


# ----------------------------------------------------------------------------- load

def load_transformer(path_or_url: str, config: ConfigLike = None, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu", storage_options: dict | None = None) -> MagiDiT:
    """Load a MAGI-1 weights folder (local path or fsspec URL: file://, s3://, memory://, ...).

    config: a MagiConfig, a size name ('4.5b', '24b-distill', ...), a model_config mapping, or None to read
    the folder's config.json. Every fault is one CheckpointError line naming the file (and key).
    """
    fs, root = url_to_fs(path_or_url, **(storage_options or {}))
    names = shard_names(fs, root, where=path_or_url)
    config = resolve_config(config, fs, root, where=path_or_url)
    state_dict, files = read_state_dict(fs, root, names, device, path_or_url)
    return from_state_dict(config, state_dict, dtype, device, files=files, where=path_or_url)


def read_state_dict(fs: AbstractFileSystem, root: str, names: list[str], device: str | torch.device,
                    where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every shard's tensors in one dict, and which file each key came from; a key in two shards is an error."""
    state_dict: dict[str, Tensor] = {}
    files: dict[str, str] = {}
    for name in names:
        for key, tensor in read_shard(fs, _join(root, name), device, label=_join(where, name)).items():
            if key in state_dict:
                raise CheckpointError(f"{where}: key {_cut(key)!r} is in two shards ({files[key]} and {name}); "
                                      f"{REDOWNLOAD}")
            state_dict[key], files[key] = tensor, name
    return state_dict, files


def shard_names(fs: AbstractFileSystem, root: str, where: str | None = None) -> list[str]:
    """The index's shard files when an index exists, else every *.safetensors of the folder."""
    where = where or root
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        problem = "a file, not a folder" if fs.exists(root) else "no such folder"
        raise CheckpointError(f"{where}: not a weights folder ({problem}); {LAYOUT_HINT}")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise CheckpointError(f"{where}: more than one index file {indexes}; keep exactly one")
    if indexes:
        label = _join(where, indexes[0])
        weight_map = read_weight_map(fs, _join(root, indexes[0]), label)
        shards = sorted(set(weight_map.values()))
        absent = [n for n in shards if n not in names]
        if absent:
            compressed = [n for n in absent if n + ".zst" in names]
            hint = (f"{compressed[0]}.zst is zstd-compressed: decompress it first (zstd -d)" if compressed
                    else "re-download it (or the whole folder)")
            raise CheckpointError(f"{label}: names shard {absent[0]!r}"
                                  f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''} "
                                  f"that is not in the folder; {hint}")
        return shards
    shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
        compressed = [n for n in names if n.endswith(".safetensors.zst")]
        hint = (f"{compressed[0]} is zstd-compressed: decompress the shards first (zstd -d)" if compressed
                else LAYOUT_HINT)
        raise CheckpointError(f"{where}: no *.safetensors file; {hint}")
    return shards


# ----------------------------------------------------------------------------- save

def save_transformer(model: MagiDiT, dir_or_url: str, max_shard_bytes: int | None = None,
                     storage_options: dict | None = None) -> list[str]:
    """Write config.json ({"model_config": ...}) + safetensors (+ index when sharded) to an empty folder."""
    fs, root = url_to_fs(dir_or_url, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    listing = fs.ls(root, detail=False) if fs.exists(root) else []
    clash = [posixpath.basename(p.rstrip("/")) for p in listing]
    clash = [n for n in clash if n == CONFIG_FILE or n.endswith((".safetensors", INDEX_SUFFIX))]
    if clash:
        raise CheckpointError(f"{dir_or_url}: already holds {clash}; save into an empty folder")
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards = split_shards(state_dict, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        fs.pipe_file(_join(root, name), save_safetensors_bytes(shard))
    fs.pipe_file(_join(root, CONFIG_FILE), json.dumps({"model_config": model.config.to_dict()}, indent=2).encode())
    written = [CONFIG_FILE, *names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state_dict.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        fs.pipe_file(_join(root, INDEX_FILE), json.dumps(index, indent=2).encode())
        written.append(INDEX_FILE)
    return written


def _cut(text: str, limit: int = QUOTE) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


__all__ = ["CheckpointError", "check_state_dict", "fp8_keys", "official_keys", "from_state_dict", "load_transformer",
           "meta_state_dict", "resolve_config", "save_transformer", "shard_names"]
