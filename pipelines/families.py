"""One table per model family, and which family a `--model` value belongs to.

    ref = detect("magi-1-tiny")          # ModelRef(family="magi-1", kind="tiny", size="tiny", ...)
    fam = table(ref.family)              # the family module: pipelines/magi1/family.py
    fam.accel_defaults("teacache", ref.size), fam.sampling_defaults(ref.size), fam.build_vae(...)

Each family module declares, once: its sizes and sampling defaults, latent geometry, resolutions,
the official folder's files, builders of its VAE and text encoder (folder or tiny random), its
accelerator adapter, `accel_defaults(method, size)` and `SELECTIVE_EXACT` (what exact selective
computation means on it). `jobs/` and `cluster/` read model facts there; `scope/` knows no model.

`--model` values (`detect`):
- None: the embedded procedural model (a small SkyReels-V2-architecture DiT with its own codec);
- "tiny": the tiny SkyReels-V2 chain (random weights);
- "magi-1-<size>": a named MAGI-1 size ("magi-1-tiny" is the tiny random MAGI-1 chain; the real
  sizes name an architecture, their weights come from a folder);
- a folder or URL: a procedural bundle when it holds `pipeline.json`; MAGI-1 when it is or holds
  an `inference_weight*` folder (or sits in the release's `ckpt/magi/<size>/`); else SkyReels-V2
  (its `describe` then checks config.json and every file).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

FAMILY_MODULES = {
    "skyreels-v2": "pipelines.skyreels_v2.family",
    "magi-1": "pipelines.magi1.family",
}
KINDS = ("procedural", "tiny", "size", "checkpoint")


@dataclass(frozen=True)
class ModelRef:
    """What a `--model` value names (no weights read)."""

    family: str          # a key of FAMILY_MODULES
    kind: str            # procedural | tiny | size (a named size without weights) | checkpoint (a folder)
    source: str          # the folder / URL, or the model name ("tiny", "magi-1-tiny", ...)
    size: str | None     # the family's named size, when known


def table(family: str) -> ModuleType:
    """The family's module (its one table of facts)."""
    if family not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {family!r}; valid: {sorted(FAMILY_MODULES)}")
    return importlib.import_module(FAMILY_MODULES[family])


def model_names() -> list[str]:
    """Every named model `--model` accepts (besides folders and the embedded default)."""
    magi = table("magi-1")
    return ["tiny", *[f"{magi.MODEL_PREFIX}{s}" for s in magi.SIZE_NAMES]]


def detect(model: str | None) -> ModelRef:
    """The family and kind of a `--model` value. Folders are recognised by their file names only
    (cheap; `jobs.setup.describe` then checks them). ValueError for an unknown `magi-1-*` name."""
    if model is None:
        from pipelines.procedural.bundle import WEIGHTS_DIR

        return ModelRef("skyreels-v2", "procedural", str(WEIGHTS_DIR), None)
    if model == "tiny":
        return ModelRef("skyreels-v2", "tiny", "tiny", "tiny")
    magi = table("magi-1")
    if model.startswith(magi.MODEL_PREFIX) and "/" not in model:
        size = magi.size_of_model_name(model)
        if size is None:
            raise ValueError(f"unknown MAGI-1 model {model!r}; named models: "
                             f"{', '.join(model_names())}, or a model folder")
        return ModelRef("magi-1", "tiny" if size == "tiny" else "size", model, size)
    folder = model.rstrip("/")
    if _has_file(folder, "pipeline.json"):
        return ModelRef("skyreels-v2", "procedural", folder, None)
    if _safely(magi.looks_like_magi, folder):
        return ModelRef("magi-1", "checkpoint", folder, None)
    return ModelRef("skyreels-v2", "checkpoint", folder, None)


def resolution_name(text: str) -> str:
    """A frame size some family accepts ('540p', '720p', 'WxH' with multiples of 16), normalised to
    its name (the job spec checks it before knowing the model; the family's `describe` then parses
    it with its own table). ValueError (the first family's hint) otherwise."""
    errors = []
    for name in FAMILY_MODULES:
        try:
            return table(name).parse_resolution(text).name
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(errors[0])


def _safely(check: object, folder: str) -> bool:
    try:
        return bool(check(folder))   # type: ignore[operator]
    except Exception:   # noqa: BLE001  (unreachable storage: `describe` says why, in one line)
        return False


def _has_file(folder: str, name: str) -> bool:
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(folder)
        return fs.isfile(f"{root.rstrip('/')}/{name}")
    except Exception:   # noqa: BLE001  (unreachable storage: `describe` says why, in one line)
        return False


__all__ = ["FAMILY_MODULES", "KINDS", "ModelRef", "detect", "model_names", "resolution_name", "table"]
