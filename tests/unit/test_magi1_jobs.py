"""MAGI-1 through the jobs: its family table, `--model` detection, `scope generate` with every
accelerator, the walk as the segment loop's segments (equal to one `MagiPipeline` walk), exact
resume after a kill, B > 1 videos in one forward, flat state in video length, `scope bench`, an
official release folder described (its missing parts named) and a tiny release-layout folder run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.cli import main
from jobs.runner import Draws, RunState, VideoRun, run_batch
from jobs.setup import describe, load, resolve_accel
from jobs.spec import JobSpec, SpecError
from jobs.video import read_video
from pipelines import families
from pipelines.magi1 import family as magi
from tests.unit.test_video_run import MemoryFolder

METHODS = ["none", "scope", "teacache", "flowcache", "taylorseer", "fbcache", "magcache"]
TINY = "magi-1-tiny"


def _spec(**changes) -> JobSpec:
    values = dict(prompt="a red fox runs over the snow", model=TINY, frames=48, seed=5, accel="scope")
    values.update(changes)
    return JobSpec(**values)


@pytest.fixture(scope="module")
def models() -> dict:
    """One DiT / VAE / T5 for the module's runs (a worker's `models` cache)."""
    return {}


def _run(spec: JobSpec, folder: MemoryFolder, models: dict, latents: list | None = None) -> VideoRun:
    from jobs.runner import open_sampler

    plan = describe(spec)
    loaded = load(plan, models)
    with open_sampler(plan, loaded) as sampler:
        run = VideoRun(plan, loaded, sampler, folder, folder,
                       on_latents=None if latents is None else (lambda first, new: latents.append(new.clone())))
        run.run()
    return run


# ----------------------------------------------------------------------------- the family table

def test_the_family_table_declares_sizes_sampling_and_geometry():
    base, distill = magi.sampling_defaults("4.5b"), magi.sampling_defaults("4.5b-distill")
    assert (base.num_steps, base.cfg_number, base.distill) == (64, 3, False)
    assert (distill.num_steps, distill.cfg_number, distill.distill) == (64, 1, True)
    assert magi.sampling_defaults("24b").num_steps == 32 and magi.sampling_defaults("24b-distill").num_steps == 16
    assert (base.window_size, base.chunk_width, base.fps, base.resolution) == (4, 6, 24, "720x720")
    assert base.sample_args().guidance.text_scales == (7.5, 7.5, 7.5, 0.0, 0.0)
    # the shared job code reads any schedule through these
    assert (base.causal_block_size, base.base_num_frames, base.overlap_frames, base.ar_step) == (6, 24, None, 16)
    assert (magi.VAE_TEMPORAL, magi.VAE_SPATIAL, magi.LATENT_CHANNELS, magi.VAE_CAUSAL) == (4, 8, 16, False)
    assert magi.chunk_count(96, 6) == 4 and magi.chunk_count(97, 6) == 5      # frames are covered, never cut
    assert magi.parse_resolution("720p").size_text == "1280x720"
    with pytest.raises(ValueError, match="multiples of 16"):
        magi.parse_resolution("100x100")
    assert set(magi.SIZE_NAMES) == set(__import__("pipelines.magi1.sizes", fromlist=["SIZES"]).SIZES)


@pytest.mark.parametrize("model, family, kind, size", [
    (None, "skyreels-v2", "procedural", None),
    ("tiny", "skyreels-v2", "tiny", "tiny"),
    ("magi-1-tiny", "magi-1", "tiny", "tiny"),
    ("magi-1-4.5b-distill", "magi-1", "size", "4.5b-distill"),
])
def test_detect_names_the_family_of_a_model_name(model, family, kind, size):
    ref = families.detect(model)
    assert (ref.family, ref.kind, ref.size) == (family, kind, size)
    assert families.table(family).NAME == family


def test_detect_recognises_folders_by_their_files(tmp_path):
    weights = tmp_path / "ckpt" / "magi" / "4.5B_distill" / "inference_weight.distill"
    weights.mkdir(parents=True)
    assert families.detect(str(weights.parent)).family == "magi-1"
    assert families.detect(str(weights)).family == "magi-1"
    (tmp_path / "sky").mkdir()
    assert families.detect(str(tmp_path / "sky")).family == "skyreels-v2"
    with pytest.raises(ValueError, match="magi-1-tiny"):
        families.detect("magi-1-9b")


def test_accelerator_defaults_come_from_the_models_family():
    magi_plan, sky_plan = describe(_spec(accel="teacache")), describe(JobSpec(prompt="a", model="tiny", frames=9,
                                                                                    accel="teacache"))
    assert magi_plan.accel.rescale is None and magi_plan.accel.probe_kind == "condition"
    assert magi_plan.accel.selective == "exact" and not magi_plan.accel.kv_cache_finished   # MAGI's own cache
    assert sky_plan.accel.rescale == "wan-1.3b"
    mag, _, _ = resolve_accel(_spec(accel="magcache"), magi_plan.args, 48, None, family="magi-1", size="tiny")
    assert set(mag.mag_ratios) == {"cond", "context", "uncond"} and mag.num_steps == 16
    with pytest.raises(SpecError, match="mag_ratios is not set"):    # no measured ratios for a real size
        resolve_accel(_spec(accel="magcache"), magi_plan.args, 48, None, family="magi-1", size="4.5b")


# ----------------------------------------------------------------------------- scope generate

@pytest.mark.parametrize("accel", METHODS)
def test_generate_magi_tiny_with_every_accelerator(tmp_path, accel):
    out, stats_path = tmp_path / "v.mp4", tmp_path / "s.json"
    rc = main(["generate", "--model", TINY, "--prompt", "a red fox runs", "--frames", "40", "--accel", accel,
               "--out", str(out), "--stats", str(stats_path), "--no-progress"])
    assert rc == 0
    stats = json.loads(stats_path.read_text())
    assert stats["frames"] == 40 and read_video(str(out)).shape == (40, 64, 64, 3)
    assert stats["segments"] == 4 and stats["family"] == "magi-1" and stats["decode"] == "MAGI VAE (per chunk)"
    assert 0 < stats["block_evals"] <= stats["block_evals_full"] and stats["accel"] == accel
    assert 0 < stats["block_eval_fraction"] <= 1 and sum(stats["modes"].values()) > 0
    if accel in ("scope", "taylorseer", "magcache"):
        assert stats["block_eval_fraction"] < 1


def test_the_segments_are_one_walk_of_magi_pipeline_with_the_named_draws(models):
    from pipelines.magi1.pipeline import Caption, MagiPipeline

    spec = _spec(accel="none")
    parts: list[torch.Tensor] = []
    _run(spec, MemoryFolder(), models, latents=parts)
    plan = describe(spec)
    loaded = load(plan, models)
    shape = (plan.channels, plan.args.chunk_width, *plan.latent_size)
    noise = torch.cat([Draws(spec.seed).segment_noise(k, shape) for k in range(len(plan.segments))], dim=1)
    want = MagiPipeline(loaded.model).generate(noise[None], Caption(loaded.context[0], loaded.negative[0]),
                                               plan.args.sample_args()).latents[0]
    assert torch.equal(torch.cat(parts, dim=1), want)


@pytest.mark.parametrize("accel, crash_after", [("scope", 0), ("scope", 2), ("taylorseer", 1), ("none", 1)])
def test_a_killed_magi_run_resumes_to_the_same_frames(models, accel, crash_after):
    spec = _spec(accel=accel, frames=60)
    whole = MemoryFolder()
    _run(spec, whole, models)
    folder = MemoryFolder(crash_after=crash_after)
    with pytest.raises(KeyboardInterrupt):
        _run(spec, folder, models)
    state = folder.load()
    assert state.sampler is not None and state.sampler.meta["next_call"] > 0
    folder.crash_after = None
    _run(spec, folder, models)
    assert np.array_equal(folder.video(), whole.video())
    assert len(folder.writes) == len(set(folder.writes)), folder.writes
    done, want = folder.load(), RunState.from_bytes(whole.state, "whole")
    assert (done.accel.calls, done.accel.block_evals, done.model_calls) == \
        (want.accel.calls, want.accel.block_evals, want.model_calls)


class SizedFolder(MemoryFolder):
    """Records, per checkpoint, the bytes of the walk state it holds (live latents + cached K/V)."""

    def __init__(self) -> None:
        super().__init__()
        self.walk_bytes: list[int] = []

    def save(self, state: RunState) -> None:
        super().save(state)
        tensors = state.sampler.tensors.values() if state.sampler is not None else []
        self.walk_bytes.append(sum(t.numel() * t.element_size() for t in tensors))


def test_walk_state_and_checkpoint_stay_flat_in_video_length(models):
    peaks = {}
    for frames in (48, 480):
        folder = SizedFolder()
        run = _run(_spec(frames=frames, accel="scope"), folder, models)
        assert len(run.plan.segments) == frames // 12 and len(folder.walk_bytes) == frames // 12
        peaks[frames] = max(folder.walk_bytes)
    assert peaks[480] == peaks[48] > 0, peaks       # the window's live chunks + one cached chunk's K/V


def test_batched_magi_videos_match_each_made_alone(models):
    from jobs.runner import open_sampler

    specs = [_spec(seed=1, prompt="a red fox runs", accel="scope"), _spec(seed=2, prompt="a blue lake", accel="scope")]
    alone = []
    for spec in specs:
        folder = MemoryFolder()
        _run(spec, folder, models)
        alone.append((folder.video(), RunState.from_bytes(folder.state, "a").accel))
    folders = [MemoryFolder() for _ in specs]
    plans = [describe(s) for s in specs]
    loads = [load(p, models) for p in plans]
    runs = [VideoRun(p, l, None, f, None) for p, l, f in zip(plans, loads, folders)]
    with open_sampler(plans[0], loads[0]) as sampler:
        summaries = run_batch(runs, sampler)
    for folder, summary, (video, stats) in zip(folders, summaries, alone):
        assert np.abs(folder.video().astype(int) - video.astype(int)).max() <= 2      # float rounding only
        assert summary.state.accel.modes.to_dict() == stats.modes.to_dict()            # its own decisions


# ----------------------------------------------------------------------------- scope bench

def test_scope_bench_on_magi_tiny_runs_every_method_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", TINY, "--methods", "none,scope,magcache", "--sweep", "none", "--prompts", "1",
               "--frames", "24", "--rounds", "1", "--threads", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["none", "scope", "magcache", "none"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["psnr_db"] == 100.0
    assert rows[-1]["psnr_db"] == 100.0                      # exact selective computation alone is lossless
    assert all(r["speedup"] > 0 and r["content_accuracy"] is None for r in rows)
    assert rows[1]["block_eval_fraction"] < 1 and rows[1]["run"]["model"] == TINY
    assert "magcache: ratios measured" in capsys.readouterr().out


# ----------------------------------------------------------------------------- folders and bad input

def _release_layout(root: Path, size_folder: str = "4.5B_distill", weights: str = "inference_weight.distill",
                    vae: bool = True, t5: bool = True) -> Path:
    """sand-ai/MAGI-1's ckpt/ layout with empty files: enough for `describe`."""
    folder = root / "ckpt" / "magi" / size_folder
    (folder / weights).mkdir(parents=True)
    (folder / weights / "model.safetensors").write_bytes(b"")
    if vae:
        (root / "ckpt" / "vae").mkdir(parents=True)
        for name in magi.VAE_FILES:
            (root / "ckpt" / "vae" / name).write_bytes(b"")
    if t5:
        (root / "ckpt" / "t5" / "t5-v1_1-xxl").mkdir(parents=True)
        for name in ("config.json", "spiece.model"):
            (root / "ckpt" / "t5" / "t5-v1_1-xxl" / name).write_bytes(b"")
    return folder


