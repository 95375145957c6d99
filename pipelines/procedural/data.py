"""Procedural captioned clips: one coloured shape moving over a dark background.

A clip is fully determined by `(seed, index)`. Frames are uint8 [T, H, W, 3]; the caption
comes from a fixed template ("a red circle moves left", "a green square bounces", "a blue
triangle stays still") and the attribute labels are returned next to it.

Motion rules (positions are continuous, shapes are anti-aliased):
- left / right / up / down: constant speed, wrap-around at the frame edges (the picture is a
  torus), so a video of any length keeps moving.
- bouncing: diagonal constant speed, elastic reflection at the frame edges (the object always
  stays fully inside the frame).
- still: the object never moves.

Objects are bright (max channel >= 190), backgrounds dark (max channel <= 70, gradients
included), so an object colour is never confused with a background colour.

CLI: `python -m pipelines.procedural.data --preview out.mp4` writes a grid of sample clips.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# 1. Vocabulary of attributes
# ---------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "white": (235, 235, 235),
    "magenta": (215, 50, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "bouncing", "still")

# Dark background colours; a gradient blends two of them (every channel stays <= 70).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "charcoal": (30, 30, 30),
    "navy": (15, 20, 60),
    "forest": (15, 50, 25),
    "plum": (45, 15, 50),
    "brown": (55, 35, 20),
    "slate": (25, 45, 55),
}

# The "position" background: dark, and a different colour at every pixel (red grows to the right,
# blue downwards). The Wan transformer only has relative (RoPE) positions, so a token can only
# learn where it is in the frame from content; a clean frame of this background gives it that.
POSITION_BACKGROUND = {"top_left": (15, 25, 15), "right": (50, 0, 0), "down": (0, 0, 50)}

START_POSITIONS = ("random", "centre", "opposite")   # ClipConfig.start_position
# unit direction per straight motion, image coordinates (x right, y down)
_DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
}


@dataclass(frozen=True)
class Attributes:
    """What a clip shows: one (colour, shape, motion) combination."""

    colour: str
    shape: str
    motion: str

    def __post_init__(self) -> None:
        for name, value, allowed in (("colour", self.colour, tuple(COLOURS)),
                                     ("shape", self.shape, SHAPES),
                                     ("motion", self.motion, MOTIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")

    def caption(self) -> str:
        """The template caption, e.g. 'a red circle moves left'."""
        subject = f"a {self.colour} {self.shape}"
        if self.motion == "bouncing":
            return f"{subject} bounces"
        if self.motion == "still":
            return f"{subject} stays still"
        return f"{subject} moves {self.motion}"


def parse_caption(caption: str) -> Attributes:
    """Inverse of `Attributes.caption`; raises ValueError on anything off-template."""
    words = caption.lower().replace(".", " ").split()
    ok = len(words) >= 4 and words[0] == "a"
    if ok and words[3:] == ["bounces"]:
        motion = "bouncing"
    elif ok and words[3:] == ["stays", "still"]:
        motion = "still"
    elif ok and len(words) == 5 and words[3] == "moves" and words[4] in _DIRECTIONS:
        motion = words[4]
    else:
        raise ValueError(f"caption {caption!r} does not follow the template "
                         "'a <colour> <shape> moves <left|right|up|down>' / "
                         "'a <colour> <shape> bounces' / 'a <colour> <shape> stays still'")
    return Attributes(words[1], words[2], motion)


def all_attributes() -> list[Attributes]:
    """Every (colour, shape, motion) combination, in a fixed order."""
    return [Attributes(c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS)]


def caption_vocabulary() -> list[str]:
    """Every word any caption can contain, sorted."""
    words = {w for a in all_attributes() for w in a.caption().split()}
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# 2. Train / held-out split of combinations
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """Combinations seen in training and combinations held out for evaluation."""

    train: tuple[Attributes, ...]
    heldout: tuple[Attributes, ...]

    def get(self, name: str) -> tuple[Attributes, ...]:
        """'train', 'heldout' or 'all'."""
        if name == "train":
            return self.train
        if name == "heldout":
            return self.heldout
        if name == "all":
            return self.train + self.heldout
        raise ValueError(f"unknown split {name!r}; choose 'train', 'heldout' or 'all'")


@functools.lru_cache(maxsize=16)
def split_attributes(heldout_fraction: float = 0.15, seed: int = 0) -> Split:
    """Hold out some combinations so that every attribute *pair* stays seen in training.

    Greedy over a seeded shuffle: a combination is held out only if its (colour, shape),
    (colour, motion) and (shape, motion) pairs each keep at least one training combination,
    and no single value is held out much more often than the others. Deterministic in `seed`.
    """
    if not 0.0 <= heldout_fraction <= 0.3:
        raise ValueError(f"heldout_fraction must be in [0, 0.3] so every pair stays in training "
                         f"(e.g. 0.15); got {heldout_fraction}")
    combos = all_attributes()
    target = round(heldout_fraction * len(combos))
    order = np.random.default_rng(seed).permutation(len(combos))

    def pairs(a: Attributes) -> list[tuple[str, str, str]]:
        return [("cs", a.colour, a.shape), ("cm", a.colour, a.motion), ("sm", a.shape, a.motion)]

    pair_count: dict[tuple[str, str, str], int] = {}
    for a in combos:
        for p in pairs(a):
            pair_count[p] = pair_count.get(p, 0) + 1
    value_count: dict[str, int] = {}
    cap = {name: math.ceil(target / n) + 1
           for name, n in (("colour", len(COLOURS)), ("shape", len(SHAPES)), ("motion", len(MOTIONS)))}

    heldout: list[Attributes] = []
    for i in order:
        if len(heldout) == target:
            break
        a = combos[i]
        values = {"colour": a.colour, "shape": a.shape, "motion": a.motion}
        if any(pair_count[p] <= 1 for p in pairs(a)):
            continue
        if any(value_count.get(f"{k}={v}", 0) >= cap[k] for k, v in values.items()):
            continue
        heldout.append(a)
        for p in pairs(a):
            pair_count[p] -= 1
        for k, v in values.items():
            value_count[f"{k}={v}"] = value_count.get(f"{k}={v}", 0) + 1
    held = set(heldout)
    return Split(train=tuple(a for a in combos if a not in held),
                 heldout=tuple(a for a in combos if a in held))


# ---------------------------------------------------------------------------------------------
# 3. Clip specification (sampling) and rendering (vectorised)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipConfig:
    """Size and motion ranges. Lengths are in pixels at 64 px and scale with the frame size."""

    height: int = 64
    width: int = 64
    num_frames: int = 32
    half_size: tuple[float, float] = (6.0, 9.0)   # object half-extent (px at 64)
    speed: tuple[float, float] = (1.5, 2.5)       # px per frame at 64: 12-20 px over 8 frames
    gradient_probability: float = 0.5
    # Layout controls. The defaults draw everything at random; the training distribution pins the
    # start point (per motion), one background and one bounce angle (see `TRAINING_CLIPS`), so that
    # a caption decides the first frame and a clean prefix decides the rest.
    start_position: str = "random"                # "random", "centre" or "opposite" (see `start_point`)
    background_style: str = "random"              # "random" (BACKGROUNDS, gradients) or "position" (POSITION_BACKGROUND)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    bounce_angle: float | None = None             # degrees (0 = right, 90 = down); None = random diagonal

    def __post_init__(self) -> None:
        if self.height < 16 or self.width < 16:
            raise ValueError(f"frames must be at least 16x16 (e.g. 64x64); got {self.height}x{self.width}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 (e.g. 32); got {self.num_frames}")
        lo, hi = self.half_size
        if not 2.0 <= lo <= hi <= 14.0:
            raise ValueError(f"half_size must be (lo, hi) with 2 <= lo <= hi <= 14 px at 64 px "
                             f"(e.g. (6, 9)); got {self.half_size}")
        lo, hi = self.speed
        if not 0.25 <= lo <= hi <= 8.0:
            raise ValueError(f"speed must be (lo, hi) px/frame with 0.25 <= lo <= hi <= 8 "
                             f"(e.g. (1.5, 2.5)); got {self.speed}")
        if not 0.0 <= self.gradient_probability <= 1.0:
            raise ValueError(f"gradient_probability must be in [0, 1]; got {self.gradient_probability}")
        if self.background_style not in ("random", "position"):
            raise ValueError(f"background_style must be 'random' or 'position'; got {self.background_style!r}")
        if self.start_position not in START_POSITIONS:
            raise ValueError(f"start_position must be one of {START_POSITIONS} ('random', 'centre' or 'opposite'); "
                             f"got {self.start_position!r}")
        unknown = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if not self.backgrounds or unknown:
            raise ValueError(f"backgrounds must be a non-empty subset of {list(BACKGROUNDS)}; got {self.backgrounds}")
        if self.bounce_angle is not None and not math.isfinite(self.bounce_angle):
            raise ValueError(f"bounce_angle must be a finite angle in degrees (e.g. 45) or None; got {self.bounce_angle}")

    @property
    def scale(self) -> float:
        return min(self.height, self.width) / 64.0


def start_point(motion: str, half: float, config: ClipConfig) -> tuple[float, float]:
    """First-frame centre for the fixed layouts: "centre" for every motion; "opposite" puts an
    object that moves in a straight line next to the edge it moves away from (centred on the
    other axis), so that it crosses the whole frame before it has to wrap around (a small
    transformer with relative positions learns wrap-around poorly: measured, objects stall at the
    edge); still and bouncing objects start at the centre."""
    cx, cy = config.width / 2, config.height / 2
    if config.start_position == "centre" or motion not in _DIRECTIONS:
        return cx, cy
    dx, dy = _DIRECTIONS[motion]
    inset = half + 2.0
    x = cx if dx == 0 else (inset if dx > 0 else config.width - inset)
    y = cy if dy == 0 else (inset if dy > 0 else config.height - inset)
    return x, y


# The training distribution: one size, speed and bounce angle, over the "position" background,
# and every video starts from a clean block of that background without the object
# (`empty_scene`). The caption then decides the first frames and the clean frames tell each token
# where it is, so a small model trained for minutes on a CPU learns to draw one object.
# (Session-1 weights, trained on random layouts without a reference, condensed object pieces all
# over the frame: Wan's RoPE is relative, so at pure noise no token knows where it is and nothing
# breaks the symmetry.) Straight movers start at the edge they move away from and move 1 px per
# frame, so they cross the frame in 48 frames before wrapping around (session 2 started them at
# the centre at 2 px/frame: they reached the edge after 12 frames and stalled there instead of
# wrapping). Later frames follow from a clean prefix: training renders clips that start at a
# random time of the endless motion when they have one.
TRAINING_CLIPS = ClipConfig(num_frames=16, half_size=(7.5, 7.5), speed=(1.0, 1.0), gradient_probability=0.0,
                            start_position="opposite", background_style="position", bounce_angle=45.0)


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip (positions are pixel centres, float)."""

    attributes: Attributes
    half_size: float
    x0: float
    y0: float
    vx: float
    vy: float
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # top/left and bottom/right colour
    gradient_axis: int                                              # 0 vertical, 1 horizontal


