"""SkyReels-V2 DF transformer: official key layout, batching, frame selection, K/V prefix, checkpoints.

Numerical parity with upstream is tested by the golden cases (tests/parity); these tests check the
properties the rest of the system relies on, on the `tiny` size on CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.skyreels_v2.checkpoint import (CheckpointError, check_state_dict, from_state_dict,
                                              load_transformer, save_transformer)
from pipelines.skyreels_v2.model import WanDFConfig, WanDFTransformer
from pipelines.skyreels_v2.sizes import SIZES, config_for
from tests.parity.golden import reference_root

KEYS_JSON = reference_root() / "skyreels_v2_df_1.3b_keys.json"
F, H, W = 4, 6, 8  # latent frames, height, width (non-square on purpose)


def tiny_model(seed: int = 0, **overrides) -> WanDFTransformer:
    """The tiny size with random weights (default init, so nothing is zero)."""
    torch.manual_seed(seed)
    config = WanDFConfig.from_dict({**config_for("tiny").to_dict(), **overrides})
    return WanDFTransformer(config).eval()


def tiny_inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, 16, F, H, W], per-frame t [B, F], context [B, L, text_dim]."""
    g = torch.Generator().manual_seed(seed)
    cfg = config_for("tiny")
    x = torch.randn(batch, cfg.in_dim, F, H, W, generator=g)
    t = torch.randint(0, 1000, (batch, F), generator=g)
    context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, context


def meta_model(config: WanDFConfig) -> WanDFTransformer:
    with torch.device("meta"):
        return WanDFTransformer(config)


# ----------------------------------------------------------------------------- layout and config

def test_1_3b_state_dict_equals_official_key_listing():
    official = json.loads(KEYS_JSON.read_text())  # flat key -> shape
    ours = {k: list(v.shape) for k, v in meta_model(config_for("1.3b-540p")).state_dict().items()}
    missing = sorted(set(official) - set(ours))
    unexpected = sorted(set(ours) - set(official))
    misshaped = {k: (ours[k], official[k]) for k in official if k in ours and ours[k] != official[k]}
    assert not (missing or unexpected or misshaped), (missing, unexpected, misshaped)


@pytest.mark.parametrize("name", ["14b-540p", "14b-720p"])
def test_14b_builds_on_meta_without_fps_keys(name):
    sd = meta_model(config_for(name)).state_dict()
    assert len(sd) == 1095
    assert not any(k.startswith("fps_") for k in sd)
    assert sd["blocks.39.ffn.0.weight"].shape == (13824, 5120)
    assert sum(v.numel() for v in sd.values()) == 14_288_491_584


def test_config_from_dict_ignores_private_keys_and_names_unknown_ones():
    d = {"_class_name": "WanModel", "_diffusers_version": "0.31", **config_for("tiny").to_dict()}
    assert WanDFConfig.from_dict(d) == config_for("tiny")
    with pytest.raises(ValueError, match=r"unknown WanDFConfig field\(s\) \['num_layer'\].*valid fields"):
        WanDFConfig.from_dict({**d, "num_layer": 3})


@pytest.mark.parametrize("change, message", [
    ({"num_heads": 3}, "multiple of num_heads"),
    ({"dim": 8, "num_heads": 2}, "at least 6"),
    ({"window_size": [4, 4]}, r"window_size must be \[-1, -1\]"),
    ({"model_type": "i2v"}, "model_type must be 't2v'"),
])
def test_config_errors_say_what_is_valid(change, message):
    with pytest.raises(ValueError, match=message):
        WanDFConfig.from_dict({**config_for("tiny").to_dict(), **change})


def test_config_for_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names: \['1.3b-540p', '14b-540p', '14b-720p', 'tiny'\]"):
        config_for("2b")
    assert set(SIZES) == {"1.3b-540p", "14b-540p", "14b-720p", "tiny"}


# ----------------------------------------------------------------------------- forward semantics

@pytest.mark.parametrize("cbs", [None, 2])
def test_batch_of_two_equals_two_single_calls(cbs):
    model = tiny_model()
    x, t, context = tiny_inputs(batch=2)
    with torch.no_grad():
        both = model(x, t, context, fps=[0, 1], causal_block_size=cbs)
        one = [model(x[i:i + 1], t[i:i + 1], context[i:i + 1], fps=[i], causal_block_size=cbs) for i in range(2)]
    torch.testing.assert_close(both, torch.cat(one), atol=1e-5, rtol=1e-5)


def test_scalar_t_equals_the_same_t_on_every_frame():
    model = tiny_model()
    x, _, context = tiny_inputs(batch=1)
    with torch.no_grad():
        plain = model(x, torch.tensor([500]), context, fps=[1])
        per_frame = model(x, torch.full((1, F), 500), context, fps=[1])
    torch.testing.assert_close(plain, per_frame, atol=1e-5, rtol=1e-5)


def test_forward_is_embed_run_blocks_unembed_and_block_ranges_compose():
    model = tiny_model()
    x, t, context = tiny_inputs(batch=1)
    with torch.no_grad():
        inputs = model.embed(x, t, context, fps=[1])
        staged = model.run_blocks(model.run_blocks(inputs.tokens, inputs, 0, 1), inputs, 1)
        torch.testing.assert_close(model.unembed(staged, inputs), model(x, t, context, fps=[1]))


