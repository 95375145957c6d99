"""MAGI-1 checkpoint loading: the official key listings on the meta device, round trips (local and
fsspec, single file and sharded), and every fault as one short line naming the file (and key).

Key listings (`magi1_*_keys.json`) come from $SCOPE_REFERENCE_DIR (default ../shared/reference).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.magi1.checkpoint import (CheckpointError, from_state_dict, load_transformer, meta_state_dict,
                                        official_keys, save_transformer)
from pipelines.magi1.model import MagiDiT
from pipelines.magi1.sizes import SIZES, config_for, size_for
from tests.parity.golden import reference_root

MAX_MESSAGE = 600


def listing(name: str) -> dict:
    path = reference_root() / name
    assert path.is_file(), f"key listing {path} is missing (set SCOPE_REFERENCE_DIR)"
    return json.loads(path.read_text())


def tiny(folder: Path, max_shard_bytes: int | None = None) -> MagiDiT:
    torch.manual_seed(0)
    model = MagiDiT(config_for("tiny")).eval()
    save_transformer(model, str(folder), max_shard_bytes=max_shard_bytes)
    return model


def one_line_error(load, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def same_weights(a: MagiDiT, b: MagiDiT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=0, rtol=0, msg=k)


# ----------------------------------------------------------------------------- official key listings

@pytest.mark.parametrize("file, size", [("magi1_4.5b_keys.json", "4.5b"), ("magi1_24b_keys.json", "24b"),
                                        ("magi1_4.5b_keys.json", "4.5b-distill")])
def test_official_key_listing_loads_on_meta_with_every_key_and_shape(file, size):
    reference = listing(file)
    model = from_state_dict(size, meta_state_dict(reference["keys"]))
    state = model.state_dict()
    assert list(state) == list(reference["keys"])
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in reference["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]
    # upstream's _high_precision_promoter: embedders / q,k LayerNorms / post-norms / final layers in float32
    attention = model.layers[0].self_attention
    assert model.x_embedder.weight.dtype == model.final_linear.linear.weight.dtype == torch.float32
    assert attention.q_layernorm.weight.dtype == model.layers[0].mlp_post_norm.weight.dtype == torch.float32
    assert attention.q_layernorm_xattn.weight.dtype == attention.linear_qkv.q.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("size", sorted(SIZES))
def test_key_table_equals_the_model_state_dict(size):
    with torch.device("meta"):
        model = MagiDiT(config_for(size))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_keys(config_for(size))


def test_fp8_distill_quant_listing_is_refused_naming_the_bf16_folder():
    reference = listing("magi1_4.5b_distill_quant_keys.json")
    message = one_line_error(lambda: from_state_dict("4.5b-distill", meta_state_dict(reference["keys"])),
                             "fp8-quantised", "inference_weight.distill", "fp8 entries")
    assert "layers.1." in message   # the first quantised layer (layers 0 and 33 stay bf16)


def test_fp8_shard_on_disk_is_refused_naming_the_file(tmp_path):
    tiny(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "videodit_blocks.layers.1.mlp.linear_fc2"
    state[f"{key}.weight"] = state[f"{key}.weight"][None].to(torch.float8_e4m3fn)
    state[f"{key}.weight_scale"] = torch.ones(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    one_line_error(lambda: load_transformer(str(tmp_path)), "fp8-quantised", "in model.safetensors",
                   "inference_weight.distill")


def test_sizes_are_the_official_configs():
    assert size_for("24b").config.half_channel_vae and size_for("24b").config.x_rescale_factor == 0.1
    assert size_for("4.5b-distill").config == size_for("4.5b").config and size_for("4.5b-distill").distill
    assert size_for("24b-distill").weights_folder == "inference_weight.distill"
    assert set(SIZES) == {"4.5b", "4.5b-distill", "24b", "24b-distill", "tiny"}
    with pytest.raises(ValueError, match="valid names"):
        size_for("7b")


# ----------------------------------------------------------------------------- round trips

def test_round_trip_local_single_file_reads_config_json(tmp_path):
    model = tiny(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    same_weights(load_transformer(str(tmp_path)), model)


def test_round_trip_fsspec_memory_sharded_with_index_and_size_name():
    import fsspec
    url = "memory://magi1-ckpt/inference_weight"
    torch.manual_seed(0)
    model = MagiDiT(config_for("tiny")).eval()
    written = save_transformer(model, url, max_shard_bytes=1_000_000)
    try:
        assert "model.safetensors.index.json" in written and len(written) > 3
        fsspec.filesystem("memory").rm(url.replace("memory://", "/") + "/config.json")  # official folders: no config
        same_weights(load_transformer(url, config="tiny"), model)
        one_line_error(lambda: load_transformer(url), "no config.json", "pass config=")
    finally:
        fsspec.filesystem("memory").rm("/magi1-ckpt", recursive=True)


def test_bf16_load_keeps_promoted_entries_in_float32(tmp_path):
    tiny(tmp_path)
    model = load_transformer(str(tmp_path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.rope.bands.dtype == torch.float32
    assert model.y_embedder.null_caption_embedding.dtype == torch.float32


# ----------------------------------------------------------------------------- faults

def test_missing_key_names_the_key(tmp_path):
    tiny(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["videodit_blocks.layers.1.self_attention.linear_kv_xattn.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    one_line_error(lambda: load_transformer(str(tmp_path)),
                   "missing key 'videodit_blocks.layers.1.self_attention.linear_kv_xattn.weight'", str(tmp_path))


def test_unexpected_key_names_the_key_and_its_shard(tmp_path):
    tiny(tmp_path, max_shard_bytes=1_000_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    state = load_file(str(shard))
    state["videodit_blocks.layers.2.mlp.linear_fc1.weight"] = torch.zeros(512, 256)
    save_file(state, str(shard))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["videodit_blocks.layers.2.mlp.linear_fc1.weight"] = shard.name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(lambda: load_transformer(str(tmp_path)),
                   f"unexpected key 'videodit_blocks.layers.2.mlp.linear_fc1.weight' in {shard.name}")


def test_misshaped_key_and_wrong_config_name_the_key_and_the_fix(tmp_path):
    tiny(tmp_path)
    message = one_line_error(lambda: load_transformer(str(tmp_path), config="4.5b"), "pass the matching config")
    assert "in model.safetensors is mis-shaped" in message or "missing key" in message


def test_truncated_shard_names_the_file(tmp_path):
    tiny(tmp_path, max_shard_bytes=1_000_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    one_line_error(lambda: load_transformer(str(tmp_path)), shard.name, "truncated or corrupt")


def test_shard_named_in_the_index_but_absent_names_both(tmp_path):
    tiny(tmp_path, max_shard_bytes=1_000_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    one_line_error(lambda: load_transformer(str(tmp_path)), "model.safetensors.index.json",
                   f"names shard {shard.name!r} that is not in the folder")


def test_compressed_shards_say_to_decompress(tmp_path):
    tiny(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model.safetensors.zst")
    one_line_error(lambda: load_transformer(str(tmp_path)), "zstd-compressed", "zstd -d")


def test_not_a_folder_and_bad_config_are_one_line(tmp_path):
    one_line_error(lambda: load_transformer(str(tmp_path / "absent"), config="tiny"), "no such folder")
    tiny(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_config": {"num_layers": 2}}))
    one_line_error(lambda: load_transformer(str(tmp_path)), "config.json", "missing required field")