@dataclass
class Clip:
    """One rendered clip: frames, caption, labels."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    caption: str
    attributes: Attributes
    spec: ClipSpec = field(repr=False)


def sample_spec(attributes: Attributes, config: ClipConfig, rng: np.random.Generator) -> ClipSpec:
    """Random size, position, speed and background for the given attributes."""
    s = config.scale
    half = rng.uniform(*config.half_size) * s
    speed = rng.uniform(*config.speed) * s
    margin = half + 1.0
    x0 = rng.uniform(margin, config.width - margin)
    y0 = rng.uniform(margin, config.height - margin)
    if config.start_position != "random":
        x0, y0 = start_point(attributes.motion, half, config)
    if attributes.motion in _DIRECTIONS:
        dx, dy = _DIRECTIONS[attributes.motion]
        vx, vy = dx * speed, dy * speed
    elif attributes.motion == "bouncing":
        angle = rng.uniform(math.radians(30), math.radians(60)) + (math.pi / 2) * rng.integers(4)
        if config.bounce_angle is not None:
            angle = math.radians(config.bounce_angle)
        vx, vy = speed * math.sqrt(2) * math.cos(angle), speed * math.sqrt(2) * math.sin(angle)
    else:
        vx = vy = 0.0
    names = list(config.backgrounds)
    first = BACKGROUNDS[names[rng.integers(len(names))]]
    second = BACKGROUNDS[names[rng.integers(len(names))]] if rng.random() < config.gradient_probability else first
    return ClipSpec(attributes, float(half), float(x0), float(y0), float(vx), float(vy),
                    (first, second), int(rng.integers(2)))


def _reflect(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fold an unbounded coordinate into [lo, hi] by elastic reflection (triangle wave)."""
    length = hi - lo
    u = torch.remainder(p - lo, 2 * length)
    return lo + length - (u - length).abs()


