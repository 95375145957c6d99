"""The whole SkyReels-V2 chain in the jobs: prompt -> umT5 -> DF transformer -> Wan VAE streaming
decode -> frames, from an official-layout folder, plus image-to-video and continuation.

The folder is the official layout at the tiny sizes (built in tmp, once per module): `config.json` +
`model.safetensors` (tiny transformer), `Wan2.1_VAE.pth` (tiny VAE), `models_t5_umt5-xxl-enc-bf16.pth`
(tiny umT5, official key names) and `google/umt5-xxl/` (a WordLevel tokenizer), plus the two sidecar
configs a non-official size needs. Geometry tests use placeholder folders: `describe` reads only JSON
and checks that files exist, so an empty `model.safetensors` next to an official config.json is
enough to plan a 540P / 720P video. Runs use 16x16 or 32x32 frames to stay fast on two cores.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from jobs.cli import main
from jobs.runner import RunFault, RunState, VideoRun
from jobs.setup import FrameDecoder, VAEFrames, default_frames, describe, load
from jobs.spec import JobSpec, SpecError
from jobs.video import encode_mp4, read_video
from pipelines.skyreels_v2 import family as sky
from pipelines.skyreels_v2.checkpoint import save_transformer
from pipelines.skyreels_v2.model import WanDFTransformer
from pipelines.skyreels_v2.pipeline import DFPipeline
from pipelines.skyreels_v2.sizes import config_for
from pipelines.wan import umt5
from pipelines.wan.vae import VAE_FILE, VAEStreamDecoder, WanVAE, WanVAEConfig, init_random_weights_

WORDS = ["a", "red", "fox", "runs", "over", "the", "snow", "blue", "lake", "at", "night"]


# ----------------------------------------------------------------------------- builders

def write_tokenizer(folder: Path) -> None:
    """A T5-like tokenizer.json (whitespace words, <pad>=0, </s>=1 appended, <unk>=2)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "config.json").write_text(json.dumps({"model_type": "umt5"}))


def write_tiny_official_folder(folder: Path) -> Path:
    """Every file of an official SkyReels-V2 DF folder, at the tiny sizes, with seeded random weights."""
    torch.manual_seed(0)
    save_transformer(WanDFTransformer(config_for("tiny")).eval(), str(folder))
    vae = init_random_weights_(WanVAE(WanVAEConfig.named("tiny")), seed=1)
    torch.save(vae.state_dict(), folder / VAE_FILE)
    (folder / sky.VAE_CONFIG_FILE).write_text(json.dumps(WanVAEConfig.named("tiny").to_dict()))
    torch.manual_seed(2)
    encoder = umt5.UMT5Encoder(umt5.UMT5Config.named("tiny")).eval()
    torch.save(umt5.to_official_state_dict(encoder), folder / sky.UMT5_FILE)
    (folder / sky.TEXT_ENCODER_CONFIG_FILE).write_text(json.dumps(umt5.UMT5Config.named("tiny").to_dict()))
    write_tokenizer(folder / sky.TOKENIZER_DIR)
    return folder


