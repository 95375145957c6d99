"""Golden-case harness: discover case folders, load them, compare with the case's own tolerances.

Layout: ../shared/reference/GOLDEN_FORMAT.md. Nothing here depends on a particular case: every
value a check needs comes from the case folder (meta.json, io.safetensors, weights file).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def golden_root() -> Path:
    """The golden folder: $SCOPE_GOLDEN_DIR, else ../shared/reference/golden next to the repo."""
    configured = os.environ.get("SCOPE_GOLDEN_DIR")
    if configured:
        path = Path(configured)
        return path if path.is_absolute() else (REPO_ROOT / path)
    return REPO_ROOT.parent / "shared" / "reference" / "golden"


def reference_root() -> Path:
    """Reference facts (key listings): $SCOPE_REFERENCE_DIR, else ../shared/reference."""
    configured = os.environ.get("SCOPE_REFERENCE_DIR")
    if configured:
        path = Path(configured)
        return path if path.is_absolute() else (REPO_ROOT / path)
    return REPO_ROOT.parent / "shared" / "reference"


def discover(family: str, root: Path | None = None) -> list[Path]:
    """Every sub-directory holding a meta.json whose family is `family` (sorted by name)."""
    root = root or golden_root()
    if not root.is_dir():
        return []
    found = []
    for meta_path in sorted(root.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("family") == family:
            found.append(meta_path.parent)
    return found


@dataclass
class GoldenCase:
    name: str
    dir: Path
    meta: dict[str, Any]
    io: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] | None

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def call(self) -> dict[str, Any]:
        return self.meta.get("call") or {}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.io:
            raise KeyError(f"golden case {self.name}: io.safetensors has no tensor {name!r}; "
                           f"it has {sorted(self.io)}")
        return self.io[name]

    def call_tensor(self, value: Any) -> Any:
        """Resolve a call argument that names an io tensor (e.g. "input.step_template")."""
        if isinstance(value, str) and value in self.io:
            return self.io[value]
        return value

    def tolerance(self, name: str) -> Any:
        tol = self.meta["tolerances"]
        return (tol.get("per_tensor") or {}).get(name, tol["default"])


def load_case(case_dir: Path) -> GoldenCase:
    meta = json.loads((case_dir / "meta.json").read_text())
    io = load_file(str(case_dir / "io.safetensors"))
    weights = None
    if meta.get("weights"):
        weights = load_file(os.path.join(case_dir, meta["weights"]["file"]))
    return GoldenCase(case_dir.name, case_dir, meta, io, weights)


def check_tensor(case: GoldenCase, name: str, actual: torch.Tensor) -> None:
    """Compare `actual` with the case's `name` under its tolerance; the error names both sides."""
    expected = case.tensor(name)
    actual = torch.as_tensor(actual).detach().cpu()
    where = f"golden case {case.name}, tensor {name}"
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{where}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = case.tolerance(name)
    if tol == "exact":
        a, e = actual, expected
        if e.dtype == torch.bool or a.dtype == torch.bool:
            a, e = a.to(torch.int64), e.to(torch.int64)
        if e.is_floating_point() or a.is_floating_point():
            same = (a.double() == e.double()) | (torch.isnan(a.double()) & torch.isnan(e.double()))
        else:
            same = a.to(torch.int64) == e.to(torch.int64)
        if not bool(same.all()):
            bad = (~same).nonzero()[:5].tolist()
            raise AssertionError(f"{where}: not exactly equal; {int((~same).sum())} elements differ, "
                                 f"first at {bad}: got {a[tuple(bad[0])].item()} expected {e[tuple(bad[0])].item()}")
        return
    torch.testing.assert_close(
        actual.to(torch.float32), expected.to(torch.float32), atol=tol["atol"], rtol=tol["rtol"],
        equal_nan=True, check_dtype=False,
        msg=lambda m: f"{where} (atol={tol['atol']}, rtol={tol['rtol']}): {m}")


def check_outputs(case: GoldenCase, produced: dict[str, torch.Tensor]) -> list[str]:
    """Every output.* must be produced and match; every produced trace.* must match.

    Returns the names that were compared.
    """
    outputs = sorted(n for n in case.io if n.startswith("output."))
    missing = [n for n in outputs if n not in produced]
    if missing:
        raise AssertionError(f"golden case {case.name}: the implementation did not produce {missing}")
    unknown = [n for n in produced if n not in case.io]
    if unknown:
        raise AssertionError(f"golden case {case.name}: produced names not in the case: {unknown}")
    compared = []
    # traces first: a failing trace points at the first place that differs
    for name in sorted(produced, key=lambda n: (not n.startswith("trace."), n)):
        check_tensor(case, name, produced[name])
        compared.append(name)
    return compared
