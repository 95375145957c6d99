"""Video files: write H.264 mp4 atomically (local path or fsspec URL), join mp4 segments by
stream copy, read frames back."""
from __future__ import annotations

import itertools
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable
from uuid import uuid4

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
    """Encode uint8 [T,H,W,3] frames as H.264 (yuv420p) into a local file.

    Deterministic: the same frames, fps and crf always give a byte-identical file.
    """
    import av

    frames = _pad_to_even(check_frames(frames))
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Determinism: x264's worker threads make its decisions depend on scheduling (the
        # "threads" option, not codec_context.thread_count, stops them, av 18.1), and even on one
        # thread its macroblock-tree rate control gave 3-5 different files in 12 encodes of the
        # same dark procedural frames; with mbtree=0 every one of 40 encodes was identical.
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
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
    _write_local_atomically(target, lambda tmp: encode_mp4(frames, tmp, fps, crf))
    return target


def _write_local_atomically(target: str, write: Callable[[str], Any]) -> Any:
    """Run `write(tmp)` on a unique temporary file next to `target`, then rename it into place.

    Returns what `write` returned. The temporary name is unique, so concurrent writers of the
    same target never share one, and a crash never leaves a half-written file under `target`.
    """
    out_dir = Path(target).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".mp4", dir=out_dir)
    os.close(fd)
    try:
        result = write(tmp)
        os.chmod(tmp, _normal_mode())   # mkstemp creates 0600; the video is an ordinary file
        os.replace(tmp, target)  # atomic on one file system
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


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
        # unique per call: two writers of the same URL must never upload into one temporary key
        partial = f"{path}.partial-{uuid4().hex}"
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


# ---------------------------------------------------------------------------------------------
# Joining segments by stream copy
# ---------------------------------------------------------------------------------------------

_NO_SOURCE = object()


def concat_mp4(sources: Iterable[str], target: str,
               opener: Callable[[str], Any] | None = None) -> int:
    """Join H.264 mp4 segments made by `encode_mp4` into one mp4 at local path `target`.

    The packets are copied, never decoded or re-encoded, one at a time (memory does not grow with
    the video length). Each source is opened with `opener(source)`, which must return an open
    binary file object or a context manager yielding one (default: `open(source, "rb")`; for s3://
    pass e.g. `lambda url: fsspec.open(url, "rb")`). All sources must share size, codec settings
    (crf), time base and fps. Returns the number of video frames written.
    """
    target = _local_concat_target(target)
    remaining = iter(sources)
    first = next(remaining, _NO_SOURCE)
    if first is _NO_SOURCE:
        raise ValueError("concat_mp4 got no sources; pass at least one mp4 segment path")
    all_sources = itertools.chain([first], remaining)
    return _write_local_atomically(
        target, lambda tmp: _remux_sources(all_sources, tmp, opener or _open_local))


def _open_local(source: str):
    return open(source, "rb")


def _local_concat_target(target: str) -> str:
    target = os.fspath(target)
    if "://" in target and not target.startswith("file://"):
        raise ValueError(f"concat_mp4 writes a local file; got {target!r} "
                         "(concat to a local path, then upload it)")
    return target.removeprefix("file://")


def _remux_sources(sources: Iterable[str], tmp: str, opener: Callable[[str], Any]) -> int:
    """Copy every source's video packets into a new mp4 at `tmp`; return the packet count."""
    import av

    with av.open(tmp, mode="w", format="mp4") as output:
        timeline: _Timeline | None = None
        for index, source in enumerate(sources):
            with opener(source) as file, _open_input(file, index, source) as container:
                in_stream = _only_video_stream(container, index, source)
                if timeline is None:
                    timeline = _Timeline(output, in_stream)
                else:
                    _check_same_format(timeline.reference, _describe(in_stream), index, source)
                timeline.copy_source(container, in_stream, index, source)
    return timeline.frames


def _open_input(file, index: int, source: str):
    import av

    try:
        return av.open(file, mode="r")
    except av.FFmpegError as error:
        raise ValueError(f"concat_mp4 source {index} ({source}) is not a readable mp4: {error}; "
                         "pass files written by encode_mp4/write_video") from None


def _only_video_stream(container, index: int, source: str):
    if not container.streams.video:
        raise ValueError(f"concat_mp4 source {index} ({source}) has no video stream; "
                         "pass files written by encode_mp4/write_video")
    return container.streams.video[0]


def _describe(stream) -> dict[str, Any]:
    """What must agree between segments for their packets to play as one stream."""
    context = stream.codec_context
    return {
        "codec": context.name,
        "width": stream.width,
        "height": stream.height,
        "pixel format": context.pix_fmt,
        "fps": stream.average_rate,  # before the time base: the muxer derives that from fps
        "time base": stream.time_base,
        # SPS/PPS: only the first source's copy goes into the output, so every segment must
        # have been encoded with the same settings (a different crf changes the PPS)
        "codec parameters (SPS/PPS)": bytes(context.extradata or b""),
    }


