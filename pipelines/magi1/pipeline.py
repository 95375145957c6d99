"""MAGI-1 chunk-wise autoregressive sampling (upstream `SampleTransport.walk` + `forward_dispatcher`).

`MagiPipeline(model, accel).stream(noise, captions, args)` yields each chunk as soon as it is
clean; `generate(...)` collects them. Per call of the plan (`schedule.plan_chunk_calls`):

1. the call's window: live latents of its chunks (a finished chunk in front at `clean_t` at the first
   step of a stage), prefix frames written in, one noise level per chunk;
2. the guidance passes (`Guidance`): base models 3 (context + text, context without text, each
   chunk alone without text), combined per chunk with the scales of its noise level; distilled
   models 1 (plus, when the oldest chunk is nearly clean, that chunk alone, mixed 0.7 / 0.3);
3. Euler on velocity for the denoising chunks, `x += v * (t[k + 1] - t[k])`; a chunk that reaches
   t = 1 is yielded (its prefix frames cut).

**KV cache of clean chunks.** The pass that upstream lets write its cache (the text-free context
pass of a 3-pass model, the single pass of a 1-pass one) captures the post-RoPE K/V of the finished
chunk it runs at `clean_t` (and of the whole prefix chunks, once, before the walk); later calls pass
those of the chunks their queries reach as the model's `kv_cache`. Upstream keeps a buffer for
the whole video; here a chunk's K/V are dropped after the last call that reads it
(`ChunkPlan.last_read`), so the cache holds at most `ChunkPlan.cache_reach` chunks plus the one
just captured. The reach: a query chunk at schedule index k sees
`noise2clean_kvrange[k // (N / len(noise2clean_kvrange))]` chunks counting itself (a clean chunk
`clean_chunk_kvrange`); with the defaults ([5, 4, 3, 2], window 4) the window's chunks, 1 to 4
stages old, see 5, 4, 3, 2 chunks, i.e. all reach back to exactly the one clean chunk before the
window (the oldest alone, in the last stages, too): one cached chunk per video, whatever its length
(`cache_reach` = 1; window 2 gives 2, an empty range list = everything, as upstream).
Live latents are likewise the window plus the last finished chunk: memory is flat in video length
when noise is drawn per chunk (`noise` given as generators, or as a function of the chunk index).

**Pausing and resuming a walk.** `MagiPipeline.walk(...)` returns the walk itself (`MagiWalk`):
`run(start_call)` yields the chunks, `requests` may be replaced between two yields (the jobs give
every segment its own accelerator request), `snapshot()` taken right after a yield is everything the
rest of the walk reads (`WalkState`: next call, the live latents still in use, the cached K/V still
read; bounded like the walk itself) and `restore(state)` + `run(state.next_call)` on a fresh walk
of the same inputs continues it exactly, provided the noise is a function of the chunk index.

**Batch.** B videos of one shape and schedule run in one forward per pass, each with its own noise,
captions and prefix (every per-video quantity stays per row: the model attends per row).

**Acceleration.** With an accelerator every model call runs inside
`with accel.call(CallContext(...))` (a list of contexts, one per video, when B > 1): branch
"cond" (text pass), "context" (text-free context pass, 3-pass models), "uncond" (chunks alone),
"solo" (the nearly-clean chunk alone, 1-pass models), "prefix" (the prefix K/V pass); `step` is
the call index, chunk noise level `sigma = 1 - t`, `chunk_offset` the call's first chunk.

Deliberate differences from upstream (same math): the uncond pass runs the denoising chunks as
one window whose chunks attend only to themselves, at their absolute RoPE positions (upstream: one
batch item per chunk at positions from 0; RoPE is relative, so attention within a chunk is the
same up to float rounding); the nearly-clean chunk's context-free copy is its own model call, at
its own position (upstream: appended to the window, after it); the extra clean chunk's null
caption and mask are its own chunk's (upstream: chunk 0's caption, chunk 1's mask, identical rows).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipelines.magi1.model import distill_dt_factor
from pipelines.magi1.schedule import ChunkCall, ChunkPlan, ChunkSchedule, plan_chunk_calls

__all__ = ["Caption", "CallRecord", "ChunkOutput", "Guidance", "MagiPipeline", "MagiResult", "MagiWalk",
           "SampleArgs", "WalkState", "noise_generators"]

NULL_CAPTION_TOKENS = 50          # upstream: the null caption's first 50 tokens are valid

NoiseSource = Tensor | Sequence[Tensor] | Sequence[torch.Generator] | Callable[[int], Tensor]
KV = dict[int, tuple[Tensor, Tensor]]     # layer -> (k, v) [B, tokens, G, head_dim]


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (upstream runtime_config names). Defaults: the base models'."""

    cfg_number: int = 3                                    # 3 = base models, 1 = distilled
    cfg_t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    nearly_clean_context_scale: float = 0.7   # 1-pass: weight of the in-context output (env prev_chunks_scale)

    def __post_init__(self) -> None:
        for name in ("cfg_t_range", "prev_chunk_scales", "text_scales"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.cfg_number not in (1, 3):
            raise ValueError(f"cfg_number must be 3 (base models: text, context and uncond passes) or 1 "
                             f"(distilled models); got {self.cfg_number!r}")
        n = len(self.cfg_t_range)
        if n == 0 or len(self.prev_chunk_scales) != n or len(self.text_scales) != n:
            raise ValueError(f"cfg_t_range, prev_chunk_scales and text_scales need one entry per t interval; "
                             f"got {n}, {len(self.prev_chunk_scales)}, {len(self.text_scales)} "
                             f"(defaults: [0, 0.0217, 0.1, 0.3, 0.999], [1.5, 1.5, 1.5, 1, 1], [7.5, 7.5, 7.5, 0, 0])")
        if list(self.cfg_t_range) != sorted(self.cfg_t_range) or self.cfg_t_range[0] > 0:
            raise ValueError(f"cfg_t_range must be increasing and start at 0 (every t in [0, 1] needs an "
                             f"interval); got {list(self.cfg_t_range)}")

    @classmethod
    def from_config(cls, runtime: dict, prev_chunks_scale: float = 0.7) -> Guidance:
        """From upstream's runtime_config dict."""
        defaults = cls()
        return cls(cfg_number=int(runtime.get("cfg_number", 3)),
                   cfg_t_range=tuple(runtime.get("cfg_t_range", defaults.cfg_t_range)),
                   prev_chunk_scales=tuple(runtime.get("prev_chunk_scales", defaults.prev_chunk_scales)),
                   text_scales=tuple(runtime.get("text_scales", defaults.text_scales)),
                   nearly_clean_context_scale=prev_chunks_scale)

    def scales(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(context scale p, text scale s) float32 [n] for noise levels t [n] (upstream
        `get_cfg_scale`: the interval of cfg_t_range holding t, boundaries moved down by 1e-7)."""
        bounds = torch.tensor(self.cfg_t_range, dtype=torch.float32) - 1e-7
        index = torch.searchsorted(bounds, t.to(torch.float32).cpu()) - 1
        if int(index.min()) < 0:
            raise ValueError(f"noise level(s) {t.tolist()} fall below cfg_t_range {list(self.cfg_t_range)}")
        index = index.clamp(max=len(self.cfg_t_range) - 1)
        return (torch.tensor(self.prev_chunk_scales, dtype=torch.float32)[index],
                torch.tensor(self.text_scales, dtype=torch.float32)[index])


@dataclass(frozen=True)
class SampleArgs:
    """Everything that decides a walk besides its inputs."""

    schedule: ChunkSchedule = field(default_factory=ChunkSchedule)
    guidance: Guidance = field(default_factory=Guidance)
    distill: bool = False           # engine_config.distill: the model gets the shortcut step-size embedding

    @classmethod
    def from_configs(cls, runtime: dict, engine: dict | None = None, t_schedule_config: dict | None = None,
                     prev_chunks_scale: float = 0.7) -> SampleArgs:
        """From upstream's runtime_config / engine_config dicts."""
        engine = engine or {}
        return cls(schedule=ChunkSchedule.from_configs(runtime, engine, t_schedule_config),
                   guidance=Guidance.from_config(runtime, prev_chunks_scale),
                   distill=bool(engine.get("distill", False)))


@dataclass(frozen=True)
class Caption:
    """One video's caption embedding: shared by every chunk ([L, C], [L]) or one per absolute chunk
    ([chunks, L, C], [chunks, L]; prefix chunks included, their rows unused). mask: 1 = valid.
    `chunk_rows` [chunks] (optional) picks each chunk's row of a [rows, L, C] y: per-chunk captions
    with few distinct rows (upstream's duration tokens) in memory flat in the video's length."""

    y: Tensor
    mask: Tensor
    chunk_rows: Tensor | None = None

    def __post_init__(self) -> None:
        if self.y.dim() not in (2, 3):
            raise ValueError(f"caption y must be [L, C] (every chunk) or [chunks, L, C]; got {tuple(self.y.shape)}")
        if tuple(self.mask.shape) != tuple(self.y.shape[:-1]):
            raise ValueError(f"caption mask must be {list(self.y.shape[:-1])} (one entry per token of y "
                             f"{tuple(self.y.shape)}); got {tuple(self.mask.shape)}")
        if self.chunk_rows is not None:
            rows = self.chunk_rows
            if self.y.dim() != 3 or rows.dim() != 1 or rows.dtype != torch.long or \
                    (rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < self.y.shape[0]):
                raise ValueError(f"chunk_rows must be a LongTensor [chunks] of rows of y [rows, L, C]; got "
                                 f"{rows.dtype} {tuple(rows.shape)} for y {tuple(self.y.shape)}")

    @property
    def per_chunk(self) -> bool:
        return self.y.dim() == 3

    @property
    def num_chunk_rows(self) -> int:
        """Chunks this caption has a row for (per-chunk captions)."""
        return self.y.shape[0] if self.chunk_rows is None else self.chunk_rows.numel()

    def rows(self, chunks: Sequence[int]) -> tuple[Tensor, Tensor]:
        """([n, L, C], [n, L]) for absolute chunks."""
        if not self.per_chunk:
            n = len(chunks)
            return self.y.unsqueeze(0).expand(n, *self.y.shape), self.mask.unsqueeze(0).expand(n, *self.mask.shape)
        index = torch.tensor(list(chunks), dtype=torch.long)
        if self.chunk_rows is not None:
            index = self.chunk_rows[index]
        return self.y[index], self.mask[index]


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class ChunkOutput:
    """A chunk as the walk yields it: `index` counts generated chunks (0 = first after the prefix)."""

    index: int
    chunk: int                  # absolute chunk index (prefix chunks included)
    latents: Tensor             # [B, C, f, H, W] (prefix frames cut)


@dataclass(frozen=True)
class CallRecord:
    """One call of the walk, as handed to `on_call` (the golden `trace.*` per call)."""

    call: ChunkCall
    model_input: Tensor          # [B, C, T, H, W] after prefix padding
    output: Tensor | None        # [B, C, T, H, W] upstream dispatcher output: guided velocity of the
                                 # denoising chunks, the input latents in the extra clean chunk's frames
                                 # (None for a prefix pass that ran only its cache-writing pass)
    model_calls: int
    cached_chunks: int           # chunks whose K/V the pipeline holds after the call
    seconds: float


@dataclass
class MagiResult:
    latents: Tensor                           # [B, C, F, H, W] generated frames (prefix cut)
    chunks: list[ChunkOutput]
    plan: ChunkPlan
    model_calls: int = 0
    max_cached_chunks: int = 0                # most chunks of K/V held at once
    max_live_chunks: int = 0                  # most chunks of latents held at once
    seconds: float = 0.0


@dataclass
class WalkState:
    """What the rest of a walk reads after the call `next_call - 1` (`MagiWalk.snapshot`): the live
    latents of the chunks later calls still use ([B, C, cw, H, W] each) and the cached K/V of the
    chunks later calls still read ({layer: (k, v)} each, [B, tokens, G, head_dim])."""

    next_call: int
    live: dict[int, Tensor]
    cache: dict[int, KV]

    def to_tensors(self, prefix: str = "walk/") -> dict[str, Tensor]:
        """Flat named tensors (references, on their device: a checkpoint copies them when it writes;
        `from_tensors` inverts it)."""
        out = {f"{prefix}live/{c}": t for c, t in self.live.items()}
        for c, layers in self.cache.items():
            for layer, (k, v) in layers.items():
                out[f"{prefix}cache/{c}/{layer}/k"], out[f"{prefix}cache/{c}/{layer}/v"] = k, v
        return {name: t.detach() for name, t in out.items()}

    @classmethod
    def from_tensors(cls, next_call: int, tensors: dict[str, Tensor], prefix: str = "walk/",
                     device: str | torch.device = "cpu") -> WalkState:
        live: dict[int, Tensor] = {}
        cache: dict[int, dict[int, list[Tensor | None]]] = {}
        for name, tensor in tensors.items():
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            if parts[0] == "live":
                live[int(parts[1])] = tensor.to(device)
            elif parts[0] == "cache":
                slot = cache.setdefault(int(parts[1]), {}).setdefault(int(parts[2]), [None, None])
                slot[0 if parts[3] == "k" else 1] = tensor.to(device)
        kv = {c: {layer: (k, v) for layer, (k, v) in layers.items()} for c, layers in cache.items()}
        return cls(next_call=next_call, live=live, cache=kv)


def noise_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per video; the pipeline draws each chunk's noise from it when the chunk starts."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


# --------------------------------------------------------------------------------------------
# the pipeline


class MagiPipeline:
    """Chunk-wise AR sampling for a `MagiDiT` (or any model with its call signature)."""

    def __init__(self, model: Any, accel: Any = None, *, full_prefix_guidance: bool = False) -> None:
        """`full_prefix_guidance`: run every guidance pass of the prefix K/V call (upstream does;
        only its cache-writing pass matters) so that `on_call` sees its guided output."""
        self.model = model
        self.accel = accel
        self.full_prefix_guidance = full_prefix_guidance

    # -- public ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, noise: NoiseSource, captions: Caption | Sequence[Caption], args: SampleArgs, **kwargs: Any
                 ) -> MagiResult:
        """Run the whole walk; the chunks concatenated in `latents`. Arguments as `stream`."""
        started = time.perf_counter()
        stats: dict[str, int] = {}
        chunks = list(self.stream(noise, captions, args, stats=stats, **kwargs))
        latents = torch.cat([c.latents for c in chunks], dim=2)
        return MagiResult(latents=latents, chunks=chunks, plan=stats.pop("plan"),  # type: ignore[arg-type]
                          model_calls=stats["model_calls"], max_cached_chunks=stats["max_cached_chunks"],
                          max_live_chunks=stats["max_live_chunks"], seconds=time.perf_counter() - started)

    def stream(self, noise: NoiseSource, captions: Caption | Sequence[Caption], args: SampleArgs, *,
               num_chunks: int | None = None, latent_shape: tuple[int, int, int] | None = None,
               prefix: Tensor | Sequence[Tensor] | None = None,
               null_captions: Caption | Sequence[Caption] | None = None,
               request_ids: Sequence[str] | None = None,
               on_call: Callable[[CallRecord], None] | None = None,
               stats: dict | None = None) -> Iterator[ChunkOutput]:
        """Yield each chunk of B videos as soon as it is clean.

        noise: [B, C, chunks*chunk_width, H, W] (prefix chunks included, as upstream's latent), one
            [C, frames, H, W] per video, one `torch.Generator` per video (each chunk's noise is
            drawn from it when the chunk starts: memory flat in length; give `num_chunks` and
            `latent_shape`), or a function `chunk -> [B, C, chunk_width, H, W]` (absolute chunk
            index; named per-chunk draws: a walk resumed from a snapshot needs no generator state;
            give `num_chunks`, `latent_shape` and, for B > 1, `request_ids`).
        captions: one `Caption` per video (or one for B = 1).
        num_chunks: chunks of the video, prefix included (needed with generators; else from noise).
        latent_shape: (C, H, W) of the latents (needed with generators).
        prefix: clean prefix latents [B, C, P, H, W] or one [C, P, H, W] per video (v2v / i2v).
        null_captions: the text-free caption (default: the model's null_caption_embedding, first 50
            tokens valid).
        request_ids: accelerator request per video (default "magi1/<b>").
        """
        walk = _Walk(self, noise, captions, args, num_chunks, prefix, null_captions, request_ids, on_call,
                     latent_shape)                    # every input is checked here, before any model call
        if stats is not None:
            stats["plan"] = walk.plan
        return _iterate(walk, stats)

    def walk(self, noise: NoiseSource, captions: Caption | Sequence[Caption], args: SampleArgs, *,
             num_chunks: int | None = None, latent_shape: tuple[int, int, int] | None = None,
             prefix: Tensor | Sequence[Tensor] | None = None,
             null_captions: Caption | Sequence[Caption] | None = None,
             request_ids: Sequence[str] | None = None,
             on_call: Callable[[CallRecord], None] | None = None) -> MagiWalk:
        """The walk itself, to run in pieces (`MagiWalk.run(start_call)`, `snapshot`, `restore`);
        arguments as `stream`. Call `end()` when done with it."""
        return _Walk(self, noise, captions, args, num_chunks, prefix, null_captions, request_ids, on_call,
                     latent_shape)


@torch.no_grad()
def _iterate(walk: _Walk, stats: dict | None) -> Iterator[ChunkOutput]:
    try:
        yield from walk.run()
    finally:
        if stats is not None:
            stats.update(model_calls=walk.model_calls, max_cached_chunks=walk.max_cached,
                         max_live_chunks=walk.max_live)
        walk.end()


class _Walk:
    """The state of one walk over B videos: live latents, K/V cache, counters."""

    def __init__(self, pipe: MagiPipeline, noise: NoiseSource, captions: Caption | Sequence[Caption],
                 args: SampleArgs, num_chunks: int | None, prefix: Tensor | Sequence[Tensor] | None,
                 null_captions: Caption | Sequence[Caption] | None, request_ids: Sequence[str] | None,
                 on_call: Callable[[CallRecord], None] | None,
                 latent_shape: tuple[int, int, int] | None = None) -> None:
        self.pipe, self.model, self.accel, self.args = pipe, pipe.model, pipe.accel, args
        self.on_call = on_call
        cfg = self.model.config
        width = args.schedule.chunk_width
        # 1. noise source, batch size, latent geometry
        self.generators: list[torch.Generator] | None = None
        self.noise_fn: Callable[[int], Tensor] | None = None
        if callable(noise) and not isinstance(noise, Tensor):
            self.noise_fn, self.noise = noise, None
        elif isinstance(noise, Tensor):
            if noise.dim() != 5:
                raise ValueError(f"noise must be [B, C, frames, H, W] (or one [C, frames, H, W] per video, or "
                                 f"one torch.Generator per video); got {tuple(noise.shape)}")
            self.noise: Tensor | None = noise
        else:
            items = list(noise)
            if not items:
                raise ValueError("noise is empty: give [B, C, frames, H, W], tensors or generators, one per video")
            if all(isinstance(n, torch.Generator) for n in items):
                self.generators, self.noise = items, None
            elif all(isinstance(n, Tensor) and n.dim() == 4 for n in items):
                if len({tuple(n.shape) for n in items}) != 1:
                    raise ValueError(f"a batch needs noise of one shape; got {[tuple(n.shape) for n in items]}")
                self.noise = torch.stack(items)
            else:
                raise ValueError("noise must be one tensor [B, C, frames, H, W], one [C, frames, H, W] per video, "
                                 "or one torch.Generator per video")
        self.captions = [captions] if isinstance(captions, Caption) else list(captions)
        if self.noise_fn is not None:
            self.batch = len(self.captions)
        else:
            self.batch = len(self.generators) if self.generators is not None else self.noise.shape[0]
        if len(self.captions) != self.batch:
            raise ValueError(f"{len(self.captions)} captions for {self.batch} videos: give one Caption per video")
        self.prefix = _stack_prefix(prefix, self.batch)
        if self.noise is not None:
            channels, frames, height, w_ = self.noise.shape[1:]
            if frames % width:
                raise ValueError(f"noise has {frames} latent frames, not whole chunks of {width}; upstream's latent "
                                 f"is ceil((frames // 4 + prefix) / {width}) chunks")
            if num_chunks is not None and num_chunks != frames // width:
                raise ValueError(f"num_chunks {num_chunks} does not match noise of {frames} frames "
                                 f"({frames // width} chunks)")
            if latent_shape is not None and tuple(latent_shape) != (channels, height, w_):
                raise ValueError(f"latent_shape {tuple(latent_shape)} does not match noise {tuple(self.noise.shape)}")
            num_chunks = frames // width
            self.shape = (channels, height, w_)
            self.device = self.noise.device
        else:
            if num_chunks is None or latent_shape is None:
                raise ValueError("noise from generators or a function needs num_chunks (prefix chunks included) "
                                 "and latent_shape (C, H, W)")
            self.shape = tuple(int(v) for v in latent_shape)
            self.device = _model_device(self.model)
        self.plan = plan_chunk_calls(num_chunks, args.schedule, 0 if self.prefix is None else self.prefix.shape[2])
        # 2. text: per-video captions and null captions, checked against the model
        nulls = null_captions if null_captions is not None else self._default_null()
        self.nulls = [nulls] * self.batch if isinstance(nulls, Caption) else list(nulls)
        if len(self.nulls) != self.batch:
            raise ValueError(f"{len(self.nulls)} null captions for {self.batch} videos")
        for name, caps in (("caption", self.captions), ("null caption", self.nulls)):
            for b, cap in enumerate(caps):
                if cap.y.shape[-1] != cfg.caption_channels:
                    raise ValueError(f"{name} {b} has {cap.y.shape[-1]} channels; the model takes "
                                     f"caption_channels={cfg.caption_channels}")
                if cap.per_chunk and cap.num_chunk_rows < num_chunks:
                    raise ValueError(f"{name} {b} has {cap.num_chunk_rows} per-chunk rows for {num_chunks} chunks")
        lengths = {c.y.shape[-2] for c in self.captions + self.nulls}
        if len(lengths) != 1:
            raise ValueError(f"captions and null captions of one batch need one token length; got {sorted(lengths)}")
        # 3. geometry checks
        channels, height, w_ = self.shape
        if channels != cfg.latent_channels:
            raise ValueError(f"latents have {channels} channels; the model takes {cfg.latent_channels}")
        _, ph, pw = cfg.patch
        if height % ph or w_ % pw:
            raise ValueError(f"latent size {height}x{w_} must be a multiple of the patch {ph}x{pw} "
                             f"(video size a multiple of 16 pixels)")
        if self.prefix is not None and (self.prefix.shape[1], *self.prefix.shape[3:]) != self.shape:
            raise ValueError(f"prefix {tuple(self.prefix.shape)} must match the latents' channels and size "
                             f"{self.shape}")
        self.tokens = width * (height // ph) * (w_ // pw)
        self.requests = list(request_ids) if request_ids is not None else [f"magi1/{b}" for b in range(self.batch)]
        if len(self.requests) != self.batch or len(set(self.requests)) != self.batch:
            raise ValueError(f"request_ids needs {self.batch} distinct ids; got {self.requests}")
        # 4. state
        self.live: dict[int, Tensor] = {}            # chunk -> [B, C, cw, H, W]
        self.cache: dict[int, KV] = {}               # chunk -> layer -> (k, v)
        self.last_read = self.plan.last_read()
        self.last_use = _last_use(self.plan)
        self.t_grid = self.plan.t.to(self.device)    # float32 [N + 1]
        self.model_calls = 0
        self.max_cached = 0
        self.max_live = 0
        self.position = -1                           # index of the last call run

    def _default_null(self) -> Caption:
        emb = self.model.y_embedder.null_caption_embedding.detach()
        mask = torch.zeros(emb.shape[0])
        mask[:NULL_CAPTION_TOKENS] = 1
        return Caption(emb, mask)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, start_call: int = 0) -> Iterator[ChunkOutput]:
        """Yield each chunk as it becomes clean, running the plan's calls from `start_call` on (a
        walk resumed with `restore` starts at its state's `next_call`)."""
        schedule = self.args.schedule
        for call in self.plan.calls[start_call:]:
            started = time.perf_counter()
            self.position = call.index
            # 1. the call's window
            for chunk in call.chunks:
                if chunk not in self.live and not call.prefix_pass:
                    self.live[chunk] = self._initial(chunk)
            x = self._window(call)                                              # [B, C, T, H, W]
            t = torch.tensor(call.t, dtype=torch.float32, device=self.device)   # [R]
            # 2. guidance passes -> velocity of the denoising chunks (and the cache write)
            calls_before = self.model_calls
            velocity, record_out = self._dispatch(call, x, t)
            # 3. Euler step of the denoising chunks
            lead = 1 if call.extra_clean else 0
            if call.denoising:
                width = schedule.chunk_width
                t_next = torch.tensor(call.t_next, dtype=torch.float32, device=self.device)
                dt = (t_next - self.t_grid[list(call.t_index[lead:])]).view(1, 1, -1, 1, 1, 1)
                x_den = x[:, :, lead * width:]
                b, c, f, h, w = x_den.shape
                stepped = (x_den.reshape(b, c, -1, width, h, w) + velocity.reshape(b, c, -1, width, h, w) * dt
                           ).reshape(b, c, f, h, w)
                for j, chunk in enumerate(call.denoising):
                    self.live[chunk] = stepped[:, :, j * width:(j + 1) * width].clone()
            self.max_cached = max(self.max_cached, len(self.cache))      # peak: after capture, before release
            self._release(call)
            if self.on_call is not None:
                self.on_call(CallRecord(call=call, model_input=x, output=record_out,
                                        model_calls=self.model_calls - calls_before,
                                        cached_chunks=len(self.cache), seconds=time.perf_counter() - started))
            # 4. a finished chunk is yielded at once
            if call.finished is not None:
                start, end = self.plan.yield_span(call.finished)
                base = call.finished * schedule.chunk_width
                latents = self.live[call.finished][:, :, start - base:end - base]
                yield ChunkOutput(index=call.finished - self.plan.chunk_offset, chunk=call.finished, latents=latents)
            for chunk in [c for c in self.live if self.last_use.get(c, -1) <= call.index]:
                del self.live[chunk]

    def snapshot(self) -> WalkState:
        """Everything the calls after `position` read (take it right after a yield): the live
        latents still used and the cached K/V still read. References, not copies: the walk never
        writes into them, it replaces them."""
        after = self.position
        live = {c: x for c, x in self.live.items() if self.last_use.get(c, -1) > after}
        cache = {c: kv for c, kv in self.cache.items() if self.last_read.get(c, -1) > after}
        return WalkState(next_call=after + 1, live=live, cache=cache)

    def restore(self, state: WalkState) -> None:
        """Continue a walk of the same inputs from a snapshot: `run(state.next_call)` next."""
        if not 0 <= state.next_call <= len(self.plan.calls):
            raise ValueError(f"walk state resumes at call {state.next_call}; this walk has "
                             f"{len(self.plan.calls)} calls (another schedule or length)")
        expected = self.shape[0], self.args.schedule.chunk_width, *self.shape[1:]
        for chunk, x in state.live.items():
            if tuple(x.shape) != (self.batch, *expected):
                raise ValueError(f"walk state: chunk {chunk} has latents {tuple(x.shape)}, this walk makes "
                                 f"{(self.batch, *expected)}")
        self.live = {c: x.to(self.device, torch.float32) for c, x in state.live.items()}
        self.cache = {c: {layer: (k.to(self.device), v.to(self.device)) for layer, (k, v) in kv.items()}
                      for c, kv in state.cache.items()}
        self.position = state.next_call - 1

    def end(self) -> None:
        """Drop everything of the walk (and its accelerator state)."""
        self.live.clear()
        self.cache.clear()
        if self.accel is not None and hasattr(self.accel, "end_request"):
            for request in self.requests:
                self.accel.end_request(request)

    # -- pieces ---------------------------------------------------------------------------------

    def _initial(self, chunk: int) -> Tensor:
        """Starting noise of a chunk [B, C, cw, H, W]."""
        width = self.args.schedule.chunk_width
        if self.noise is not None:
            return self.noise[:, :, chunk * width:(chunk + 1) * width].to(torch.float32).clone()
        c, h, w = self.shape
        if self.noise_fn is not None:
            x = self.noise_fn(chunk)
            if tuple(x.shape) != (self.batch, c, width, h, w):
                raise ValueError(f"the noise function gave {tuple(x.shape)} for chunk {chunk}; the walk needs "
                                 f"{(self.batch, c, width, h, w)}")
            return x.to(self.device, torch.float32)
        draws = [torch.randn((c, width, h, w), generator=g, device=g.device, dtype=torch.float32)
                 for g in self.generators]
        return torch.stack(draws).to(self.device)

    def _window(self, call: ChunkCall) -> Tensor:
        """The call's input [B, C, R*cw, H, W]: live latents (the prefix pass: the prefix), prefix
        frames written in."""
        width = self.args.schedule.chunk_width
        if call.prefix_pass:
            return self.prefix[:, :, :call.num_chunks * width].to(torch.float32).clone()
        self.max_live = max(self.max_live, len(self.live))
        x = torch.cat([self.live[c] for c in call.chunks], dim=2).clone()
        first, count = call.prefix_pad
        if count:
            x[:, :, :count] = self.prefix[:, :, first:first + count].to(x)
        return x

    def _dispatch(self, call: ChunkCall, x: Tensor, t: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Run the guidance passes of one call; return (guided velocity of the denoising chunks,
        the dispatcher output for the trace)."""
        guidance = self.args.guidance
        width = self.args.schedule.chunk_width
        lead = 1 if call.extra_clean else 0
        chunks = list(call.chunks)
        cond_y, cond_mask = self._text(chunks, lead, text=not call.prefix_pass)
        null_y, null_mask = self._text(chunks, len(chunks), text=False)
        capture = self._capture_range(call)
        if call.prefix_pass and not self.pipe.full_prefix_guidance:
            if guidance.cfg_number == 3:
                self._forward(call, "prefix", x, t, null_y, null_mask, dropped=True, capture=capture)
                return None, None
            out = self._forward(call, "prefix", x, t, cond_y, cond_mask, dropped=False, capture=capture)
            return None, out
        if guidance.cfg_number == 3:
            text = self._forward(call, "cond", x, t, cond_y, cond_mask, dropped=False)
            context = self._forward(call, "context", x, t, null_y, null_mask, dropped=True, capture=capture)
            den = slice(lead, None)
            alone = self._forward_alone(call, "uncond", x[:, :, lead * width:], t[den], null_y[:, den],
                                        null_mask[:, den], chunks[lead:], dropped=True)
            p, s = guidance.scales(t[den])
            p = p.to(x.device).repeat_interleave(width).view(1, 1, -1, 1, 1)
            s = s.to(x.device).repeat_interleave(width).view(1, 1, -1, 1, 1)
            velocity = (1 - p) * alone + (p - s) * context[:, :, lead * width:] + s * text[:, :, lead * width:]
        else:
            out = self._forward(call, "cond", x, t, cond_y, cond_mask, dropped=False, capture=capture)
            velocity = out[:, :, lead * width:]
            if call.nearly_clean and not call.prefix_pass:
                j = slice(lead, lead + 1)
                solo = self._forward_alone(call, "solo", x[:, :, lead * width:(lead + 1) * width], t[j],
                                           cond_y[:, j], cond_mask[:, j], chunks[lead:lead + 1], dropped=False)
                scale = guidance.nearly_clean_context_scale
                velocity = velocity.clone()
                velocity[:, :, :width] = velocity[:, :, :width] * scale + solo * (1 - scale)
                # upstream's dispatcher then returns the extra clean chunk's model output, not its input
                return velocity, torch.cat([out[:, :, :lead * width], velocity], dim=2)
        record = torch.cat([x[:, :, :lead * width], velocity], dim=2)
        return (None if call.prefix_pass else velocity), record

    def _text(self, chunks: list[int], lead: int, text: bool) -> tuple[Tensor, Tensor]:
        """Caption rows [B, R, L, C], masks [B, R, L]: the null caption for the first `lead` chunks
        (or every chunk when not `text`), the video's caption for the others."""
        ys, masks = [], []
        for caption, null in zip(self.captions, self.nulls):
            ny, nm = null.rows(chunks)
            if text and lead < len(chunks):
                cy, cm = caption.rows(chunks[lead:])
                ny, nm = torch.cat([ny[:lead], cy.to(ny)]), torch.cat([nm[:lead], cm.to(nm)])
            ys.append(ny.to(torch.float32))
            masks.append(nm.to(torch.float32))
        return torch.stack(ys).to(self.device), torch.stack(masks).to(self.device)

    def _capture_range(self, call: ChunkCall) -> tuple[int, int] | None:
        """Chunks of this call (positions in it) whose K/V later calls read from the cache."""
        if call.extra_clean:
            return (0, 1) if call.chunks[0] in self.last_read else None
        if call.prefix_pass:
            needed = [j for j, c in enumerate(call.chunks) if c in self.last_read]
            return (min(needed), max(needed) + 1) if needed else None
        return None

    def _cache_view(self, call: ChunkCall) -> tuple[KV | None, int]:
        """(K/V of the cached chunks the call reads, concatenated; first cached chunk)."""
        cached = call.cached_chunks
        if not cached:
            return None, call.slice_point
        missing = [c for c in cached if c not in self.cache]
        if missing:
            raise RuntimeError(f"call {call.index} reads chunks {missing} that are not cached (internal error)")
        entries = [self.cache[c] for c in cached]
        if len(entries) == 1:
            return entries[0], cached[0]
        view = {layer: (torch.cat([e[layer][0] for e in entries], dim=1),
                        torch.cat([e[layer][1] for e in entries], dim=1)) for layer in entries[0]}
        return view, cached[0]

    def _forward(self, call: ChunkCall, branch: str, x: Tensor, t: Tensor, y: Tensor, mask: Tensor, *,
                 dropped: bool, capture: tuple[int, int] | None = None) -> Tensor:
        """One pass over the whole call window, with the cache; files captured K/V by chunk."""
        kv_cache, first = self._cache_view(call)
        ranges = [[(s - first) * self.tokens, (c + 1 - first) * self.tokens]
                  for s, c in zip(call.kv_start, call.chunks)]
        kv_range = torch.tensor(ranges, dtype=torch.long, device=self.device)
        store: KV | None = {} if capture is not None else None
        out = self._model(branch, call, list(call.chunks), call.active, x, t, y, mask, dropped, kv_range,
                          call.slice_point, kv_cache, store, capture)
        if store is not None:
            a, b = capture
            for j in range(b - a):
                rows = slice(j * self.tokens, (j + 1) * self.tokens)
                # copies: a view would keep the whole call's K/V alive
                self.cache[call.chunks[a + j]] = {layer: (k[:, rows].clone(), v[:, rows].clone())
                                                  for layer, (k, v) in store.items()}
        return out

    def _forward_alone(self, call: ChunkCall, branch: str, x: Tensor, t: Tensor, y: Tensor, mask: Tensor,
                       chunks: list[int], *, dropped: bool) -> Tensor:
        """One pass where each chunk attends only to itself, no cache (upstream: each chunk its own item)."""
        kv_range = torch.tensor([[j * self.tokens, (j + 1) * self.tokens] for j in range(len(chunks))],
                                dtype=torch.long, device=self.device)
        active = (not call.prefix_pass,) * len(chunks)
        return self._model(branch, call, chunks, active, x, t, y, mask, dropped, kv_range, chunks[0], None, None,
                           None)

    def _model(self, branch: str, call: ChunkCall, chunks: list[int], active: Sequence[bool], x: Tensor, t: Tensor,
               y: Tensor, mask: Tensor, dropped: bool, kv_range: Tensor, slice_point: int, kv_cache: KV | None,
               capture_store: KV | None, capture: tuple[int, int] | None) -> Tensor:
        """One model call, described to the accelerator."""
        b, r = self.batch, len(chunks)
        schedule = self.args.schedule
        distill_dt = None
        if self.args.distill:
            distill_dt = distill_dt_factor(schedule.num_steps, call.distill_interval)
        kwargs = dict(slice_point=slice_point, distill_dt=distill_dt, kv_cache=kv_cache,
                      kv_capture=capture_store, capture_chunks=capture)
        scope = nullcontext()
        if self.accel is not None:
            # chunks whose K/V this pass writes into the cache must run through every block
            required = [capture is not None and capture[0] <= j < capture[1] for j in range(r)]
            scope = self.accel.call(self._contexts(branch, call, chunks, active, required))
        with scope:
            out = self.model(x, t.unsqueeze(0).expand(b, r).contiguous(), y.reshape(b * r, *y.shape[2:]),
                             torch.full((b,), dropped, dtype=torch.bool, device=self.device),
                             mask.reshape(b * r, -1), kv_range, **kwargs)
        self.model_calls += 1
        if out.shape != x.shape:
            raise RuntimeError(f"model returned {tuple(out.shape)} for input {tuple(x.shape)}")
        return out.to(torch.float32)

    def _contexts(self, branch: str, call: ChunkCall, chunks: list[int], active: Sequence[bool],
                  required: Sequence[bool] | None = None) -> Any:
        """`scope.hooks.CallContext` per video for one model call."""
        from scope.hooks import CallContext   # lazy: the pipeline runs without scope

        by_chunk = dict(zip(call.chunks, call.t))
        nxt = dict(zip(call.denoising, call.t_next))
        sigma = [min(1.0, max(0.0, 1.0 - by_chunk[c])) for c in chunks]
        sigma_next = [min(1.0, max(0.0, 1.0 - nxt[c])) if (a and c in nxt) else s
                      for c, a, s in zip(chunks, active, sigma)]
        contexts = [CallContext(request=request, branch=branch, step=call.index,
                                frames_per_chunk=self.args.schedule.chunk_width, chunk_sigma=sigma,
                                chunk_active=list(active), causal=True, chunk_sigma_next=sigma_next,
                                chunk_offset=chunks[0], chunk_required=required)
                    for request in self.requests]
        return contexts[0] if len(contexts) == 1 else contexts

    def _release(self, call: ChunkCall) -> None:
        """Drop cached K/V no later call reads."""
        for chunk in [c for c in self.cache if self.last_read.get(c, -1) <= call.index]:
            del self.cache[chunk]


MagiWalk = _Walk   # the public name of a walk (`MagiPipeline.walk`)


# --------------------------------------------------------------------------------------------
# helpers


def _last_use(plan: ChunkPlan) -> dict[int, int]:
    """Per chunk: index of the last call that has it in its window."""
    last: dict[int, int] = {}
    for call in plan.calls:
        if call.prefix_pass:
            continue
        for chunk in call.chunks:
            last[chunk] = call.index
    return last


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _stack_prefix(prefix: Tensor | Sequence[Tensor] | None, batch: int) -> Tensor | None:
    """The clean prefix [B, C, P, H, W] (None: text-to-video)."""
    if prefix is None:
        return None
    if isinstance(prefix, Tensor):
        if prefix.dim() == 4:
            prefix = prefix.unsqueeze(0)
        if prefix.dim() != 5:
            raise ValueError(f"prefix must be [B, C, P, H, W] or one [C, P, H, W] per video; "
                             f"got {tuple(prefix.shape)}")
        out = prefix
    else:
        items = list(prefix)
        if len({tuple(p.shape) for p in items}) != 1:
            raise ValueError(f"a batch needs prefixes of one shape; got {[tuple(p.shape) for p in items]}")
        out = torch.stack(items)
    if out.shape[0] != batch:
        raise ValueError(f"prefix has {out.shape[0]} videos for a batch of {batch}")
    if out.shape[2] < 1:
        raise ValueError("prefix has no frames; pass None for text-to-video")
    return out
