"""jobs.video: atomic mp4 writing (local and fsspec), frames read back, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from jobs.video import read_video, write_video


def _moving_square(t: int = 12, h: int = 32, w: int = 48) -> np.ndarray:
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, 8:16, 2 * i:2 * i + 8] = (255, 0, 0)
    return frames


def test_write_and_read_back(tmp_path):
    frames = _moving_square()
    out = write_video(frames, str(tmp_path / "sub" / "v.mp4"), fps=8)
    back = read_video(out)
    assert back.shape == frames.shape
    # H.264 is lossy, but a flat red square stays red
    assert back[5, 12, 12, 0] > 200 and back[5, 12, 12, 2] < 60
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".partial-")]


def test_odd_sizes_are_padded(tmp_path):
    out = write_video(_moving_square(4, 31, 45), str(tmp_path / "odd.mp4"))
    assert read_video(out).shape == (4, 32, 46, 3)


def test_fsspec_memory_url():
    import fsspec

    write_video(_moving_square(), "memory://videos/a.mp4")
    fs = fsspec.filesystem("memory")
    assert fs.exists("/videos/a.mp4") and not fs.exists("/videos/a.mp4.partial")
    assert fs.size("/videos/a.mp4") > 100


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 8, 8), np.uint8), "shape"),
    (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((0, 8, 8, 3), np.uint8), "no frames"),
])
def test_bad_frames_are_named(tmp_path, bad, message):
    target = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match=message):
        write_video(bad, str(target))
    assert not target.exists()


def test_written_video_has_normal_permissions(tmp_path):
    import os
    import stat

    import numpy as np

    from jobs.video import write_video

    target = tmp_path / "v.mp4"
    write_video(np.zeros((4, 16, 16, 3), dtype=np.uint8), str(target), fps=8)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
