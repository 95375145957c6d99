"""pipelines.procedural.data: deterministic captioned clips, motion rules, split, batches, preview."""
from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest
import torch

from pipelines.procedural.data import (
    BACKGROUNDS, COLOURS, MOTIONS, SHAPES, Attributes, ClipConfig, ProceduralClips, all_attributes,
    caption_vocabulary, main, make_batch, make_clip, parse_caption, render_clips, sample_spec,
    split_attributes,
)


def _object_mask(frames: np.ndarray) -> np.ndarray:
    """Object pixels of clean rendered frames: bright pixels (backgrounds are dark)."""
    return frames.max(-1) > 140


def _centre_x(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def test_clip_is_deterministic_in_seed_and_index():
    a, b = make_clip(5, 3), make_clip(5, 3)
    assert np.array_equal(a.frames, b.frames) and a.caption == b.caption
    assert a.frames.dtype == np.uint8 and a.frames.shape == (32, 64, 64, 3)
    assert not np.array_equal(a.frames, make_clip(5, 4).frames)


def test_captions_follow_the_template_and_parse_back():
    assert Attributes("red", "circle", "left").caption() == "a red circle moves left"
    assert Attributes("green", "square", "bouncing").caption() == "a green square bounces"
    assert Attributes("blue", "triangle", "still").caption() == "a blue triangle stays still"
    for attributes in all_attributes():
        assert parse_caption(attributes.caption()) == attributes
    with pytest.raises(ValueError, match="template"):
        parse_caption("a red circle dances")
    with pytest.raises(ValueError, match="choose one of"):
        parse_caption("a purple circle bounces")
    assert len(all_attributes()) == len(COLOURS) * len(SHAPES) * len(MOTIONS)
    assert {"a", "moves", "bounces", "stays", "still", *COLOURS, *SHAPES} <= set(caption_vocabulary())


def test_object_and_background_colours_are_well_separated():
    palette = np.array(list(COLOURS.values()), float)
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)]
    assert len(COLOURS) >= 5 and len(SHAPES) >= 3 and min(gaps) > 120, f"closest palette pair {min(gaps):.0f}"
    assert palette.max(1).min() >= 190, "every object colour is bright"
    assert max(max(c) for c in BACKGROUNDS.values()) <= 70, "every background is dark"


def test_split_holds_out_combinations_but_keeps_every_pair_in_training():
    split = split_attributes()
    assert split == split_attributes(), "deterministic"
    train, held = set(split.train), set(split.heldout)
    assert held and not (train & held) and train | held == set(all_attributes())
    for a in held:
        assert any(t.colour == a.colour and t.shape == a.shape for t in train), a
        assert any(t.colour == a.colour and t.motion == a.motion for t in train), a
        assert any(t.shape == a.shape and t.motion == a.motion for t in train), a
    with pytest.raises(ValueError, match="'train', 'heldout' or 'all'"):
        split.get("test")


def test_straight_motion_wraps_around_and_keeps_moving():
    config = ClipConfig(num_frames=96)
    clip = make_clip(0, 0, config, attributes=Attributes("red", "square", "left"))
    mask = _object_mask(clip.frames)
    assert mask.any(axis=(1, 2)).all(), "the object is visible in every frame"
    step = abs(clip.spec.vx)
    assert 1.5 <= step <= 2.5
    assert mask[:, :, 0].any() and mask[:, :, -1].any(), "crossed the left edge and came back on the right"
    # between two frames where the object is whole, it moved left by the speed
    whole = {t for t in range(96) if not (mask[t, :, 0].any() or mask[t, :, -1].any())}
    t0 = min(t for t in whole if t + 4 in whole)
    assert _centre_x(mask[t0 + 4]) - _centre_x(mask[t0]) == pytest.approx(-4 * step, abs=0.6)


def test_bouncing_stays_inside_and_reverses():
    config = ClipConfig(num_frames=128)
    clip = make_clip(1, 0, config, attributes=Attributes("white", "circle", "bouncing"))
    mask = _object_mask(clip.frames)
    assert not (mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any())
    xs = np.array([_centre_x(m) for m in mask])
    steps = np.sign(np.diff(xs))
    assert (steps[1:] != steps[:-1]).any(), "x direction reverses at a wall"
    assert clip.spec.vx != 0 and clip.spec.vy != 0, "bouncing moves diagonally"


def test_still_clip_does_not_change():
    clip = make_clip(2, 0, attributes=Attributes("yellow", "triangle", "still"))
    assert (clip.frames == clip.frames[:1]).all()


def test_start_offset_continues_the_same_video():
    spec = sample_spec(Attributes("blue", "circle", "down"), ClipConfig(), np.random.default_rng(0))
    long = render_clips([spec], ClipConfig(num_frames=48))[0]
    tail = render_clips([spec], ClipConfig(num_frames=16), start=32)[0]
    assert torch.equal(long[32:], tail)