def placeholder_folder(folder: Path, size: str) -> Path:
    """An official config.json and empty files under every official name: enough for `describe`."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", **config_for(size).to_dict()}))
    for name in ("model.safetensors", VAE_FILE, sky.UMT5_FILE, f"{sky.TOKENIZER_DIR}/tokenizer.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_official_folder(tmp_path_factory.mktemp("skyreels") / "SkyReels-V2-DF-tiny")


class MemoryFolder:
    """SegmentWriter + CheckpointStore in memory; `crash_after` raises after checkpointing that segment."""

    def __init__(self, crash_after: int | None = None):
        self.segments: dict[int, np.ndarray] = {}
        self.state: bytes | None = None
        self.crash_after = crash_after

    def has_segment(self, index: int) -> bool:
        return index in self.segments

    def write_segment(self, index: int, frames: np.ndarray) -> None:
        self.segments[index] = frames.copy()

    def load(self) -> RunState | None:
        return None if self.state is None else RunState.from_bytes(self.state, "memory")

    def save(self, state: RunState) -> None:
        self.state = state.to_bytes(seed=0)
        if self.crash_after is not None and state.next_segment - 1 >= self.crash_after:
            raise KeyboardInterrupt("simulated driver kill")

    def video(self) -> np.ndarray:
        return np.concatenate([self.segments[i] for i in sorted(self.segments)])


def run(spec: JobSpec, folder: MemoryFolder, latents: list | None = None) -> tuple:
    plan = describe(spec)
    loaded = load(plan)
    VideoRun(plan, loaded, DFPipeline(loaded.model), folder, folder,
             on_latents=None if latents is None else (lambda first, new: latents.append(new))).run()
    return plan, loaded


def spec_for(folder: Path | str, **changes) -> JobSpec:
    values = dict(prompt="a red fox runs over the snow", frames=9, seed=1, model=str(folder), steps=2,
                  resolution="32x32")
    return JobSpec(**{**values, **changes})


# ----------------------------------------------------------------------------- the whole chain

def test_generate_from_an_official_layout_folder_makes_a_real_video(tiny_folder, tmp_path):
    out, stats_path = tmp_path / "v.mp4", tmp_path / "s.json"
    rc = main(["generate", "--model", str(tiny_folder), "--prompt", "a red fox runs over the snow", "--frames", "9",
               "--resolution", "32x32", "--steps", "2", "--out", str(out), "--stats", str(stats_path),
               "--no-progress"])
    assert rc == 0
    stats = json.loads(stats_path.read_text())
    assert stats["text"] == f"umT5 ({sky.UMT5_FILE})" and stats["decode"] == "Wan VAE (streaming)"
    assert stats["resolution"] == "32x32" and stats["frames"] == 9
    assert read_video(str(out)).shape == (9, 32, 32, 3)


def test_the_long_video_job_streams_the_chain_into_its_folder(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rc = main(["long-video", "--model", str(tiny_folder), "--prompt", "a blue lake at night", "--frames", "41",
               "--resolution", "16x16", "--steps", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["decode"] == "Wan VAE (streaming)" and stats["segments"] >= 2
    assert read_video(str(out / "video.mp4")).shape == (41, 16, 16, 3)


def test_the_chain_equals_its_parts_run_by_hand(tiny_folder):
    """Text = the folder's umT5 on the prompt (upstream's negative prompt by default); frames = the
    VAE's one-shot decode of every latent, although they were decoded segment by segment."""
    spec = spec_for(tiny_folder, frames=21, base_frames=4, overlap=2)
    parts: list[torch.Tensor] = []
    folder = MemoryFolder()
    plan, loaded = run(spec, folder, parts)
    assert len(plan.segments) >= 2 and plan.args.guidance_scale > 1
    text = umt5.load_text_encoder(str(tiny_folder), config=umt5.UMT5Config.named("tiny"), text_len=16,
                                  dtype=torch.float32)
    torch.testing.assert_close(loaded.context, text([spec.prompt]))
    torch.testing.assert_close(loaded.negative, text([sky.NEGATIVE_PROMPT]))
    vae = sky.build_vae(str(tiny_folder), config=WanVAEConfig.named("tiny").to_dict())
    whole = VAEFrames(vae)(torch.cat(parts, dim=1), True)[:21]
    diff = np.abs(folder.video().astype(int) - whole.astype(int)).max()
    assert folder.video().shape == whole.shape == (21, 32, 32, 3) and diff <= 1, diff


@pytest.mark.parametrize("missing", [VAE_FILE, sky.UMT5_FILE, f"{sky.TOKENIZER_DIR}/tokenizer.json",
                                     "model.safetensors"])
def test_each_missing_file_is_named_in_one_line_before_any_weights_load(tmp_path, capsys, missing):
    folder = placeholder_folder(tmp_path / "SkyReels-V2-DF-1.3B-540P", "1.3b-540p")   # empty weight files
    (folder / missing).unlink()
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--model", str(folder), "--prompt", "x", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(folder) in err and missing.split("/")[-1] in err, err    # where it looked, and what
    assert "not a readable" not in err                                    # no (empty) weights file was read
    assert not out.exists()


def test_context_replaces_the_text_encoder_and_preview_replaces_the_vae(tmp_path):
    folder = placeholder_folder(tmp_path / "ckpt", "1.3b-540p")
    for name in (sky.UMT5_FILE, f"{sky.TOKENIZER_DIR}/tokenizer.json", VAE_FILE):
        (folder / name).unlink()
    with pytest.raises(SpecError, match="missing .*Wan2.1_VAE.pth.*models_t5"):
        describe(JobSpec(prompt="x", frames=9, model=str(folder)))
    assert describe(JobSpec(prompt="x", frames=9, model=str(folder), context="c.safetensors",
                            decode="preview")).decode == "latent preview"
    with pytest.raises(SpecError, match="Wan2.1_VAE.pth"):   # an image needs the VAE's encoder
        describe(JobSpec(prompt="x", frames=9, model=str(folder), context="c.safetensors", decode="preview",
                         image="any.png"))


