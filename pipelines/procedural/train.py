"""Train the small procedural model: a SkyReels-V2 DF transformer with diffusion forcing, on CPU.

One command, deterministic in the seed, about 20 minutes on 2 CPU cores:

    .venv/bin/python -m pipelines.procedural.train --out pipelines/procedural/weights

Per step: draw a batch of training clips (`data.make_batch`), encode them with the patch codec,
draw one noise level per causal block (diffusion forcing), and regress the flow-matching
velocity with block-causal attention:

    x_t = (1 - sigma) * x0 + sigma * eps,   target v = eps - x0,   t = round(1000 * sigma)

so the sampler's x0 prediction is x_t - sigma * v. Blocks at sigma 0 are a clean prefix: they
condition the others and carry no loss. The text encoder's word table is trained jointly; 10%
of captions are dropped to the empty caption (the CFG null prompt).

Output (what `bundle.load_bundle` reads): `config.json` + `model.safetensors` (official layout; an
index `model.safetensors.index.json` names it as the only shard, so the loader ignores the others),
`text_encoder.safetensors` + `text_encoder.json`, `codec.safetensors` + `codec.json`,
`pipeline.json` (sampling defaults and how the weights were made).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# On a shared 2-core machine, OpenMP threads that spin at barriers collapse when another process
# holds a core (measured: 8 s instead of 1.6 s per step); sleeping waiters avoid it. Read when torch
# loads, so it must be set before the import below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from pipelines.procedural.codec import PatchCodec, fit_default_codec
from pipelines.procedural.data import TRAINING_CLIPS, ClipConfig, caption_vocabulary, empty_scene, make_batch
from pipelines.procedural.text import TextEncoder
from pipelines.skyreels_v2.checkpoint import INDEX_FILE, SINGLE_FILE, save_transformer
from pipelines.skyreels_v2.model import WanDFConfig, WanDFTransformer

TRAIN_COMMAND = ".venv/bin/python -m pipelines.procedural.train --out pipelines/procedural/weights"
TEXT_ENCODER_FILE = "text_encoder"   # .safetensors + .json
CODEC_FILE = "codec"                 # .safetensors + .json (the codec's own format)
PIPELINE_FILE = "pipeline.json"


# ----------------------------------------------------------------------------- 1. settings

@dataclass(frozen=True)
class ModelSize:
    """The WanDFTransformer fields we choose; the rest are WanDFConfig defaults."""

    dim: int = 128                      # 2x the 64 latent values of one 1x2x2 patch
    ffn_dim: int = 512
    num_heads: int = 2                  # head width 64: small heads cannot focus over 1024 tokens
    num_layers: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)   # official; 64 tokens per 16x16 latent frame
    freq_dim: int = 128
    text_len: int = 8      # longest caption is 5 words + <eos>
    text_dim: int = 64
    qk_norm_init: float = 1.5           # initial q/k RMSNorm weight: attention logits scale by its square

    def wan_config(self) -> WanDFConfig:
        return WanDFConfig(dim=self.dim, ffn_dim=self.ffn_dim, num_heads=self.num_heads,
                           num_layers=self.num_layers, patch_size=self.patch_size, freq_dim=self.freq_dim,
                           text_len=self.text_len, text_dim=self.text_dim, inject_sample_info=False)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the seed)."""

    steps: int = 3000
    batch_size: int = 6
    lr: float = 2e-3
    min_lr_ratio: float = 0.05          # cosine decays to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.997            # the saved weights are the EMA
    clip_frames: int = 16               # latent frames per training clip (= base_num_frames)
    causal_block_size: int = 2          # latent frames per causal block (= accel chunk)
    caption_dropout: float = 0.1
    # per-sample noise pattern: independent per block / one sigma for all / monotone ramp
    pattern_probs: tuple[float, float, float] = (0.4, 0.2, 0.4)
    prefix_probability: float = 0.5     # share of samples with clean prefix blocks (sigma 0)
    prefix_start_frames: int = 64       # a clip with a prefix starts at a random frame in [0, this)
    reference_block: bool = True        # clips without a prefix start with one block of `empty_scene`
    sigma_shift: float = 3.0            # sigma = s*u / (1 + (s-1)*u), u uniform: more high-noise steps
    channel_weighting: bool = True      # loss weight per latent channel (see `channel_weights`)
    bf16_autocast: bool = True          # forward matmuls in bfloat16 (weights and optimizer in float32)
    codec_clips: int = 256
    log_every: int = 25
    model: ModelSize = field(default_factory=ModelSize)
    clips: ClipConfig = TRAINING_CLIPS  # layout of the training clips (num_frames is set from clip_frames)

    def __post_init__(self) -> None:
        if self.clip_frames % self.causal_block_size:
            raise ValueError(f"clip_frames ({self.clip_frames}) must be a multiple of causal_block_size "
                             f"({self.causal_block_size}), e.g. 16 and 2")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1; got {self.steps}, {self.batch_size}")
        if abs(sum(self.pattern_probs) - 1) > 1e-6:
            raise ValueError(f"pattern_probs must sum to 1; got {self.pattern_probs}")


