"""Parity with the upstream SkyReels-V2 code: one test per `skyreels-v2-df__*` golden case.

The folder comes from $SCOPE_GOLDEN_DIR (default ../shared/reference/golden). A case of a
supported kind never skips; a case of an unsupported kind fails and names the kind.
"""
from __future__ import annotations

import pytest

from tests.parity.golden import check_outputs, discover, golden_root, load_case
from tests.parity.skyreels_forward import run_forward
from tests.parity.skyreels_sampling import run_sample, run_scheduler, run_timestep_matrix

FAMILY = "skyreels-v2-df"
RUNNERS = {
    "forward": run_forward,
    "timestep_matrix": run_timestep_matrix,
    "scheduler": run_scheduler,
    "sample": run_sample,
}
CASES = discover(FAMILY)


def test_golden_folder_has_cases():
    assert CASES, f"no {FAMILY} golden case under {golden_root()} (set SCOPE_GOLDEN_DIR)"


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_golden_case(case_dir):
    case = load_case(case_dir)
    runner = RUNNERS.get(case.kind)
    if runner is None:
        pytest.fail(f"golden case {case.name}: kind {case.kind!r} is not supported by the "
                    f"{FAMILY} adapter (supported: {sorted(RUNNERS)})")
    produced = runner(case)
    compared = check_outputs(case, produced)
    assert any(n.startswith("output.") for n in compared)
