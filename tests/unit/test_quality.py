"""PSNR / SSIM of jobs.quality against values worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jobs.quality import PSNR_CAP_DB, SSIM_C1, SSIM_C2, gaussian_window, psnr, ssim, ssim_map


def test_psnr_of_a_known_mse():
    # every pixel off by 51/255 = 0.2 -> MSE 0.04 -> PSNR = 10 log10(1 / 0.04) = 13.979 dB
    a = np.full((2, 4, 4, 3), 100, np.uint8)
    b = np.full((2, 4, 4, 3), 151, np.uint8)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-9)


def test_psnr_averages_the_error_over_all_frames_before_the_log():
    # one frame identical, one frame off by 0.2: MSE = 0.02 over the video (not a mean of dB)
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 51
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.02), abs=1e-9)


def test_psnr_of_identical_videos_is_the_cap():
    a = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert psnr(a, a) == PSNR_CAP_DB == 100.0


def test_psnr_takes_floats_in_unit_range():
    a = np.zeros((1, 2, 2, 3), np.float32)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-5)   # MSE 0.01


def test_gaussian_window_is_normalised_and_symmetric():
    g = gaussian_window()
    assert g.numel() == 11 and float(g.sum()) == pytest.approx(1.0)
    assert torch.allclose(g, g.flip(0))
    assert float(g[5] / g[4]) == pytest.approx(math.exp(1 / (2 * 1.5 ** 2)))


def test_ssim_of_two_flat_frames_is_the_luminance_term():
    # flat images: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a_val, b_val = 0.2, 0.6
    a = np.full((1, 16, 16, 3), a_val, np.float64)
    b = np.full((1, 16, 16, 3), b_val, np.float64)
    want = (2 * a_val * b_val + SSIM_C1) / (a_val ** 2 + b_val ** 2 + SSIM_C1)
    assert ssim(a, b) == pytest.approx(want, rel=1e-9)


def test_ssim_of_a_negated_pattern_in_one_window():
    # one 11x11 window (valid positions: exactly one); y = 1 - x has the same variance and
    # covariance -var, so SSIM = L * (C2 - 2 var) / (2 var + C2) with L from the weighted means
    rng = np.random.default_rng(1)
    x = rng.random((1, 11, 11, 1))
    x = np.repeat(x, 3, axis=3)
    y = 1.0 - x
    g = np.outer(gaussian_window().numpy(), gaussian_window().numpy())
    w = x[0, :, :, 0]
    mu_x = (g * w).sum()
    mu_y = 1.0 - mu_x
    var = (g * w * w).sum() - mu_x ** 2
    want = ((2 * mu_x * mu_y + SSIM_C1) * (-2 * var + SSIM_C2)
            / ((mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (2 * var + SSIM_C2)))
    assert ssim_map(x, y).shape == (3, 1, 1, 1)
    assert ssim(x, y) == pytest.approx(want, rel=1e-9)


def test_ssim_of_identical_videos_is_one_and_averages_over_frames():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # second frame flat 0.2 vs flat 0.6: the mean is (1 + luminance term) / 2
    b = a.copy().astype(np.float64) / 255
    c = b.copy()
    b[1], c[1] = 0.2, 0.6
    lum = (2 * 0.2 * 0.6 + SSIM_C1) / (0.2 ** 2 + 0.6 ** 2 + SSIM_C1)
    assert ssim(b, c) == pytest.approx((1 + lum) / 2, rel=1e-9)


def test_mismatched_shapes_are_refused_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(1, 16, 16, 3\).*\(2, 16, 16, 3\)"):
        psnr(np.zeros((1, 16, 16, 3)), np.zeros((2, 16, 16, 3)))
