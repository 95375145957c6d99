"""MAGI-1 DiT: parity with the upstream `VideoDiTModel.forward` on every golden `forward` case, and the
properties the chunk-wise pipeline relies on (K/V cache of clean chunks, block ranges, batch items).

Golden cases come from $SCOPE_GOLDEN_DIR (default ../shared/reference/golden); every `magi-1__*` case
of kind `forward` is a test and never skips. Other kinds (scheduler, timestep_matrix, sample) are
tested elsewhere. The property tests use the `tiny` size with seeded random weights.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipelines.magi1.model import MagiConfig, MagiDiT, distill_dt_factor, load_special_tokens, pad_special_tokens
from pipelines.magi1.sizes import config_for
from tests.parity.golden import check_outputs, discover, golden_root, load_case
from tests.parity.magi1_forward import run_forward

FAMILY = "magi-1"
EXPOSED_TRACE = re.compile(r"trace\.(x_embedder|t_embedder(_distill_dt)?|y_xattn|y_adaln|rope|layer\d+|"
                           r"final_layernorm|final_linear)")
CASES = [c for c in discover(FAMILY) if json.loads((c / "meta.json").read_text())["kind"] == "forward"]


def test_golden_folder_has_forward_cases():
    assert CASES, f"no {FAMILY} forward golden case under {golden_root()} (set SCOPE_GOLDEN_DIR)"


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_golden_forward_case(case_dir):
    case = load_case(case_dir)
    compared = check_outputs(case, run_forward(case))
    assert "output.out" in compared
    missing = sorted(n for n in case.io if EXPOSED_TRACE.fullmatch(n) and n not in compared)
    assert not missing, f"golden case {case.name}: traces the model exposes were not compared: {missing}"


# ----------------------------------------------------------------------------- tiny model helpers

def tiny_model(**changes) -> MagiDiT:
    """The tiny size (8 heads of 32, 4 K/V groups, 2 layers) with seeded random weights, float32."""
    torch.manual_seed(0)
    model = MagiDiT(replace(config_for("tiny"), **changes)).eval()
    with torch.no_grad():   # LayerNorm1p weights start at 0; give every parameter some spread
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
        model.rope.bands.copy_(1.0 / 10000 ** (torch.arange(4) / 4))
    return model


def window(model: MagiDiT, chunks: int, batch: int = 1, frames: int = 6, h: int = 8, w: int = 6, seed: int = 1):
    """Random call arguments for `chunks` chunks: x, t, y, caption_dropout_mask, xattn_mask, block-causal kv_range."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.latent_channels, chunks * frames, h, w, generator=g)
    t = torch.rand(batch, chunks, generator=g)
    y = torch.randn(batch * chunks, 1, cfg.caption_max_length, cfg.caption_channels, generator=g)
    mask = torch.zeros(batch * chunks, 1, cfg.caption_max_length)
    for row in range(batch * chunks):
        mask[row, 0, :3 + row % 5] = 1
    n = frames * (h // 2) * (w // 2)
    kv_range = torch.tensor([[0, (i + 1) * n] for i in range(chunks)] * batch, dtype=torch.int32)
    return x, t, y, torch.zeros(batch, dtype=torch.bool), mask, kv_range


def rows(tensor: torch.Tensor, batch: int, chunks: int, keep: slice) -> torch.Tensor:
    """The per-(item, chunk) rows of chunks `keep` of every item."""
    return tensor.view(batch, chunks, *tensor.shape[1:])[:, keep].flatten(0, 1)


# ----------------------------------------------------------------------------- K/V cache of clean chunks

@torch.no_grad()
def test_cached_clean_chunk_kv_reproduces_the_full_window():
    """Chunk 0 captured alone, then chunks 1-2 attending to its cached K/V = one block-causal window call."""
    model = tiny_model()
    x, t, y, drop, mask, kv_range = window(model, chunks=3)
    full = model(x, t, y, drop, mask, kv_range)
    n = kv_range[0, 1].item()
    # 1. the clean chunk alone, its K/V captured (upstream: the fwd_extra_1st_chunk / cond_pre pass)
    captured: dict = {}
    first = model(x[:, :, :6], t[:, :1], y[:1], drop, mask[:1], kv_range[:1], kv_capture=captured)
    assert sorted(captured) == [0, 1] and captured[0][0].shape == (1, n, 4, 32)
    # 2. the later chunks: RoPE one chunk further on (slice_point), key ranges offset by the cache
    rest = model(x[:, :, 6:], t[:, 1:], y[1:], drop, mask[1:], kv_range[1:], slice_point=1, kv_cache=captured)
    torch.testing.assert_close(first, full[:, :, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest, full[:, :, 6:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_capture_chunks_keeps_only_those_chunks_and_cache_may_live_on_another_dtype():
    model = tiny_model()
    x, t, y, drop, mask, kv_range = window(model, chunks=3)
    captured: dict = {}
    model(x, t, y, drop, mask, kv_range, kv_capture=captured, capture_chunks=(1, 2))
    everything: dict = {}
    model(x, t, y, drop, mask, kv_range, kv_capture=everything)
    n = kv_range[0, 1].item()
    for layer in (0, 1):
        torch.testing.assert_close(captured[layer][0], everything[layer][0][:, n:2 * n])
        torch.testing.assert_close(captured[layer][1], everything[layer][1][:, n:2 * n])


@torch.no_grad()
def test_kv_range_past_the_keys_names_the_layer_and_counts():
    model = tiny_model()
    x, t, y, drop, mask, kv_range = window(model, chunks=2)
    with pytest.raises(ValueError, match=r"kv_range reaches token 300 but layer 0 has 144 keys \(0 cached"):
        model(x, t, y, drop, mask, torch.tensor([[0, 72], [0, 300]]))
    bad = {0: (torch.zeros(1, 72, 8, 32), torch.zeros(1, 72, 8, 32))}
    with pytest.raises(ValueError, match=r"kv_cache\[0\] must be \(k, v\), each \[B=1, M, 4, 32\]"):
        model(x, t, y, drop, mask, kv_range, kv_cache=bad)


# ----------------------------------------------------------------------------- structure for hooks and stages

@torch.no_grad()
def test_forward_is_embed_run_blocks_unembed_and_block_ranges_compose():
    model = tiny_model()
    args = window(model, chunks=2)
    inputs = model.embed(*args)
    h = model.run_blocks(inputs.tokens, inputs, 0, 1)
    h = model.run_blocks(h, inputs, 1, None)
    torch.testing.assert_close(model.unembed(h, inputs), model(*args), atol=0, rtol=0)
    assert inputs.tokens.shape == (1, 2 * 6 * 4 * 3, 256) and inputs.condition.shape == (1, 2, 64)
    assert inputs.rope_table().shape == (inputs.tokens.shape[1], 24)


@torch.no_grad()
def test_batch_items_equal_single_calls_including_per_item_ranges():
    """Two items in one call = two calls; upstream's uncond pass (each chunk its own item) works the same way."""
    model = tiny_model()
    x, t, y, drop, mask, kv_range = window(model, chunks=2, batch=2)
    drop = torch.tensor([False, True])
    kv_range[3] = torch.tensor([72, 144])   # item 1, chunk 1 sees only itself
    both = model(x, t, y, drop, mask, kv_range)
    for b in range(2):
        one = model(x[b:b + 1], t[b:b + 1], y[2 * b:2 * b + 2], drop[b:b + 1], mask[2 * b:2 * b + 2],
                    kv_range[2 * b:2 * b + 2])
        torch.testing.assert_close(both[b:b + 1], one, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_caption_enters_only_through_valid_tokens_and_an_empty_caption_gives_no_text():
    model = tiny_model()
    x, t, y, drop, mask, kv_range = window(model, chunks=2)
    base = model(x, t, y, drop, mask, kv_range)
    noisy_padding = y + (1 - mask.unsqueeze(-1)) * 100.0        # only masked-out tokens change
    torch.testing.assert_close(model(x, t, noisy_padding, drop, mask, kv_range), base)
    mask[0] = 0                                                  # chunk 0 without any caption token
    out = model(x, t, y, drop, mask, kv_range)
    assert torch.isfinite(out).all() and not torch.allclose(out, base)


@torch.no_grad()
def test_adaln_uses_the_null_caption_tokens_not_the_prompt():
    model = tiny_model()
    x, t, y, drop, mask, kv_range = window(model, chunks=2)
    inputs = model.embed(x, t, y, drop, mask, kv_range)
    dropped = model.embed(x, t, y, torch.tensor([True]), mask, kv_range)
    other_prompt = model.embed(x, t, torch.randn_like(y), drop, mask, kv_range)
    torch.testing.assert_close(other_prompt.condition, inputs.condition)
    null = model.y_embedder.null_caption_embedding
    adaln = model.y_embedder.y_proj_adaln[0]
    torch.testing.assert_close(dropped.condition - inputs.condition,
                               (adaln(null[-1]) - adaln(null[-2])).expand(1, 2, -1), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_24b_layout_duplicates_the_latent_and_undoes_the_rescale():
    """half_channel_vae + x_rescale_factor f: out(x) = g(f x) / f on the first half, g = the same model with f = 1."""
    model = tiny_model(in_channels=32, out_channels=32, half_channel_vae=True, x_rescale_factor=0.1,
                       gated_linear_unit=True)
    assert model.layers[0].mlp.linear_fc1.weight.shape == (1024, 256)
    unscaled = MagiDiT(replace(model.config, x_rescale_factor=1.0)).eval()
    unscaled.load_state_dict(model.state_dict())
    x, t, y, drop, mask, kv_range = window(model, chunks=1)
    out = model(x, t, y, drop, mask, kv_range)
    assert out.shape == x.shape
    torch.testing.assert_close(out, unscaled(x * 0.1, t, y, drop, mask, kv_range) / 0.1, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_bf16_parameters_run_and_stay_close_to_fp32():
    from pipelines.magi1.checkpoint import from_state_dict
    model = tiny_model()
    args = window(model, chunks=2)
    half = from_state_dict(model.config, model.state_dict(), dtype=torch.bfloat16)
    assert half.x_embedder.weight.dtype == torch.float32 and half.dtype == torch.bfloat16
    out = half(*args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(*args), atol=0.1, rtol=0.1)


def test_input_errors_name_the_expected_shape():
    model = tiny_model()
    x, t, y, drop, mask, kv_range = window(model, chunks=2)
    with pytest.raises(ValueError, match=r"x must be \[B, 16, T, H, W\]"):
        model(x[:, :8], t, y, drop, mask, kv_range)
    with pytest.raises(ValueError, match=r"must split evenly into the 5 chunks"):
        model(x, torch.rand(1, 5), y, drop, mask, kv_range)
    with pytest.raises(ValueError, match=r"y must be \[B\*chunks=2, L, caption_channels=64\]"):
        model(x, t, y[:1], drop, mask, kv_range)
    with pytest.raises(ValueError, match=r"caption_dropout_mask must be bool \[B=1\]"):
        model(x, t, y, torch.zeros(2, dtype=torch.bool), mask, kv_range)
    with pytest.raises(ValueError, match=r"kv_range must be \[B\*chunks=2, 2\]"):
        model(x, t, y, drop, mask, kv_range[:, :1])


@pytest.mark.parametrize("change, message", [
    (dict(num_query_groups=3), "multiple of num_query_groups"),
    (dict(kv_channels=20), "RoPE needs"),
    (dict(num_attention_heads=5, num_query_groups=5, hidden_size=320, kv_channels=33), "multiple of 8"),
    (dict(cond_gating_ratio=0.5), "cond_gating_ratio must be 1.0"),
    (dict(half_channel_vae=True, in_channels=15, out_channels=15), "in_channels must be even"),
    (dict(params_dtype="torch.int8"), "params_dtype must be one of"),
    (dict(model_name="other"), "videodit_ardf"),
])
def test_config_errors_say_what_is_valid(change, message):
    with pytest.raises(ValueError, match=message):
        replace(config_for("tiny"), **change)


def test_config_reads_the_official_sections_and_names_unknown_fields():
    cfg = config_for("4.5b")
    assert MagiConfig.from_dict({"model_config": cfg.to_dict(), "runtime_config": {}}) == cfg
    with pytest.raises(ValueError, match=r"unknown MagiConfig field\(s\) \['num_heads'\]"):
        MagiConfig.from_dict({**cfg.to_dict(), "num_heads": 3})
    with pytest.raises(ValueError, match="missing required field"):
        MagiConfig.from_dict({"hidden_size": 3072})


def test_distill_dt_factor_follows_upstream():
    assert distill_dt_factor(64) == 32 and distill_dt_factor(16) == 8 and distill_dt_factor(8) == 4
    assert distill_dt_factor(12, distill_interval=2.0) == 4 and distill_dt_factor(12, 1.0) == 8


def test_special_tokens_are_fp16_duration_then_hq_then_caption(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "special_tokens.npz"
    np.savez(path, caption_token=rng.normal(size=(1, 8)), logo_token=rng.normal(size=(1, 8)),
             other_tokens=rng.normal(size=(20, 8)))
    tokens = load_special_tokens(str(path))
    assert tokens["other_tokens"].dtype == torch.float16
    caption, mask = torch.randn(1, 3, 6, 8), torch.zeros(1, 3, 6)
    mask[..., :2] = 1
    out, out_mask = pad_special_tokens(caption, mask, tokens["other_tokens"], max_length=7)
    assert out.shape == (1, 3, 7, 8) and out_mask[0, :, :5].tolist() == [[1, 1, 1, 1, 0]] * 3
    other = tokens["other_tokens"].float()
    for i, left in enumerate((2, 1, 0)):        # DURATION_k with k + 1 chunks left
        torch.testing.assert_close(out[0, i, 0], other[7 + left])
        torch.testing.assert_close(out[0, i, 1], other[1])
        torch.testing.assert_close(out[0, i, 2:], caption[0, i, :5])
