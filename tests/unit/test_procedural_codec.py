"""pipelines.procedural.codec: closed-form patch codec, PSNR, unit-variance latents, streaming decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.procedural.codec import PatchCodec, fit_codec, fit_default_codec, main, psnr
from pipelines.procedural.data import ClipConfig, make_batch


@pytest.fixture(scope="module")
def codec() -> PatchCodec:
    clips = (make_batch(11, b, 32, ClipConfig(num_frames=8), "all")["frames"] for b in range(2))
    return fit_codec(clips, patch=4, channels=16)


@pytest.fixture(scope="module")
def fresh() -> torch.Tensor:
    """Clips the codec was not fitted on, uint8 [16, 32, 64, 64, 3]."""
    return make_batch(12, 0, 16, ClipConfig(), "all")["frames"]


def test_reconstruction_psnr_is_high(codec, fresh):
    back = codec.decode(codec.encode(fresh))
    worst = min(psnr(fresh[i].numpy(), back[i]) for i in range(len(fresh)))
    assert psnr(fresh.numpy(), back) >= 33.0
    assert worst >= 30.0, f"worst clip PSNR {worst:.1f} dB"


def test_latents_have_the_model_layout_and_unit_variance(codec, fresh):
    z = codec.encode(fresh[0])
    assert z.shape == (16, 32, 16, 16) and z.dtype == torch.float32
    var = codec.encode(fresh).var(dim=(0, 2, 3, 4))
    assert ((var > 0.5) & (var < 2.0)).all(), f"per-channel variance {var.tolist()}"
    batched = codec.encode(fresh[:3])
    assert batched.shape == (3, 16, 32, 16, 16)
    assert torch.allclose(batched[1], codec.encode(fresh[1]), atol=1e-6)


def test_frames_are_coded_independently(codec, fresh):
    """No temporal mixing: latent frame t depends on pixel frame t only."""
    video = fresh[0]
    assert torch.allclose(codec.encode(video)[:, 10:14], codec.encode(video[10:14]), atol=1e-6)


def test_chunked_decode_is_bit_identical_to_whole_decode(codec, fresh):
    z = codec.encode(fresh[1]) + 0.05 * torch.randn(16, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = codec.decode(z)
    bounds = [0, 1, 5, 13, 14, 32]
    chunks = [codec.decode(z[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    assert np.array_equal(np.concatenate(chunks), whole)
    assert np.array_equal(codec.decode(torch.stack([z, z + 1]))[0], whole), "batching changes nothing either"


def test_save_and_load_round_trip(codec, fresh, tmp_path):
    codec.save(tmp_path / "codec")
    assert (tmp_path / "codec.safetensors").exists() and (tmp_path / "codec.json").exists()
    loaded = PatchCodec.load(tmp_path / "codec.safetensors")
    z = codec.encode(fresh[2])
    assert torch.equal(loaded.encode(fresh[2]), z)
    assert np.array_equal(loaded.decode(z), codec.decode(z))


def test_fit_is_deterministic_and_the_cli_reports_psnr(tmp_path, capsys):
    small = ClipConfig(num_frames=4)
    a, b = fit_default_codec(num_clips=16, config=small), fit_default_codec(num_clips=16, config=small)
    assert torch.equal(a.components, b.components) and torch.equal(a.scale, b.scale)
    main(["--fit", str(tmp_path / "codec"), "--clips", "16"])
    assert "PSNR" in capsys.readouterr().out
    assert PatchCodec.load(tmp_path / "codec").channels == 16


def test_bad_inputs_say_what_is_expected(codec):
    with pytest.raises(ValueError, match="uint8 frames"):
        codec.encode(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        codec.encode(np.zeros((2, 62, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"latents \[..., 16, T, h, w\]"):
        codec.decode(torch.zeros(8, 2, 16, 16))
    with pytest.raises(ValueError, match="channels must be in"):
        fit_codec([np.zeros((1, 8, 8, 3), np.uint8)], channels=64)
