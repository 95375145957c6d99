"""Unit state is keyed by (request, branch, chunk) and dropped per request."""

import pytest
import torch

from scope.state import CallContext, StateStore, UnitKey


def test_store_keys_units_and_drops_a_whole_request():
    store: StateStore[list] = StateStore(list)
    for req in ("a", "b"):
        for br in ("cond", "uncond"):
            for c in range(3):
                store.ensure(UnitKey(req, br, c)).append((req, br, c))
    assert len(store) == 12
    assert store.get(UnitKey("a", "uncond", 2)) == [("a", "uncond", 2)]
    assert store.drop_chunks("a", [0, 1], branch="cond") == 2
    assert sorted(k.chunk for k in store.keys("a", "cond")) == [2]
    assert store.drop_request("a") == 4
    assert store.requests() == ["b"] and len(store) == 6
    assert UnitKey("b", "cond", 0) in store and UnitKey("a", "cond", 2) not in store


def test_store_without_factory_refuses_to_invent_state():
    with pytest.raises(KeyError, match="no factory"):
        StateStore().ensure(UnitKey("a", "cond", 0))


def ctx(**kw):
    base = dict(request="r", branch="cond", step=0, frames_per_chunk=2,
                chunk_sigma=torch.tensor([0.0, 0.5, 1.0]), chunk_active=torch.tensor([False, True, False]),
                causal=False)
    return CallContext(**{**base, **kw})


def test_call_context_derives_python_lists_and_unit_keys():
    c = ctx(chunk_offset=7, chunk_sigma_next=[0.0, 0.0, 1.0])
    assert c.sigmas == (0.0, 0.5, 1.0) and c.active == (False, True, False) and c.num_chunks == 3
    assert c.unit(1) == UnitKey("r", "cond", 8)
    assert c.is_final(1) is True and c.is_final(0) is False
    assert ctx().is_final(1) is None


@pytest.mark.parametrize("kw, message", [
    ({"chunk_sigma": torch.tensor([0.5, 1.5, 1.0])}, r"noise levels in \[0, 1\]"),
    ({"chunk_active": [True]}, "one entry per chunk"),
    ({"frames_per_chunk": 0}, "frames_per_chunk must be an integer >= 1"),
    ({"causal": 1}, "causal must be a bool"),
    ({"chunk_sigma": torch.zeros(3, 1)}, r"must be 1-D \[C\]"),
    ({"chunk_sigma_next": [0.1]}, "chunk_sigma_next needs 3 entries"),
])
def test_call_context_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        ctx(**kw)
