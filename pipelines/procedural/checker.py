"""Content checker: read colour, shape and motion of the one object in a video from its pixels.

Per video (uint8 [T, H, W, 3]):
1. Background: per frame, a plane a + b*x + c*y per channel fitted to the pixels far from the
   frame's median colour (solid colours and linear gradients are fitted exactly).
2. Colour: median colour of the core foreground pixels -> nearest palette colour.
3. Coverage: alpha = projection of (pixel - background) on (object - background); the object
   is where alpha >= 0.5. Its row / column profiles are rolled per frame so that an object
   split by wrap-around is contiguous again (circular mean of the occupied columns / rows).
4. Shape: per frame, fill = soft area / (soft width * soft height) and top = share of the
   area in the top half of the box (soft = coverage summed, so blur and rounded corners keep
   the area); the median over frames goes to the nearest prototype:
   circle (pi/4, 0.5), square (1, 0.5), triangle with apex up (0.5, 0.25).
5. Motion: centroid per frame; steps between frames are wrapped into [-W/2, W/2) and summed
   into a track, displacements taken over a stride of up to 8 frames (outline wobble of
   generated objects is position noise that does not grow with the stride). Mean displacement
   per frame below `still_speed` -> still; one axis moving with a consistent sign and the other
   nearly idle -> left / right / up / down; anything else (diagonal, reversals) -> bouncing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.procedural.data import COLOURS, Attributes, parse_caption

SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (math.pi / 4, 0.5),
    "square": (1.0, 0.5),
    "triangle": (0.5, 0.25),
}
FOREGROUND_DISTANCE = 60.0   # RGB distance from the background that counts as object
MIN_AREA = 6                 # px at 64x64; fewer -> no object in that frame


@dataclass
class CheckResult:
    """Attributes read from a video (None where not determinable) plus the measurements."""

    colour: str | None
    shape: str | None
    motion: str | None
    object_colour: tuple[float, float, float] | None = None   # measured median RGB
    fill: float | None = None
    top: float | None = None
    velocity: tuple[float, float] | None = None    # mean step (px/frame, x right, y down)
    speed: tuple[float, float] | None = None       # mean |step| per axis
    found_frames: float = 0.0                      # share of frames with an object
    centroids: np.ndarray | None = field(default=None, repr=False)  # [T, 2] (x, y), NaN if none

    def agreement(self, truth: Attributes | str) -> dict[str, bool]:
        """Per-attribute agreement with the truth (Attributes or a template caption)."""
        truth = parse_caption(truth) if isinstance(truth, str) else truth
        return {"colour": self.colour == truth.colour, "shape": self.shape == truth.shape,
                "motion": self.motion == truth.motion}

    def matches(self, caption: str) -> bool:
        """True if colour, shape and motion all agree with the caption."""
        return all(self.agreement(caption).values())


# ---------------------------------------------------------------------------------------------
# 1. Background and colour
# ---------------------------------------------------------------------------------------------

def _dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product over a last axis of size 3 (faster than .sum(-1) on small inner axes)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _fit_background(frames: np.ndarray, stride: int = 2) -> np.ndarray:
    """Per frame and channel, least-squares plane over the pixels far from any object [T,H,W,3].

    Fitted on every `stride`-th pixel per axis (a plane needs few), evaluated on all pixels.
    """
    t, h, w, _ = frames.shape
    sub = frames[:, ::stride, ::stride]                                          # [T, h', w', 3]
    median = np.median(sub.reshape(t, -1, 3), axis=1)                            # [T, 3]
    offset = sub - median[:, None, None]
    far = (_dot3(offset, offset) < (FOREGROUND_DISTANCE / 2) ** 2).reshape(t, -1).astype(np.float32)
    ys = np.linspace(-1, 1, h, dtype=np.float32)
    xs = np.linspace(-1, 1, w, dtype=np.float32)
    yy, xx = np.meshgrid(ys[::stride], xs[::stride], indexing="ij")
    basis = np.stack([np.ones_like(xx), xx, yy], -1).reshape(-1, 3)              # [P, 3]
    pairs = (basis[:, :, None] * basis[:, None, :]).reshape(-1, 9)               # [P, 9]
    gram = (far @ pairs).reshape(t, 3, 3) + 1e-3 * np.eye(3)                     # [T, 3, 3]
    rhs = basis.T[None] @ (far[..., None] * sub.reshape(t, -1, 3))               # [T, 3, C]
    coef = np.linalg.solve(gram, rhs).astype(np.float32)                         # [T, 3, C]
    return (coef[:, None, None, 0] + coef[:, None, None, 1] * xs[None, None, :, None]
            + coef[:, None, None, 2] * ys[None, :, None, None])                  # [T, H, W, C]


def nearest_colour(rgb: Sequence[float]) -> str:
    """Palette name nearest to an RGB triple."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], np.float64)
    return names[int(np.argmin(np.linalg.norm(palette - np.asarray(rgb, np.float64), axis=1)))]


