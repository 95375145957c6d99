"""Where things are in the MAGI-1 DiT, for `scope.hooks.apply_accel` (the Wan table's sibling).

    accel = apply_accel(model, make_config("scope", selective="exact"), MagiStackAdapter())
    with accel.call(CallContext(request="v", branch="cond", step=k, frames_per_chunk=chunk_width,
                                chunk_sigma=[1 - t for t in call_t], chunk_active=..., causal=True,
                                chunk_sigma_next=[1 - t for t in next_t], chunk_offset=first_chunk)):
        velocity = model(x, t, y, caption_dropout_mask, xattn_mask, kv_range, ...)

The hook wraps `MagiDiT.run_blocks(h, inputs, start=0, end=None)` on the instance; the model file
never mentions acceleration. Facts this table encodes (pipelines/magi1/model.py, NOTES_magi1.md):

* **Noise level.** MAGI's `t` runs from 0 = pure noise to 1 = clean; SCOPE's `CallContext` wants
  sigma in [0, 1] with 1 = noise. The pipeline passes `sigma = 1 - t` per chunk (clamped to
  [0, 1]); the extra clean chunk (`t = clean_t = 0.9999`) is at sigma 1e-4, a chunk reaching
  `t = 1` has `sigma_next = 0` (SCOPE's final step).
* **Frames.** A frame is a token frame (`grid[0]` of the call; one latent frame for every released
  model, `t_patch_size = 1`), `tokens_per_frame = h * w`, tokens are frame-major (T H W).
  `frames_per_chunk` of the context is the chunk width (`grid[0] / R`, upstream 6).
* **Attention.** Each chunk's queries see the key range `kv_range` of that (item, chunk) row in
  `[MAGI's clean-chunk cache (M tokens); this call's tokens]`: block-causal (`causal=True`), and the
  uncond pass of 3-pass CFG is block-diagonal (each chunk alone), also causal in SCOPE's sense.
* **Probe** (AdaLN conditioning path): the per-chunk condition `t_emb(t) [+ t_emb(distill_dt)] +
  y_adaln(null-caption token)`, spread per token. MAGI's AdaLN never sees the prompt: every probe
  kind is a function of the chunk's noise level and the pass (caption dropped or not), not of the
  content. Kinds: "condition" (default) [B, N, cond_dim]; "gates" = layer 0's soft-capped AdaLN
  gates tanh(W silu(condition)) [B, N, 2 * hidden] (the nearest thing to Wan's modulated `e0`;
  needs the model, bound by `num_blocks(model)` or the constructor); "h" = the stack input.
  Wan's "e0" / "e" are refused: the published TeaCache polynomials (`pipelines.wan.calibration`)
  were fitted on Wan's probes and there is none for MAGI-1, so TeaCache on MAGI runs with
  `rescale: null` on the "condition" probe (raw relative L1: `accel_defaults("teacache")`) or a
  coefficient list measured on MAGI-1, and its threshold is then in those units (uncalibrated).
  FlowCache's scope defaults are already its MAGI-1 ones (stack-input indicator, 0.015).
* **Selected frames.** `select_frames` keeps whole chunks with their original RoPE rows (absolute
  temporal positions), conditions, captions and key ranges (still in the full call's key
  coordinates); `run_stack` / `run_stack_kv` rebuild the key sequence as [prefix; run chunks],
  the prefix = MAGI's cached clean chunks and the served chunks in the order that keeps every
  block-causal range contiguous (attention sees a set of keys), and re-express each query
  chunk's range in it (the served chunk's key positions are baked in by RoPE). Keys of dropped
  chunks leave the range: the "approx" semantics; a range that cannot stay contiguous raises.
* **K/V entries** (`kv_cache_finished` / `kv_cache_stale`): one entry per captured chunk set,
  `{"chunks": LongTensor [B, c] window chunk indices, "kv": {layer: (k, v) [B, c * n, G, d]}}`,
  post-RoPE like MAGI's own cache, for the layers of the block range that captured it.
* **MAGI's own K/V write** (`kv_capture` / `capture_chunks` of the KV-writing pass) still happens
  when the executor runs a frame subset: the wanted chunks are found in the subset (or filled from
  SCOPE's served entries). A call in which the accelerator runs *nothing* (every active chunk
  reused) or, for FBCache, only block 0, cannot write it: the pipeline must make the KV-writing
  pass's clean chunk run (e.g. run that pass outside `accel.call`); the next accelerated call that
  reads the unfilled cache raises, naming this. Rows of a batched KV-writing pass whose group ran
  nothing are left NaN (loud, not stale).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from pipelines.magi1.model import GATE_SOFTCAP, BlockInputs, MagiDiT, softcap
from scope.hooks import call_original

__all__ = ["ACCEL_DEFAULTS", "MagiStackAdapter", "MagiSubset", "PROBE_KINDS", "accel_defaults"]

PROBE_KINDS = ("condition", "gates", "h")
# What a method runs with on MAGI-1 when the user names only the method (the Wan family's
# counterpart is pipelines.wan.calibration.ACCEL_DEFAULTS): TeaCache has no MAGI polynomial, so
# it compares the raw relative L1 of the AdaLN condition.
ACCEL_DEFAULTS: dict[str, dict[str, Any]] = {"teacache": {"rescale": None, "probe_kind": "condition"}}


def accel_defaults(method: str) -> dict[str, Any]:
    """MAGI-1's per-method config defaults (a copy)."""
    return dict(ACCEL_DEFAULTS.get(method, {}))


