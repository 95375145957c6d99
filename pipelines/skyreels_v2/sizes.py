"""Named SkyReels-V2 DF model sizes (values from ../shared/reference/NOTES_skyreels_v2.md section 1)."""
from __future__ import annotations

from pipelines.skyreels_v2.model import WanDFConfig

_COMMON = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, freq_dim=256, text_dim=4096,
               out_dim=16, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
_1_3B = dict(_COMMON, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, inject_sample_info=True)
_14B = dict(_COMMON, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, inject_sample_info=False)

SIZES: dict[str, WanDFConfig] = {
    "1.3b-540p": WanDFConfig(**_1_3B),
    "14b-540p": WanDFConfig(**_14B),
    "14b-720p": WanDFConfig(**_14B),  # same architecture as 14b-540p, other weights
    # tests and CPU demos: the golden cases' layout at a few hundred thousand parameters
    "tiny": WanDFConfig(**dict(_COMMON, dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=16,
                               text_dim=32, inject_sample_info=True)),
}


def config_for(name: str) -> WanDFConfig:
    """The config of a named size (configs are frozen, so sharing them is safe)."""
    if name not in SIZES:
        raise ValueError(f"unknown SkyReels-V2 size {name!r}; valid names: {sorted(SIZES)}")
    return SIZES[name]
