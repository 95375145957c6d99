"""One validated job spec at the boundary, shared by `scope generate`, the long-video job and
the dataset job.

    spec = JobSpec.from_yaml("spec.yaml")                 # or JobSpec.from_mapping({...})
    spec = JobSpec.from_yaml("spec.yaml", overrides={"seed": 3})   # CLI flags win over the file

Every field sits at the top level of the YAML. The spec is parsed once, before any model or
worker starts; a bad one raises `SpecError` (a ValueError: the CLI prints one line and exits 2)
naming the field, the bad value (shortened) and what a valid one looks like. Unknown fields are
errors. `storage_options` may hold credentials: they are never shown (`to_dict(redacted=True)`,
`fingerprint` leaves them out) and never written.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

MAX_PROMPT_CHARS = 2000          # umT5 reads 512 tokens; a prompt 4x longer is a mistake
MAX_FRAMES = 100_000_000         # hard sanity cap; the job also caps duration by the model's fps
MAX_VIDEO_SECONDS = 24 * 3600    # one job makes at most a day of video: split longer ones
ACCEL_METHODS = ("none", "scope", "teacache", "flowcache", "taylorseer", "fbcache", "magcache")
BACKENDS = ("local", "ray")
DECODE_MODES = ("vae", "preview")
# fields that change no output byte: a resume may differ in them
NOT_IN_FINGERPRINT = ("out", "storage_options", "storage_timeout_s", "checkpoint_every", "replicas", "batch_size")


class SpecError(ValueError):
    """A bad job spec: one line naming the field, the value and a valid example."""


def short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: errors never echo a 100 kB prompt."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# ------------------------------------------------------------------------------ field checks

def _int(low: int, high: int | None = None, example: str = "") -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"spec field {name!r}: {short(value)} is not an integer; e.g. {example}")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise SpecError(f"spec field {name!r}: {value} is out of range; it must be {bound}, e.g. {example}")
        return value
    return check


def _float(low: float, high: float | None = None, example: str = "", open_low: bool = False
           ) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"spec field {name!r}: {short(value)} is not a number; e.g. {example}")
        value = float(value)
        if not math.isfinite(value):
            raise SpecError(f"spec field {name!r}: {value} is not a finite number; e.g. {example}")
        too_low = value <= low if open_low else value < low
        if too_low or (high is not None and value > high):
            bound = (f"> {low}" if open_low else f">= {low}") + ("" if high is None else f" and <= {high}")
            raise SpecError(f"spec field {name!r}: {value} is out of range; it must be {bound}, e.g. {example}")
        return value
    return check


def _text(max_chars: int, example: str, allow_empty: bool = False) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise SpecError(f"spec field {name!r}: {short(value)} is not a string; e.g. {example!r}")
        if not allow_empty and not value.strip():
            raise SpecError(f"spec field {name!r} is empty; e.g. {example!r}")
        if len(value) > max_chars:
            raise SpecError(f"spec field {name!r}: {len(value)} characters, at most {max_chars} "
                            f"are allowed; shorten it (starts {short(value[:40])})")
        if "\x00" in value:
            raise SpecError(f"spec field {name!r}: contains a NUL character; remove it")
        return value
    return check


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in options:
            raise SpecError(f"spec field {name!r}: {short(value)} is not one of {', '.join(options)}")
        return value
    return check


def _device(name: str, value: Any) -> str:
    text = _text(32, "auto")(name, value)
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise SpecError(f"spec field {name!r}: {short(value)} is not a device; use auto (a GPU when one is "
                    f"visible, else the CPU), cpu, cuda or cuda:N")


def _accel(name: str, value: Any) -> str:
    text = _text(4096, "scope")(name, value)
    if text in ACCEL_METHODS or text.endswith(".json"):
        return text
    raise SpecError(f"spec field {name!r}: {short(value)} is neither a method ({', '.join(ACCEL_METHODS)}) "
                    f"nor the path or URL of an accel.json (written by `scope calibrate`)")


def _storage_options(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SpecError(f"spec field {name!r}: must be a mapping of fsspec options, e.g. "
                        f"{{client_kwargs: {{endpoint_url: 'http://127.0.0.1:9000'}}}}; got a "
                        f"{type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))   # a plain, JSON-able copy the caller cannot mutate
    except (TypeError, ValueError) as err:
        raise SpecError(f"spec field {name!r}: values must be strings, numbers, booleans, lists or mappings "
                        f"({short(str(err), 80)}); quote dates and other values") from None


def _resolution(name: str, value: Any) -> str:
    from pipelines.families import resolution_name   # any family's names; its table decides in `describe`

    text = _text(32, "720p")(name, value)
    try:
        return resolution_name(text)
    except ValueError as err:
        raise SpecError(f"spec field {name!r}: {err}") from None


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "prompt": _text(MAX_PROMPT_CHARS, "a red circle moves right"),
    "negative_prompt": _text(MAX_PROMPT_CHARS, "blurry, static", allow_empty=True),
    "frames": _optional(_int(1, MAX_FRAMES, "48 (video frames)")),
    "duration_s": _optional(_float(0.0, MAX_VIDEO_SECONDS, "600 (seconds of video)", open_low=True)),
    "seed": _int(0, 2**63 - 1, "0"),
    "model": _optional(_text(4096, "tiny")),
    "context": _optional(_text(4096, "embeddings.safetensors")),
    "image": _optional(_text(4096, "first_frame.png")),
    "video": _optional(_text(4096, "clip.mp4")),
    "resolution": _optional(_resolution),
    "accel": _accel,
    "steps": _optional(_int(1, 1000, "30")),
    "shift": _optional(_float(0.0, 100.0, "8.0", open_low=True)),
    "guidance": _optional(_float(0.0, 100.0, "6.0 (<= 1 disables CFG)")),
    "ar_step": _optional(_int(0, 1000, "0 (synchronous) or 5")),
    "causal_block_size": _optional(_int(1, 1000, "5")),
    "base_frames": _optional(_int(1, 100_000, "25 (latent frames per window)")),
    "overlap": _optional(_int(0, 100_000, "5 (latent frames)")),
    "addnoise_condition": _optional(_int(0, 999, "20 (README; at most ~50)")),
    "fps": _optional(_int(1, 240, "24")),
    "decode": _choice(DECODE_MODES),
    "out": _text(4096, "out/video or s3://bucket/videos/run-1"),
    "checkpoint_every": _int(1, 1_000_000, "1 (segments)"),
    "backend": _choice(BACKENDS),
    "stages": _int(1, 1024, "2"),
    "replicas": _int(1, 4096, "1"),
    "batch_size": _int(1, 256, "4 (videos per forward pass, dataset job)"),
    "device": _device,
    "storage_options": _storage_options,
    "storage_timeout_s": _float(0.0, 3600.0, "10", open_low=True),
}


# ------------------------------------------------------------------------------------ the spec

@dataclass(frozen=True)
class JobSpec:
    """What to generate, with what, and where to put it. Checked as a whole in `__post_init__`.

    frames | duration_s: the video's length (exactly one; duration_s x the model's fps).
    negative_prompt: "" = the model's default (SkyReels-V2: upstream's Chinese negative prompt).
    model: None = the embedded procedural model; "tiny"; or a folder / fsspec URL.
    context: precomputed text embeddings (safetensors 'context' [L, text_dim], optional
        'negative_context'); None = the model's own text encoder (SkyReels-V2: umT5 from the folder).
    image | video (SkyReels-V2, at most one; path or URL): image-to-video (the image is the first
        latent, as upstream) or continuation (the video's last 1 + 4 x (overlap - 1) frames are the
        clean prefix; the output holds only the new frames). Encoded by the VAE.
    resolution: "540p", "720p" or "WxH" (multiples of 16); None = what the model's size implies.
    addnoise_condition: noise level given to a clean prefix (upstream's flag; None = the model's default).
    decode: "vae" (the real decoder) or "preview" (SkyReels-V2 only: a latent preview, no VAE needed
        unless image / video is set).
    accel: a method name, or the path / URL of an accel.json.
    steps, shift, guidance, ar_step, causal_block_size, base_frames, overlap, fps: schedule
        overrides (None = the model's default); base_frames / overlap in latent frames.
    out: a folder (local path or fsspec URL); `scope generate` also accepts an .mp4 file.
    checkpoint_every: segments between checkpoints (long-video job).
    batch_size: videos of one shape per forward pass (dataset job; each keeps its own accelerator state).
    device: where the model runs in this process (or in each Ray stage / dataset actor): auto =
        a CUDA GPU when one is visible, else the CPU; cpu; cuda; cuda:N.
    storage_options: fsspec options for `out` (credentials: never logged nor written).
    """

    prompt: str
    frames: int | None = None
    duration_s: float | None = None
    negative_prompt: str = ""
    seed: int = 0
    model: str | None = None
    context: str | None = None
    image: str | None = None
    video: str | None = None
    resolution: str | None = None
    accel: str = "none"
    steps: int | None = None
    shift: float | None = None
    guidance: float | None = None
    ar_step: int | None = None
    causal_block_size: int | None = None
    base_frames: int | None = None
    overlap: int | None = None
    addnoise_condition: int | None = None
    fps: int | None = None
    decode: str = "vae"
    out: str = "out/video"
    checkpoint_every: int = 1
    backend: str = "local"
    stages: int = 1
    replicas: int = 1
    batch_size: int = 1
    device: str = "auto"
    storage_options: dict[str, Any] = field(default_factory=dict)
    storage_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):   # every field is checked: a spec with several bad values names them all
            try:
                object.__setattr__(self, f.name, _CHECKS[f.name](f.name, getattr(self, f.name)))
            except SpecError as err:
                problems.append(str(err))
        if len(problems) == 1:
            raise SpecError(problems[0])
        if problems:
            raise SpecError(f"{len(problems)} bad spec fields: " + " | ".join(
                p.removeprefix("spec field ") for p in problems))
        if (self.frames is None) == (self.duration_s is None):
            raise SpecError("spec: give exactly one of 'frames' (e.g. 48) and 'duration_s' (e.g. 600); "
                            f"got frames={self.frames}, duration_s={self.duration_s}")
        if self.backend == "local" and (self.stages > 1 or self.replicas > 1):
            raise SpecError(f"spec: stages={self.stages}, replicas={self.replicas} need backend 'ray' "
                            f"(the local backend is one process); set backend: ray or stages: 1")
        if self.image is not None and self.video is not None:
            raise SpecError("spec: give at most one of 'image' (image-to-video) and 'video' (continuation)")
        if self.overlap is not None and self.base_frames is not None and self.overlap >= self.base_frames:
            raise SpecError(f"spec field 'overlap': {self.overlap} must be smaller than base_frames "
                            f"({self.base_frames}), e.g. overlap 4 with base_frames 16")

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "spec") -> JobSpec:
        """A spec from a mapping (a parsed YAML document); unknown keys are errors."""
        if not isinstance(values, Mapping):
            raise SpecError(f"{where}: must be a mapping of fields (prompt: ..., frames: ...); "
                            f"got {type(values).__name__}")
        valid = [f.name for f in fields(cls)]
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise SpecError(f"{where}: unknown field {short(key, 40)}; {hint}valid fields: {', '.join(valid)}")
        if "prompt" not in values:
            raise SpecError(f"{where}: field 'prompt' is required, e.g. prompt: a red circle moves right")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str, overrides: Mapping[str, Any] | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> JobSpec:
        """A spec from a YAML file (local path or fsspec URL), then `overrides` (CLI flags; None
        values are "not given")."""
        import yaml

        text = _read_text(path, storage_options)
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise SpecError(f"spec {path}: not valid YAML{at} ({getattr(err, 'problem', 'parse error')}); "
                            f"fix the file") from None
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise SpecError(f"spec {path}: must be a mapping of fields (prompt: ..., frames: ...); "
                            f"got a {type(values).__name__}")
        merged = dict(values)
        merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if merged.get("frames") is not None and overrides and overrides.get("frames") is not None:
            merged.pop("duration_s", None)     # a CLI length replaces the file's
        if merged.get("duration_s") is not None and overrides and overrides.get("duration_s") is not None:
            merged.pop("frames", None)
        return cls.from_mapping(merged, where=f"spec {path}")

    # -- writing ---------------------------------------------------------------------------------
    def to_dict(self, redacted: bool = True) -> dict[str, Any]:
        """Every field; `redacted` (anything logged or written) keeps storage_options' keys and
        hides every value: a credential can hide under any name (a connection string, a header)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if redacted:
            values["storage_options"] = _redact(values["storage_options"])
        return values

    def fingerprint(self) -> str:
        """sha256 of every field that can change an output byte (not where it goes, nor how often
        it is checkpointed, nor credentials)."""
        values = {k: v for k, v in self.to_dict(redacted=False).items() if k not in NOT_IN_FINGERPRINT}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """'field: this vs other' for every fingerprinted field that differs from a spec dict."""
        mine = self.to_dict()
        return [f"{k}: {short(other.get(k), 30)} there vs {short(mine[k], 30)} now" for k in mine
                if k not in NOT_IN_FINGERPRINT and other.get(k) != mine[k]]

    def with_overrides(self, **changes: Any) -> JobSpec:
        return replace(self, **changes)

    def frame_count(self, fps: int) -> int:
        """Video frames: `frames`, or `duration_s` x fps (rounded up: never shorter than asked)."""
        frames = self.frames if self.frames is not None else math.ceil(self.duration_s * fps - 1e-9)
        if frames > MAX_VIDEO_SECONDS * fps:
            raise SpecError(f"spec: {frames} frames at {fps} fps is {frames / fps / 3600:.1f} h of video; "
                            f"one job makes at most {MAX_VIDEO_SECONDS // 3600} h: split it into several jobs")
        return frames


def _read_text(path: str, storage_options: Mapping[str, Any] | None) -> str:
    if "://" in path and not path.startswith("file://"):
        from jobs.storage import StorageError, read_bytes

        try:
            data = read_bytes(path, dict(storage_options or {}))
        except StorageError as err:
            raise SpecError(f"spec {path}: {err}") from None
        if data is None:
            raise SpecError(f"spec {path}: no such object; check the URL")
        return data.decode("utf-8", errors="replace")
    try:
        with open(path.removeprefix("file://"), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise SpecError(f"spec {path}: no such file; pass --spec PATH to a YAML job spec") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"spec {path}: cannot read it ({type(err).__name__}: {short(str(err), 80)})") from None


def _redact(value: Any) -> Any:
    """The same structure with every leaf value replaced by '***'."""
    if isinstance(value, Mapping):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return "***"
