"""Pipeline split of the SkyReels-V2 DF transformer (no Ray): stages compose to the whole model,
each stage holds and loads only its own blocks."""
from __future__ import annotations

import pytest
import torch

from pipelines.skyreels_v2.checkpoint import save_transformer
from pipelines.skyreels_v2.parallelize import StageSpec, build_stage, load_stage_model, split_blocks

SPEC = StageSpec("tiny", seed=0, overrides=(("num_layers", 3),))


def inputs(frames: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, 4, 6, generator=g)
    t = torch.randint(0, 1000, (1, frames), generator=g)
    return x, t, torch.randn(1, 16, 32, generator=g)


def run_stages(stages, x, t, context, cbs):
    h = None
    with torch.no_grad():
        for stage in stages:
            block_inputs = stage.embed(x, t, context, [1], cbs)
            h = block_inputs.tokens if stage.is_first else h
            h = stage.run_blocks(h, block_inputs)
        return stages[-1].unembed(h, block_inputs)


def test_split_blocks_is_even_with_the_remainder_first_and_checks_counts():
    assert split_blocks(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert split_blocks(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert split_blocks(5, 2, counts=[1, 4]) == [(0, 1), (1, 5)]
    with pytest.raises(ValueError, match=r"sum to num_layers=5"):
        split_blocks(5, 2, counts=[1, 3])
    with pytest.raises(ValueError, match=r"num_stages must be an integer in \[1, num_layers=3\]"):
        split_blocks(3, 4)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("cbs", [None, 2])
def test_stages_compose_to_the_whole_model(num_stages, cbs):
    model = load_stage_model(SPEC)
    x, t, context = inputs()
    with torch.no_grad():
        want = model(x, t, context, fps=[1], causal_block_size=cbs)
    stages = [build_stage(SPEC, i, num_stages) for i in range(num_stages)]
    torch.testing.assert_close(run_stages(stages, x, t, context, cbs), want, atol=0, rtol=0)


def test_a_stage_keeps_only_its_blocks_and_the_head_on_the_last_stage():
    whole = set(load_stage_model(SPEC).state_dict())
    first, last = build_stage(SPEC, 0, 3), build_stage(SPEC, 2, 3)
    assert {k.split(".")[1] for k in first.model.state_dict() if k.startswith("blocks.")} == {"0"}
    assert not any(k.startswith("head.") for k in first.model.state_dict())
    assert {k.split(".")[1] for k in last.model.state_dict() if k.startswith("blocks.")} == {"2"}
    assert any(k.startswith("head.") for k in last.model.state_dict())
    assert set(first.model.state_dict()) < whole
    with pytest.raises(RuntimeError, match="block 2 lives on another pipeline stage"):
        first.model.blocks[2](None)
    with pytest.raises(RuntimeError, match="only the last stage unembeds"):
        first.unembed(None, None)


def test_a_stage_loads_only_its_tensors_from_a_checkpoint(tmp_path):
    model = load_stage_model(SPEC)
    save_transformer(model, str(tmp_path / "ckpt"), max_shard_bytes=200_000)
    spec = StageSpec(str(tmp_path / "ckpt"))
    stages = [build_stage(spec, i, 2) for i in range(2)]
    middle = stages[1].model.state_dict()
    assert "blocks.0.self_attn.q.weight" not in middle
    torch.testing.assert_close(middle["blocks.2.ffn.0.weight"], model.state_dict()["blocks.2.ffn.0.weight"])
    x, t, context = inputs()
    with torch.no_grad():
        want = model(x, t, context, fps=[1])
    # same weights; tensors read from a file may take other vectorised kernels: float tolerance
    torch.testing.assert_close(run_stages(stages, x, t, context, None), want, atol=1e-5, rtol=1e-5)


def test_stage_spec_overrides_only_apply_to_named_sizes():
    with pytest.raises(ValueError, match="config overrides apply to named sizes"):
        StageSpec("/some/checkpoint", overrides=(("num_layers", 2),))
    with pytest.raises(ValueError, match="dtype must be one of"):
        StageSpec("tiny", dtype="float8")
