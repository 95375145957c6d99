"""Named MAGI-1 DiT sizes (values from the official example/*/*_config.json `model_config` sections).

Distilled models share their base model's architecture; `MagiSize.distill` says whether the forward
adds the shortcut step embedding (`engine_config.distill`), `weights_folder` where the official
bf16 weights live (`<load>/<weights_folder>`).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.magi1.model import MagiConfig

_COMMON = dict(model_name="videodit_ardf", kv_channels=128, num_query_groups=8, layernorm_epsilon=1e-6,
               apply_layernorm_1p=True, params_dtype="torch.bfloat16", patch_size=2, t_patch_size=1,
               cond_hidden_ratio=0.25, caption_channels=4096, caption_max_length=800, xattn_cond_hidden_ratio=1.0,
               cond_gating_ratio=1.0)
_4_5B = MagiConfig(**_COMMON, num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24,
                   x_rescale_factor=1.0, half_channel_vae=False, in_channels=16, out_channels=16,
                   gated_linear_unit=False)
_24B = MagiConfig(**_COMMON, num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48,
                  x_rescale_factor=0.1, half_channel_vae=True, in_channels=32, out_channels=32,
                  gated_linear_unit=True)
# tests and CPU demos: the golden cases' layout (8 heads of 32, 4 K/V groups) at ~1.5 M parameters
_TINY = MagiConfig(**dict(_COMMON, kv_channels=32, num_query_groups=4, params_dtype="torch.float32",
                          caption_channels=64, caption_max_length=16),
                   num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8, x_rescale_factor=1.0,
                   half_channel_vae=False, in_channels=16, out_channels=16, gated_linear_unit=False)


@dataclass(frozen=True)
class MagiSize:
    config: MagiConfig
    distill: bool            # add t_embedder(distill_dt) (engine_config.distill)
    weights_folder: str      # official bf16 weights: <load>/<weights_folder>


SIZES: dict[str, MagiSize] = {
    "4.5b": MagiSize(_4_5B, distill=False, weights_folder="inference_weight"),
    "4.5b-distill": MagiSize(_4_5B, distill=True, weights_folder="inference_weight.distill"),
    "24b": MagiSize(_24B, distill=False, weights_folder="inference_weight"),
    "24b-distill": MagiSize(_24B, distill=True, weights_folder="inference_weight.distill"),
    "tiny": MagiSize(_TINY, distill=False, weights_folder="inference_weight"),
}


def size_for(name: str) -> MagiSize:
    """The named size; the error lists the valid names."""
    if name not in SIZES:
        raise ValueError(f"unknown MAGI-1 size {name!r}; valid names: {sorted(SIZES)}")
    return SIZES[name]


def config_for(name: str) -> MagiConfig:
    """The MagiConfig of a named size (configs are frozen, so sharing them is safe)."""
    return size_for(name).config