def _starts(start: int | Sequence[int], n: int) -> torch.Tensor:
    """First frame index per clip [N, 1]: one int for all clips or one per clip."""
    if isinstance(start, int):
        return torch.full((n, 1), start, dtype=torch.float64)
    if len(start) != n:
        raise ValueError(f"need one start frame per clip: {n} clips, {len(start)} starts")
    return torch.tensor([float(s) for s in start], dtype=torch.float64)[:, None]


def _trajectory(specs: Sequence[ClipSpec], config: ClipConfig,
                start: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Object centres [N, T] for frames start .. start+T-1 (closed form, any start)."""
    t = torch.arange(config.num_frames, dtype=torch.float64)[None] + _starts(start, len(specs))
    x0 = torch.tensor([s.x0 for s in specs], dtype=torch.float64)[:, None]
    y0 = torch.tensor([s.y0 for s in specs], dtype=torch.float64)[:, None]
    vx = torch.tensor([s.vx for s in specs], dtype=torch.float64)[:, None]
    vy = torch.tensor([s.vy for s in specs], dtype=torch.float64)[:, None]
    margin = torch.tensor([s.half_size + 1.0 for s in specs], dtype=torch.float64)[:, None]
    x, y = x0 + vx * t, y0 + vy * t
    bouncing = torch.tensor([s.attributes.motion == "bouncing" for s in specs])[:, None]
    x = torch.where(bouncing, _reflect(x, margin, config.width - margin), torch.remainder(x, config.width))
    y = torch.where(bouncing, _reflect(y, margin, config.height - margin), torch.remainder(y, config.height))
    return x.float(), y.float()


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Signed distance (px, negative inside) to a shape whose bounding box is [-half, half]^2."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - half
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - half
    # triangle, apex up: base y = +half, sides through (0, -half) and (+-half, +half)
    return torch.maximum(dy - half, (2 * dx.abs() - dy - half) / math.sqrt(5.0))


def render_clips(specs: Sequence[ClipSpec], config: ClipConfig, start: int | Sequence[int] = 0) -> torch.Tensor:
    """Render clips to uint8 [N, T, H, W, 3]; frames start .. start+T-1 of each clip's motion
    (`start`: one frame index for all clips, or one per clip)."""
    n, t, h, w = len(specs), config.num_frames, config.height, config.width
    # 1. background [N, H, W, 3]: a solid colour or a linear blend along one axis
    first = torch.tensor([s.background[0] for s in specs], dtype=torch.float32)
    second = torch.tensor([s.background[1] for s in specs], dtype=torch.float32)
    ramp_y = torch.linspace(0, 1, h)[None, :, None].expand(n, h, w)
    ramp_x = torch.linspace(0, 1, w)[None, None, :].expand(n, h, w)
    vertical = torch.tensor([s.gradient_axis == 0 for s in specs])[:, None, None]
    ramp = torch.where(vertical, ramp_y, ramp_x)[..., None]
    background = first[:, None, None] * (1 - ramp) + second[:, None, None] * ramp
    if config.background_style == "position":
        background = position_background(config)[None].expand(n, h, w, 3)

    # 2. coverage [N, T, H, W] of the anti-aliased object, on the torus (wrap-around)
    cx, cy = _trajectory(specs, config, start)
    px = torch.arange(w, dtype=torch.float32) + 0.5
    py = torch.arange(h, dtype=torch.float32) + 0.5
    dx = torch.remainder(px[None, None, None, :] - cx[..., None, None] + w / 2, w) - w / 2  # [N,T,1,W]
    dy = torch.remainder(py[None, None, :, None] - cy[..., None, None] + h / 2, h) - h / 2  # [N,T,H,1]
    half = torch.tensor([s.half_size for s in specs], dtype=torch.float32)[:, None, None, None]
    coverage = torch.empty(n, t, h, w)
    for shape in SHAPES:
        idx = [i for i, s in enumerate(specs) if s.attributes.shape == shape]
        if idx:
            sel = torch.tensor(idx)
            sd = _signed_distance(shape, dx[sel], dy[sel], half[sel])
            coverage[sel] = (0.5 - sd).clamp(0, 1)

    # 3. composite [N, T, H, W, 3]
    colour = torch.tensor([COLOURS[s.attributes.colour] for s in specs], dtype=torch.float32)
    cov = coverage[..., None]
    frames = background[:, None] * (1 - cov) + colour[:, None, None, None] * cov
    return frames.round_().clamp_(0, 255).to(torch.uint8)


def position_background(config: ClipConfig) -> torch.Tensor:
    """The "position" background [H, W, 3] float (every channel <= 70)."""
    pb = POSITION_BACKGROUND
    x = torch.linspace(0, 1, config.width)[None, :, None]
    y = torch.linspace(0, 1, config.height)[:, None, None]
    return (torch.tensor(pb["top_left"], dtype=torch.float32) + x * torch.tensor(pb["right"], dtype=torch.float32)
            + y * torch.tensor(pb["down"], dtype=torch.float32))


def empty_scene(config: ClipConfig) -> torch.Tensor:
    """uint8 [T, H, W, 3]: the clip's background without any object (the reference frames that
    start every procedural video, see `TRAINING_CLIPS`). Needs a fixed background style."""
    if config.background_style != "position":
        raise ValueError("empty_scene needs background_style='position' (random backgrounds differ per clip)")
    frame = position_background(config).round().clamp(0, 255).to(torch.uint8)
    return frame[None].expand(config.num_frames, -1, -1, -1).clone()


def _clip_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def sample_clip_spec(seed: int, index: int, config: ClipConfig,
                     combinations: Sequence[Attributes] | None = None) -> ClipSpec:
    """Spec of clip `index` of stream `seed`: its combination is drawn from `combinations`."""
    combos = all_attributes() if combinations is None else list(combinations)
    rng = _clip_rng(seed, index)
    return sample_spec(combos[rng.integers(len(combos))], config, rng)


def make_clip(seed: int, index: int = 0, config: ClipConfig | None = None, split: str = "all",
              attributes: Attributes | None = None, start: int = 0) -> Clip:
    """One clip, deterministic in (seed, index). `attributes` overrides the drawn combination."""
    config = config or ClipConfig()
    if attributes is None:
        spec = sample_clip_spec(seed, index, config, split_attributes().get(split))
    else:
        spec = sample_spec(attributes, config, _clip_rng(seed, index))
    frames = render_clips([spec], config, start)[0].numpy()
    return Clip(frames, spec.attributes.caption(), spec.attributes, spec)


# ---------------------------------------------------------------------------------------------
# 4. Batches for training
# ---------------------------------------------------------------------------------------------

def make_batch(seed: int, batch_index: int, batch_size: int, config: ClipConfig | None = None,
               split: str = "train", start: int | Sequence[int] = 0) -> dict[str, object]:
    """Batch `batch_index` of stream `seed`: clips batch_index*B .. +B-1 of that stream.

    `start` > 0 renders frames start .. start+T-1 of each clip's (endless) motion (one int for
    all clips, or one per clip).
    Returns {"frames": uint8 [B,T,H,W,3], "captions": list[str],
    "colour" / "shape" / "motion": LongTensor [B] indices into COLOURS / SHAPES / MOTIONS}.
    """
    config = config or ClipConfig()
    combos = split_attributes().get(split)
    specs = [sample_clip_spec(seed, batch_index * batch_size + i, config, combos) for i in range(batch_size)]
    colours, shapes, motions = list(COLOURS), list(SHAPES), list(MOTIONS)
    return {
        "frames": render_clips(specs, config, start),
        "captions": [s.attributes.caption() for s in specs],
        "colour": torch.tensor([colours.index(s.attributes.colour) for s in specs]),
        "shape": torch.tensor([shapes.index(s.attributes.shape) for s in specs]),
        "motion": torch.tensor([motions.index(s.attributes.motion) for s in specs]),
    }


class ProceduralClips(torch.utils.data.IterableDataset):
    """Endless stream of batches (use `DataLoader(ds, batch_size=None)`); workers interleave."""

    def __init__(self, batch_size: int, config: ClipConfig | None = None, split: str = "train",
                 seed: int = 0, num_batches: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (e.g. 16); got {batch_size}")
        split_attributes().get(split)  # validate the name early
        self.batch_size, self.config, self.split = batch_size, config or ClipConfig(), split
        self.seed, self.num_batches = seed, num_batches

    def __iter__(self) -> Iterator[dict[str, object]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        indices = itertools.count(worker, workers) if self.num_batches is None \
            else range(worker, self.num_batches, workers)
        for b in indices:
            yield make_batch(self.seed, b, self.batch_size, self.config, self.split)


# ---------------------------------------------------------------------------------------------
# 5. Preview CLI
# ---------------------------------------------------------------------------------------------

def tile_clips(frames: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """uint8 [N, T, H, W, 3] -> one grid video uint8 [T, rows*(H+gap)-gap, cols*(W+gap)-gap, 3]."""
    n, t, h, w, _ = frames.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((t, rows * (h + gap) - gap, columns * (w + gap) - gap, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = frames[i]
    return grid


def write_preview(frames: np.ndarray, path: str, fps: int = 8) -> None:
    """Minimal H.264 (yuv420p) writer for uint8 [T, H, W, 3]; even sizes via edge padding."""
    import av

    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write sample procedural clips as one grid mp4.")
    parser.add_argument("--preview", required=True, help="output .mp4 path")
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="all", choices=["train", "heldout", "all"])
    args = parser.parse_args(argv)
    config = ClipConfig(height=args.size, width=args.size, num_frames=args.frames)
    batch = make_batch(args.seed, 0, args.clips, config, args.split)
    write_preview(tile_clips(batch["frames"].numpy(), columns=min(4, args.clips)), args.preview)
    for i, caption in enumerate(batch["captions"]):
        print(f"{i:2d}  {caption}")
    print(f"wrote {args.preview}")


if __name__ == "__main__":
    main()
