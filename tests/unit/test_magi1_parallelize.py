"""Pipeline split of the MAGI-1 DiT (no Ray): stages chained equal the whole model, each stage keeps
the K/V of its own layers, loads only its own tensors, and `MagiPipeline` driven through the
stage-side K/V protocol (`cluster.magi.MagiRemoteModel` on an in-process replica) equals the
pipeline on the whole model.

The model is the tiny MAGI-1 size with 3 layers (so 1, 2 and 3 stages all exist), random weights
drawn from a seed: every stage rebuilds exactly its part of the same weights.
"""
from __future__ import annotations

import pytest
import torch

from cluster.magi import KV_ON_STAGES, KVRef, MagiRemoteModel, _Lease
from pipelines.magi1.checkpoint import CheckpointError, save_transformer
from pipelines.magi1.parallelize import (MagiCall, MagiStageSpec, SEQUENCE_PARALLEL_REFUSED, build_stage,
                                         load_stage_model, parallelize_magi1, split_blocks)
from pipelines.magi1.pipeline import Caption, Guidance, MagiPipeline, SampleArgs, noise_generators
from pipelines.magi1.schedule import ChunkSchedule

SPEC = MagiStageSpec("tiny", seed=0, overrides=(("num_layers", 3),))
C, H, W, L, CAP = 16, 4, 4, 16, 64            # latent channels and size; caption tokens, channels (tiny)
WIDTH = 2                                      # latent frames per chunk
TPC = WIDTH * (H // 2) * (W // 2)             # tokens per chunk


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run faster on one torch thread (and far faster on a shared CPU: no OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def call_args(chunks: int = 2, batch: int = 1, seed: int = 1, **kwargs):
    """Arguments of one block-causal model call over `chunks` chunks (each sees itself and the cache)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch * chunks, L)
    mask[:, :5] = 1
    cached = kwargs.pop("cached_tokens", 0)
    kv_range = torch.tensor([[0, cached + (i + 1) * TPC] for i in range(chunks)])
    return dict(x=torch.randn(batch, C, chunks * WIDTH, H, W, generator=g),
                t=torch.rand(batch, chunks, generator=g),
                y=torch.randn(batch * chunks, L, CAP, generator=g),
                caption_dropout_mask=torch.zeros(batch, dtype=torch.bool), xattn_mask=mask,
                kv_range=kv_range, **kwargs)


def run_call(stages, request: str = "r", **call) -> torch.Tensor:
    """One `MagiCall` through the stages in order, as a replica runs it."""
    message = MagiCall(key=0, request=request, **call)
    h = None
    for stage in stages:
        h = stage.run_call(message, h)
    return h


# ----------------------------------------------------------------------------- the split

def test_stage_ranges_follow_split_blocks_and_counts():
    assert [build_stage(SPEC, s, 2).start for s in range(2)] == [0, 2]
    stages = [build_stage(SPEC, s, 2, counts=[1, 2]) for s in range(2)]
    assert [(s.start, s.end) for s in stages] == split_blocks(3, 2, [1, 2]) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match=r"sum to num_layers=3"):
        build_stage(SPEC, 0, 2, counts=[1, 1])


def test_a_stage_keeps_only_its_layers_and_the_final_layers_on_the_last_stage():
    whole = set(load_stage_model(SPEC).state_dict())
    first, last = build_stage(SPEC, 0, 3), build_stage(SPEC, 2, 3)
    def layers(stage):
        return {k.split(".")[2] for k in stage.model.state_dict() if k.startswith("videodit_blocks.layers.")}

    assert layers(first) == {"0"} and layers(last) == {"2"}
    final = ("final_linear.", "videodit_blocks.final_layernorm.")
    assert not any(k.startswith(final) for k in first.model.state_dict())
    assert {"final_linear.linear.weight", "videodit_blocks.final_layernorm.weight"} <= set(last.model.state_dict())
    # every stage keeps the embedders: the conditioning is rebuilt on each stage
    assert {"x_embedder.weight", "t_embedder.mlp.0.weight", "rope.bands"} <= set(last.model.state_dict())
    assert set(first.model.state_dict()) < whole
    assert last.model.dtype == torch.float32                  # read from a layer the stage holds
    with pytest.raises(RuntimeError, match="layer 2 lives on another pipeline stage"):
        first.model.layers[2](None, None, 2)
    with pytest.raises(RuntimeError, match="only the last stage unembeds"):
        first.unembed(None, None)
    with pytest.raises(ValueError, match=r"stage 0 holds layers \[0, 1\); asked for \[0, 2\)"):
        first.run_blocks(None, None, 0, 2)


def test_sequence_parallel_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(NotImplementedError, match="per-chunk AdaLN gates"):
        parallelize_magi1(load_stage_model(SPEC), 0, 2, sp_group=object())
    from cluster.families import ModelSpec
    from cluster.replica import ReplicaConfig
    from scope.config import make_config
    spec = ModelSpec("tiny", family="magi-1", overrides=(("num_layers", 3),))
    with pytest.raises(ValueError, match="sequence_parallel=1"):
        ReplicaConfig(model=spec, sequence_parallel=2)
    with pytest.raises(ValueError, match="MAGI-1 replicas run without acceleration"):
        ReplicaConfig(model=spec, accel=make_config("scope"))
    assert "Ulysses" in SEQUENCE_PARALLEL_REFUSED


def test_stage_spec_checks_its_overrides():
    with pytest.raises(ValueError, match="unknown MagiConfig field"):
        MagiStageSpec("tiny", overrides=(("dim", 3),))
    with pytest.raises(ValueError, match="takes only the override"):
        MagiStageSpec("/some/folder", overrides=(("num_layers", 2),))
    with pytest.raises(ValueError, match="dtype must be one of"):
        MagiStageSpec("tiny", dtype="float8")
    assert MagiStageSpec("/some/folder", overrides=(("size", "4.5b"),)).size == "4.5b"
    # a named size in bfloat16: layers cast, the entries upstream keeps in float32 stay float32
    stage = load_stage_model(MagiStageSpec("tiny", dtype="bfloat16"), (1, 2), keep_final=True)
    assert stage.dtype == torch.bfloat16 and stage.x_embedder.weight.dtype == torch.float32


def test_an_official_folder_without_config_json_takes_its_size_from_the_spec(tmp_path):
    folder = tmp_path / "inference_weight"
    save_transformer(load_stage_model(MagiStageSpec("tiny")), str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config.json; .* overrides=\(\('size'"):
        build_stage(MagiStageSpec(str(folder)), 1, 2)
    stage = build_stage(MagiStageSpec(str(folder), overrides=(("size", "tiny"),)), 1, 2)
    assert (stage.start, stage.end) == (1, 2) and stage.is_last


# ----------------------------------------------------------------------------- stages compose, K/V per stage

@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_stages_chained_equal_the_whole_model_with_kv_capture_and_cache(num_stages):
    """Call 1 captures the K/V of its first chunk; call 2 reads it as its cache. Chained stages give the
    whole model's outputs, and each stage keeps exactly the whole model's K/V of its own layers."""
    model = load_stage_model(SPEC)
    first = call_args(chunks=2, seed=1)
    second = call_args(chunks=2, seed=2, slice_point=1, cached_tokens=TPC)
    with torch.no_grad():
        captured: dict = {}
        want_1 = model(**first, kv_capture=captured, capture_chunks=(0, 1))
        want_2 = model(**second, kv_cache=captured)
    stages = [build_stage(SPEC, s, num_stages) for s in range(num_stages)]
    got_1 = run_call(stages, **first, capture=0, capture_chunks=(0, 1))
    got_2 = run_call(stages, **second, kv_read=((0, 0, TPC),))
    torch.testing.assert_close(got_1, want_1, atol=0, rtol=0)
    torch.testing.assert_close(got_2, want_2, atol=0, rtol=0)
    for stage in stages:
        entry = stage.kv.entries["r"][0]
        assert sorted(entry) == list(range(stage.start, stage.end)), "a stage keeps only its own layers' K/V"
        for layer, (k, v) in entry.items():
            torch.testing.assert_close(k, captured[layer][0], atol=0, rtol=0)
            torch.testing.assert_close(v, captured[layer][1], atol=0, rtol=0)
            assert k.untyped_storage().nbytes() == k.nbytes, "an entry must not keep the whole call's K/V alive"


def test_a_multi_chunk_capture_is_filed_per_chunk_and_read_back_in_runs():
    """A prefix-style capture of 2 chunks becomes entries 5 and 6; a later call reading the second half of
    entry 5 and all of entry 6 equals the whole model given those tokens."""
    model = load_stage_model(SPEC)
    prefix = call_args(chunks=2, seed=3)
    half = TPC // 2
    later = call_args(chunks=1, seed=4, slice_point=2, cached_tokens=half + TPC)
    with torch.no_grad():
        captured: dict = {}
        model(**prefix, kv_capture=captured)
        cache = {i: (k[:, half:], v[:, half:]) for i, (k, v) in captured.items()}
        want = model(**later, kv_cache=cache)
    stages = [build_stage(SPEC, s, 2) for s in range(2)]
    run_call(stages, **prefix, capture=5)
    assert sorted(stages[1].kv.entries["r"]) == [5, 6]
    got = run_call(stages, **later, kv_read=((5, half, TPC), (6, 0, TPC)), release=())
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # a call's releases are dropped before it runs
    run_call(stages, **call_args(chunks=1, seed=5, slice_point=2, cached_tokens=TPC), kv_read=((6, 0, TPC),),
             release=(5,))
    for stage in stages:
        assert sorted(stage.kv.entries["r"]) == [6]
        stage.end_request("r")
        assert stage.kv.entries == {}
    with pytest.raises(RuntimeError, match=r"K/V entries \[6\] are not held by this stage"):
        run_call(stages, **later, kv_read=((6, 0, TPC),))


def test_a_stage_loads_only_its_tensors_from_a_weights_folder(tmp_path):
    model = load_stage_model(SPEC)
    save_transformer(model, str(tmp_path / "ckpt"), max_shard_bytes=2_000_000)
    spec = MagiStageSpec(str(tmp_path / "ckpt"))
    stages = [build_stage(spec, s, 2) for s in range(2)]
    second = stages[1].model.state_dict()
    assert "videodit_blocks.layers.0.self_attention.linear_qkv.q.weight" not in second
    key = "videodit_blocks.layers.2.mlp.linear_fc1.weight"
    torch.testing.assert_close(second[key], model.state_dict()[key], atol=0, rtol=0)
    args = call_args(chunks=2)
    with torch.no_grad():
        want = model(**args)
    torch.testing.assert_close(run_call(stages, **args), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- handles the pipeline holds

def test_kv_refs_support_what_the_pipeline_does_with_k_v_and_nothing_else():
    released: list[int] = []
    a, b = _Lease("r", 0, released), _Lease("r", 1, released)
    ref = KVRef(2, ((a, 0, 8), (b, 0, 8)))
    assert ref.shape == (2, 16)
    assert ref[:, 4:12].entries("r") == ((0, 4, 8), (1, 0, 4))
    assert ref[:, 0:8].clone().entries("r") == ((0, 0, 8),)
    joined = torch.cat([ref[:, 0:4], ref[:, 4:8], ref[:, 8:16]], dim=1)
    assert joined.entries("r") == ((0, 0, 8), (1, 0, 8))          # adjacent runs of one entry merge
    with pytest.raises(TypeError, match=r"torch.cat\(refs, dim=1\) only"):
        torch.stack([ref, ref])
    with pytest.raises(TypeError, match="only be cut on tokens"):
        ref[0]
    with pytest.raises(ValueError, match="not of 'other'"):
        ref.entries("other")
    del ref, joined
    assert released == []                                      # the leases themselves are still held here
    del a
    assert released == [0]                                     # the last handle gone: queued for release
    del b
    assert released == [0, 1]


class LocalReplica:
    """`Replica.submit_call` / `end_request` without Ray: the stages of one replica in this process."""

    name, epoch = "local", 0

    def __init__(self, stages):
        self.stages = stages
        self.calls: list[MagiCall] = []
        self.held: list[list[set[int]]] = []          # per call: entry ids each stage holds after it

    def submit_call(self, call, *, epoch=None):
        self.calls.append(call)
        out = run_call(self.stages, request=call.request, **{k: getattr(call, k) for k in MAGI_CALL_FIELDS})
        self.held.append([set(s.kv.entries.get(call.request, {})) for s in self.stages])
        return Done(out)

    def end_request(self, request, feedback=None):
        for stage in self.stages:
            stage.end_request(request)


MAGI_CALL_FIELDS = [f for f in MagiCall.__dataclass_fields__ if f not in ("key", "request")]


class Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def caption(seed: int) -> Caption:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(L)
    mask[:3 + seed % 4] = 1
    return Caption(torch.randn(L, CAP, generator=g), mask)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def schedule(steps: int) -> ChunkSchedule:
    return ChunkSchedule(num_steps=steps, window_size=2, chunk_width=WIDTH)


CASES = {
    # 3-pass base model, B = 2 with a partial-chunk prefix: the prefix pass captures 2 chunks at once
    "base-3pass-B2-prefix": dict(args=SampleArgs(schedule=schedule(4), guidance=Guidance(cfg_number=3)),
                                 noise=lambda: randn(2, C, 5 * WIDTH, H, W, seed=5),
                                 captions=[caption(1), caption(2)],
                                 options=dict(prefix=randn(2, C, 5, H, W, seed=6))),
    # 1-pass distill, noise drawn per chunk from a generator, the nearly-clean chunk's solo pass
    "distill-1pass": dict(args=SampleArgs(schedule=schedule(12), guidance=Guidance(cfg_number=1), distill=True),
                          noise=lambda: noise_generators([7]), captions=[caption(3)],
                          options=dict(num_chunks=4, latent_shape=(C, H, W))),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("num_stages", [1, 3])
def test_magi_pipeline_through_the_proxy_equals_the_whole_model(name, num_stages):
    """`MagiPipeline` on the proxy (stage-side K/V shards) = on the whole model; every stage holds the same
    entries, for its own layers, never more chunks than the in-process cache; nothing after the walk."""
    case = CASES[name]
    model = load_stage_model(SPEC)
    want = MagiPipeline(model).generate(case["noise"](), case["captions"], case["args"], **case["options"])
    replica = LocalReplica([build_stage(SPEC, s, num_stages) for s in range(num_stages)])
    null = model.y_embedder.null_caption_embedding.detach()
    proxy = MagiRemoteModel(replica, "walk", model.config, lambda: null)
    got = MagiPipeline(proxy).generate(case["noise"](), case["captions"], case["args"], **case["options"])
    torch.testing.assert_close(got.latents, want.latents, atol=0, rtol=0)
    assert [c.index for c in got.chunks] == [c.index for c in want.chunks]
    assert (got.model_calls, got.max_cached_chunks) == (want.model_calls, want.max_cached_chunks)
    assert want.max_cached_chunks > 0, "the case must exercise the K/V cache"
    # what travelled: names of K/V, never K/V
    assert any(c.kv_read for c in replica.calls) and any(c.capture is not None for c in replica.calls)
    assert any(c.release for c in replica.calls)
    assert all(isinstance(e, int) for c in replica.calls for run in c.kv_read for e in run)
    # every stage holds the same entries, at most what the in-process cache holds (+ the one
    # released with the next call), and only its own layers
    for held in replica.held:
        assert all(h == held[0] for h in held)
        assert len(held[0]) <= want.max_cached_chunks + 1
    assert max(len(h[0]) for h in replica.held) >= want.max_cached_chunks
    proxy.end_request()
    assert all(stage.kv.entries == {} for stage in replica.stages)


def test_the_proxy_refuses_k_v_tensors():
    replica = LocalReplica([build_stage(SPEC, 0, 1)])
    proxy = MagiRemoteModel(replica, "walk", load_stage_model(SPEC).config, lambda: None)
    args = call_args(chunks=1, cached_tokens=TPC)
    with pytest.raises(ValueError, match="the K/V of a replica lives on its stages"):
        proxy(**args, kv_cache={0: (torch.zeros(1, TPC, 4, 32), torch.zeros(1, TPC, 4, 32))})
    store: dict = {}
    proxy(**call_args(chunks=2), kv_capture=store, capture_chunks=(1, 2))
    ref = store[KV_ON_STAGES][0]
    assert ref.shape == (1, TPC) and ref.entries("walk") == ((0, 0, TPC),)
