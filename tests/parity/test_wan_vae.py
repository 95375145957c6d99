"""Parity with the upstream Wan2.1 VAE (SkyReels-V2 `modules/vae.py`): one test per `wan-vae__*` golden case,
the full-size key listing, and the loader's faults.

The golden folder comes from $SCOPE_GOLDEN_DIR (default ../shared/reference/golden). Everything a case
needs (config, weights file, normalisation, splits) is read from its folder. A case never skips; a case
of an unsupported kind fails and names the kind.
"""
from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from pipelines.skyreels_v2.checkpoint import CheckpointError
from pipelines.wan.vae import (VAE_FILE, VAEStreamDecoder, WanVAE, WanVAEConfig, init_random_weights_,
                               load_wan_vae, vae_from_state_dict)
from tests.parity.golden import GoldenCase, check_outputs, discover, golden_root, load_case, reference_root

FAMILY = "wan-vae"
CASES = discover(FAMILY)


# ----------------------------------------------------------------------------- adapters per kind

def case_vae(case: GoldenCase) -> WanVAE:
    """The case's model: its config and normalisation, its weights file read by the real loader."""
    config = dict(case.meta["model_config"])
    stats = case.call.get("normalisation")
    if stats is not None:
        config.update(latent_mean=stats["mean"], latent_std=stats["std"])
    elif "input.mean" in case.io:
        config.update(latent_mean=case.io["input.mean"].tolist(), latent_std=case.io["input.std"].tolist())
    weights = os.path.join(case.dir, case.meta["weights"]["file"])
    return load_wan_vae(weights, WanVAEConfig.from_dict(config))