def test_context_file_still_works_through_the_cli(tiny_folder, tmp_path):
    from safetensors.torch import save_file

    folder = Path(shutil.copytree(tiny_folder, tmp_path / "no-text-encoder"))
    (folder / sky.UMT5_FILE).unlink()
    shutil.rmtree(folder / "google")
    save_file({"context": torch.randn(16, 32), "negative_context": torch.zeros(16, 32)},
              str(tmp_path / "c.safetensors"))
    out, stats = tmp_path / "v.mp4", tmp_path / "s.json"
    rc = main(["generate", "--model", str(folder), "--prompt", "x", "--context", str(tmp_path / "c.safetensors"),
               "--frames", "5", "--steps", "1", "--resolution", "16x16", "--out", str(out), "--stats", str(stats),
               "--no-progress"])
    assert rc == 0 and json.loads(stats.read_text())["text"].startswith("context file")
    assert read_video(str(out)).shape == (5, 16, 16, 3)


def test_the_folder_may_be_an_fsspec_url(tiny_folder):
    import fsspec

    fs, url = fsspec.filesystem("memory"), "memory://skyreels-chain/SkyReels-V2-DF-tiny"
    for path in tiny_folder.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{url}/{path.relative_to(tiny_folder).as_posix()}", path.read_bytes())
    local, remote = MemoryFolder(), MemoryFolder()
    run(spec_for(tiny_folder, frames=5, resolution="16x16"), local)
    run(spec_for(url, frames=5, resolution="16x16"), remote)
    assert np.array_equal(local.video(), remote.video()) and local.video().shape == (5, 16, 16, 3)
    fs.rm(url, recursive=True)
    with pytest.raises(SpecError, match="config.json"):
        describe(spec_for(url))


# ----------------------------------------------------------------------------- sizes and resolutions

def test_resolution_and_defaults_come_from_the_checkpoint_and_the_spec(tmp_path):
    small = placeholder_folder(tmp_path / "SkyReels-V2-DF-1.3B-540P", "1.3b-540p")
    large = placeholder_folder(tmp_path / "SkyReels-V2-DF-14B-720P", "14b-720p")
    p540 = describe(JobSpec(prompt="x", frames=97, model=str(small)))
    assert (p540.resolution, p540.latent_size, p540.fps, p540.latent_frames) == ("960x544", (68, 120), 24, 25)
    assert (p540.args.num_steps, p540.args.shift, p540.args.guidance_scale, p540.args.ar_step) == (30, 8.0, 6.0, 0)
    assert (p540.args.base_num_frames, p540.args.causal_block_size, p540.args.addnoise_condition) == (25, 1, 20)
    p720 = describe(JobSpec(prompt="x", frames=257, model=str(large)))
    assert (p720.resolution, p720.latent_size, p720.args.base_num_frames, p720.defaults["size"]) == (
        "1280x720", (90, 160), 31, "14b-720p")
    assert p720.args.overlap_frames == 5 and len(p720.segments) == 3           # README: overlap 17 frames
    asked = describe(JobSpec(prompt="x", frames=97, model=str(small), resolution="720P"))
    assert (asked.resolution, asked.latent_size, asked.args.base_num_frames) == ("1280x720", (90, 160), 25)
    assert describe(JobSpec(prompt="x", frames=97, model=str(small), resolution="960x544")).latent_size == (68, 120)
    assert (default_frames(str(small)), default_frames(str(large)), default_frames("tiny")) == (97, 121, 48)
    assert describe(JobSpec(prompt="x", frames=9, model="tiny")).resolution == "64x64"


@pytest.mark.parametrize("value", ["1000x500", "480p", "x", "64X"])
def test_a_bad_resolution_is_one_line_listing_the_valid_values(value):
    with pytest.raises(SpecError) as caught:
        JobSpec(prompt="x", frames=9, model="tiny", resolution=value)
    message = str(caught.value)
    assert "spec field 'resolution'" in message and "540p, 720p, or WxH" in message and "\n" not in message


def test_family_file_names_are_the_parts_own():
    from pipelines.wan import vae

    assert (sky.VAE_FILE, sky.UMT5_FILE, sky.TOKENIZER_DIR) == (vae.VAE_FILE, umt5.WEIGHTS_FILE, umt5.TOKENIZER_DIR)
    assert (WanVAEConfig().temporal_stride, WanVAEConfig().spatial_stride) == (sky.VAE_TEMPORAL, sky.VAE_SPATIAL)


