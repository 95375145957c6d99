"""Calibration constants published for Wan2.1-based models, registered into `scope` by name.

TeaCache's rescale polynomials (numpy.poly1d order: highest degree first) were fitted by its
authors on Wan2.1's indicator: "e0" = the per-token time projection (the "ret steps" variant),
"e" = the time embedding. SkyReels-V2 reuses the T2V ones unchanged. `scope` knows no model:
importing this module makes the names available to `scope.config`, and `accel_defaults` gives a
Wan-based family's published defaults per method (TeaCache: the 1.3B polynomial).
"""
from __future__ import annotations

from typing import Any

from scope.config import register_rescale

# name: (coefficients, probe kind, fitted with ret steps)
TEACACHE_POLYNOMIALS: dict[str, tuple[tuple[float, ...], str, bool]] = {
    "wan-1.3b": ((-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2), "e0", True),
    "wan-1.3b-noret": ((2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975, 1.37887774e-1), "e", False),
    "wan-14b": ((-3.03318725e5, 4.90537029e4, -2.65530556e3, 5.87365115e1, -3.15583525e-1), "e0", True),
    "wan-14b-noret": ((-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404), "e", False),
    "wan-i2v-540p": ((2.57151496e5, -3.54229917e4, 1.40286849e3, -1.35890334e1, 1.32517977e-1), "e0", True),
    "wan-i2v-540p-noret": ((-3.02331670e2, 2.23948934e2, -5.25463970e1, 5.87348440, -2.01973289e-1), "e", False),
    "wan-i2v-720p": ((8.10705460e3, 2.13393892e3, -3.72934672e2, 1.66203073e1, -4.17769401e-2), "e0", True),
    "wan-i2v-720p-noret": ((-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683), "e", False),
}
SKYREELS_ALIASES = {"wan-1.3b": ("skyreels-v2-1.3b",), "wan-1.3b-noret": ("skyreels-v2-1.3b-noret",),
                    "wan-14b": ("skyreels-v2-14b",), "wan-14b-noret": ("skyreels-v2-14b-noret",)}

for _name, (_coeffs, _probe, _ret) in TEACACHE_POLYNOMIALS.items():
    register_rescale(_name, _coeffs, _probe, _ret, SKYREELS_ALIASES.get(_name, ()))

# What a method runs with on a Wan-based model when the user names only the method.
ACCEL_DEFAULTS: dict[str, dict[str, Any]] = {"teacache": {"rescale": "wan-1.3b"}}


def accel_defaults(method: str) -> dict[str, Any]:
    """The published per-method defaults on Wan-based models (a copy)."""
    return dict(ACCEL_DEFAULTS.get(method, {}))
