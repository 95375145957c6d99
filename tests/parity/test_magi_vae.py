"""Parity with the upstream MAGI-1 ViT VAE: one test per `magi-vae__*` golden case, plus the full-size keys.

The folder comes from $SCOPE_GOLDEN_DIR (default ../shared/reference/golden). Everything a case needs
(config, weights, tiling, scale factor, which traces exist) comes from its meta.json and io file; a
case of an unsupported kind fails and names the kind, it never skips.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipelines.magi1.vae import (MagiVAEConfig, MagiVAETiling, config_for, decode_plan, decode_video,
                                 encode_plan, encode_video, expected_keys, from_state_dict, to_uint8)
from tests.parity.golden import GoldenCase, check_outputs, discover, golden_root, load_case, reference_root

FAMILY = "magi-vae"
CASES = discover(FAMILY)


def _vae_and_tiling(case: GoldenCase):
    cfg = MagiVAEConfig.from_dict(case.meta["model_config"])
    assert case.weights is not None, f"golden case {case.name}: kind {case.kind} needs weights"
    vae = from_state_dict(cfg, case.weights, dtype=torch.float32, where=f"golden case {case.name} weights")
    return vae, MagiVAETiling.from_dict(case.call["tiling"])


def _check_grid(case: GoldenCase, plans, recorded_key: str, length_axes) -> None:
    """When the case records its tile grid (`call.tile_grid_*`), ours must be the same ranges."""
    recorded = case.call.get(recorded_key)
    if recorded is None:
        return
    ours = {axis: [list(r) for r in plan.ranges(n)] for axis, plan, n in zip("thw", plans, length_axes)}
    assert ours == {axis: recorded[axis] for axis in "thw"}, \
        f"golden case {case.name}: tile grid {ours} != recorded {recorded_key} {recorded}"


def run_encode(case: GoldenCase) -> dict[str, torch.Tensor]:
    """latent = tiled_encode_3d(video, **tiling, allow_spatial_tiling=True) * scale_factor, with traces."""
    vae, tiling = _vae_and_tiling(case)
    video = case.tensor("input.video")
    _check_grid(case, encode_plan(vae.config, tiling, tuple(video.shape[2:])), "tile_grid_pixels", video.shape[2:])
    trace: dict[str, torch.Tensor] = {}
    produced = {"output.latent": encode_video(vae, video, tiling, case.call["scale_factor"], trace=trace)}
    produced.update({f"trace.{name}": value for name, value in trace.items() if f"trace.{name}" in case.io})
    return produced


def run_decode(case: GoldenCase) -> dict[str, torch.Tensor]:
    """video = VaeHelper.decode(latent / scale_factor, **tiling): float frames first, and their uint8."""
    vae, tiling = _vae_and_tiling(case)
    latent = case.tensor("input.latent")
    _check_grid(case, decode_plan(vae.config, tiling, tuple(latent.shape[2:])), "tile_grid_latent", latent.shape[2:])
    video = decode_video(vae, latent, tiling, case.call["scale_factor"])
    produced = {"output.video": video, "output.video_uint8": to_uint8(video)}
    return {name: value for name, value in produced.items() if name in case.io}


RUNNERS = {"encode": run_encode, "decode": run_decode}


def test_golden_folder_has_cases():
    assert CASES, f"no {FAMILY} golden case under {golden_root()} (set SCOPE_GOLDEN_DIR)"


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_golden_case(case_dir):
    case = load_case(case_dir)
    runner = RUNNERS.get(case.kind)
    if runner is None:
        pytest.fail(f"golden case {case.name}: kind {case.kind!r} is not supported by the "
                    f"{FAMILY} adapter (supported: {sorted(RUNNERS)})")
    compared = check_outputs(case, runner(case))
    assert any(n.startswith("output.") for n in compared)
    if case.kind == "encode":
        # every trace we can expose and the case holds was compared
        exposable = [n for n in case.io if n == "trace.moments_mode" or
                     (n.startswith("trace.tile") and n.endswith("_mode"))]
        assert sorted(exposable) == sorted(n for n in compared if n.startswith("trace.")), compared


def test_full_size_key_listing_loads_on_meta():
    """The official 613.8 M-parameter key listing fits `official` exactly, through the loader's own path."""
    listing = json.loads((reference_root() / "magi-vae_keys.json").read_text())
    cfg = config_for("official")
    assert expected_keys(cfg) == {k: tuple(v) for k, v in listing.items()}
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in listing.items()}
    vae = from_state_dict(cfg, state_dict, device="meta", where="magi-vae_keys.json")
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == listing
    assert all(p.device.type == "meta" for p in vae.parameters())
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 613.8


def test_golden_configs_round_trip():
    """Each case's model_config parses and writes back the same ddconfig (official naming)."""
    for case_dir in CASES:
        meta = json.loads((case_dir / "meta.json").read_text())
        if meta.get("model_config"):
            cfg = MagiVAEConfig.from_dict(meta["model_config"])
            ours = cfg.to_dict()["ddconfig"]
            theirs = {k: v for k, v in meta["model_config"]["ddconfig"].items() if k not in cfg.INERT_KEYS}
            assert {k: ours[k] for k in theirs} == theirs, case_dir.name
