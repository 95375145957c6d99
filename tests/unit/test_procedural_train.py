"""pipelines.procedural.train: diffusion-forcing noise draws, the reference block, and the whole
one-command path (train -> save -> load_bundle -> generate_video) at a toy size."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from pipelines.procedural.bundle import generate_video, load_bundle
from pipelines.procedural.data import TRAINING_CLIPS, empty_scene, make_batch, parse_caption, start_point
from pipelines.procedural.train import (
    ModelSize, TrainConfig, add_reference_block, draw_prefix_blocks, draw_start_frames, sample_block_sigmas,
    save_weights, train,
)


def test_prefix_blocks_are_clean_and_the_rest_noisy():
    cfg = TrainConfig(prefix_probability=0.5)
    gen = torch.Generator().manual_seed(0)
    prefix = draw_prefix_blocks(256, 8, cfg, gen)
    assert prefix.min() == 0 and prefix.max() <= 7
    assert 0.35 < (prefix > 0).float().mean() < 0.65
    sigma = sample_block_sigmas(prefix, 8, cfg, gen)
    blocks = torch.arange(8)[None]
    assert (sigma[blocks < prefix[:, None]] == 0).all()
    assert (sigma[blocks >= prefix[:, None]] > 0).float().mean() > 0.95
    assert sigma.max() < 1.0


def test_clips_without_prefix_start_with_the_empty_scene_then_the_motion():
    cfg = TrainConfig()
    cbs = cfg.causal_block_size
    clips = dataclasses.replace(cfg.clips, num_frames=cfg.clip_frames)
    prefix = torch.tensor([0, 3])
    starts = draw_start_frames(prefix, cfg, torch.Generator().manual_seed(1))
    assert starts[0] == -cbs and 0 <= starts[1] < cfg.prefix_start_frames
    batch = make_batch(0, 0, 2, clips, "train", start=starts)
    frames, new_prefix = add_reference_block(batch["frames"], prefix, cfg, clips)
    assert new_prefix.tolist() == [1, 3], "the reference block is a clean prefix of one block"
    scene = empty_scene(dataclasses.replace(clips, num_frames=cbs))
    assert torch.equal(frames[0, :cbs], scene)
    assert torch.equal(frames[0, cbs:], batch["frames"][0, cbs:])
    assert torch.equal(frames[1], batch["frames"][1]), "clips with a prefix are left as they are"
    # the motion starts at its start point (`start_point`) right after the reference block
    first = frames[0, cbs].numpy()
    ys, xs = np.nonzero(first.max(-1) > 140)
    ex, ey = start_point(parse_caption(batch["captions"][0]).motion, 7.5, clips)
    assert abs(xs.mean() + 0.5 - ex) < 1.5 and abs(ys.mean() + 0.5 - ey) < 3.0


def test_one_command_training_writes_a_bundle_that_generates(tmp_path):
    tiny = ModelSize(dim=32, ffn_dim=64, num_heads=1, num_layers=1, freq_dim=32)
    cfg = TrainConfig(steps=3, batch_size=2, warmup_steps=1, codec_clips=8, log_every=1, model=tiny)
    result = train(cfg, seed=0, log=False)
    assert len(result.losses) == 3 and all(np.isfinite(v) for _, v in result.losses)
    out = save_weights(result, cfg, 0, tmp_path / "weights")
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["reference_block"] is True and meta["background_style"] == TRAINING_CLIPS.background_style
    assert meta["training"]["config"]["model"]["dim"] == 32
    bundle = load_bundle(out)
    reference = bundle.reference_latents(2)
    assert reference.shape == (bundle.codec.channels, 2, 16, 16)
    video, latents, info = generate_video(bundle, "a red circle moves left", 6, seed=0, num_inference_steps=2)
    assert video.shape == (6, 64, 64, 3) and latents.shape[1] == 6, "the reference block is not in the output"
    assert info["segments"] == 1
