"""Video quality against a reference video: PSNR and SSIM (DESIGN section 5).

Both take uint8 frames [T, H, W, 3] (or float in [0, 1]) of the same shape and work on pixel
values scaled to [0, 1].

- `psnr(a, b)`: one PSNR over every pixel of every frame, 10 log10(1 / MSE), in dB. Identical
  videos have MSE 0; the result is then capped at `PSNR_CAP_DB` = 100 dB (so JSON stays finite
  and averages stay meaningful). The cap sits above any difference that matters: one uint8 step
  on a single pixel of a 48-frame 64x64 video already gives ~106 dB, so 100 dB reads as
  "identical up to a few rounding steps".
- `ssim(a, b)`: Wang et al. 2004 SSIM with an 11x11 Gaussian window (sigma 1.5), C1 = 0.01^2,
  C2 = 0.03^2 (data range 1), computed over the "valid" window positions of each frame and
  channel and averaged over positions, then over frames and channels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def _unit_float(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) frames -> float64 tensor in [0, 1]."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype == torch.uint8:
        return x.to(torch.float64) / 255.0
    return x.to(torch.float64)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape to be compared; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3]; got {tuple(a.shape)}")


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, cap: float = PSNR_CAP_DB) -> float:
    """PSNR in dB over all frames (pixel range [0, 1]); identical videos give `cap`."""
    x, y = _unit_float(a), _unit_float(b)
    _check_pair(x, y)
    mse = float(((x - y) ** 2).mean())
    if mse == 0.0:
        return cap
    return min(cap, 10.0 * math.log10(1.0 / mse))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian [size] (the 2-D window is its outer product)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of x [N, 1, H, W]."""
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1))
    return F.conv2d(x, g.view(1, 1, 1, k))


def ssim_map(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-position SSIM [T*3, 1, H-10, W-10] (frames x channels stacked on dim 0)."""
    x, y = _unit_float(a), _unit_float(b)
    _check_pair(x, y)
    t, h, w, c = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}; got {h}x{w}")
    x = x.permute(0, 3, 1, 2).reshape(t * c, 1, h, w)
    y = y.permute(0, 3, 1, 2).reshape(t * c, 1, h, w)
    g = gaussian_window()
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x ** 2
    var_y = _filter(y * y, g) - mu_y ** 2
    cov = _filter(x * y, g) - mu_x * mu_y
    return ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
            / ((mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2)))


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean SSIM over window positions, then frames and channels (all equal-sized: one mean)."""
    return float(ssim_map(a, b).mean())
