"""Parity with upstream's umT5 encoder (SkyReels-V2 `T5Encoder`): one test per `wan-umt5__*` golden case.

The folder comes from $SCOPE_GOLDEN_DIR (default ../shared/reference/golden). Everything a case
needs (config, weights, inputs, tolerances) is read from the case; a case never skips. Each case
runs with both attention kernels the encoder offers. The full-size key listing is checked to map
and load, on the meta device, through the same function the file loader uses.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipelines.wan.umt5 import UMT5Config, UMT5Encoder, encoder_from_official, official_key_map, to_official_state_dict
from tests.parity.golden import GoldenCase, check_outputs, discover, golden_root, load_case, reference_root

FAMILY = "wan-umt5"
KINDS = ("forward",)
CASES = discover(FAMILY)
KEY_LISTING = "wan-umt5_keys.json"


def test_golden_folder_has_cases():
    assert CASES, f"no {FAMILY} golden case under {golden_root()} (set SCOPE_GOLDEN_DIR)"


def run_forward(case: GoldenCase, attn_implementation: str) -> dict[str, torch.Tensor]:
    """`output.context` plus every trace the case holds: embedding, block{i}, hidden, rel_buckets."""
    config = UMT5Config.from_dict(case.meta["model_config"])
    encoder = encoder_from_official(case.weights, config, dtype=torch.float32,
                                    attn_implementation=attn_implementation, label=f"golden case {case.name}")
    ids, mask = case.call_tensor("input.ids"), case.call_tensor("input.mask")
    produced: dict[str, torch.Tensor] = {}
    hooks = record_traces(encoder, produced)
    try:
        with torch.no_grad():
            produced["output.context"] = encoder(ids, mask)
            produced["trace.hidden"] = encoder.hidden(ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    produced["trace.rel_buckets"] = encoder.relative_buckets(ids.shape[1])
    # only what this case stores: another golden set may keep fewer traces
    return {name: value for name, value in produced.items() if name in case.io}


def record_traces(encoder: UMT5Encoder, produced: dict[str, torch.Tensor]) -> list:
    """Forward hooks writing the embedding output and each block's residual stream into `produced`."""
    def keep(name):
        def hook(_module, _inputs, output):
            produced[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    stack = encoder.model.encoder
    hooks = [stack.embed_tokens.register_forward_hook(keep("trace.embedding"))]
    hooks += [block.register_forward_hook(keep(f"trace.block{i}")) for i, block in enumerate(stack.block)]
    return hooks


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_golden_case(case_dir, attn_implementation):
    case = load_case(case_dir)
    if case.kind not in KINDS:
        pytest.fail(f"golden case {case.name}: kind {case.kind!r} is not supported by the {FAMILY} adapter "
                    f"(supported: {list(KINDS)})")
    produced = run_forward(case, attn_implementation)
    compared = check_outputs(case, produced)
    assert "output.context" in compared
    # the traces the encoder exposes must all have been compared when the case holds them
    exposable = {"trace.embedding", "trace.hidden", "trace.rel_buckets"} | {
        f"trace.block{i}" for i in range(case.meta["model_config"]["encoder_layers"])}
    assert exposable & set(case.io) <= set(compared)


def test_full_size_key_listing_loads_on_meta():
    """wan-umt5_keys.json (the official XXL state dict) maps with no missing/unexpected/mis-shaped key."""
    listing = json.loads((reference_root() / KEY_LISTING).read_text())
    config = UMT5Config.named("xxl")
    assert list(official_key_map(config)) == list(listing), "the key table's order/names differ from the listing"
    state_dict = {k: torch.empty(shape, dtype=torch.bfloat16, device="meta") for k, shape in listing.items()}
    encoder = encoder_from_official(state_dict, config, device="meta", label=KEY_LISTING)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight
    params = sum(p.numel() for p in encoder.parameters())  # tied embedding counted once
    assert params == sum(torch.Size(shape).numel() for shape in listing.values())
    assert 5.6e9 < params < 5.7e9  # GOLDEN_FORMAT 8: 5.68 B
    round_trip = to_official_state_dict(encoder)
    assert {k: list(v.shape) for k, v in round_trip.items()} == listing