KV = dict[int, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class MagiSubset:
    """Some whole chunks of one stack call (what `select_frames` returns; only `run_stack` /
    `run_stack_kv` consume it).

    inputs: the `BlockInputs` of those chunks, `kv_range` still in the FULL call's key coordinates
        ([cache; all R chunks]), no K/V capture of its own;
    chunks: window chunk index (position in the full call) of each chunk of `inputs`;
    store / store_chunks: MAGI's own K/V capture request of the full call (`kv_capture` dict and
        the window chunks of `capture_chunks`), None when the call writes nothing.
    """

    inputs: BlockInputs
    chunks: tuple[int, ...]
    store: dict | None
    store_chunks: tuple[int, ...]


class MagiStackAdapter:
    """`scope.hooks.StackAdapter` for `MagiDiT` (docs/ARCHITECTURE.md 2.2)."""

    stack_method = "run_blocks"

    def __init__(self, model: MagiDiT | None = None) -> None:
        self._model = model
        self._num_blocks = None if model is None else len(model.layers)

    # -- the table -----------------------------------------------------------------------------
    def num_blocks(self, model: MagiDiT) -> int:
        self._model = model
        self._num_blocks = len(model.layers)
        return self._num_blocks

    def split_stack_args(self, h: Tensor, inputs: BlockInputs, start: int = 0,
                         end: int | None = None) -> tuple[Tensor, BlockInputs]:
        _check_cache_filled(inputs, h, self._num_blocks)
        return h, inputs

    def block_range(self, h: Tensor, inputs: BlockInputs, start: int = 0,
                    end: int | None = None) -> tuple[int, int]:
        """The layers a `run_blocks` call covers; `end=None` means through the last layer."""
        if self._num_blocks is None:
            raise RuntimeError("MagiStackAdapter.block_range needs num_blocks(model) first")
        return range(self._num_blocks)[start:end].start, range(self._num_blocks)[start:end].stop

    def tokens_per_frame(self, inputs: BlockInputs | MagiSubset) -> int:
        _, h, w = _base(inputs).grid
        return h * w

    def num_frames(self, inputs: BlockInputs | MagiSubset) -> int:
        return _base(inputs).grid[0]

    def select_frames(self, inputs: BlockInputs | MagiSubset, frames: Tensor) -> MagiSubset:
        """The whole chunks covering `frames` (positions on this input's frame axis, ascending,
        whole chunks only), with their original RoPE positions, conditions, captions, key ranges."""
        sub = _as_subset(inputs)
        base = sub.inputs
        fpc, R = base.frames_per_chunk, base.num_chunks
        wanted = [int(f) for f in frames.flatten().tolist()]
        pos = sorted({f // fpc for f in wanted})
        whole = [p * fpc + i for p in pos for i in range(fpc)]
        if wanted != whole or not pos or pos[-1] >= R:
            raise ValueError(f"MAGI-1 runs whole chunks: frames must be ascending whole chunks of {fpc} "
                             f"frames within {R} chunks; got {wanted}")
        return replace(sub, inputs=_take_chunks(base, pos), chunks=tuple(sub.chunks[p] for p in pos))

    def select_rows(self, inputs: BlockInputs, rows: Tensor) -> BlockInputs:
        """The stack inputs of some batch rows (one CallContext per row); MAGI's own K/V capture
        of those rows lands in its rows of the full-batch capture tensors."""
        if isinstance(inputs, MagiSubset):
            raise TypeError("select_rows takes the full call's BlockInputs (rows before frames)")
        rows = rows.to(inputs.condition.device).long()
        batch, R = inputs.condition.shape[:2]
        per_chunk = (rows[:, None] * R + torch.arange(R, device=rows.device)).flatten()
        kv_range = inputs.kv_range
        kv_range = kv_range[per_chunk.to(kv_range.device)] if kv_range.shape[0] == batch * R else kv_range
        cache = None
        if inputs.kv_cache is not None:
            cache = {layer: (k[rows.to(k.device)], v[rows.to(v.device)]) for layer, (k, v) in inputs.kv_cache.items()}
        capture = inputs.kv_capture
        if capture is not None:
            capture = _RowsInto.of(capture, rows, batch)
        return replace(inputs, tokens=inputs.tokens[rows.to(inputs.tokens.device)], condition=inputs.condition[rows],
                       y_xattn=inputs.y_xattn[per_chunk.to(inputs.y_xattn.device)],
                       xattn_mask=inputs.xattn_mask[per_chunk.to(inputs.xattn_mask.device)],
                       kv_range=kv_range, kv_cache=cache, kv_capture=capture)

    def probe(self, inputs: BlockInputs | MagiSubset, h: Tensor, kind: str = "condition") -> Tensor:
        """Indicator source per token [B, N, *] from MAGI's AdaLN path (see the module docstring)."""
        base = _base(inputs)
        if kind in ("condition", "default"):
            return base.per_token(base.condition)
        if kind == "gates":
            if self._model is None:
                raise RuntimeError("probe kind 'gates' needs the model: MagiStackAdapter(model) or "
                                   "num_blocks(model) first")
            gates = softcap(self._model.layers[0].ada_modulate_layer(base.condition), GATE_SOFTCAP)
            return base.per_token(gates)
        if kind == "h":
            return h
        if kind in ("e0", "e"):
            raise ValueError(f"probe kind {kind!r} belongs to Wan's TeaCache polynomials; MAGI-1 has no "
                             f"published rescale polynomial: run teacache on MAGI with rescale=null (probe "
                             f"'condition') or a coefficient list measured on MAGI-1")
        raise ValueError(f"unknown probe kind {kind!r}; the MAGI-1 adapter offers {', '.join(PROBE_KINDS)}")

    def run_stack(self, model: MagiDiT, h: Tensor, inputs: BlockInputs | MagiSubset, start: int,
                  end: int | None) -> Tensor:
        if isinstance(inputs, BlockInputs):
            return call_original(model, self.stack_method, h, inputs, start, end)
        return self.run_stack_kv(model, h, inputs, start, end, [], [])[0]

    def run_stack_kv(self, model: MagiDiT, h: Tensor, inputs: BlockInputs | MagiSubset, start: int,
                     end: int | None, served: Sequence[dict], capture: Sequence[Tensor]) -> tuple[Tensor, list[dict]]:
        """Run layers [start, end) on these chunks; their queries also see the `served` entries
        (this method's earlier captures, same block range), placed at their window positions of
        the key ranges. Returns one entry per `capture` frame set (positions in `inputs`)."""
        sub = _as_subset(inputs)
        base = sub.inputs
        n, fpc = base.tokens_per_chunk, base.frames_per_chunk
        layers = range(len(model.layers))[start:end]
        served_chunks = [c for entry in served for c in _entry_chunks(entry)]
        overlap = set(served_chunks) & set(sub.chunks)
        if overlap or len(set(served_chunks)) != len(served_chunks):
            raise ValueError(f"served K/V of chunks {served_chunks} overlaps itself or the chunks that run "
                             f"{list(sub.chunks)}")
        cache, kv_range = _key_layout(base, sub.chunks, served, served_chunks, layers)

        # what to keep of each layer's (k, v): SCOPE's capture sets and MAGI's own write
        targets: list[tuple[Tensor, dict]] = []
        entries: list[dict] = []
        for frames in capture:
            pos = sorted({int(f) // fpc for f in frames.flatten().tolist()})
            entry = {"chunks": torch.tensor([[sub.chunks[p] for p in pos]] * h.shape[0], device=h.device),
                     "kv": {}}
            targets.append((_token_index(frames, base, h.device), entry["kv"]))
            entries.append(entry)
        from_served = self._store_target(sub, served_chunks, h.device, targets)
        recorder = _Recorder(targets) if targets else None
        run_inputs = replace(base, kv_range=kv_range, kv_cache=cache, kv_capture=recorder, capture_chunks=None)
        out = call_original(model, self.stack_method, h, run_inputs, start, end)
        if from_served:   # MAGI's write of chunks SCOPE served: their entries hold the same K/V
            idx = torch.tensor([served_chunks.index(c) * n + i for c in sub.store_chunks for i in range(n)],
                               dtype=torch.long)
            for layer in layers:
                k = torch.cat([entry["kv"][layer][0] for entry in served], dim=1)
                v = torch.cat([entry["kv"][layer][1] for entry in served], dim=1)
                sub.store[layer] = (k[:, idx.to(k.device)], v[:, idx.to(v.device)])
        return out, entries

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _store_target(sub: MagiSubset, served_chunks: list[int], device: torch.device,
                      targets: list[tuple[Tensor, dict]]) -> bool:
        """Add MAGI's own K/V write to `targets` when its chunks run; True when they are all
        served instead (filled from the entries); raise when they are neither."""
        if sub.store is None:
            return False
        want = list(sub.store_chunks)
        if all(c in sub.chunks for c in want):
            n = sub.inputs.tokens_per_chunk
            tok = [sub.chunks.index(c) * n + i for c in want for i in range(n)]
            targets.append((torch.tensor(tok, dtype=torch.long, device=device), sub.store))
            return False
        if all(c in served_chunks for c in want):
            return True
        raise RuntimeError(f"this call writes MAGI's K/V cache for window chunks {want} but the accelerator "
                           f"runs chunks {list(sub.chunks)} and serves {served_chunks}: a KV-writing pass "
                           f"must run (or serve) the chunks it writes; use selective='exact' or "
                           f"context_chunks >= 1")


# ---------------------------------------------------------------------------------------------
# subsets of chunks


def _base(inputs: BlockInputs | MagiSubset) -> BlockInputs:
    return inputs.inputs if isinstance(inputs, MagiSubset) else inputs


def _as_subset(inputs: BlockInputs | MagiSubset) -> MagiSubset:
    """A full call as the subset of all its chunks (its own K/V capture moved to `store`)."""
    if isinstance(inputs, MagiSubset):
        return inputs
    R = inputs.num_chunks
    store_chunks: tuple[int, ...] = ()
    if inputs.kv_capture is not None:
        a, b = inputs.capture_chunks if inputs.capture_chunks is not None else (0, R)
        store_chunks = tuple(range(a, b))
    return MagiSubset(inputs=replace(inputs, kv_capture=None, capture_chunks=None), chunks=tuple(range(R)),
                      store=inputs.kv_capture, store_chunks=store_chunks)


def _take_chunks(base: BlockInputs, pos: list[int]) -> BlockInputs:
    """Chunks `pos` (positions in `base`) of every per-token / per-chunk / per-row field."""
    n, R = base.tokens_per_chunk, base.num_chunks
    batch = base.condition.shape[0]
    device = base.tokens.device
    chunk_idx = torch.tensor(pos, dtype=torch.long, device=device)
    tok = (chunk_idx[:, None] * n + torch.arange(n, device=device)).flatten()
    rows = (torch.arange(batch, device=device)[:, None] * R + chunk_idx).flatten()
    ranges = base.kv_range
    ranges = _at(ranges, rows) if ranges.shape[0] == batch * R else _at(ranges, chunk_idx)
    _, h, w = base.grid
    return replace(base, tokens=base.tokens[:, tok], condition=base.condition[:, chunk_idx.to(base.condition.device)],
                   rope_sin=_at(base.rope_sin, tok), rope_cos=_at(base.rope_cos, tok), y_xattn=_at(base.y_xattn, rows),
                   xattn_mask=_at(base.xattn_mask, rows), kv_range=ranges,
                   grid=(len(pos) * base.frames_per_chunk, h, w), num_chunks=len(pos))


def _at(t: Tensor, index: Tensor) -> Tensor:
    """Rows `index` of t (dim 0), the index moved to t's device."""
    return t[index.to(t.device)]


def _token_index(frames: Tensor, base: BlockInputs, device: torch.device) -> Tensor:
    _, h, w = base.grid
    frames = frames.flatten().to(device).long()
    return (frames[:, None] * (h * w) + torch.arange(h * w, device=device)).flatten()


# ---------------------------------------------------------------------------------------------
# key sequence: MAGI's cache, served chunks, run chunks


def _cache_tokens(cache: Mapping[int, tuple[Tensor, Tensor]] | None) -> int:
    if not cache:
        return 0
    sizes = {k.shape[1] for k, _ in cache.values()}
    if len(sizes) != 1:
        raise ValueError(f"MAGI's kv_cache must hold the same tokens at every layer; got sizes {sorted(sizes)}")
    return sizes.pop()


def _check_cache_filled(inputs: BlockInputs, h: Tensor, num_blocks: int | None) -> None:
    """Name the cause when MAGI's cache reaches this call without some layers' K/V (the model would
    only say that a key range is too long)."""
    cache = inputs.kv_cache
    if cache is None or num_blocks is None or inputs.kv_range_max <= h.shape[1]:
        return
    missing = [layer for layer in range(num_blocks) if layer not in cache]
    if missing:
        raise RuntimeError(
            f"MAGI's clean-chunk K/V cache given to this accelerated call has no K/V for layers {missing}: the "
            f"KV-writing pass that should have filled it ran nothing (or only block 0) under the accelerator, "
            f"because every chunk of it was inactive (the prefix pass) or reused (a stage's first step whose "
            f"active chunks all Cache/Predict; FBCache skipping blocks 1..L-1). The pipeline must make that "
            f"pass compute the chunks it writes (e.g. run it outside accel.call)")


def _entry_chunks(entry: dict) -> list[int]:
    if not isinstance(entry, dict) or "chunks" not in entry or "kv" not in entry:
        raise TypeError("served K/V entries must be the dicts MagiStackAdapter.run_stack_kv returned")
    return [int(c) for c in entry["chunks"][0].tolist()]


def _key_layout(base: BlockInputs, chunks: tuple[int, ...], served: Sequence[dict], served_chunks: list[int],
                layers: range) -> tuple[Mapping[int, tuple[Tensor, Tensor]] | None, Tensor]:
    """MAGI's `kv_cache` for the run (per layer: cached clean tokens and served chunks, in a chosen
    order) and each query row's key range over [that prefix; the run's chunks].

    Attention sees a set of keys, so the prefix order is free: elements (cache blocks of one chunk,
    served chunks) needed by fewer query rows go first. Every block-causal row then needs a
    suffix of the prefix followed by a prefix of the run's chunks, one contiguous range, also when
    stale K/V of a Cache/Predict chunk is served between two chunks that run."""
    n = base.tokens_per_chunk
    cache = base.kv_cache
    M = _cache_tokens(cache)
    rows = base.kv_range.tolist()
    # prefix elements: (first, end) in the full call's key coordinates [cache; window chunks], source
    elements: list[tuple[int, int, tuple]] = []
    if M:
        blocks = [(a, a + n) for a in range(0, M, n)] if M % n == 0 else [(0, M)]
        elements += [(a, b, ("cache", a, b)) for a, b in blocks]
    for i, entry in enumerate(served):
        elements += [(M + c * n, M + (c + 1) * n, ("served", i, k * n)) for k, c in enumerate(_entry_chunks(entry))]
    if served:
        need = [sum(s < b and a < e for s, e in rows) for a, b, _ in elements]
        elements = [elements[i] for i in sorted(range(len(elements)), key=lambda i: (need[i], i))]
    segments, first = [], 0
    for a, b, _ in elements:
        segments.append((a, b, first))
        first += b - a
    segments += [(M + c * n, M + (c + 1) * n, first + p * n) for p, c in enumerate(chunks)]
    kv_range = _translate(rows, segments, chunks, served_chunks, base.kv_range.device)
    if not served:
        return cache, kv_range
    out: KV = {}
    for layer in layers:
        parts = []
        for _, _, source in elements:
            if source[0] == "cache":
                if layer not in cache:
                    raise ValueError(f"MAGI's kv_cache has no entry for layer {layer}")
                k, v = cache[layer]
                parts.append((k[:, source[1]:source[2]], v[:, source[1]:source[2]]))
            else:
                kv = served[source[1]]["kv"]
                if layer not in kv:
                    raise ValueError(f"served K/V holds layers {sorted(kv)}, not layer {layer}: entries are per "
                                     f"block range")
                k, v = kv[layer]
                parts.append((k[:, source[2]:source[2] + n], v[:, source[2]:source[2] + n]))
        k0 = parts[-1][0]
        out[layer] = (torch.cat([p[0].to(device=k0.device, dtype=k0.dtype) for p in parts], dim=1),
                      torch.cat([p[1].to(device=k0.device, dtype=k0.dtype) for p in parts], dim=1))
    return out, kv_range


def _translate(rows: list[list[int]], segments: list[tuple[int, int, int]], chunks: tuple[int, ...],
               served_chunks: list[int], device: torch.device) -> Tensor:
    """Each row's [start, end) over [cache; all window chunks] -> over the run's key sequence
    (`segments`: (first, end) in the full call -> first there). Keys of absent chunks leave it."""
    out = []
    for s, e in rows:
        pieces = sorted((new + max(s, a) - a, new + min(e, b) - a) for a, b, new in segments if s < b and a < e)
        if any(x[1] != y[0] for x, y in zip(pieces, pieces[1:])):
            raise ValueError(f"key range [{s}, {e}) of the full call is not contiguous over the run's keys "
                             f"{pieces} (running chunks {list(chunks)}, serving {served_chunks})")
        out.append([pieces[0][0], pieces[-1][1]] if pieces else [0, 0])
    return torch.tensor(out, dtype=torch.long, device=device).view(-1, 2)


# ---------------------------------------------------------------------------------------------
# capture sinks (the model writes `kv_capture[layer] = (k, v)`)


class _Recorder(dict):
    """The run's `kv_capture`: keeps each target's token rows of every layer's (k, v) [B, S, G, d]."""

    def __init__(self, targets: list[tuple[Tensor, dict]]) -> None:
        super().__init__()
        self.targets = targets

    def __setitem__(self, layer: int, kv: tuple[Tensor, Tensor]) -> None:
        k, v = kv
        for tok, sink in self.targets:
            sink[layer] = (k[:, tok.to(k.device)], v[:, tok.to(v.device)])


class _RowsInto(dict):
    """MAGI's K/V write of some batch rows, placed in those rows of full-batch tensors of `store`
    (rows no group wrote stay NaN)."""

    def __init__(self, store: dict, rows: Tensor, batch: int) -> None:
        super().__init__()
        self.store, self.rows, self.batch = store, rows, batch

    @classmethod
    def of(cls, store: dict, rows: Tensor, batch: int) -> _RowsInto:
        if isinstance(store, _RowsInto):
            return cls(store.store, store.rows[rows.to(store.rows.device)], store.batch)
        return cls(store, rows, batch)

    def __setitem__(self, layer: int, kv: tuple[Tensor, Tensor]) -> None:
        full = self.store.get(layer)
        if full is None or full[0].shape[1:] != kv[0].shape[1:]:
            full = tuple(torch.full((self.batch, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
                         for t in kv)
            self.store[layer] = full
        for dst, src in zip(full, kv):
            dst[self.rows.to(dst.device)] = src