# Sampling defaults shipped in pipeline.json (chosen with `evaluate.py` on training captions).
SAMPLING_DEFAULTS: dict[str, object] = {
    "num_inference_steps": 10,
    "shift": 3.0,
    "guidance_scale": 3.0,
    "causal_block_size": 2,
    "ar_step": 0,                # synchronous (SkyReels-V2's default): held-out motion 79 % vs 71 % at ar_step 2 (48 frames)
    "base_num_frames": 16,
    "overlap_frames": 4,
    "addnoise_condition": 0,
    "causal_attention": True,
    "fps": 8,
    "reference_block": True,     # videos start from a clean block of the empty scene (dropped from the output)
}


# ----------------------------------------------------------------------------- 2. model set-up

def init_weights(model: WanDFTransformer, qk_norm_init: float = 1.0) -> None:
    """Wan's initialisation (xavier linears, small text/time embeddings, zero output head), and q/k
    norm weights at `qk_norm_init`: with q/k RMS-normalised, a head of width d has logits of at most
    w^2 sqrt(d), so small heads start (and long stay) nearly uniform over 1024 tokens at w = 1."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
    for seq in (model.text_embedding, model.time_embedding):
        for m in seq.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
    nn.init.zeros_(model.head.head.weight)
    for block in model.blocks:
        for attn in (block.self_attn, block.cross_attn):
            for norm in (attn.norm_q, attn.norm_k):
                nn.init.constant_(norm.weight, qk_norm_init)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- 3. diffusion forcing

def draw_prefix_blocks(batch: int, num_blocks: int, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Clean prefix length per sample [B] in blocks: 0, or 1..num_blocks-1 for a share of samples."""
    has_prefix = torch.rand(batch, generator=gen) < cfg.prefix_probability
    return torch.randint(1, num_blocks, (batch,), generator=gen) * has_prefix


def draw_start_frames(prefix: Tensor, cfg: TrainConfig, gen: torch.Generator) -> list[int]:
    """First frame of each clip's motion: 0 without a prefix (the caption decides the first frame),
    random with one (the prefix shows where the object is; long videos continue from anywhere).
    With `reference_block`, a clip without a prefix starts one block earlier: that block is then
    replaced by the empty scene, so the motion starts right after it."""
    starts = torch.randint(0, max(1, cfg.prefix_start_frames), prefix.shape, generator=gen)
    first = -cfg.causal_block_size if cfg.reference_block else 0
    return torch.where(prefix > 0, starts, first).tolist()


def add_reference_block(frames: Tensor, prefix: Tensor, cfg: TrainConfig, clip_config: ClipConfig
                        ) -> tuple[Tensor, Tensor]:
    """Clips without a prefix get the empty scene as their first block, a clean prefix of 1 block
    (what `bundle.generate_video` gives the first segment). frames uint8 [B, T, H, W, 3]."""
    if not cfg.reference_block:
        return frames, prefix
    cbs = cfg.causal_block_size
    fresh = prefix == 0
    frames = frames.clone()
    frames[fresh, :cbs] = empty_scene(dataclasses.replace(clip_config, num_frames=cbs))
    return frames, torch.where(fresh, 1, prefix)