# ---------------------------------------------------------------------------------------------
# 2. Per-frame geometry on the torus
# ---------------------------------------------------------------------------------------------

def _centring_shift(occupied: np.ndarray) -> np.ndarray:
    """Integer shift per frame that moves the circular mean of occupied [T, n] to n/2.

    After the shift an object narrower than half the frame that wraps around the edge is
    contiguous again.
    """
    n = occupied.shape[1]
    angle = 2 * np.pi * (np.arange(n) + 0.5) / n
    occupied = occupied.astype(np.float32)
    mean = np.arctan2(occupied @ np.sin(angle), occupied @ np.cos(angle))        # [T]
    centre = (mean % (2 * np.pi)) * n / (2 * np.pi)
    return np.round(n / 2 - centre).astype(np.int64)


def _roll(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Roll each row of x [T, n] by its own shift: out[t, i] = x[t, (i - shift[t]) % n]."""
    n = x.shape[1]
    return np.take_along_axis(x, (np.arange(n)[None] - shift[:, None]) % n, axis=1)


def _extent(occupied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last occupied index per row of occupied [T, n] (bool)."""
    n = occupied.shape[1]
    return occupied.argmax(1), n - 1 - occupied[:, ::-1].argmax(1)


def frame_geometry(alpha: np.ndarray, margin: int = 2) -> dict[str, np.ndarray]:
    """Per-frame object geometry from coverage alpha [T, H, W] (~1 on the object), wrap-around handled.

    The object is where alpha >= 0.5. Row and column profiles are rolled per frame so the
    object is contiguous (the frames themselves are never rolled). Sizes are soft: coverage
    summed over the object's box grown by `margin` px, so blurred edges and rounded corners
    keep the area and the extent. Returns arrays [T]: area (px with alpha >= 0.5), cx, cy
    (centroid, px, in [0, W) / [0, H)), fill (soft area over width * height, width = sum over
    columns of the column's max coverage) and top (share of the object in the top half of its box).
    """
    t, h, w = alpha.shape
    mask = alpha >= 0.5
    col_any, row_any = mask.any(1), mask.any(2)                                  # [T, W], [T, H]
    sx, sy = _centring_shift(col_any), _centring_shift(row_any)
    # 1. the box in rolled coordinates, grown by the margin, mapped back to the frame
    x0, x1 = _extent(_roll(col_any, sx))
    y0, y1 = _extent(_roll(row_any, sy))
    xs, ys = np.arange(w)[None], np.arange(h)[None]
    in_x = _roll((xs >= x0[:, None] - margin) & (xs <= x1[:, None] + margin), -sx)  # [T, W]
    in_y = _roll((ys >= y0[:, None] - margin) & (ys <= y1[:, None] + margin), -sy)  # [T, H]
    # 2. soft coverage inside the box, as rolled profiles
    soft = np.where(alpha >= 0.1, np.clip(alpha, 0.0, 1.0), 0.0)
    soft = soft * in_y[:, :, None] * in_x[:, None, :]                            # [T, H, W]
    cols, rows = _roll(soft.sum(1), sx), _roll(soft.sum(2), sy)                  # [T, W], [T, H]
    area = cols.sum(1)
    safe = np.maximum(area, 1e-6)
    width, height = soft.max(1).sum(1), soft.max(2).sum(1)
    centre_y = ys + 0.5
    box_mid = ((y0 + y1 + 1) / 2)[:, None]
    top = ((rows * (centre_y < box_mid)).sum(1) + 0.5 * (rows * (centre_y == box_mid)).sum(1)) / safe
    return {"area": mask.sum((1, 2)).astype(np.float64),
            "cx": ((cols @ (xs[0] + 0.5)) / safe - sx) % w,
            "cy": ((rows @ (ys[0] + 0.5)) / safe - sy) % h,
            "fill": area / np.maximum(width * height, 1e-6),
            "top": top}


# ---------------------------------------------------------------------------------------------
# 3. The check
# ---------------------------------------------------------------------------------------------

def _wrap(d: np.ndarray, period: float) -> np.ndarray:
    return (d + period / 2) % period - period / 2


def unwrapped_track(centroids: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centroids [T, 2] with wrap-around undone: each step wrapped into [-W/2, W/2) and summed.
    A frame without an object (NaN) ends a run; the next run restarts from its own centroid, so
    displacements are only taken inside runs (see `classify_motion`)."""
    track = np.full_like(centroids, np.nan, dtype=np.float64)
    for i, c in enumerate(centroids):
        if np.isnan(c[0]):
            continue
        if i > 0 and not np.isnan(centroids[i - 1, 0]):
            step = c - centroids[i - 1]
            track[i] = track[i - 1] + (_wrap(step[0], width), _wrap(step[1], height))
        else:
            track[i] = c
    return track


def motion_stride(frames: int) -> int:
    """Frames between the two ends of one displacement: up to 8, at least 3 per clip."""
    return max(1, min(8, (frames - 1) // 3))


def classify_motion(centroids: np.ndarray, width: int, height: int,
                    still_speed: float = 0.35, straightness: float = 0.8, stride: int | None = None,
                    ) -> tuple[str | None, tuple[float, float], tuple[float, float]]:
    """Motion label from centroids [T, 2] (NaN rows = no object); px thresholds at 64 px.

    Displacements are taken over `stride` frames (default `motion_stride`) and divided by it:
    a generated object's outline wobbles from frame to frame, which moves its centroid by a
    pixel or two without going anywhere; that position noise does not grow with the stride,
    real motion does. Ground-truth clips read the same at any stride (tests)."""
    scale = min(width, height) / 64.0
    stride = motion_stride(len(centroids)) if stride is None else stride
    track = unwrapped_track(centroids, width, height)
    # a displacement counts only when both ends are in the same run of found frames
    run = np.cumsum(np.isnan(track[:, 0]))
    ends = (~np.isnan(track[stride:, 0])) & (~np.isnan(track[:-stride, 0])) & (run[stride:] == run[:-stride]) \
        if len(track) > stride else np.zeros(0, dtype=bool)
    if not ends.any():
        return None, (0.0, 0.0), (0.0, 0.0)
    step = (track[stride:] - track[:-stride])[ends] / stride       # [S, 2] px per frame
    velocity = step.mean(0)
    speed = np.abs(step).mean(0)
    vx, vy = velocity
    sx, sy = speed
    idle = still_speed * scale
    if max(sx, sy) < idle:
        motion = "still"
    elif sx >= sy and abs(vx) > straightness * sx and sy < max(idle, 0.25 * sx):
        motion = "right" if vx > 0 else "left"
    elif sy > sx and abs(vy) > straightness * sy and sx < max(idle, 0.25 * sy):
        motion = "down" if vy > 0 else "up"
    else:
        motion = "bouncing"
    return motion, (float(vx), float(vy)), (float(sx), float(sy))


def check_video(frames: np.ndarray) -> CheckResult:
    """Read colour, shape and motion of the single object in uint8 frames [T, H, W, 3]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"check_video expects frames [T, H, W, 3]; got {frames.shape}")
    f = frames.astype(np.float32)
    t, h, w, _ = f.shape
    min_area = max(2, round(MIN_AREA * h * w / 4096))

    # 1. background and foreground
    background = _fit_background(f)
    diff = f - background
    dist = np.sqrt(_dot3(diff, diff))                               # [T, H, W]
    fg = dist > FOREGROUND_DISTANCE
    if fg.sum() < min_area:
        return CheckResult(None, None, None, centroids=np.full((t, 2), np.nan))

    # 2. colour: median of the core pixels (the brightest-contrast part of the foreground)
    core = fg & (dist >= 0.8 * np.percentile(dist[fg], 90))
    object_rgb = np.median(f[core], axis=0)
    colour = nearest_colour(object_rgb)

    # 3. coverage alpha in [0, 1]: projection on (object - background), per pixel
    direction = object_rgb[None, None, None] - background            # [T, H, W, 3]
    alpha = _dot3(diff, direction) / np.maximum(_dot3(direction, direction), 1.0)

    # 4. per-frame geometry -> shape, centroids
    geometry = frame_geometry(alpha)
    found = geometry["area"] >= min_area                             # [T]
    centroids = np.where(found[:, None], np.stack([geometry["cx"], geometry["cy"]], -1), np.nan)
    if not found.any():
        return CheckResult(colour, None, None, tuple(float(c) for c in object_rgb), centroids=centroids)
    fill = float(np.median(geometry["fill"][found]))
    top = float(np.median(geometry["top"][found]))
    shape = min(SHAPE_PROTOTYPES, key=lambda s: math.dist((fill, top), SHAPE_PROTOTYPES[s]))

    # 5. motion
    motion, velocity, speed = classify_motion(centroids, w, h)
    return CheckResult(colour, shape, motion, tuple(float(c) for c in object_rgb), fill, top,
                       velocity, speed, float(found.mean()), centroids)


def agreement_rates(results: Sequence[CheckResult], truths: Sequence[Attributes | str]) -> dict[str, float]:
    """Share of videos whose colour / shape / motion / all three agree with the truth."""
    if len(results) != len(truths) or not results:
        raise ValueError(f"need one truth per result (and at least one); got {len(results)} vs {len(truths)}")
    rows = [r.agreement(t) for r, t in zip(results, truths)]
    rates = {k: float(np.mean([row[k] for row in rows])) for k in ("colour", "shape", "motion")}
    rates["all"] = float(np.mean([all(row.values()) for row in rows]))
    return rates