def test_per_clip_start_offsets_render_each_clip_from_its_own_frame():
    config = ClipConfig(num_frames=8)
    specs = [sample_spec(Attributes("red", "square", m), config, np.random.default_rng(i))
             for i, m in enumerate(("left", "bouncing"))]
    both = render_clips(specs, config, start=[0, 20])
    assert torch.equal(both[0], render_clips(specs[:1], config, start=0)[0])
    assert torch.equal(both[1], render_clips(specs[1:], config, start=20)[0])
    with pytest.raises(ValueError, match="one start frame per clip"):
        render_clips(specs, config, start=[0])


def test_training_layout_starts_opposite_the_motion_on_the_position_background():
    from pipelines.procedural.data import TRAINING_CLIPS, empty_scene, position_background

    expected = {"left": (64 - 9.5, 32), "right": (9.5, 32), "up": (32, 64 - 9.5), "down": (32, 9.5),
                "still": (32, 32), "bouncing": (32, 32)}
    seen = set()
    for index in range(12):
        clip = make_clip(7, index, TRAINING_CLIPS, split="train")
        seen.add(clip.attributes.motion)
        mask = _object_mask(clip.frames[0])
        ys, xs = np.nonzero(mask)
        ex, ey = expected[clip.attributes.motion]
        assert abs(xs.mean() + 0.5 - ex) < 1.5 and abs(ys.mean() + 0.5 - ey) < 3.0, clip.caption  # triangles: mass below the box centre
        # a straight mover crosses the frame in 48 frames without wrapping around
        if clip.attributes.motion in ("left", "right", "up", "down"):
            last = make_clip(7, index, dataclasses.replace(TRAINING_CLIPS, num_frames=48), split="train")
            ys, xs = np.nonzero(_object_mask(last.frames[-1]))
            assert xs.max() - xs.min() < 20 and ys.max() - ys.min() < 20, "not split by the frame edge"
        scene = empty_scene(TRAINING_CLIPS)[0].numpy()
        yy, xx = np.mgrid[:64, :64]
        far = (abs(xx + 0.5 - ex) > 12) | (abs(yy + 0.5 - ey) > 12)    # well away from the object
        assert np.array_equal(clip.frames[0][far], scene[far]), "background = the empty scene"
    background = position_background(TRAINING_CLIPS)
    colours = {tuple(c) for c in background.round().reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 0.5 * len(background.reshape(-1, 3)[::7]), "positions have their own colours"
    assert background.max() <= 70, "dark, like every background"
    bouncing = make_clip(7, 0, TRAINING_CLIPS, attributes=Attributes("red", "circle", "bouncing"))
    assert bouncing.spec.vx > 0 and bouncing.spec.vy > 0 and abs(bouncing.spec.vx - bouncing.spec.vy) < 1e-9


def test_layout_errors_say_what_is_valid():
    with pytest.raises(ValueError, match="'random', 'centre' or 'opposite'"):
        ClipConfig(start_position="middle")
    with pytest.raises(ValueError, match="subset of"):
        ClipConfig(backgrounds=("pink",))
    with pytest.raises(ValueError, match="subset of"):
        ClipConfig(backgrounds=())


def test_batches_are_fast_and_labelled():
    make_batch(0, 0, 4)  # warm up
    start = time.perf_counter()
    batch = make_batch(0, 1, 64)
    seconds = time.perf_counter() - start
    assert seconds < 1.9, f"64 clips took {seconds:.2f} s (< 2000 clips per minute)"
    assert batch["frames"].shape == (64, 32, 64, 64, 3) and batch["frames"].dtype == torch.uint8
    for i in range(64):
        attributes = parse_caption(batch["captions"][i])
        assert list(COLOURS)[batch["colour"][i]] == attributes.colour
        assert SHAPES[batch["shape"][i]] == attributes.shape
        assert MOTIONS[batch["motion"][i]] == attributes.motion


def test_dataset_yields_only_its_split():
    dataset = ProceduralClips(batch_size=8, split="heldout", seed=3, num_batches=3,
                              config=ClipConfig(num_frames=4))
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=None))
    assert len(batches) == 3
    held = {a.caption() for a in split_attributes().heldout}
    assert all(c in held for b in batches for c in b["captions"])
    assert torch.equal(batches[1]["frames"], make_batch(3, 1, 8, ClipConfig(num_frames=4), "heldout")["frames"])


def test_size_is_configurable():
    clip = make_clip(0, 0, ClipConfig(height=96, width=128, num_frames=5))
    assert clip.frames.shape == (5, 96, 128, 3)


def test_config_errors_say_what_is_valid():
    with pytest.raises(ValueError, match="e.g. 32"):
        ClipConfig(num_frames=0)
    with pytest.raises(ValueError, match="e.g. \\(1.5, 2.5\\)"):
        ClipConfig(speed=(3.0, 1.0))


def test_preview_writes_an_mp4(tmp_path, capsys):
    import av

    out = tmp_path / "preview.mp4"
    main(["--preview", str(out), "--clips", "4", "--frames", "6"])
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (64 * 1 + 0, 64 * 4 + 2 * 3, 3)
    assert "wrote" in capsys.readouterr().out