def sample_block_sigmas(prefix: Tensor, num_blocks: int, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Noise level per (sample, causal block) [B, num_blocks] in [0, 1).

    Patterns: independent uniform levels; one level for all blocks (synchronous schedule); a
    monotone ramp, earlier blocks cleaner (asynchronous schedule). Then the first `prefix[b]`
    blocks of sample b are a clean prefix at sigma 0 (long-video overlap).
    """
    batch = prefix.shape[0]

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen)

    s = cfg.sigma_shift
    u = uniform(batch, num_blocks)
    independent = u
    synchronous = u[:, :1].expand(batch, num_blocks)
    start, slope = uniform(batch, 1), uniform(batch, 1) * 2.0 / num_blocks  # ramp spans up to 2
    ramp = (start * 1.2 - 0.2 + slope * torch.arange(num_blocks)).clamp(0.0, 0.999)
    pattern = torch.multinomial(torch.tensor(cfg.pattern_probs), batch, replacement=True, generator=gen)
    u = torch.stack([independent, synchronous, ramp])[pattern, torch.arange(batch)]  # [B, nb]
    sigma = s * u / (1 + (s - 1) * u)
    return torch.where(torch.arange(num_blocks)[None] < prefix[:, None], 0.0, sigma)


def channel_weights(codec: PatchCodec) -> Tensor:
    """Loss weight per latent channel [C]: the codec's pixel scale, normalised to mean 1.

    The codec whitens its PCA channels, so plain latent MSE gives the 11 finest channels (5% of
    the pixel variance) 69% of the loss; pixel MSE would give 3 channels 88%. The square root of
    the pixel weighting sits between: layout and colour learn first, edges are still denoised.
    """
    return codec.scale / codec.scale.mean()


def diffusion_forcing_loss(model: WanDFTransformer, x0: Tensor, context: Tensor, cfg: TrainConfig,
                           gen: torch.Generator, weights: Tensor | None = None,
                           prefix: Tensor | None = None) -> Tensor:
    """Flow-matching velocity MSE on latents x0 [B, C, F, H, W] with per-block noise levels.

    `weights` [C] weighs the latent channels (None = equal); `prefix` [B] clean prefix blocks
    per sample (None = drawn here).
    """
    batch, _, frames = x0.shape[:3]
    cbs = cfg.causal_block_size
    if prefix is None:
        prefix = draw_prefix_blocks(batch, frames // cbs, cfg, gen)
    # 1. one sigma per block -> per frame [B, F]; model timestep per frame
    sigma = sample_block_sigmas(prefix, frames // cbs, cfg, gen).repeat_interleave(cbs, dim=1)
    t = (sigma * 1000).round().long().clamp(0, 999)
    # 2. noised input and velocity target
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma[:, None, :, None, None]
    x_t = (1 - s) * x0 + s * eps
    target = eps - x0
    # 3. block-causal prediction; clean (sigma 0) frames carry no loss
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        v = model(x_t, t, context, causal_block_size=cbs)
    err = (v.float() - target).pow(2)                               # [B, C, F, H, W]
    if weights is not None:
        err = err * weights[None, :, None, None, None]
    per_frame = err.mean(dim=(1, 3, 4))                             # [B, F]
    weight = (t > 0).float()
    return (per_frame * weight).sum() / weight.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- 4. training loop

@dataclass
class TrainResult:
    model: WanDFTransformer
    text_encoder: TextEncoder
    codec: PatchCodec
    losses: list[tuple[int, float]]   # (step, mean loss over the last log interval)
    seconds: float


def train(cfg: TrainConfig, seed: int = 0, log: bool = True) -> TrainResult:
    """Train from scratch; deterministic in (cfg, seed) on a given machine and thread count."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clip_config = dataclasses.replace(cfg.clips, num_frames=cfg.clip_frames)
    # 1. codec (closed form), text encoder, transformer
    codec = fit_default_codec(num_clips=cfg.codec_clips, config=ClipConfig())
    text_encoder = TextEncoder(caption_vocabulary(), text_len=cfg.model.text_len, text_dim=cfg.model.text_dim)
    model = WanDFTransformer(cfg.model.wan_config())
    init_weights(model, cfg.model.qk_norm_init)
    weights = channel_weights(codec) if cfg.channel_weighting else None
    params = list(model.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    decay_params = [p for p in params if p.dim() >= 2]
    other_params = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": cfg.weight_decay},
                             {"params": other_params, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    if log:
        count = sum(p.numel() for p in model.parameters())
        print(f"model {count / 1e6:.2f}M params {asdict(cfg.model)}; text encoder "
              f"{sum(p.numel() for p in text_encoder.parameters())} params; {cfg.steps} steps of "
              f"{cfg.batch_size} clips x {cfg.clip_frames} latent frames", flush=True)

    # 2. steps
    losses: list[tuple[int, float]] = []
    window: list[float] = []
    model.train()
    for step in range(cfg.steps):
        prefix = draw_prefix_blocks(cfg.batch_size, cfg.clip_frames // cfg.causal_block_size, cfg, gen)
        batch = make_batch(seed, step, cfg.batch_size, clip_config, "train", start=draw_start_frames(prefix, cfg, gen))
        frames, prefix = add_reference_block(batch["frames"], prefix, cfg, clip_config)
        x0 = codec.encode(frames)                                            # [B, C, F, h, w]
        captions = ["" if torch.rand((), generator=gen) < cfg.caption_dropout else c
                    for c in batch["captions"]]
        context = text_encoder(captions)                                     # [B, L, text_dim]
        loss = diffusion_forcing_loss(model, x0, context, cfg, gen, weights, prefix)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            losses.append((step + 1, sum(window) / len(window)))
            window = []
            if log:
                elapsed = time.perf_counter() - started
                print(f"step {step + 1:5d}/{cfg.steps}  loss {losses[-1][1]:.4f}  lr {lr_at(step, cfg):.2e}  "
                      f"{elapsed / (step + 1):.2f} s/step  {elapsed / 60:.1f} min", flush=True)

    # 3. the EMA weights are the result
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval()
    text_encoder.eval()
    return TrainResult(model, text_encoder, codec, losses, time.perf_counter() - started)


# ----------------------------------------------------------------------------- 5. saving

def save_text_encoder(encoder: TextEncoder, folder: Path) -> None:
    """`text_encoder.safetensors` (state dict) + `text_encoder.json` (constructor arguments)."""
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / f"{TEXT_ENCODER_FILE}.safetensors"))
    (folder / f"{TEXT_ENCODER_FILE}.json").write_text(json.dumps(encoder.config(), indent=2) + "\n")


def write_single_shard_index(model: WanDFTransformer, folder: Path) -> None:
    """An index naming model.safetensors as the only shard, so the loader skips our other safetensors."""
    state = model.state_dict()
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {k: SINGLE_FILE for k in state}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_weights(result: TrainResult, cfg: TrainConfig, seed: int, out: str | Path) -> Path:
    """Write every file to a fresh folder next to `out`, then swap it in (no half-written folder)."""
    out = Path(out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_transformer(result.model, str(staging))
    write_single_shard_index(result.model, staging)
    save_text_encoder(result.text_encoder, staging)
    result.codec.save(staging / CODEC_FILE)
    final_loss = result.losses[-1][1] if result.losses else float("nan")
    pipeline = {
        **SAMPLING_DEFAULTS,
        "height": cfg.clips.height, "width": cfg.clips.width, "latent_channels": result.codec.channels,
        "background_style": cfg.clips.background_style,
        "reference_block": cfg.reference_block,
        "training": {
            "command": TRAIN_COMMAND if cfg.steps == TrainConfig().steps and seed == 0
            else f"{TRAIN_COMMAND} --steps {cfg.steps} --seed {seed}",
            "seed": seed, "steps": cfg.steps, "final_loss": round(final_loss, 5),
            "wall_seconds": round(result.seconds, 1), "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
            "config": _jsonable(asdict(cfg)),
            "loss_curve": [[s, round(v, 5)] for s, v in result.losses],
        },
    }
    (staging / PIPELINE_FILE).write_text(json.dumps(pipeline, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------- 6. entry points

def run_train(args: argparse.Namespace) -> Path:
    """`scope train`: args.out, args.steps (None = default), args.seed."""
    torch.set_num_threads(2)
    steps = TrainConfig().steps if getattr(args, "steps", None) is None else args.steps
    cfg = TrainConfig(steps=steps)
    seed = getattr(args, "seed", 0) or 0
    result = train(cfg, seed=seed)
    out = save_weights(result, cfg, seed, args.out)
    print(f"saved {out} (final loss {result.losses[-1][1]:.4f}, {result.seconds / 60:.1f} min)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the procedural SkyReels-V2 DF model (diffusion forcing).")
    parser.add_argument("--out", default="pipelines/procedural/weights", help="output folder (replaced)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {TrainConfig().steps})")
    parser.add_argument("--seed", type=int, default=0, help="torch and data seed")
    run_train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