def _check_same_format(reference: dict[str, Any], found: dict[str, Any], index: int,
                       source: str) -> None:
    for name, expected in reference.items():
        if found[name] != expected:
            raise ValueError(f"concat_mp4 source {index} ({source}): {name} "
                             f"{_difference(found[name], expected)}; "
                             "encode every segment with the same size, fps and crf")


def _difference(found: Any, expected: Any) -> str:
    if isinstance(expected, bytes):  # raw SPS/PPS bytes say nothing to a reader
        return "differ from the first source's (another crf or preset?)"
    return f"is {found}, the first source's is {expected}"


class _Timeline:
    """The output stream and where the next source's packets go on its time axis.

    Each source is shifted to start where the previous ones ended. Decode timestamps need one
    more step: x264 delays decoding behind presentation by up to `reorder_depth` frames (B-frame
    reordering), but a 1- or 2-frame segment has no B-frames and no delay. Every source is given
    the same delay (the one its SPS allows), so dts rise steadily across segment boundaries and
    the mp4's track length equals the sum of the segments.
    """

    def __init__(self, output, first_stream) -> None:
        self.reference = _describe(first_stream)
        if self.reference["codec"] != "h264":
            raise ValueError(f"concat_mp4 joins H.264 segments; the first source's codec is "
                             f"{self.reference['codec']} (write segments with encode_mp4)")
        self.output = output
        self.stream = output.add_stream_from_template(first_stream)
        output.start_encoding()  # the muxer may pick its own time base when the header is written
        self.time_base = Fraction(self.stream.time_base)
        self.frame_period = _frame_period(first_stream.average_rate, self.time_base)
        self.delay = first_stream.codec_context.reorder_depth * self.frame_period
        self.end = 0            # where the next source starts, in the output time base
        self.last_dts: int | None = None
        self.frames = 0

    def copy_source(self, container, in_stream, index: int, source: str) -> int:
        """Mux every video packet of one source; return how many were written."""
        from av.rational import AVRational

        out_time_base = AVRational(self.time_base)  # Packet.rescale_ts takes only AVRational
        written = 0
        pts_shift = dts_shift = 0
        for packet in container.demux(in_stream):
            if packet.dts is None:  # the demuxer's empty end-of-stream packet
                continue
            packet.rescale_ts(out_time_base)
            if written == 0:
                pts_shift, dts_shift = self._shifts_for(packet, index, source)
            packet.pts += pts_shift
            packet.dts += dts_shift
            self._check_order(packet, index, source)
            self.end = max(self.end, packet.pts + (packet.duration or self.frame_period))
            packet.stream = self.stream
            self.output.mux(packet)
            written += 1
        if written == 0:
            raise ValueError(f"concat_mp4 source {index} ({source}) has no video frames; "
                             "drop it from the list")
        self.frames += written
        return written

    def _shifts_for(self, first_packet, index: int, source: str) -> tuple[int, int]:
        """(pts, dts) offsets that start this source at `self.end` with the common decode delay.

        The first packet in decode order is the source's opening IDR frame: its pts is where the
        source starts, and pts - dts is the source's own decode delay.
        """
        own_delay = first_packet.pts - first_packet.dts
        if self.last_dts is None:
            self.delay = max(self.delay, own_delay)
        if own_delay > self.delay:
            raise ValueError(f"concat_mp4 source {index} ({source}) delays decoding by "
                             f"{own_delay} ticks, more than the first source's {self.delay}; "
                             "encode every segment with encode_mp4")
        pts_shift = self.end - first_packet.pts
        return pts_shift, pts_shift - (self.delay - own_delay)

    def _check_order(self, packet, index: int, source: str) -> None:
        """The mp4 muxer needs strictly rising dts, each no later than its pts."""
        if (self.last_dts is not None and packet.dts <= self.last_dts) or packet.dts > packet.pts:
            raise ValueError(f"concat_mp4 source {index} ({source}) has timestamps out of order "
                             f"(dts {packet.dts} after {self.last_dts}, pts {packet.pts}); "
                             "re-encode it with encode_mp4")
        self.last_dts = packet.dts


def _frame_period(fps: Fraction | None, time_base: Fraction) -> int:
    """Length of one frame in `time_base` ticks."""
    if not fps:
        raise ValueError("concat_mp4: the first source has no frame rate; "
                         "write segments with encode_mp4")
    return round(1 / (Fraction(fps) * time_base))
