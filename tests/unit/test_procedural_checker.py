"""pipelines.procedural.checker: reads colour, shape and motion back from pixels.

Validated against ground truth: >= 95 % agreement per attribute on 320 random clips, on the
same clips after the codec, on long clips far into their motion, and at another frame size.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.procedural.checker import CheckResult, agreement_rates, check_video
from pipelines.procedural.codec import fit_default_codec
from pipelines.procedural.data import Attributes, ClipConfig, make_batch, make_clip


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Rendering here is many mid-sized ops: one thread avoids spin-waiting on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_batches(seed: int, batches: int, config: ClipConfig, codec=None, start: int = 0) -> dict[str, float]:
    results, truths = [], []
    for b in range(batches):
        batch = make_batch(seed, b, 64, config, "all", start=start)
        frames = codec.decode(codec.encode(batch["frames"])) if codec else batch["frames"].numpy()
        results += [check_video(f) for f in frames]
        truths += batch["captions"]
    return agreement_rates(results, truths)


def _assert_rates(rates: dict[str, float], what: str) -> None:
    low = {k: v for k, v in rates.items() if k != "all" and v < 0.95}
    assert not low, f"{what}: checker agrees with the truth on {rates} (need >= 0.95 per attribute)"


def test_checker_agrees_with_ground_truth_clips():
    _assert_rates(_check_batches(21, 5, ClipConfig(num_frames=32)), "320 clips x 32 frames")


def test_checker_agrees_after_the_codec():
    codec = fit_default_codec(num_clips=32, config=ClipConfig(num_frames=8))
    _assert_rates(_check_batches(22, 5, ClipConfig(num_frames=16), codec), "320 clips x 16 frames, encode/decode")


def test_checker_agrees_on_long_clips_far_into_the_video():
    _assert_rates(_check_batches(23, 1, ClipConfig(num_frames=128), start=1000), "64 clips x 128 frames at t=1000")


def test_checker_agrees_at_another_frame_size():
    _assert_rates(_check_batches(24, 1, ClipConfig(height=96, width=128, num_frames=12)), "64 clips 96x128")


def test_object_split_by_the_edge_is_read_whole():
    clip = make_clip(0, 0, ClipConfig(num_frames=12), attributes=Attributes("green", "triangle", "right"))
    frames = np.roll(clip.frames, 64 - int(clip.spec.x0), axis=2)  # object centre on the right edge at t=0
    result = check_video(frames)
    assert result.matches("a green triangle moves right"), result
    assert result.velocity[0] == pytest.approx(clip.spec.vx, abs=0.1)


def test_matches_and_agreement_name_each_attribute():
    clip = make_clip(1, 0, attributes=Attributes("magenta", "circle", "up"))
    result = check_video(clip.frames)
    assert result.matches("a magenta circle moves up")
    assert not result.matches("a magenta circle moves down")
    assert result.agreement("a white square moves up") == {"colour": False, "shape": False, "motion": True}


def test_empty_video_has_no_attributes():
    result = check_video(np.full((8, 64, 64, 3), 30, np.uint8))
    assert result == CheckResult(None, None, None, centroids=result.centroids)
    assert not result.matches("a red circle stays still")


def test_wrong_layout_raises():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        check_video(np.zeros((64, 64, 3), np.uint8))