def test_select_frames_slices_every_per_token_field():
    model = tiny_model()
    x, t, context = tiny_inputs(batch=1)
    frames = torch.tensor([1, 3])
    with torch.no_grad():
        full = model.embed(x, t, context, fps=[1], causal_block_size=2)
        sub = full.select_frames(frames)
        # the same subset embedded on its own, told its original frame positions
        alone = model.embed(x[:, :, frames], t[:, frames], context, fps=[1], causal_block_size=2,
                            frame_index=frames)
    hw = full.tokens_per_frame
    idx = (frames[:, None] * hw + torch.arange(hw)).flatten()
    assert sub.grid == alone.grid == (2, H // 2, W // 2) and sub.tokens_per_frame == hw
    assert sub.frame_index.tolist() == alone.frame_index.tolist() == [1, 3]
    torch.testing.assert_close(sub.tokens, full.tokens[:, idx])
    torch.testing.assert_close(sub.e, full.e[:, idx])
    torch.testing.assert_close(sub.e0, full.e0[:, :, idx])
    torch.testing.assert_close(sub.rope, full.rope[idx])
    assert torch.equal(sub.block_mask(), full.block_mask()[idx][:, idx])
    for name in ("tokens", "e", "e0", "rope"):
        torch.testing.assert_close(getattr(sub, name), getattr(alone, name), msg=name)
    assert torch.equal(sub.block_mask(), alone.block_mask())


@pytest.mark.parametrize("cbs", [None, 2])
def test_recorded_kv_prefix_reproduces_the_full_window(cbs):
    """Frames 2..F-1 run alone, attending to the recorded K/V of frames 0-1, equal the full-window run."""
    model = tiny_model()
    x, t, context = tiny_inputs(batch=1)
    with torch.no_grad():
        full = model.embed(x, t, context, fps=[1], causal_block_size=cbs)
        full.kv_record, full.kv_record_frames = {}, torch.tensor([0, 1])
        h_full = model.run_blocks(full.tokens, full)
        later = full.select_frames(torch.arange(2, F))
        later.kv_prefix, later.kv_record = full.kv_record, None
        h_later = model.run_blocks(later.tokens, later)
    assert sorted(full.kv_record) == list(range(len(model.blocks)))
    assert full.kv_record[0][0].shape == (1, 2, 2 * full.tokens_per_frame, 32)  # [B, heads, M, head_dim]
    torch.testing.assert_close(h_later, h_full[:, 2 * full.tokens_per_frame:], atol=1e-5, rtol=1e-5)


def test_bf16_parameters_run_and_stay_close_to_fp32():
    model = tiny_model()
    x, t, context = tiny_inputs(batch=1)
    with torch.no_grad():
        ref = model(x, t, context, fps=[1])
        out = model.to(torch.bfloat16)(x, t, context, fps=[1])
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_input_errors_name_the_expected_shape():
    model = tiny_model()
    x, t, context = tiny_inputs(batch=1)
    with pytest.raises(ValueError, match="one timestep per latent frame"):
        model(x, t[:, :2], context, fps=[1])
    with pytest.raises(ValueError, match="fps is required"):
        model(x, t, context)
    with pytest.raises(ValueError, match=r"context must be \[B=1, L, text_dim=32\]"):
        model(x, t, context[..., :8], fps=[1])


# ----------------------------------------------------------------------------- checkpoints

def assert_same_model(a: WanDFTransformer, b: WanDFTransformer) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x, t, context = tiny_inputs(batch=1)
    with torch.no_grad():  # equal weights; memory-mapped tensors may take other SIMD paths (~1e-7)
        torch.testing.assert_close(a(x, t, context, fps=[1]), b(x, t, context, fps=[1]), atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_local_single_file(tmp_path):
    model = tiny_model()
    assert save_transformer(model, str(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    loaded = load_transformer(str(tmp_path / "ckpt"))
    assert_same_model(model, loaded)
    assert loaded.rope_freqs[0].device.type == "cpu"  # RoPE tables are real after meta loading
    assert load_transformer(f"file://{tmp_path / 'ckpt'}", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_checkpoint_round_trip_fsspec_memory_sharded_with_index():
    model = tiny_model()
    url = "memory://skyreels-unit/sharded"
    written = save_transformer(model, url, max_shard_bytes=200_000)
    shards = [n for n in written if n.endswith(".safetensors")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in written
    assert_same_model(model, load_transformer(url))
    with pytest.raises(CheckpointError, match="empty folder"):
        save_transformer(model, url)


def test_checkpoint_shards_without_index_are_all_read(tmp_path):
    model = tiny_model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = list(sd)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: sd[k] for k in keys[:20]}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k] for k in keys[20:]}, str(tmp_path / "b.safetensors"))
    assert_same_model(model, load_transformer(str(tmp_path)))


def test_loader_error_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model = tiny_model()
    sd = dict(model.state_dict())
    del sd["blocks.1.self_attn.norm_q.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["head.head.weight"] = torch.zeros(63, 64)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(model, sd)
    message = str(err.value)
    assert "1 missing key(s):\n  blocks.1.self_attn.norm_q.weight" in message
    assert "1 unexpected key(s):\n  blocks.0.extra.weight" in message
    assert "head.head.weight: expected [64, 64], found [63, 64]" in message

    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="blocks.1.self_attn.norm_q.weight"):
        load_transformer(str(tmp_path))
    with pytest.raises(CheckpointError, match="missing key"):
        from_state_dict(model.config, sd)
