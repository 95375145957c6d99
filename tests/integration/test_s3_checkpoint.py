"""Checkpoints and videos on a real S3 API (moto server) through s3fs."""
from __future__ import annotations

import pytest
import s3fs
import torch

from pipelines.skyreels_v2.checkpoint import CheckpointError, load_transformer, save_transformer
from pipelines.skyreels_v2.model import WanDFTransformer
from pipelines.skyreels_v2.sizes import config_for

pytestmark = pytest.mark.integration


def test_sharded_checkpoint_round_trip_over_s3(s3_options):
    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir("ckpt")
    torch.manual_seed(0)
    model = WanDFTransformer(config_for("tiny")).eval()
    names = save_transformer(model, "s3://ckpt/tiny", max_shard_bytes=100_000, storage_options=s3_options)
    assert sum(n.endswith(".safetensors") for n in names) >= 2 and any(n.endswith(".index.json") for n in names)
    loaded = load_transformer("s3://ckpt/tiny", storage_options=s3_options)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_shard_over_s3_is_named(s3_options):
    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir("broken")
    torch.manual_seed(0)
    save_transformer(WanDFTransformer(config_for("tiny")), "s3://broken/m", max_shard_bytes=100_000,
                     storage_options=s3_options)
    victim = sorted(p for p in fs.ls("broken/m") if p.endswith(".safetensors"))[0]
    fs.rm(victim)
    with pytest.raises(CheckpointError, match=victim.rsplit("/", 1)[-1]):
        load_transformer("s3://broken/m", storage_options=s3_options)


def test_video_written_atomically_to_s3(s3_options, monkeypatch):
    import numpy as np
    import fsspec

    from jobs.video import write_video

    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir("videos")
    # route fsspec's s3 URLs to the moto endpoint, as a user's environment would
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_options)
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    write_video(frames, "s3://videos/out/a.mp4")
    fs.invalidate_cache()
    assert fs.exists("videos/out/a.mp4") and not fs.exists("videos/out/a.mp4.partial")
