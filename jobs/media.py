"""Conditioning media: an image (image-to-video) or a video (continuation) -> pixels in [-1, 1] at
the run's resolution, which the VAE then encodes into the first segment's clean prefix.

    check_media(spec)                                   # describe: the file exists (cheap), one line if not
    image = read_image(spec, width, height)             # [3, 1, H, W] float32 in [-1, 1]
    clip = read_last_frames(spec, count, width, height)  # [3, count, H, W]: the video's last frames

Local paths and fsspec URLs (read whole through `jobs.storage`, bounded by `storage_timeout_s`).
Images are read with Pillow, videos with PyAV (frames streamed, only the last `count` kept). Each
picture is scaled to cover the frame and centre-cropped (upstream resizes without cropping, which
stretches a picture of another aspect ratio; the two agree when the aspect ratios match), then
scaled to [-1, 1] as upstream (`x / 127.5 - 1`). A video's own frame rate is ignored: its frames
are taken as they come. Any unreadable file is one `SpecError` line naming the field and the file.
"""
from __future__ import annotations

import io
from collections import deque
from typing import Any

import numpy as np
import torch

from jobs import storage
from jobs.spec import JobSpec, SpecError, short

FIELDS = ("image", "video")


def media_field(spec: JobSpec) -> str | None:
    """'image', 'video' or None: which conditioning the spec asks for."""
    return next((name for name in FIELDS if getattr(spec, name) is not None), None)


def check_media(spec: JobSpec) -> None:
    """The conditioning file exists (local or URL); storage faults and absence are one line."""
    name = media_field(spec)
    if name is None:
        return
    url = getattr(spec, name)
    try:
        found = storage.exists(url, spec.storage_options, spec.storage_timeout_s)
    except storage.StorageError as err:
        raise SpecError(f"spec field {name!r}: {err}") from None
    if not found:
        what = "an image (png, jpg, ...)" if name == "image" else "a video (mp4, webm, ...)"
        raise SpecError(f"spec field {name!r}: {short(url, 200)}: no such file; give {what}, local or a URL")


def _read(spec: JobSpec, name: str) -> bytes:
    url = getattr(spec, name)
    try:
        data = storage.read_bytes(url, spec.storage_options, spec.storage_timeout_s)
    except storage.StorageError as err:
        raise SpecError(f"spec field {name!r}: {err}") from None
    if data is None:
        raise SpecError(f"spec field {name!r}: {short(url, 200)}: no such file")
    return data


def fit(picture: Any, width: int, height: int) -> np.ndarray:
    """A PIL image scaled to cover width x height (bicubic) and centre-cropped -> uint8 [H, W, 3]."""
    from PIL import Image

    picture = picture.convert("RGB")
    scale = max(width / picture.width, height / picture.height)
    size = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.BICUBIC)
    left, top = (picture.width - width) // 2, (picture.height - height) // 2
    return np.asarray(picture.crop((left, top, left + width, top + height)), dtype=np.uint8)


def to_pixels(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 frames [H, W, 3] -> [3, T, H, W] float32 in [-1, 1] (upstream: x / (255 / 2) - 1)."""
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()
    return video / (255.0 / 2.0) - 1.0


def read_image(spec: JobSpec, width: int, height: int) -> torch.Tensor:
    """The spec's image as one frame [3, 1, H, W] in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    data = _read(spec, "image")
    try:
        with Image.open(io.BytesIO(data)) as picture:
            return to_pixels([fit(picture, width, height)])
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SpecError(f"spec field 'image': {short(spec.image, 200)} is not a readable image "
                        f"({type(err).__name__}: {short(str(err), 80)}); give a png or jpg") from None


def read_last_frames(spec: JobSpec, count: int, width: int, height: int) -> torch.Tensor:
    """The last `count` frames of the spec's video [3, count, H, W] in [-1, 1]; fewer is an error."""
    import av

    data = _read(spec, "video")
    kept: deque[Any] = deque(maxlen=count)
    seen = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("it holds no video stream")
            for frame in container.decode(video=0):
                kept.append(frame.to_image())
                seen += 1
    except (av.error.FFmpegError, ValueError, OSError) as err:
        raise SpecError(f"spec field 'video': {short(spec.video, 200)} is not a readable video "
                        f"({type(err).__name__}: {short(str(err), 80)}); give an mp4 or webm") from None
    if seen < count:
        raise SpecError(f"spec field 'video': {short(spec.video, 200)} has {seen} frame(s); the continuation "
                        f"encodes its last {count} (the prefix of `overlap` latents = 1 + 4 x (overlap - 1) frames): "
                        f"give a longer video or a smaller overlap")
    return to_pixels([fit(picture, width, height) for picture in kept])