def test_an_official_4_5b_distill_folder_is_described_without_loading(tmp_path):
    folder = _release_layout(tmp_path)
    plan = describe(JobSpec(prompt="a cat", model=str(folder), frames=96, accel="scope"))
    assert plan.family == "magi-1" and plan.defaults["size"] == "4.5b-distill"
    assert (plan.args.num_steps, plan.args.cfg_number, plan.args.distill) == (64, 1, True)
    assert plan.resolution == "720x720" and plan.latent_size == (90, 90) and len(plan.segments) == 4
    assert plan.defaults["parts"]["vae"].endswith("ckpt/vae") and plan.defaults["parts"]["t5"].endswith("t5-v1_1-xxl")
    assert plan.defaults["transformer"]["num_layers"] == 34


@pytest.mark.parametrize("layout, message", [
    (dict(vae=False), "missing the MAGI VAE (vae/config.json + diffusion_pytorch_model.safetensors"),
    (dict(t5=False), "missing the T5 text encoder (t5/t5-v1_1-xxl/config.json"),
    (dict(weights="inference_weight.fp8.distill"), "only inference_weight.fp8.distill is there"),
])
def test_a_missing_part_of_an_official_folder_is_named_in_one_line(tmp_path, capsys, layout, message):
    folder = _release_layout(tmp_path, **layout)
    rc = main(["generate", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "magi-1-4.5b-distill"], "names a MAGI-1 size, not weights"),
    (["--model", "magi-1-huge"], "unknown MAGI-1 model"),
    (["--model", TINY, "--ar-step", "2"], "spec field 'ar_step'"),
    (["--model", TINY, "--image", "x.png"], "spec field 'image'"),
    (["--model", TINY, "--resolution", "720p", "--steps", "10"], "multiple of window_size"),
])
def test_bad_magi_input_is_one_clear_line(tmp_path, capsys, args, message):
    rc = main(["generate", "--prompt", "x", "--out", str(tmp_path / "v.mp4"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_tiny_release_layout_folder_loads_its_parts_and_runs(tmp_path):
    import transformers

    from pipelines.magi1.checkpoint import save_transformer
    from pipelines.magi1.vae import save_magi_vae
    from tests.unit.test_skyreels_chain import write_tokenizer

    root = tmp_path / "ckpt"
    save_transformer(magi.build_transformer(None, "tiny"), str(root / "magi" / "tiny" / "inference_weight"))
    save_magi_vae(magi.build_vae(None), str(root / "vae"))
    t5 = root / "t5" / "t5-v1_1-xxl"
    write_tokenizer(t5)
    transformers.T5EncoderModel(transformers.T5Config(**magi.TINY_T5)).save_pretrained(str(t5))
    out, stats = tmp_path / "v.mp4", tmp_path / "s.json"
    args = ["generate", "--model", str(root / "magi" / "tiny"), "--prompt", "a red fox", "--frames", "24",
            "--accel", "scope", "--out", str(out), "--stats", str(stats), "--no-progress"]
    assert main(args) == 0 and read_video(str(out)).shape == (24, 64, 64, 3)
    assert json.loads(stats.read_text())["special_tokens"].startswith("none")
    # upstream's special tokens beside the model: captions become [DURATION, HQ, T5 tokens]
    np.savez(root / magi.SPECIAL_TOKENS_FILE, other_tokens=np.random.default_rng(0).normal(size=(100, 64)))
    out.unlink()
    assert main(args) == 0 and read_video(str(out)).shape == (24, 64, 64, 3)
    assert json.loads(stats.read_text())["special_tokens"] == "HQ + duration (special_tokens.npz)"


def test_special_tokens_give_each_chunk_its_duration_and_the_hq_token():
    from pipelines.magi1.pipeline import Caption

    other = torch.randn(100, 8).half().float()
    caption, mask = torch.randn(6, 8), torch.tensor([1, 1, 1, 0, 0, 0]).float()
    y, m = magi.special_token_caption(caption, mask, other, max_length=6)
    cap = Caption(y, m, chunk_rows=magi.duration_rows(10))
    rows, masks = cap.rows(range(10))
    for c in range(10):                                    # chunk c of 10: min(9 - c, 7) + 1 chunks left
        assert torch.equal(rows[c, 0], other[7 + min(9 - c, 7)]) and torch.equal(rows[c, 1], other[1])
        assert torch.equal(rows[c, 2:], caption[:4]) and masks[c].tolist() == [1, 1, 1, 1, 1, 0]
    assert y.shape == (8, 6, 8)                            # 8 variants whatever the length: flat memory


def test_dataset_rows_with_a_magi_model_are_walked_together_and_equal_each_made_alone(tmp_path):
    from jobs.dataset import VideoMaker
    from tests.unit.test_dataset_worker import _items

    base = JobSpec(prompt="(set per row)", model=TINY, frames=24, accel="scope", out=str(tmp_path))
    rows = [{"id": "p", "prompt": "a red fox runs", "seed": 1}, {"id": "q", "prompt": "a blue lake", "seed": 2}]
    _, batch = _items(rows, base)
    together = VideoMaker(str(tmp_path / "together"), {}, 10.0)(batch)
    assert together["status"] == ["done", "done"]
    for i, key in enumerate(batch["key"]):
        alone = VideoMaker(str(tmp_path / f"alone{i}"), {}, 10.0)({"key": [key], "item": [batch["item"][i]]})
        assert alone["modes"][0] == together["modes"][i]
        assert alone["block_eval_fraction"][0] == together["block_eval_fraction"][i] < 1.0
        a = read_video(str(tmp_path / f"alone{i}" / "videos" / f"{key}.mp4")).astype(int)
        b = read_video(str(tmp_path / "together" / "videos" / f"{key}.mp4")).astype(int)
        assert a.shape == (24, 64, 64, 3) and np.abs(a - b).max() <= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_magi_walk_on_a_gpu_gives_the_cpu_frames_and_resumes_there(models):
    on_cpu, on_gpu = MemoryFolder(), MemoryFolder()
    _run(_spec(device="cpu"), on_cpu, {})
    _run(_spec(device="cuda"), on_gpu, {})
    assert np.abs(on_cpu.video().astype(int) - on_gpu.video().astype(int)).max() <= 3
    killed = MemoryFolder(crash_after=1)
    with pytest.raises(KeyboardInterrupt):
        _run(_spec(device="cuda"), killed, {})
    killed.crash_after = None
    _run(_spec(device="cuda"), killed, {})
    assert np.array_equal(killed.video(), on_gpu.video())
