"""MAGI-1 on a real local Ray: pipeline stages, data-parallel replicas, a stage fault.

Every walk is compared with the in-process `MagiPipeline` on the same model and inputs. The model is
the tiny MAGI-1 size with 3 layers (so 1, 2 and 3 stages all exist), random weights drawn from a
seed: each stage worker rebuilds exactly its part of the same weights. K/V of clean chunks lives on
the stages (each its own layers); the driver holds handles only.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")  # before ray is imported

import signal  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from cluster.api import RayCluster  # noqa: E402
from cluster.coordinator import SegmentOutput  # noqa: E402
from cluster.families import ModelSpec, load_model  # noqa: E402
from cluster.magi import MagiCoordinator, MagiRequest, generate_magi_on_ray  # noqa: E402
from cluster.replica import ReplicaConfig  # noqa: E402
from pipelines.magi1.pipeline import (Caption, Guidance, MagiPipeline, MagiResult, SampleArgs,  # noqa: E402
                                      noise_generators)
from pipelines.magi1.schedule import ChunkSchedule  # noqa: E402

pytestmark = pytest.mark.integration

SPEC = ModelSpec("tiny", family="magi-1", overrides=(("num_layers", 3),))
ATOL = 1e-5
C, H, W, L, CAP = 16, 4, 4, 16, 64             # latent channels and size; caption tokens, channels (tiny)
WIDTH = 2                                       # latent frames per chunk
ARGS = {
    "base-3pass": SampleArgs(schedule=ChunkSchedule(num_steps=4, window_size=2, chunk_width=WIDTH),
                             guidance=Guidance(cfg_number=3)),
    "distill-1pass": SampleArgs(schedule=ChunkSchedule(num_steps=12, window_size=2, chunk_width=WIDTH),
                                guidance=Guidance(cfg_number=1), distill=True),
}


# ----------------------------------------------------------------------------- fixtures, helpers

@pytest.fixture(scope="module")
def ray_local():
    before = torch.get_num_threads()
    torch.set_num_threads(1)          # as the workers: tiny tensors, and a shared CPU
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clusters(ray_local):
    """One one-replica cluster per pipeline depth P = 1, 2, 3."""
    built: dict[int, RayCluster] = {}
    try:
        for stages in (1, 2, 3):
            built[stages] = RayCluster(ReplicaConfig(model=SPEC, stages=stages, cpus_per_worker=0.25))
        yield built
    finally:
        for cluster in built.values():
            cluster.shutdown()


@pytest.fixture(scope="module")
def model(ray_local):
    return load_model(SPEC)


def caption(seed: int) -> Caption:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(L)
    mask[:3 + seed % 4] = 1
    return Caption(torch.randn(L, CAP, generator=g), mask)


def request(name: str, seed: int, chunks: int = 4) -> MagiRequest:
    """A walk of `chunks` chunks; the 3-pass case as B = 2 videos, the 1-pass one drawing noise per chunk."""
    if name == "base-3pass":
        noise = torch.randn(2, C, chunks * WIDTH, H, W, generator=torch.Generator().manual_seed(seed))
        return MagiRequest(f"{name}-{seed}", noise, [caption(seed), caption(seed + 1)], ARGS[name])
    return MagiRequest(f"{name}-{seed}", noise_generators([seed]), [caption(seed)], ARGS[name],
                       dict(num_chunks=chunks, latent_shape=(C, H, W)))


def in_process(model: torch.nn.Module, req: MagiRequest) -> MagiResult:
    noise = noise_generators([g.initial_seed() for g in req.noise]) if isinstance(req.noise, list) else req.noise
    return MagiPipeline(model).generate(noise, req.captions, req.args, **req.options)


def assert_same_walk(got: MagiResult, want: MagiResult, label: str, atol: float = ATOL) -> None:
    diff = (got.latents - want.latents).abs().max().item()
    assert got.latents.shape == want.latents.shape and diff <= atol, (
        f"{label}: Ray latents {tuple(got.latents.shape)} differ from in-process {tuple(want.latents.shape)} "
        f"by {diff:.3g} (atol {atol})")
    assert [c.index for c in got.chunks] == [c.index for c in want.chunks], label
    assert (got.model_calls, got.max_cached_chunks) == (want.model_calls, want.max_cached_chunks), label


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("name", sorted(ARGS))
def test_stages_equal_the_in_process_pipeline_with_kv_on_the_stages(clusters, model, name):
    """P = 1, 2, 3 stages give the in-process walk; during it every stage holds the same K/V entries, for
    its own layers only, never more chunks than the in-process cache (+1 released with the next call);
    after it, none."""
    req = request(name, seed=1)
    want = in_process(model, req)
    assert want.max_cached_chunks > 0, "the case must exercise the K/V cache"
    for stages, cluster in clusters.items():
        replica = cluster.replicas[0]
        held: list[list[dict]] = []

        def look(request_id: str, done: int, total: int) -> None:
            held.append(ray.get([ranks[0].kv_summary.remote() for ranks in replica.workers]))

        cluster.coordinator.progress = look
        req = request(name, seed=1)
        try:
            got = cluster.generate([req])[0]
        finally:
            cluster.coordinator.progress = None
        assert_same_walk(got, want, f"{name}, P={stages}")
        layers = [list(range(*r["blocks"])) for ranks in replica.layout() for r in ranks]
        for summaries in held:
            entries = [s.get(req.request_id, {}) for s in summaries]
            assert all(set(e) == set(entries[0]) for e in entries), f"P={stages}: stages hold different entries"
            assert len(entries[0]) <= want.max_cached_chunks + 1, f"P={stages}: {len(entries[0])} chunks held"
            for s, stage_entries in enumerate(entries):
                assert all(e["layers"] == layers[s] for e in stage_entries.values()), (
                    f"P={stages}: stage {s} holds K/V of layers other than {layers[s]}: {stage_entries}")
        assert max(len(s[0].get(req.request_id, {})) for s in held) >= want.max_cached_chunks
        after = ray.get([ranks[0].kv_summary.remote() for ranks in replica.workers])
        assert after == [{}] * stages, f"P={stages}: K/V left on the stages after the walk: {after}"


def test_generate_magi_on_ray_takes_a_cluster(clusters, model):
    req = request("distill-1pass", seed=2, chunks=3)
    want = in_process(model, req)
    got = generate_magi_on_ray(SPEC, req.noise, req.captions, req.args, cluster=clusters[2], **req.options)
    assert_same_walk(got, want, "generate_magi_on_ray, P=2")


# ----------------------------------------------------------------------------- data parallel

def test_two_replicas_serve_two_requests_each_once(clusters, model):
    """A P = 2 and a P = 3 replica drain one queue; each walk runs once and each chunk is decoded once."""
    decoded: list[SegmentOutput] = []
    replicas = [clusters[2].replicas[0], clusters[3].replicas[0]]
    coordinator = MagiCoordinator(replicas, decoded.append, requests_per_replica=1)
    requests = [request("base-3pass", seed=10), request("distill-1pass", seed=11)]
    wants = [in_process(model, r) for r in requests]
    results = coordinator.run(requests)
    for req, got, want in zip(requests, results, wants):
        assert_same_walk(got, want, req.request_id)
    served_by = coordinator.served_by
    assert all(len(names) == 1 for names in served_by.values()), f"a request ran twice: {served_by}"
    assert {n for names in served_by.values() for n in names} == {r.name for r in replicas}, served_by
    assert sorted((d.request, d.segment) for d in decoded) == sorted(
        (r.request_id, c.index) for r, w in zip(requests, wants) for c in w.chunks)


# ----------------------------------------------------------------------------- faults

def test_killed_stage_worker_mid_walk_is_recovered_and_the_walk_still_equals(clusters, model):
    """SIGKILL stage 1 halfway through a walk: the replica is recovered (stage K/V shards start empty),
    the walk replays from its start, equals the undisturbed one, and each chunk is decoded once."""
    replica = clusters[2].replicas[0]
    req = request("base-3pass", seed=3)
    want = in_process(model, req)
    killed: list[int] = []

    def kill_stage_1(request_id: str, done: int, total: int) -> None:
        if done == total // 2 and not killed:
            pid = ray.get(replica.workers[1][0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    decoded: list[SegmentOutput] = []
    coordinator = MagiCoordinator([replica], decoded.append, progress=kill_stage_1)
    got = coordinator.run([request("base-3pass", seed=3)])[0]
    new_pid = ray.get(replica.workers[1][0].pid.remote())
    assert killed and coordinator.faults, f"the fault did not happen (killed={killed}, faults={coordinator.faults})"
    assert new_pid != killed[0], "stage 1 should run in a new process after the kill"
    assert_same_walk(got, want, "after a killed stage worker")
    assert sorted(d.segment for d in decoded) == [c.index for c in want.chunks], "a chunk was decoded twice"
    assert max(coordinator.sink.attempts.values()) == 2, "chunks finished before the fault were replayed"
    for d, c in zip(sorted(decoded, key=lambda d: d.segment), want.chunks):
        torch.testing.assert_close(d.latents, c.latents, atol=ATOL, rtol=0)
