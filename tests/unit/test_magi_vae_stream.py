"""MAGI-1 VAE: streamed decode == one-shot tiled decode, tiling/config checks, and loader faults.

The VAE is the `tiny` size with seeded random weights (CPU, fp32). The one-shot reference is
`decode_video` (the golden-checked `VaeHelper.decode` path); the stream must reproduce it bit for bit
for any segmentation, since a row is only decoded once all its latent frames are in.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.magi1.vae import (CheckpointError, MagiVAE, MagiVAEConfig, MagiVAEStreamDecoder, MagiVAETiling,
                                 config_for, decode_plan, decode_video, load_magi_vae, save_magi_vae)

MAX_MESSAGE = 600  # characters: one clear line, never a dump


@pytest.fixture(scope="module")
def vae() -> MagiVAE:
    torch.manual_seed(0)
    model = MagiVAE(config_for("tiny")).eval()
    with torch.no_grad():  # the zero-initialised tables would hide pos_embed / cls mistakes
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


# 32-pixel tiles -> 4x4 latent tiles with stride 3: a 5x6 latent is a 2x2 spatial grid
TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, spatial_tile_overlap_factor=0.25)
NO_T_OVERLAP = MagiVAETiling(**TILES, tile_sample_min_length=12)                                  # L 3, stride 3
# L 4, stride 2, blend 8 frames
T_OVERLAP = MagiVAETiling(**TILES, tile_sample_min_length=16, temporal_tile_overlap_factor=0.5)


def latent(frames: int, seed: int = 1) -> torch.Tensor:
    return 0.18215 * torch.randn(1, 16, frames, 5, 6, generator=torch.Generator().manual_seed(seed))


def stream(vae: MagiVAE, z: torch.Tensor, tiling: MagiVAETiling, splits: list[int],
           final_flag: bool = True) -> list[torch.Tensor]:
    """Push z in segments of `splits` latent frames; the last one is final (or finish() afterwards)."""
    assert sum(splits) == z.shape[2]
    decoder, parts, start = MagiVAEStreamDecoder(vae, tiling), [], 0
    for k, n in enumerate(splits):
        last = k == len(splits) - 1
        parts.append(decoder.decode_segment(z[:, :, start:start + n], final=last and final_flag))
        start += n
    if not final_flag:
        parts.append(decoder.finish())
    return parts


# ----------------------------------------------------------------------------- streamed == one-shot

@pytest.mark.parametrize("tiling, splits", [
    (NO_T_OVERLAP, [6, 6]),             # production alignment: 6-latent chunks, 3-latent tiles
    (NO_T_OVERLAP, [3, 3, 3, 3]),
    (NO_T_OVERLAP, [2, 5, 4, 1]),       # misaligned: tails wait for the next segment
    (NO_T_OVERLAP, [6, 1]),             # a last row of 1 latent frame decodes to 1 frame
    (NO_T_OVERLAP, [1]),                # an image
    (T_OVERLAP, [3, 3, 3]),             # overlapping rows blend with the previous row across segments
    (T_OVERLAP, [1] * 9),
    (T_OVERLAP, [4, 4, 1]),
], ids=lambda v: v if isinstance(v, list) else None)
def test_stream_equals_one_shot(vae, tiling, splits):
    z = latent(sum(splits))
    one_shot = decode_video(vae, z, tiling)
    for final_flag in (True, False):
        parts = stream(vae, z, tiling, splits, final_flag)
        streamed = torch.cat(parts, dim=0)
        assert streamed.shape == one_shot.shape, (streamed.shape, one_shot.shape)
        assert torch.equal(streamed, one_shot), f"max |diff| {(streamed - one_shot).abs().max().item()}"


def test_one_latent_last_row_gives_one_frame(vae):
    """F = 4 with 3-latent rows: 12 + 1 frames, not 16 (upstream's T == 1 tile rule)."""
    assert decode_video(vae, latent(4), NO_T_OVERLAP).shape[0] == 13
    assert [p.shape[0] for p in stream(vae, latent(4), NO_T_OVERLAP, [3, 1])] == [12, 1]


def test_aligned_segments_come_out_at_once_and_hold_nothing(vae):
    decoder = MagiVAEStreamDecoder(vae, NO_T_OVERLAP)
    z = latent(18)
    for k in range(3):
        frames = decoder.decode_segment(z[:, :, 6 * k:6 * k + 6])
        assert frames.shape == (24, 3, 40, 48)
        assert decoder.pending_latent_frames == 0      # memory bounded by the segment
    assert decoder.finish().shape[0] == 0


def test_misaligned_segment_holds_back_only_the_open_row(vae):
    decoder = MagiVAEStreamDecoder(vae, NO_T_OVERLAP)
    z = latent(7)
    assert decoder.decode_segment(z[:, :, :4]).shape[0] == 12     # row [0, 3) done, frame 3 waits
    assert decoder.pending_latent_frames == 1
    assert decoder.decode_segment(z[:, :, 4:7], final=True).shape[0] == 12 + 1   # rows [3, 6) and [6, 7)


def test_overlapping_rows_keep_only_what_the_next_row_reads(vae):
    decoder = MagiVAEStreamDecoder(vae, T_OVERLAP)                # rows [0,4) [2,6) [4,8) ...
    z = latent(10)
    decoder.decode_segment(z[:, :, :7])
    assert decoder.pending_latent_frames == 3                     # rows from latent 4 on still open
    assert decoder._previous is not None and len(decoder._previous) == 2   # one row of 2x2 decoded tiles


def test_stream_refuses_misuse(vae):
    decoder = MagiVAEStreamDecoder(vae, NO_T_OVERLAP)
    decoder.decode_segment(latent(3))
    with pytest.raises(ValueError, match="does not continue the stream"):
        decoder.decode_segment(torch.zeros(1, 16, 3, 4, 6))
    with pytest.raises(ValueError, match=r"\[B, 16, n, h, w\]"):
        decoder.decode_segment(torch.zeros(16, 3, 5, 6))
    decoder.decode_segment(latent(3), final=True)
    with pytest.raises(RuntimeError, match="finished"):
        decoder.decode_segment(latent(3))


# ----------------------------------------------------------------------------- config and tiling checks

def test_tiling_grid_matches_upstream_arithmetic(vae):
    """Production tiling at 720x1280 latents 90x160: 32-latent tiles every 24 -> 4 x 7 tiles, rows of 3."""
    plan_t, plan_h, plan_w = decode_plan(config_for("official"), MagiVAETiling.production(24), (6, 90, 160))
    assert plan_t.ranges(6) == [(0, 3), (3, 6)] and (plan_t.blend, plan_t.limit) == (0, 12)
    assert len(plan_h.starts) == 4 and len(plan_w.starts) == 7
    assert (plan_h.blend, plan_h.limit) == (64, 192)


@pytest.mark.parametrize("bad, fragment", [
    (dict(spatial_tile_overlap_factor=1.0), "must be in [0, 1)"),
    (dict(tile_sample_min_length=0), "positive integer"),
    (dict(tile_sample_min_height=True), "positive integer"),
])
def test_tiling_rejects_bad_values(bad, fragment):
    with pytest.raises(ValueError) as caught:
        MagiVAETiling(**bad)
    assert fragment in str(caught.value)


def test_tile_smaller_than_a_patch_is_a_clear_error(vae):
    with pytest.raises(ValueError, match="leaves no stride"):
        decode_video(vae, latent(3), MagiVAETiling(tile_sample_min_height=4, tile_sample_min_width=32))


def _ddconfig(**changes) -> dict:
    return {"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": {**config_for("tiny").to_dict()["ddconfig"],
                                                                       **changes}}


@pytest.mark.parametrize("config, fragment", [
    ({**_ddconfig(), "_class_name": "AutoencoderKL"}, "_class_name must be 'ViTVAE'"),
    ({**_ddconfig(), "model_type": "titok"}, "model_type must be 'vit'"),
    ({"_class_name": "ViTVAE"}, '"ddconfig" must be an object'),
    (_ddconfig(num_heads=3), "divisible by num_heads"),
    (_ddconfig(embed_dim=260, num_heads=4), "divisible by patch_length*patch_size^2 = 256"),
    (_ddconfig(use_rope=True), "use_rope true"),
    (_ddconfig(conv_last_layer=False), "conv_last_layer must be true"),
    (_ddconfig(double_z=False), "double_z must be true"),
    (_ddconfig(depht=2), "unknown ddconfig key(s) ['depht']"),
    (_ddconfig(depth="2"), "depth must be a positive integer"),
])
def test_config_rejects_with_a_reason(config, fragment):
    with pytest.raises(ValueError) as caught:
        MagiVAEConfig.from_dict(config)
    assert fragment in str(caught.value)


def test_config_defaults_and_inert_keys():
    dd = dict(_ddconfig()["ddconfig"], qk_scale=None, drop_rate=0.0)
    assert MagiVAEConfig.from_dict({"model_type": "vit", "ddconfig": dd}) == config_for("tiny")
    assert config_for("official").unpatch_channels == 4 and config_for("official").num_tokens == 4097


# ----------------------------------------------------------------------------- loading

def one_line_error(load, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def same_weights(a: MagiVAE, b: MagiVAE) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_folder_round_trip_local_and_fsspec(vae, tmp_path):
    assert save_magi_vae(vae, str(tmp_path / "vae")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = load_magi_vae(str(tmp_path / "vae"))
    assert same_weights(vae, loaded) and not loaded.training
    assert same_weights(vae, load_magi_vae(f"file://{tmp_path / 'vae'}"))
    save_magi_vae(vae, "memory://magi-vae-test/vae")
    assert same_weights(vae, load_magi_vae("memory://magi-vae-test/vae"))
    half = load_magi_vae(str(tmp_path / "vae"), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    # a single safetensors file takes config.json from beside it, or config=
    assert same_weights(vae, load_magi_vae(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")))


def test_torch_checkpoints_load_with_weights_only(vae, tmp_path):
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    assert same_weights(vae, load_magi_vae(str(tmp_path / "vae.pt"), config="tiny"))
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save({"state_dict": vae.state_dict(), "epoch": 3}, folder / "diffusion_pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(vae.config.to_dict()))
    assert same_weights(vae, load_magi_vae(str(folder)))


def test_truncated_files_are_one_line_errors(vae, tmp_path):
    save_magi_vae(vae, str(tmp_path / "vae"))
    truncate(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    one_line_error(lambda: load_magi_vae(str(tmp_path / "vae")),
                   "diffusion_pytorch_model.safetensors", "truncated or corrupt")
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    truncate(tmp_path / "vae.pt")
    one_line_error(lambda: load_magi_vae(str(tmp_path / "vae.pt"), config="tiny"),
                   "vae.pt", "not a readable torch checkpoint", "truncated or corrupt")


def test_missing_things_are_one_line_errors(vae, tmp_path):
    one_line_error(lambda: load_magi_vae(str(tmp_path / "nowhere")), "nowhere", "no such file or folder")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_magi_vae(str(tmp_path / "empty")), "no weights file", "config.json")
    torch.save(vae.state_dict(), tmp_path / "alone.pt")
    one_line_error(lambda: load_magi_vae(str(tmp_path / "alone.pt")), "alone.pt", "pass config=")
    save_magi_vae(vae, str(tmp_path / "vae"))
    (tmp_path / "vae" / "config.json").unlink()
    one_line_error(lambda: load_magi_vae(str(tmp_path / "vae")), "config.json", "missing")


def test_weights_that_do_not_fit_name_the_keys(vae, tmp_path):
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    dropped = dict(state)
    del dropped["decoder.last_layer.bias"]
    save_file(dropped, str(tmp_path / "dropped.safetensors"))
    one_line_error(lambda: load_magi_vae(str(tmp_path / "dropped.safetensors"), config="tiny"),
                   "dropped.safetensors", "1 missing key(s): decoder.last_layer.bias")
    extra = dict(state, **{"encoder.blocks.0.norm1.weight": torch.ones(256)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    one_line_error(lambda: load_magi_vae(str(tmp_path / "extra.safetensors"), config="tiny"),
                   "1 unexpected key(s): encoder.blocks.0.norm1.weight")
    deeper = MagiVAEConfig(**{**config_for("tiny").to_dict()["ddconfig"], "mlp_ratio": 2.0})
    one_line_error(lambda: load_magi_vae(str(tmp_path / "extra.safetensors"), config=deeper),
                   "mis-shaped key(s): encoder.blocks.0.mlp.fc1.weight: expected [512, 256], found [256, 256]")


def test_bad_config_file_and_non_tensor_entries(vae, tmp_path):
    save_magi_vae(vae, str(tmp_path / "vae"))
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["ddconfig"]["embed_dim"] = 250
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    one_line_error(lambda: load_magi_vae(str(tmp_path / "vae")), "config.json", "divisible by num_heads")
    (tmp_path / "vae" / "config.json").write_text("{not json")
    one_line_error(lambda: load_magi_vae(str(tmp_path / "vae")), "config.json", "not valid JSON")
    torch.save({"encoder.norm.weight": torch.ones(3), "step": 7}, tmp_path / "mixed.pt")
    one_line_error(lambda: load_magi_vae(str(tmp_path / "mixed.pt"), config="tiny"), "'step'", "not a named tensor")