# ----------------------------------------------------------------------------- streaming decode, resume

def test_the_decoders_receptive_field_is_measured_and_covered_by_the_history():
    """Perturb one latent frame of a 60-frame stream: the decoded frames change up to those of latent
    k + 38 and are bit-identical after. A decoder warmed on the last W latents decodes on exactly."""
    vae = init_random_weights_(WanVAE(WanVAEConfig.named("tiny")), seed=0).eval()
    z = torch.randn(1, 16, 60, 2, 2, generator=torch.Generator().manual_seed(1))
    base = VAEStreamDecoder(vae, clamp=False).decode_next(z)
    k = 6
    bumped = z.clone()
    bumped[:, :, k] += 1.0
    changed = (VAEStreamDecoder(vae, clamp=False).decode_next(bumped) - base).abs().amax(dim=(0, 1, 3, 4)) > 0
    last_frame = int(changed.nonzero().max())
    assert (last_frame + 3) // 4 - k == sky.DECODER_RECEPTIVE_FIELD < sky.DECODER_HISTORY
    r = 50
    for history, exact in ((sky.DECODER_HISTORY, True), (sky.DECODER_RECEPTIVE_FIELD - 8, False)):
        warm = VAEStreamDecoder(vae, clamp=False)
        warm.decode_next(z[:, :, r - history:r])
        assert torch.equal(warm.decode_next(z[:, :, r:]), base[:, :, 4 * r - 3:]) == exact, history


def test_frame_decoder_resumes_a_stream_mid_video():
    vae = sky.build_vae(None)
    latents = torch.randn(16, 50, 2, 2, generator=torch.Generator().manual_seed(3))

    def decoder() -> FrameDecoder:
        return FrameDecoder(VAEFrames(vae), frames=190, temporal=4, kind="vae", history=sky.DECODER_HISTORY)

    whole = decoder()
    want = np.concatenate([whole.decode(latents[:, a:b], a) for a, b in ((0, 20), (20, 45), (45, 50))])
    first, history = decoder(), None
    got = [first.decode(latents[:, a:b], a) for a, b in ((0, 20), (20, 45))]
    for a, b in ((0, 20), (20, 45)):
        history = first.history_after(history, latents[:, a:b])
    assert history.shape[1] == sky.DECODER_HISTORY
    resumed = decoder()
    resumed.resume(history, 45)
    got.append(resumed.decode(latents[:, 45:50], 45))
    assert np.array_equal(np.concatenate(got), want) and want.shape[0] == 190
    with pytest.raises(RuntimeError, match="expects latent 50"):
        resumed.decode(latents[:, 10:12], 10)


@pytest.mark.parametrize("crash_after", [3, 9])
def test_a_killed_long_video_resumes_to_the_uninterrupted_frames_with_the_vae(crash_after):
    """11 segments of 16x16 frames: the crash after segment 9 resumes past W latents, so the decoder
    is warmed on the checkpoint's history alone, not on the stream from its start."""
    spec = JobSpec(prompt="a blue lake at night", frames=181, seed=2, model="tiny", steps=1, resolution="16x16")
    whole = MemoryFolder()
    plan, _ = run(spec, whole)
    assert len(plan.segments) == 11 and plan.new_latents_of(plan.segments[10])[0] > sky.DECODER_HISTORY
    folder = MemoryFolder(crash_after=crash_after)
    with pytest.raises(KeyboardInterrupt):
        run(spec, folder)
    state = folder.load()
    resume_at = plan.new_latents_of(plan.segments[crash_after + 1])[0]
    assert state.decode_history.shape[1] == min(sky.DECODER_HISTORY, resume_at)
    folder.crash_after = None
    run(spec, folder)
    video, want = folder.video(), whole.video()
    assert video.shape == want.shape == (181, 16, 16, 3)
    assert np.abs(video.astype(int) - want.astype(int)).max() <= 1


def test_a_checkpoint_without_decoder_history_is_refused():
    spec = JobSpec(prompt="x", frames=30, seed=2, model="tiny", steps=1, resolution="16x16")
    folder = MemoryFolder(crash_after=0)
    with pytest.raises(KeyboardInterrupt):
        run(spec, folder)
    state = folder.load()
    state.decode_history = None
    folder.state, folder.crash_after = state.to_bytes(seed=0), None
    with pytest.raises(RunFault, match="decoder history"):
        run(spec, folder)