def traces_of_case(case: GoldenCase, produced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs always (check_outputs requires them); traces only where the case stores them."""
    return {k: v for k, v in produced.items() if k.startswith("output.") or k in case.io}


def run_encode(case: GoldenCase) -> dict[str, torch.Tensor]:
    vae = case_vae(case)
    video = case.tensor("input.video")
    features = vae.encode_features(video)
    mu, log_var = vae.moments(features)
    latent = vae.normalise(mu)
    # the public one-call path must give the same latent as the traced steps
    torch.testing.assert_close(vae.encode(video), latent, atol=0, rtol=0)
    return {"trace.encoder_out": features, "trace.mu": mu, "trace.log_var": log_var, "output.latent": latent}


def run_decode(case: GoldenCase) -> dict[str, torch.Tensor]:
    vae = case_vae(case)
    latent = case.tensor("input.latent")
    raw = vae.decode_raw(latent)
    video = vae.decode(latent)
    torch.testing.assert_close(video, raw.clamp(-1, 1), atol=0, rtol=0)
    return {"trace.conv2_out": vae.conv2(vae.denormalise(latent)), "trace.video_raw": raw, "output.video": video}


def run_decode_stream(case: GoldenCase) -> dict[str, torch.Tensor]:
    vae = case_vae(case)
    latent = case.tensor("input.latent")
    produced = {"output.video": vae.decode(latent), "trace.video_raw": vae.decode_raw(latent),
                "trace.conv2_out": vae.conv2(vae.denormalise(latent))}
    # one stream over call.splits, the cache never cleared between calls
    stream = VAEStreamDecoder(vae, clamp=False)
    ranges = case.call.get("output_frame_ranges")
    parts = []
    for k, (a, b) in enumerate(case.call["splits"]):
        start = stream.frames_out
        raw = stream.decode_next(latent[:, :, a:b])
        if ranges is not None:
            assert [start, stream.frames_out] == list(ranges[k]), (
                f"golden case {case.name}: split {k} {[a, b]} gave output frames {[start, stream.frames_out]}, "
                f"the reference gave {ranges[k]}")
        produced[f"trace.video_raw_part{k}"] = raw
        produced[f"output.video_part{k}"] = raw.clamp(-1, 1)
        parts.append(raw.clamp(-1, 1))
    tol = case.tolerance("output.video")
    torch.testing.assert_close(torch.cat(parts, dim=2), produced["output.video"], atol=tol["atol"], rtol=tol["rtol"],
                               msg=lambda m: f"golden case {case.name}: streamed parts vs one-shot decode: {m}")
    return produced


RUNNERS = {"encode": run_encode, "decode": run_decode, "decode_stream": run_decode_stream}


def test_golden_folder_has_cases():
    assert CASES, f"no {FAMILY} golden case under {golden_root()} (set SCOPE_GOLDEN_DIR)"


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_golden_case(case_dir):
    case = load_case(case_dir)
    runner = RUNNERS.get(case.kind)
    if runner is None:
        pytest.fail(f"golden case {case.name}: kind {case.kind!r} is not supported by the "
                    f"{FAMILY} adapter (supported: {sorted(RUNNERS)})")
    produced = traces_of_case(case, runner(case))
    compared = check_outputs(case, produced)
    assert any(n.startswith("output.") for n in compared)


# ----------------------------------------------------------------------------- full-size key listing

def test_full_size_key_listing_loads_on_meta():
    """Every key of the released Wan2.1_VAE.pth, at its shape, fits the official config: nothing missing or extra."""
    listing = json.loads((reference_root() / "wan-vae_keys.json").read_text())
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in listing.items()}
    vae = vae_from_state_dict(state_dict, "official", device="meta", source="wan-vae_keys.json")
    assert sorted(vae.state_dict()) == sorted(listing)
    assert sum(p.numel() for p in vae.parameters()) == sum(t.numel() for t in state_dict.values())
    assert vae.config.spatial_stride == 8 and vae.config.temporal_stride == 4


# ----------------------------------------------------------------------------- loader faults

@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    vae = init_random_weights_(WanVAE(WanVAEConfig.named("tiny")), seed=3)
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


def test_safetensors_and_pth_load_the_same_model(tmp_path, tiny_state):
    save_file(tiny_state, str(tmp_path / "vae.safetensors"))
    torch.save(tiny_state, tmp_path / VAE_FILE)
    latent = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    from_st = load_wan_vae(str(tmp_path / "vae.safetensors"), "tiny")
    from_pth = load_wan_vae(str(tmp_path / VAE_FILE), "tiny")
    from_folder = load_wan_vae(str(tmp_path), "tiny")   # Wan2.1_VAE.pth is preferred in a folder
    for vae in (from_pth, from_folder):
        torch.testing.assert_close(vae.decode(latent), from_st.decode(latent), atol=0, rtol=0)


def test_fsspec_url_loads(tiny_state):
    import fsspec
    fs = fsspec.filesystem("memory")
    buffer = io.BytesIO()
    torch.save(tiny_state, buffer)
    fs.pipe_file("/wan_vae_test/" + VAE_FILE, buffer.getvalue())
    try:
        vae = load_wan_vae("memory://wan_vae_test", "tiny")
        assert vae.encoder.conv1.weight.shape == tiny_state["encoder.conv1.weight"].shape
    finally:
        fs.rm("/wan_vae_test", recursive=True)


def test_missing_key_is_named_with_the_file(tmp_path, tiny_state):
    broken = {k: v for k, v in tiny_state.items() if k != "decoder.head.2.bias"}
    save_file(broken, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_wan_vae(str(tmp_path / "vae.safetensors"), "tiny")
    message = str(err.value)
    assert "missing" in message and "decoder.head.2.bias" in message and "vae.safetensors" in message
    assert "\n" not in message


def test_unexpected_key_is_named_with_the_file(tmp_path, tiny_state):
    torch.save({**tiny_state, "decoder.extra.weight": torch.zeros(2)}, tmp_path / VAE_FILE)
    with pytest.raises(CheckpointError) as err:
        load_wan_vae(str(tmp_path / VAE_FILE), "tiny")
    message = str(err.value)
    assert "unexpected" in message and "decoder.extra.weight" in message and VAE_FILE in message


def test_wrong_config_names_the_misshaped_key(tmp_path, tiny_state):
    save_file(tiny_state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"mis-shaped.*encoder\.conv1\.weight"):
        load_wan_vae(str(tmp_path / "vae.safetensors"))   # official config, tiny weights


@pytest.mark.parametrize("name", ["vae.safetensors", VAE_FILE])
def test_truncated_file_is_one_line_naming_it(tmp_path, tiny_state, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(tiny_state, str(path))
    else:
        torch.save(tiny_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_wan_vae(str(path), "tiny")
    message = str(err.value)
    assert name in message and "truncated or corrupt" in message and "\n" not in message


class _NotATensor:
    """A pickled object that weights_only must refuse (plain pickle would construct it)."""


def test_pth_is_read_with_weights_only(tmp_path, tiny_state):
    path = tmp_path / VAE_FILE
    torch.save({**tiny_state, "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError) as err:
        load_wan_vae(str(path), "tiny")
    message = str(err.value)
    assert "weights_only" in message and VAE_FILE in message and "\n" not in message
    # the file itself is sound: only weights_only keeps the object from being built
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert isinstance(torch.load(path, weights_only=False)["payload"], _NotATensor)


def test_not_a_state_dict_and_missing_paths(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / VAE_FILE)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_wan_vae(str(tmp_path / VAE_FILE), "tiny")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_wan_vae(str(tmp_path / "absent"), "tiny")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not exactly one weights file"):
        load_wan_vae(str(empty), "tiny")
