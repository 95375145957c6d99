"""Golden `forward` cases of magi-1: one `VideoDiTModel.forward` call, its output and its traces.

Everything comes from the case folder: `model_config`, weights, `call.kwargs` (slice_point, num_steps,
distill_interval), `call.engine_config.distill` and the inputs. Traces are stored tokens-first
([S, N, D]); ours are batch-first, so they are transposed back before comparing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipelines.magi1.checkpoint import from_state_dict
from pipelines.magi1.model import MagiConfig, MagiDiT, distill_dt_factor
from tests.parity.golden import GoldenCase


def build_model(case: GoldenCase) -> MagiDiT:
    """The case's model in float32 from its model_config and weights."""
    if case.weights is None:
        raise ValueError(f"golden case {case.name}: a forward case needs weights (meta.weights is null)")
    return from_state_dict(MagiConfig.from_dict(case.meta["model_config"]), case.weights, dtype=torch.float32)


def call_arguments(case: GoldenCase) -> dict:
    """The forward's keyword arguments from `call`: slice_point and (distill only) the shortcut step."""
    kwargs = case.call.get("kwargs") or {}
    distill = bool((case.call.get("engine_config") or {}).get("distill", False))
    distill_dt = distill_dt_factor(kwargs["num_steps"], kwargs.get("distill_interval", 1.0)) if distill else None
    return {"slice_point": int(kwargs.get("slice_point", 0)), "distill_dt": distill_dt}


def run_forward(case: GoldenCase) -> dict[str, Tensor]:
    """Run the case's forward call; return output.out and every trace the case stores that we expose."""
    model = build_model(case)
    args = [case.tensor(f"input.{n}") for n in ("x", "t", "y", "caption_dropout_mask", "xattn_mask", "kv_range")]
    produced: dict[str, Tensor] = {}
    handles = [module.register_forward_hook(_store(produced, names, case))
               for module, names in traced_modules(model).items()]
    try:
        with torch.no_grad():
            produced["output.out"] = model(*args, **call_arguments(case))
            if "trace.rope" in case.io:
                inputs = model.embed(*args, **call_arguments(case))
                produced["trace.rope"] = inputs.rope_table()
    finally:
        for handle in handles:
            handle.remove()
    return {name: value for name, value in produced.items() if name in case.io or name.startswith("output.")}


def traced_modules(model: MagiDiT) -> dict[nn.Module, list[str]]:
    """Module -> the trace names of its successive calls' outputs (t_embedder runs twice for distill)."""
    modules: dict[nn.Module, list[str]] = {
        model.x_embedder: ["trace.x_embedder"],                                  # [N, D, T, h, w]
        model.t_embedder: ["trace.t_embedder", "trace.t_embedder_distill_dt"],   # [N*R, Dc] each
        model.y_embedder: ["trace.y_xattn+trace.y_adaln"],                       # ([N*R, L, D], [N, 1, Dc])
        model.videodit_blocks.final_layernorm: ["trace.final_layernorm"],        # [N, S, D]
        model.final_linear: ["trace.final_linear"],                              # [N, S, patch values]
    }
    modules.update({layer: [f"trace.layer{i}"] for i, layer in enumerate(model.layers)})  # [N, S, D]
    return modules


def _store(produced: dict[str, Tensor], names: list[str], case: GoldenCase):
    """A forward hook that stores the k-th call's output under names[k], in the golden layout."""
    calls = iter(names)

    def hook(module: nn.Module, args: tuple, output) -> None:
        name = next(calls, None)
        if name == "trace.y_xattn+trace.y_adaln":
            produced["trace.y_xattn"] = output[0].detach().float().unsqueeze(1)   # [N*R, 1, L, D]
            produced["trace.y_adaln"] = output[1].detach().float()                # [N, 1, Dc]
        elif name is not None and name.startswith(("trace.t_embedder", "trace.x_embedder")):
            produced[name] = output.detach().float()
        elif name is not None:
            produced[name] = output.detach().float().transpose(0, 1)              # tokens-first [S, N, *]
    return hook

