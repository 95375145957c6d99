"""Video files: write H.264 mp4 atomically (local path or fsspec URL), read frames back."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def _even(n: int) -> int:
    return n + (n % 2)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: pad the last row/column by edge replication."""
    t, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, _even(h) - h), (0, _even(w) - w), (0, 0)), mode="edge")


def check_frames(frames: np.ndarray) -> np.ndarray:
    """Frames must be uint8 [T, H, W, 3] with T >= 1; say how to fix anything else."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must have shape [T, H, W, 3] (RGB, frames first); got {frames.shape}")
    if frames.shape[0] < 1:
        raise ValueError("video has no frames: generate at least one frame before writing")
    if frames.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8 in [0, 255]; got {frames.dtype} "
                         "(convert with (x.clamp(-1, 1) * 127.5 + 127.5).to(torch.uint8))")
    return frames


def encode_mp4(frames: np.ndarray, path: str, fps: int = 16, crf: int = 18) -> None:
    """Encode uint8 [T,H,W,3] frames as H.264 (yuv420p) into a local file."""
    import av

    frames = _pad_to_even(check_frames(frames))
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(frames: np.ndarray, target: str, fps: int = 16, crf: int = 18) -> str:
    """Write an mp4 atomically: encode to a temporary name, then commit it under `target`.

    `target` is a local path or any fsspec URL (s3://bucket/key.mp4). A crash mid-write never
    leaves a half-written file under the target name.
    """
    if fps <= 0:
        raise ValueError(f"fps must be a positive integer (e.g. 16 or 24); got {fps}")
    if "://" in target and not target.startswith("file://"):
        return _write_remote(frames, target, fps, crf)
    target = target.removeprefix("file://")
    out_dir = Path(target).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".mp4", dir=out_dir)
    os.close(fd)
    try:
        encode_mp4(frames, tmp, fps, crf)
        os.chmod(tmp, _normal_mode())   # mkstemp creates 0600; the video is an ordinary file
        os.replace(tmp, target)  # atomic on one file system
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _normal_mode() -> int:
    """0o666 minus the process umask (what open() would have given the file)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_remote(frames: np.ndarray, url: str, fps: int, crf: int) -> str:
    import fsspec

    with tempfile.TemporaryDirectory() as tmpdir:
        local = os.path.join(tmpdir, "video.mp4")
        encode_mp4(frames, local, fps, crf)
        fs, path = fsspec.core.url_to_fs(url)
        partial = f"{path}.partial"
        fs.put_file(local, partial)
        # object stores have no rename: copy then delete; readers only ever see the final key
        # once its content is complete
        fs.mv(partial, path)
    return url


def read_video(path: str) -> np.ndarray:
    """Decode an mp4 back to uint8 [T, H, W, 3] (for tests and quality metrics)."""
    import av

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no decodable video frames")
    return np.stack(frames)
