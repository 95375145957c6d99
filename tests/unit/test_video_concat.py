"""jobs.video: deterministic encoding, concat_mp4 (stream copy of segments), unique remote temps."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from jobs.video import concat_mp4, encode_mp4, read_video, write_video

FPS = 16


def _segment_frames(length: int, colour: tuple[int, int, int], seed: int) -> np.ndarray:
    """A square of one colour moving over faint noise: each segment looks different."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 40, (length, 64, 64, 3), dtype=np.uint8)
    for i in range(length):
        frames[i, 16:32, 4 * i:4 * i + 16] = colour
    return frames


def _encode_segments(folder, lengths=(5, 7, 4), **encode_args) -> list[str]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    paths = []
    for index, length in enumerate(lengths):
        path = str(folder / f"segment{index}.mp4")
        encode_mp4(_segment_frames(length, colours[index % 4], seed=index), path, fps=FPS,
                   **encode_args)
        paths.append(path)
    return paths


def _decoded_segments(paths: list[str]) -> np.ndarray:
    return np.concatenate([read_video(path) for path in paths])


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _timestamps(path: str) -> tuple[list[int], list[int], float, object]:
    """(pts, dts, container seconds, stream duration in seconds) of the first video stream."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.dts) for p in container.demux(stream) if p.dts is not None]
        seconds = stream.duration * stream.time_base
        return ([p for p, _ in packets], [d for _, d in packets],
                container.duration / 1e6, seconds)


def test_encode_mp4_is_byte_identical_across_runs(tmp_path):
    frames = np.random.default_rng(7).integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)
    contents = []
    for run in range(4):
        path = tmp_path / f"run{run}.mp4"
        encode_mp4(frames, str(path), fps=FPS)
        contents.append(path.read_bytes())
    assert all(content == contents[0] for content in contents[1:])


def test_concat_copies_every_frame_unchanged(tmp_path):
    segments = _encode_segments(tmp_path)
    target = str(tmp_path / "out" / "joined.mp4")
    assert concat_mp4(segments, target) == 16
    joined = read_video(target)
    # stream copy: decoding the joined file gives exactly the segments' decoded frames
    np.testing.assert_array_equal(joined, _decoded_segments(segments))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".partial-")]


def test_concat_plays_continuously(tmp_path):
    target = str(tmp_path / "joined.mp4")
    concat_mp4(_encode_segments(tmp_path), target)
    pts, dts, container_seconds, stream_seconds = _timestamps(target)
    shown = sorted(pts)
    assert shown == [i * shown[1] for i in range(16)]  # one frame period apart, no gaps
    assert all(a < b for a, b in zip(dts, dts[1:]))
    assert stream_seconds == pytest.approx(16 / FPS)
    assert container_seconds == pytest.approx(16 / FPS, abs=1e-3)


def test_short_segment_first_keeps_full_length(tmp_path):
    # 1- and 2-frame segments have no B-frames and thus no decode delay, unlike longer ones;
    # joining them must neither break dts order nor shorten the track
    segments = _encode_segments(tmp_path, lengths=(1, 6, 2, 5))
    target = str(tmp_path / "joined.mp4")
    assert concat_mp4(segments, target) == 14
    np.testing.assert_array_equal(read_video(target), _decoded_segments(segments))
    _, dts, container_seconds, stream_seconds = _timestamps(target)
    assert all(a < b for a, b in zip(dts, dts[1:]))
    assert stream_seconds == pytest.approx(14 / FPS)
    assert container_seconds == pytest.approx(14 / FPS, abs=1e-3)


def test_concat_is_deterministic(tmp_path):
    segments = _encode_segments(tmp_path)
    first, second = tmp_path / "a.mp4", tmp_path / "b.mp4"
    concat_mp4(segments, str(first))
    concat_mp4(segments, str(second))
    assert first.read_bytes() == second.read_bytes()


def test_concat_result_has_normal_permissions(tmp_path):
    target = tmp_path / "joined.mp4"
    concat_mp4(_encode_segments(tmp_path), str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_concat_opens_sources_through_opener(tmp_path):
    paths = _encode_segments(tmp_path)
    names = {f"segment://{i}": path for i, path in enumerate(paths)}
    calls = []

    def opener(name):
        calls.append(name)
        return open(names[name], "rb")

    target = str(tmp_path / "joined.mp4")
    assert concat_mp4(iter(names), target, opener=opener) == 16
    assert calls == list(names)
    np.testing.assert_array_equal(read_video(target), _decoded_segments(paths))


def test_concat_accepts_fsspec_open(tmp_path):
    import fsspec

    urls = []
    for index, path in enumerate(_encode_segments(tmp_path)):
        url = f"memory://concat-test/segment{index}.mp4"
        with fsspec.open(url, "wb") as remote, open(path, "rb") as local:
            remote.write(local.read())
        urls.append(url)
    # fsspec.open returns an OpenFile, a context manager yielding the file object
    assert concat_mp4(urls, str(tmp_path / "joined.mp4"),
                      opener=lambda url: fsspec.open(url, "rb")) == 16


def test_mismatched_size_is_refused(tmp_path):
    segments = _encode_segments(tmp_path)
    wide = str(tmp_path / "wide.mp4")
    encode_mp4(np.zeros((3, 64, 96, 3), np.uint8), wide, fps=FPS)
    target = tmp_path / "joined.mp4"
    with pytest.raises(ValueError, match=r"source 1 \(.*wide.mp4\): width is 96, the first source's is 64"):
        concat_mp4([segments[0], wide, segments[1]], str(target))
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]


def test_mismatched_fps_is_refused(tmp_path):
    segments = _encode_segments(tmp_path)
    fast = str(tmp_path / "fast.mp4")
    encode_mp4(_segment_frames(3, (9, 9, 9), seed=9), fast, fps=24)
    with pytest.raises(ValueError, match="source 2 .*(time base|fps)"):
        concat_mp4(segments[:2] + [fast], str(tmp_path / "joined.mp4"))


def test_mismatched_crf_is_refused(tmp_path):
    # a different crf changes the PPS, and only the first source's PPS reaches the output
    segments = _encode_segments(tmp_path)
    (tmp_path / "crf30").mkdir()
    other = _encode_segments(tmp_path / "crf30", lengths=(3,), crf=30)
    with pytest.raises(ValueError, match=r"source 1 .*SPS/PPS"):
        concat_mp4([segments[0], other[0]], str(tmp_path / "joined.mp4"))


@pytest.mark.parametrize("empty", [[], iter(())])
def test_no_sources_is_refused(tmp_path, empty):
    with pytest.raises(ValueError, match="no sources"):
        concat_mp4(empty, str(tmp_path / "joined.mp4"))
    assert list(tmp_path.iterdir()) == []


def test_source_that_is_not_a_video_is_refused(tmp_path):
    junk = tmp_path / "notes.mp4"
    junk.write_text("not a video")
    with pytest.raises(ValueError, match=r"source 0 .*notes.mp4.* not a readable mp4"):
        concat_mp4([str(junk)], str(tmp_path / "joined.mp4"))


def test_remote_target_is_refused(tmp_path):
    with pytest.raises(ValueError, match="local file"):
        concat_mp4(_encode_segments(tmp_path, lengths=(2,)), "s3://bucket/joined.mp4")


def test_remote_write_uses_a_unique_temporary_key(monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    uploaded = []
    put_file = MemoryFileSystem.put_file

    def recording_put_file(self, local, remote, *args, **kwargs):
        uploaded.append(remote)
        return put_file(self, local, remote, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", recording_put_file)
    frames = _segment_frames(3, (255, 0, 0), seed=0)
    write_video(frames, "memory://unique-temp/a.mp4")
    write_video(frames, "memory://unique-temp/a.mp4")
    assert len(uploaded) == 2 and uploaded[0] != uploaded[1]
    assert all(key.startswith("/unique-temp/a.mp4.partial-") for key in uploaded)
    fs = fsspec.filesystem("memory")
    assert fs.ls("/unique-temp", detail=False) == ["/unique-temp/a.mp4"]


def test_encoding_the_embedded_models_frames_is_deterministic(tmp_path):
    """Dark, smooth procedural frames made x264's macroblock-tree rate control give 3-5 different
    files in 12 encodes (threads=1 alone was not enough); every encode must now be identical."""
    import hashlib

    from pipelines.procedural.bundle import generate_video, load_bundle

    frames, _, _ = generate_video(load_bundle(), "a red circle moves right", 14, seed=5, num_inference_steps=3)
    digests = set()
    for i in range(12):
        path = tmp_path / f"{i}.mp4"
        encode_mp4(frames, str(path), fps=8)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1, f"{len(digests)} different files from 12 encodes of the same frames"
