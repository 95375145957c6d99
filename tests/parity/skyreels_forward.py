"""Golden `forward` cases of skyreels-v2-df: one model call, its output and the traces the case holds.

Everything comes from the case folder (config, weights, call, inputs). `_bf16emu` cases run in
float32 too: their tolerance covers the reference's bf16 roundings.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipelines.skyreels_v2.checkpoint import from_state_dict
from pipelines.skyreels_v2.model import WanDFConfig, WanDFTransformer
from tests.parity.golden import GoldenCase


def traced_modules(model: WanDFTransformer) -> dict[str, nn.Module]:
    """Trace name -> the module whose output the reference stored under that name."""
    modules: dict[str, nn.Module] = {
        "trace.patch_embedding": model.patch_embedding,    # [B, D, F, h, w]
        "trace.text_embedding": model.text_embedding,      # [B, L, D]
        "trace.time_embedding": model.time_embedding,      # [B*F, D] or [B, D]
        "trace.time_projection": model.time_projection,    # [B*F, 6D] or [B, 6D], before fps
        "trace.head": model.head,                          # [B, N, patch values], before unpatchify
    }
    modules.update({f"trace.block{i}": block for i, block in enumerate(model.blocks)})  # [B, N, D]
    return modules


def run_forward(case: GoldenCase) -> dict[str, Tensor]:
    """Run the case's forward call in float32; return output.out and every trace the case stores."""
    if case.weights is None:
        raise ValueError(f"golden case {case.name}: a forward case needs weights (meta.weights is null)")
    model = from_state_dict(WanDFConfig.from_dict(case.meta["model_config"]), case.weights, dtype=torch.float32)
    x, t, context = case.tensor("input.x"), case.tensor("input.t"), case.tensor("input.context")
    fps, cbs = case.call.get("fps"), case.call.get("causal_block_size")

    produced: dict[str, Tensor] = {}
    handles = [module.register_forward_hook(_store(produced, name))
               for name, module in traced_modules(model).items() if name in case.io]
    try:
        with torch.no_grad():
            produced["output.out"] = model(x, t, context, fps=fps, causal_block_size=cbs)
            if "trace.block_mask" in case.io:
                mask = model.embed(x, t, context, fps, cbs).block_mask()  # [N, N] bool
                produced["trace.block_mask"] = mask[None, None].to(torch.uint8)
    finally:
        for handle in handles:
            handle.remove()
    return produced


def _store(produced: dict[str, Tensor], name: str):
    """A forward hook that keeps the module's output under `name`."""
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        produced[name] = output.detach().float()
    return hook
