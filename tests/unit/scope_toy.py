"""A toy block stack whose arithmetic makes expected values obvious, and its adapter.

Block b adds `poly_b(sigma) * w` to every token (sigma = the token's frame noise level,
poly_b(s) = a_b + b_b s + c_b s^2), plus, if `mix` != 0, `mix * tanh(mean of visible tokens)`
(a one-head "attention": block-causal over chunks or bidirectional). With mix = 0 the stack
residual of a chunk is exactly sum_b poly_b(sigma) * w: a degree-2 polynomial in sigma that
does not depend on the input, so Cache / Predict outputs can be written down by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from scope.hooks import call_original
from scope.state import CallContext

DTYPE = torch.float64


@dataclass
class ToyInputs:
    sigma: torch.Tensor               # [F] noise level per frame
    frame_index: torch.Tensor         # [F] position of each frame in the window
    tokens_per_frame: int
    frames_per_chunk: int
    causal: bool
    kv_served: list = field(default_factory=list)     # entries from earlier captures
    kv_capture: list = field(default_factory=list)    # frame positions (in this subset) to capture
    captured: list = field(default_factory=list)

    def select_frames(self, frames: torch.Tensor) -> ToyInputs:
        return dataclasses.replace(self, sigma=self.sigma[frames], frame_index=self.frame_index[frames],
                                   kv_served=[], kv_capture=[], captured=[])


class ToyModel(nn.Module):
    def __init__(self, num_blocks: int = 4, dim: int = 3, mix: float = 0.0,
                 coeffs: list[tuple[float, float, float]] | None = None) -> None:
        super().__init__()
        self.num_blocks, self.dim, self.mix = num_blocks, dim, mix
        if coeffs is None:
            coeffs = [(0.1 * (b + 1), 0.5 - 0.2 * b, 0.3 + 0.1 * b) for b in range(num_blocks)]
        self.register_buffer("coeffs", torch.tensor(coeffs, dtype=DTYPE))      # [L, 3]
        self.register_buffer("w", torch.linspace(1.0, 2.0, dim, dtype=DTYPE))   # [D]
        self.log: list[tuple[int, int, int]] = []   # (start, end, tokens) of every original run

    def poly(self, b: int, sigma: torch.Tensor) -> torch.Tensor:
        a, b1, c = self.coeffs[b]
        return a + b1 * sigma + c * sigma ** 2

    def residual(self, sigma: float, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Stack residual of one token at noise level sigma (mix = 0): [D]."""
        end = self.num_blocks if end is None else end
        s = torch.tensor(sigma, dtype=DTYPE)
        return sum(self.poly(b, s) for b in range(start, end)) * self.w

    def forward(self, h: torch.Tensor, inputs: ToyInputs) -> torch.Tensor:
        return self.run_blocks(h, inputs)

    def run_blocks(self, h: torch.Tensor, inputs: ToyInputs, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
        end = self.num_blocks if end is None else end
        self.log.append((start, end, h.shape[1]))
        tpf, fpc = inputs.tokens_per_frame, inputs.frames_per_chunk
        sig_tok = inputs.sigma.repeat_interleave(tpf)                     # [N]
        chunk_tok = (inputs.frame_index // fpc).repeat_interleave(tpf)    # [N]
        captured = [{} for _ in inputs.kv_capture]
        for b in range(start, end):
            for i, frames in enumerate(inputs.kv_capture):
                tok = (frames[:, None] * tpf + torch.arange(tpf)).reshape(-1)
                captured[i][b] = (h[:, tok].clone(), chunk_tok[tok].clone())
            delta = self.poly(b, sig_tok)[None, :, None] * self.w
            if self.mix:
                keys, key_chunk = h, chunk_tok
                if inputs.kv_served:
                    keys = torch.cat([e[b][0] for e in inputs.kv_served] + [h], dim=1)
                    key_chunk = torch.cat([e[b][1] for e in inputs.kv_served] + [chunk_tok])
                if inputs.causal:
                    mask = (key_chunk[None, :] <= chunk_tok[:, None]).to(DTYPE)
                else:
                    mask = torch.ones(h.shape[1], keys.shape[1], dtype=DTYPE)
                weights = mask / mask.sum(-1, keepdim=True)
                delta = delta + self.mix * torch.tanh(torch.einsum("nk,bkd->bnd", weights, keys))
            h = h + delta
        inputs.captured = captured
        return h


class ToyAdapter:
    stack_method = "run_blocks"

    def num_blocks(self, model: ToyModel) -> int:
        return model.num_blocks

    def split_stack_args(self, h, inputs, start=0, end=None):
        return h, inputs

    def tokens_per_frame(self, inputs: ToyInputs) -> int:
        return inputs.tokens_per_frame

    def num_frames(self, inputs: ToyInputs) -> int:
        return int(inputs.sigma.numel())

    def select_frames(self, inputs: ToyInputs, frames: torch.Tensor) -> ToyInputs:
        return inputs.select_frames(frames)

    def probe(self, inputs: ToyInputs, h: torch.Tensor) -> torch.Tensor:
        """The token's noise level (like Wan's e0, a function of the timestep only): [B, N, 1]."""
        s = inputs.sigma.repeat_interleave(inputs.tokens_per_frame)
        return s[None, :, None].expand(h.shape[0], -1, 1)

    def run_stack(self, model, h, inputs, start, end):
        return call_original(model, "run_blocks", h, inputs, start, end)

    def run_stack_kv(self, model, h, inputs, start, end, served, capture):
        sub = dataclasses.replace(inputs, kv_served=list(served), kv_capture=list(capture), captured=[])
        out = call_original(model, "run_blocks", h, sub, start, end)
        return out, sub.captured


def make_inputs(chunk_sigmas: list[float], fpc: int = 1, tpf: int = 2, causal: bool = False) -> ToyInputs:
    sigma = torch.tensor(chunk_sigmas, dtype=DTYPE).repeat_interleave(fpc)
    return ToyInputs(sigma=sigma, frame_index=torch.arange(sigma.numel()), tokens_per_frame=tpf,
                     frames_per_chunk=fpc, causal=causal)


def make_hidden(num_chunks: int, fpc: int = 1, tpf: int = 2, dim: int = 3, seed: int = 0,
                batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_chunks * fpc * tpf, dim, generator=g, dtype=DTYPE)


def make_ctx(sigmas: list[float], active: list[bool] | None = None, nxt: list[float] | None = None,
             *, request: str = "r", branch: str = "cond", step: int = 0, fpc: int = 1,
             causal: bool = False, offset: int = 0) -> CallContext:
    active = [True] * len(sigmas) if active is None else active
    return CallContext(request=request, branch=branch, step=step, frames_per_chunk=fpc,
                       chunk_sigma=torch.tensor(sigmas, dtype=DTYPE), chunk_active=torch.tensor(active),
                       causal=causal,
                       chunk_sigma_next=None if nxt is None else torch.tensor(nxt, dtype=DTYPE),
                       chunk_offset=offset)


def chunk_tokens(h: torch.Tensor, j: int, fpc: int = 1, tpf: int = 2) -> torch.Tensor:
    n = fpc * tpf
    return h[:, j * n:(j + 1) * n]


def df_schedule(num_blocks: int, steps: int, ar_step: int) -> list[list[int]]:
    """SkyReels-V2 style step-index rows (0 = not started, steps + 1 = done)."""
    rows, pre = [], [0] * num_blocks
    while any(i < steps for i in pre):
        new = []
        for i in range(num_blocks):
            if i == 0 or pre[i - 1] >= steps:
                v = pre[i] + 1
            else:
                v = new[i - 1] - ar_step
            new.append(min(max(v, 0), steps + 1))
        rows.append(new)
        pre = new
    return rows
