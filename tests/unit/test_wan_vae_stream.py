"""Streaming Wan VAE: chunked decode (and encode) equals the one-call result, and the cache stays bounded.

Tiny random weights (all layers active, attention projections included) on small latents; one CPU
thread, which is faster for models this small.
"""
from __future__ import annotations

import pytest
import torch

from pipelines.wan.vae import (CACHE_T, FIRST_FRAME_PASSED, VAEStreamDecoder, VAEStreamEncoder, WanVAE,
                               WanVAEConfig, init_random_weights_)

LATENT_FRAMES = 7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return init_random_weights_(WanVAE(WanVAEConfig.named("tiny")), seed=11).eval()


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    return torch.randn(1, 16, LATENT_FRAMES, 2, 3, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def one_shot(vae, latent) -> torch.Tensor:
    return vae.decode(latent)


def stream_decode(vae: WanVAE, latent: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    stream = VAEStreamDecoder(vae)
    parts, start = [], 0
    for size in sizes:
        parts.append(stream.decode_next(latent[:, :, start:start + size]))
        start += size
    assert start == latent.shape[2]
    return parts


# ----------------------------------------------------------------------------- decode

SPLITS = {
    "one_frame_calls": [1] * LATENT_FRAMES,
    "all_at_once": [LATENT_FRAMES],
    "first_call_two_frames": [2, 5],
    "frame0_alone_then_threes": [1, 3, 3],
    "uneven": [4, 1, 2],
    "with_empty_call": [1, 0, 6],
    "small_big_small": [3, 1, 1, 2],
}


@pytest.mark.parametrize("sizes", SPLITS.values(), ids=SPLITS.keys())
def test_streamed_decode_equals_one_shot(vae, latent, one_shot, sizes):
    parts = stream_decode(vae, latent, sizes)
    # latent frame 0 gives 1 frame, every later latent frame 4, whatever the chunking
    seen = 0
    for size, part in zip(sizes, parts):
        expected = (4 * size - 3 if seen == 0 else 4 * size) if size else 0
        assert part.shape[2] == expected, f"chunk of {size} latent frames after {seen}: {part.shape[2]} frames"
        seen += size
    streamed = torch.cat(parts, dim=2)
    assert streamed.shape == one_shot.shape == (1, 3, 1 + 4 * (LATENT_FRAMES - 1), 16, 24)
    torch.testing.assert_close(streamed, one_shot, atol=1e-5, rtol=0)


def test_decode_is_clamped_and_raw_is_not(vae, latent, one_shot):
    raw = vae.decode_raw(latent)
    assert raw.abs().max() > 1, "random weights should overshoot [-1, 1] somewhere"
    assert one_shot.abs().max() <= 1
    torch.testing.assert_close(one_shot, raw.clamp(-1, 1), atol=0, rtol=0)


def test_cache_does_not_grow_with_calls(vae):
    stream = VAEStreamDecoder(vae)
    gen = torch.Generator().manual_seed(1)
    sizes = []
    for call in range(30):
        stream.decode_next(torch.randn(1, 16, 1, 2, 3, generator=gen))
        sizes.append((len(stream.cache.tensors()), stream.cache.nbytes()))
    # after the first few frames every slot is filled; from then on nothing is added
    assert len(set(sizes[4:])) == 1, f"cache (tensors, bytes) per call: {sizes}"
    assert len(stream.cache) == vae.decoder.num_slots
    assert all(t.shape[2] <= CACHE_T for t in stream.cache.tensors())
    assert stream.latent_frames_in == 30 and stream.frames_out == 1 + 4 * 29


def test_reset_starts_a_new_video(vae, latent, one_shot):
    stream = VAEStreamDecoder(vae)
    stream.decode_next(torch.randn(1, 16, 3, 2, 3))
    stream.reset()
    torch.testing.assert_close(stream.decode_next(latent), one_shot, atol=1e-5, rtol=0)


def test_two_streams_share_one_model(vae, latent, one_shot):
    """The state lives in each stream, not on the model: interleaved streams do not disturb each other."""
    other = torch.randn(1, 16, LATENT_FRAMES, 2, 3, generator=torch.Generator().manual_seed(9))
    a, b = VAEStreamDecoder(vae), VAEStreamDecoder(vae)
    parts_a, parts_b = [], []
    for i in range(LATENT_FRAMES):
        parts_a.append(a.decode_next(latent[:, :, i:i + 1]))
        parts_b.append(b.decode_next(other[:, :, i:i + 1]))
    torch.testing.assert_close(torch.cat(parts_a, dim=2), one_shot, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(parts_b, dim=2), vae.decode(other), atol=1e-5, rtol=0)


def test_another_grid_mid_stream_is_refused(vae):
    stream = VAEStreamDecoder(vae)
    stream.decode_next(torch.randn(1, 16, 1, 2, 3))
    with pytest.raises(ValueError, match="reset"):
        stream.decode_next(torch.randn(1, 16, 1, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, 16, f, h, w\]"):
        stream.decode_next(torch.randn(1, 8, 1, 2, 3))


def test_decoder_given_two_frames_first_skips_time_upsampling(vae, latent):
    """The upstream rule the stream works around: on a fresh cache every frame of the first call skips
    the temporal upsampling ('Rep'), so 2 latent frames give 2 frames, not 5."""
    cache = vae.new_decoder_cache()
    x = vae.conv2(vae.denormalise(latent[:, :, :2]))
    with torch.no_grad():
        out = vae.decoder(x, cache)
    assert out.shape[2] == 2
    assert FIRST_FRAME_PASSED in cache.slots


# ----------------------------------------------------------------------------- encode

@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return torch.rand(1, 3, 13, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1


def test_encode_shapes_and_dropped_frames(vae, video):
    latent = vae.encode(video)
    assert latent.shape == (1, 16, 4, 2, 3) and latent.dtype == torch.float32
    extra = torch.cat([video, video[:, :, :2]], dim=2)   # 15 frames: the last 2 do not fill a chunk
    torch.testing.assert_close(vae.encode(extra), latent, atol=0, rtol=0)
    assert vae.config.num_latent_frames(15) == 4 and vae.config.num_frames(4) == 13


@pytest.mark.parametrize("sizes", [[1, 4, 4, 4], [13], [3, 5, 5], [2, 2, 2, 2, 2, 2, 1], [1, 12]])
def test_streamed_encode_equals_one_call(vae, video, sizes):
    stream = VAEStreamEncoder(vae)
    parts, start = [], 0
    for size in sizes:
        parts.append(stream.encode_next(video[:, :, start:start + size]))
        start += size
    assert stream.pending_frames == 0
    torch.testing.assert_close(torch.cat(parts, dim=2), vae.encode(video), atol=1e-5, rtol=0)


def test_streamed_encode_holds_frames_until_a_chunk_is_full(vae, video):
    stream = VAEStreamEncoder(vae)
    assert stream.encode_next(video[:, :, :3]).shape[2] == 1   # frame 0 alone; 2 frames wait
    assert stream.pending_frames == 2
    assert stream.encode_next(video[:, :, 3:4]).shape[2] == 0
    assert stream.encode_next(video[:, :, 4:5]).shape[2] == 1
    assert stream.pending_frames == 0


def test_round_trip_shape(vae, video):
    assert vae.decode(vae.encode(video)).shape == video.shape


# ----------------------------------------------------------------------------- config

def test_config_checks_itself():
    official = WanVAEConfig.named("official")
    assert (official.dim, official.z_dim, official.dim_mult) == (96, 16, (1, 2, 4, 4))
    assert WanVAEConfig.from_dict({**official.to_dict(), "_class_name": "WanVAE_"}) == official
    with pytest.raises(ValueError, match="unknown WanVAEConfig field"):
        WanVAEConfig.from_dict({"dim": 4, "dims": 4})
    with pytest.raises(ValueError, match="attn_scales must be"):
        WanVAEConfig(attn_scales=[1.0])
    with pytest.raises(ValueError, match="temperal_downsample must be 3"):
        WanVAEConfig(temperal_downsample=[True, True])
    with pytest.raises(ValueError, match="at most 2 levels"):
        WanVAEConfig(temperal_downsample=[True, True, True])
    with pytest.raises(ValueError, match="latent_mean must hold z_dim = 8"):
        WanVAEConfig(z_dim=8)
    with pytest.raises(ValueError, match="unknown Wan VAE size"):
        WanVAEConfig.named("huge")
