"""The segment loop (`jobs.runner.VideoRun`) on the tiny DF model and the embedded model: it
equals `DFPipeline.generate` fed the same named draws; a run killed after any segment resumes
from its checkpoint to the same frames, writing no segment twice; bad latents stop it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.runner import Draws, RunFault, RunState, VideoRun
from jobs.setup import describe, load
from jobs.spec import JobSpec
from pipelines.skyreels_v2.pipeline import DFPipeline


class MemoryFolder:
    """SegmentWriter + CheckpointStore in memory; `crash_after` raises after writing that segment."""

    def __init__(self, crash_after: int | None = None):
        self.segments: dict[int, np.ndarray] = {}
        self.writes: list[int] = []
        self.state: bytes | None = None
        self.crash_after = crash_after

    def has_segment(self, index: int) -> bool:
        return index in self.segments

    def write_segment(self, index: int, frames: np.ndarray) -> None:
        self.segments[index] = frames.copy()
        self.writes.append(index)

    def load(self) -> RunState | None:
        return None if self.state is None else RunState.from_bytes(self.state, "memory")

    def save(self, state: RunState) -> None:
        self.state = state.to_bytes(seed=0)
        if self.crash_after is not None and state.next_segment - 1 >= self.crash_after:
            raise KeyboardInterrupt("simulated driver kill")

    def video(self) -> np.ndarray:
        return np.concatenate([self.segments[i] for i in sorted(self.segments)])


def _tiny_spec(**changes) -> JobSpec:
    values = dict(prompt="a test", frames=49, seed=3, model="tiny", steps=3, base_frames=6, overlap=2,
                  ar_step=1, accel="scope")
    values.update(changes)
    return JobSpec(**values)


def _run(spec: JobSpec, folder: MemoryFolder, every: int = 1, latents: list | None = None) -> VideoRun:
    plan = describe(spec)
    loaded = load(plan)
    pipe = DFPipeline(loaded.model)
    run = VideoRun(plan, loaded, pipe, folder, folder, checkpoint_every=every,
                   on_latents=None if latents is None else (lambda first, new: latents.append(new)))
    run.run()
    return run


def test_loop_equals_dfpipeline_generate_with_the_same_draws():
    spec = _tiny_spec(accel="none")
    plan = describe(spec)
    assert len(plan.segments) >= 3
    parts: list[torch.Tensor] = []
    _run(spec, MemoryFolder(), latents=parts)
    draws = Draws(spec.seed)
    h, w = plan.latent_size
    noises = [draws.segment_noise(s.index, (plan.channels, s.num_frames, h, w)) for s in plan.segments]
    eps = [draws.prefix_noise(s.index) for s in plan.segments]
    loaded = load(plan)
    want = DFPipeline(loaded.model).generate(noises, loaded.context, loaded.negative, plan.args,
                                             addnoise_eps=eps).latents
    assert torch.equal(torch.cat(parts, dim=1), want)


@pytest.mark.parametrize("crash_after, every", [(0, 1), (1, 1), (2, 2)])
def test_a_killed_run_resumes_to_the_same_frames_without_rewriting_segments(crash_after, every):
    spec = _tiny_spec()
    whole = MemoryFolder()
    _run(spec, whole, every)
    folder = MemoryFolder(crash_after=crash_after)
    with pytest.raises(KeyboardInterrupt):
        _run(spec, folder, every)
    written_before = list(folder.writes)
    folder.crash_after = None
    _run(spec, folder, every)
    assert np.array_equal(folder.video(), whole.video())
    assert len(folder.writes) == len(set(folder.writes)), f"a segment was written twice: {folder.writes}"
    assert folder.writes[:len(written_before)] == written_before
    state = folder.load()
    assert state.next_segment == len(describe(spec).segments) and state.frames_done == 49
    assert state.accel.calls == RunState.from_bytes(whole.state, "w").accel.calls


def test_frames_decode_segment_by_segment_to_the_requested_count():
    spec = _tiny_spec(frames=30)
    folder = MemoryFolder()
    _run(spec, folder)
    video = folder.video()
    assert video.shape == (30, 64, 64, 3) and video.dtype == np.uint8


def test_embedded_model_skips_its_reference_block_and_rounding():
    spec = JobSpec(prompt="a red circle moves right", frames=21, seed=1, steps=2)
    plan = describe(spec)
    assert plan.skip == 2 and plan.latent_frames == 2 + 22
    folder = MemoryFolder()
    _run(spec, folder)
    assert folder.video().shape == (21, 64, 64, 3)


def test_a_different_spec_cannot_resume_another_checkpoint():
    folder = MemoryFolder(crash_after=0)
    with pytest.raises(KeyboardInterrupt):
        _run(_tiny_spec(), folder)
    folder.crash_after = None
    with pytest.raises(RunFault, match="another spec"):
        _run(_tiny_spec(seed=4), folder)


def test_nan_latents_stop_the_run_before_anything_of_the_segment_is_written():
    spec = _tiny_spec(accel="none")
    plan = describe(spec)
    loaded = load(plan)

    class Poisoned(DFPipeline):
        def sample_segment(self, *args, **kwargs):
            info = super().sample_segment(*args, **kwargs)
            if kwargs["plan"].index == 1:
                info.latents[:, -1] = float("nan")
            return info

    folder = MemoryFolder()
    with pytest.raises(RunFault, match="segment 1: the model produced NaN"):
        VideoRun(plan, loaded, Poisoned(loaded.model), folder, folder).run()
    assert folder.writes == [0]


def test_checkpoint_bytes_round_trip_and_torn_files_are_refused():
    state = RunState(fingerprint="f" * 64, next_segment=3, prefix=torch.randn(16, 2, 4, 4), frames_done=30,
                     model_calls=12, rows=9, sample_seconds=1.5)
    back = RunState.from_bytes(state.to_bytes(seed=5), "here")
    assert back.next_segment == 3 and torch.equal(back.prefix, state.prefix) and back.model_calls == 12
    with pytest.raises(RunFault, match="unreadable"):
        RunState.from_bytes(state.to_bytes(seed=5)[:50], "here")


def test_draws_are_named_and_independent():
    draws = Draws(7)
    a = draws.segment_noise(0, (2, 3))
    assert torch.equal(a, Draws(7).segment_noise(0, (2, 3)))
    assert not torch.equal(a, draws.segment_noise(1, (2, 3)))
    assert not torch.equal(a, Draws(8).segment_noise(0, (2, 3)))
    assert not torch.equal(torch.randn(2, 3, generator=draws.prefix_noise(0)), a)


def test_the_loop_builds_no_autograd_graph():
    """A graph through the segment prefix chained every segment to the next (700 MB per segment
    on the embedded model): sampling must run without grad whoever calls it."""
    parts: list[torch.Tensor] = []
    assert torch.is_grad_enabled()
    _run(_tiny_spec(accel="none"), MemoryFolder(), latents=parts)
    assert parts and not any(p.requires_grad or p.grad_fn is not None for p in parts)


def test_a_ray_backend_driver_reads_a_checkpoints_config_not_its_weights(tmp_path):
    """The stages hold the weights; the driver of a Ray-backend run only needs the config."""
    from safetensors.torch import save_file

    from pipelines.skyreels_v2.checkpoint import save_transformer
    from pipelines.skyreels_v2.model import WanDFTransformer
    from pipelines.skyreels_v2.sizes import config_for

    save_transformer(WanDFTransformer(config_for("tiny")), str(tmp_path / "ckpt"))
    config = config_for("tiny")
    save_file({"context": torch.randn(config.text_len, config.text_dim)}, str(tmp_path / "ctx.safetensors"))
    spec = JobSpec(prompt="x", frames=9, model=str(tmp_path / "ckpt"), context=str(tmp_path / "ctx.safetensors"),
                   backend="ray", stages=2, decode="preview")   # transformer only: no VAE in the folder
    loaded = load(describe(spec))
    assert loaded.model is None and loaded.context.shape == (1, config.text_len, config.text_dim)
    local = load(describe(spec.with_overrides(backend="local", stages=1)))
    assert isinstance(local.model, WanDFTransformer)


def test_device_is_checked_before_anything_loads():
    from jobs.spec import SpecError

    with pytest.raises(SpecError, match="not a device"):
        _tiny_spec(device="tpu")
    assert describe(_tiny_spec(device="cpu")).device == "cpu"
    if not torch.cuda.is_available():
        assert describe(_tiny_spec()).device == "cpu"          # auto
        with pytest.raises(SpecError, match="shows 0 CUDA GPU"):
            describe(_tiny_spec(device="cuda"))
    assert describe(_tiny_spec(backend="ray", stages=2)).device == "cpu"   # the stages take the GPUs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_loop_on_a_gpu_gives_the_cpu_frames():
    on_cpu, on_gpu = MemoryFolder(), MemoryFolder()
    _run(_tiny_spec(device="cpu"), on_cpu)
    _run(_tiny_spec(device="cuda"), on_gpu)
    assert np.abs(on_cpu.video().astype(int) - on_gpu.video().astype(int)).max() <= 3


def test_a_checkpoint_made_on_another_device_is_refused():
    folder = MemoryFolder(crash_after=0)
    with pytest.raises(KeyboardInterrupt):
        _run(_tiny_spec(device="cpu"), folder)
    state = folder.load()
    assert state.device == "cpu"
    state.device = "cuda"                 # as if the first run had a GPU
    folder.state, folder.crash_after = state.to_bytes(seed=0), None
    with pytest.raises(RunFault, match="made on cuda"):
        _run(_tiny_spec(device="cpu"), folder)


def test_resumed_totals_equal_uninterrupted_ones():
    whole, folder = MemoryFolder(), MemoryFolder(crash_after=1)
    _run(_tiny_spec(), whole)
    with pytest.raises(KeyboardInterrupt):
        _run(_tiny_spec(), folder)
    folder.crash_after = None
    _run(_tiny_spec(), folder)
    a, b = RunState.from_bytes(whole.state, "w").accel, folder.load().accel
    assert (a.observed_error.count, a.block_evals) == (b.observed_error.count, b.block_evals)
    assert abs(a.observed_error.mean - b.observed_error.mean) < 1e-9