# ----------------------------------------------------------------------------- image-to-video, continuation

def test_image_to_video_starts_from_the_encoded_image(tiny_folder, tmp_path):
    from PIL import Image

    gradient = np.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3).astype(np.uint8)
    Image.fromarray(gradient).save(tmp_path / "first.png")
    spec = spec_for(tiny_folder, image=str(tmp_path / "first.png"), addnoise_condition=20)
    parts: list[torch.Tensor] = []
    folder = MemoryFolder()
    plan, loaded = run(spec, folder, parts)
    assert (plan.reference_latents, plan.skip, plan.args.causal_block_size) == (1, 0, 1)
    from jobs.media import fit, to_pixels

    vae = sky.build_vae(str(tiny_folder), config=WanVAEConfig.named("tiny").to_dict())
    expected = vae.encode(to_pixels([fit(Image.open(tmp_path / "first.png"), 32, 32)])[None])[0]
    torch.testing.assert_close(loaded.reference, expected)
    assert torch.equal(parts[0][:, :1], loaded.reference)              # the prefix stays clean: frame 0
    assert folder.video().shape == (9, 32, 32, 3)                        # the image is frame 0, as upstream
    with pytest.raises(SpecError, match="causal_block_size 1"):
        describe(spec.with_overrides(causal_block_size=2))


def test_continuation_encodes_the_videos_last_frames_and_outputs_only_new_ones(tiny_folder, tmp_path):
    clip = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    encode_mp4(clip, str(tmp_path / "clip.mp4"), fps=24)
    spec = spec_for(tiny_folder, video=str(tmp_path / "clip.mp4"), frames=8)
    parts: list[torch.Tensor] = []
    folder = MemoryFolder()
    plan, loaded = run(spec, folder, parts)
    assert (plan.reference_latents, plan.skip, plan.latent_frames) == (4, 4, 6)   # 13 frames -> 4 latents
    from jobs.media import read_last_frames

    vae = sky.build_vae(str(tiny_folder), config=WanVAEConfig.named("tiny").to_dict())
    expected = vae.encode(read_last_frames(spec, 13, 32, 32)[None])[0]
    torch.testing.assert_close(loaded.reference, expected)
    assert torch.equal(torch.cat(parts, dim=1)[:, :4], loaded.reference)
    stream = VAEFrames(vae)(torch.cat(parts, dim=1), True)                    # prefix frames, then new ones
    video = folder.video()
    assert video.shape == (8, 32, 32, 3) and np.abs(video.astype(int) - stream[13:].astype(int)).max() <= 1


@pytest.mark.parametrize("field, content, message", [
    ("image", b"not a picture", "is not a readable image"),
    ("video", b"not a video", "is not a readable video"),
])
def test_a_bad_conditioning_file_is_one_line(tmp_path, capsys, field, content, message):
    (tmp_path / "bad").write_bytes(content)
    rc = main(["generate", "--model", "tiny", "--prompt", "x", "--frames", "5", "--resolution", "16x16",
               f"--{field}", str(tmp_path / "bad"), "--causal-block-size", "1", "--out", str(tmp_path / "v.mp4"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_or_too_short_conditioning_file_fails_in_describe_or_load(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        describe(JobSpec(prompt="x", frames=5, model="tiny", image=str(tmp_path / "none.png")))
    encode_mp4(np.zeros((5, 16, 16, 3), np.uint8), str(tmp_path / "short.mp4"), fps=24)
    plan = describe(JobSpec(prompt="x", frames=5, model="tiny", video=str(tmp_path / "short.mp4"), resolution="16x16"))
    with pytest.raises(SpecError, match="has 5 frame.*encodes its last 13"):
        load(plan)
    with pytest.raises(SpecError, match="at most one of 'image'"):
        JobSpec(prompt="x", frames=5, image="a.png", video="b.mp4")


def test_the_tiny_text_encoder_is_deterministic_and_tells_prompts_apart():
    encoder = sky.build_text_encoder(None, text_len=16)
    a, b = encoder(["a red fox"]), encoder(["a blue lake"])
    assert a.shape == (1, 16, 32) and torch.equal(a, sky.build_text_encoder(None, text_len=16)(["a red fox"]))
    assert not torch.allclose(a, b) and torch.equal(a[0, 4:], torch.zeros(12, 32))   # 3 words + </s>, padding 0
