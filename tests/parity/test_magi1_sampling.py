"""Parity with upstream MAGI-1 sampling: one test per `magi-1__*` golden case of kind `scheduler`,
`timestep_matrix` or `sample` (the `forward` kind is `test_magi1_forward.py`'s).

The folder comes from $SCOPE_GOLDEN_DIR (default ../shared/reference/golden). A case of these
kinds never skips.
"""
from __future__ import annotations

import json

import pytest

from tests.parity.golden import check_outputs, discover, golden_root, load_case
from tests.parity.magi1_sampling import run_sample, run_scheduler, run_timestep_matrix

FAMILY = "magi-1"
RUNNERS = {
    "scheduler": run_scheduler,
    "timestep_matrix": run_timestep_matrix,
    "sample": run_sample,
}
CASES = [c for c in discover(FAMILY) if json.loads((c / "meta.json").read_text())["kind"] in RUNNERS]


def test_golden_folder_has_cases():
    assert CASES, f"no {FAMILY} scheduler / timestep_matrix / sample golden case under {golden_root()} " \
                  f"(set SCOPE_GOLDEN_DIR)"


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_golden_case(case_dir):
    case = load_case(case_dir)
    produced = RUNNERS[case.kind](case)
    compared = check_outputs(case, produced)
    assert any(n.startswith("output.") for n in compared)
