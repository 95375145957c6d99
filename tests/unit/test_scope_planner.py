"""Selective computation on a hand-worked asynchronous schedule.

5 chunks, 4 steps, ar_step 2 (step index per chunk; 0 = not started, 5 = done):

    row  indices          update mask   classes (F finished, A active, W waiting)
     0   [1, 0, 0, 0, 0]  A . . . .     A W W W W
     2   [3, 1, 0, 0, 0]  A A . . .     A A W W W
     4   [5, 3, 1, 0, 0]  . A A . .     F A A W W
     6   [5, 5, 3, 1, 0]  . . A A .     F F A A W
     8   [5, 5, 5, 3, 1]  . . . A A     F F F A A
    11   [5, 5, 5, 5, 4]  . . . . A     F F F F A
"""

import pytest

from scope.planner import (active_from_sigmas, active_interval, classify_chunks, plan_selective)
from tests.unit.scope_toy import df_schedule

STEPS, AR = 4, 2
ROWS = df_schedule(5, STEPS, AR)
SIGMA = {0: 1.0, 1: 0.9, 2: 0.7, 3: 0.45, 4: 0.2, 5: 0.0}   # step index -> model input sigma


def mask(row: int) -> list[bool]:
    prev = ROWS[row - 1] if row else [0] * 5
    return [n != p and n != STEPS + 1 for n, p in zip(ROWS[row], prev)]


def test_schedule_matches_the_hand_worked_rows():
    assert len(ROWS) == STEPS + 4 * AR
    assert ROWS[4] == [5, 3, 1, 0, 0] and ROWS[6] == [5, 5, 3, 1, 0] and ROWS[8] == [5, 5, 5, 3, 1]
    assert [mask(r) for r in (0, 4, 6, 11)] == [
        [True, False, False, False, False], [False, True, True, False, False],
        [False, False, True, True, False], [False, False, False, False, True]]


@pytest.mark.parametrize("row, interval, classes", [
    (0, (0, 0), "AWWWW"), (2, (0, 1), "AAWWW"), (4, (1, 2), "FAAWW"),
    (6, (2, 3), "FFAAW"), (8, (3, 4), "FFFAA"), (11, (4, 4), "FFFFA"),
])
def test_active_interval_and_classes(row, interval, classes):
    names = {"finished": "F", "active": "A", "waiting": "W", "gap": "G"}
    assert active_interval(mask(row)) == interval
    assert "".join(names[c] for c in classify_chunks(mask(row))) == classes


def test_active_from_sigmas_reproduces_the_update_mask():
    for row in range(1, len(ROWS)):
        sig = [SIGMA[i] for i in ROWS[row]]
        prev = [SIGMA[i] for i in ROWS[row - 1]]
        assert active_from_sigmas(sig, prev) == mask(row), f"row {row}"


def plan(row, mode, causal, recompute=None, **kw):
    m = mask(row)
    return plan_selective(m, m if recompute is None else recompute, causal=causal, mode=mode, **kw)


def test_row6_every_mode():
    # row 6: F F A A W, all active chunks recompute
    off = plan(6, "off", causal=True)
    assert (off.run, off.dropped, off.context) == ((0, 1, 2, 3, 4), (), (0, 1, 4))

    exact_causal = plan(6, "exact", causal=True)
    assert exact_causal.run == (0, 1, 2, 3)          # waiting chunk 4 cannot influence 2, 3
    assert exact_causal.dropped == (4,) and exact_causal.context == (0, 1)

    exact_bidir = plan(6, "exact", causal=False)      # nothing can be dropped exactly
    assert exact_bidir.run == (0, 1, 2, 3, 4) and exact_bidir.dropped == ()

    approx = plan(6, "approx", causal=False, context_chunks=1)
    assert approx.run == (1, 2, 3) and approx.dropped == (0, 4) and approx.context == (1,)

    approx0 = plan(6, "approx", causal=False, context_chunks=0)
    assert approx0.run == (2, 3) and approx0.dropped == (0, 1, 4)


def test_exact_causal_drops_everything_after_the_last_recompute_chunk():
    # row 8: F F F A A; only chunk 3 recomputes (chunk 4 is Cached): chunk 4 cannot influence 3
    p = plan(8, "exact", causal=True, recompute=[False, False, False, True, False])
    assert p.run == (0, 1, 2, 3) and p.dropped == (4,)
    # only chunk 4 recomputes: chunk 3 (Cached) must run as context under exact
    p = plan(8, "exact", causal=True, recompute=[False, False, False, False, True])
    assert p.run == (0, 1, 2, 3, 4) and p.context == (0, 1, 2, 3)


def test_finished_kv_is_captured_then_served():
    kw = dict(kv_cache_finished=True)
    first = plan(6, "exact", causal=True, **kw)
    assert first.kv_capture == (0, 1) and first.kv_served == () and first.run == (0, 1, 2, 3)
    later = plan(6, "exact", causal=True, kv_finished_ready=[True, True, False, False, False], **kw)
    assert later.kv_served == (0, 1) and later.run == (2, 3) and later.context == (0, 1)


def test_stale_kv_serves_cache_chunks_in_approx():
    rec = [False, False, False, False, True]          # row 8: chunk 3 Cached, chunk 4 recomputes
    p = plan(8, "approx", causal=False, recompute=rec, context_chunks=1, kv_cache_stale=True,
             kv_stale_ready=[False, False, False, True, False])
    assert p.kv_served == (3,) and p.run == (2, 4) and p.kv_capture == (4,)


def test_nothing_runs_when_nothing_recomputes():
    p = plan(6, "exact", causal=True, recompute=[False] * 5)
    assert p.run == () and p.active == (2, 3)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="selective mode must be"):
        plan(6, "fast", causal=True)
