"""Polynomial extrapolation of residuals over non-uniform points (noise level sigma or step).

Points are passed oldest first (the order history is kept in). Newton's form is built newest
first, so the order-(k-1) prediction is the order-k one without its last term: the embedded
error estimate costs one extra tensor op. Order k reproduces exactly any residual that is a
polynomial of degree <= k in the coordinate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _work_dtype(y: torch.Tensor) -> torch.dtype:
    return torch.promote_types(y.dtype, torch.float32)


def _check_points(xs: Sequence[float], ys: Sequence[torch.Tensor], need: int) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"got {len(xs)} coordinates for {len(ys)} tensors")
    if len(xs) < need:
        raise ValueError(f"need at least {need} points, got {len(xs)}")
    used = list(xs)[-need:]
    if len(set(used)) != len(used):
        raise ValueError(f"extrapolation points must have distinct coordinates, got {used}")


def newton_predictions(xs: Sequence[float], ys: Sequence[torch.Tensor], x: float,
                       max_order: int) -> list[torch.Tensor]:
    """[p_0(x), ..., p_max_order(x)], p_k interpolating the k+1 newest points."""
    _check_points(xs, ys, max_order + 1)
    pts_x = list(xs)[::-1][: max_order + 1]          # newest first
    dtype = _work_dtype(ys[-1])
    table = [y.to(dtype) for y in list(ys)[::-1][: max_order + 1]]
    preds = [table[0]]
    basis = 1.0                                      # prod_{j<k} (x - x_j)
    for k in range(1, max_order + 1):
        table = [(table[i] - table[i + 1]) / (pts_x[i] - pts_x[i + k]) for i in range(len(table) - 1)]
        basis *= x - pts_x[k - 1]
        preds.append(preds[-1] + basis * table[0])
    return preds


def newton_extrapolate(xs: Sequence[float], ys: Sequence[torch.Tensor], x: float,
                       order: int) -> torch.Tensor:
    """Order-`order` Newton polynomial through the `order + 1` newest points, evaluated at x."""
    return newton_predictions(xs, ys, x, order)[order]


def taylor_extrapolate(xs: Sequence[float], ys: Sequence[torch.Tensor], x: float,
                       order: int) -> torch.Tensor:
    """TaylorSeer's rule: a Taylor series at the newest point, derivative i+1 = backward
    difference of derivative i between the two newest points (over their gap)."""
    _check_points(xs, ys, order + 1)
    pts_x = list(xs)[::-1][: order + 1]
    dtype = _work_dtype(ys[-1])
    derivs = [y.to(dtype) for y in list(ys)[::-1][: order + 1]]  # F_0 at each point, newest first
    out = derivs[0].clone()
    term = 1.0
    for i in range(1, order + 1):
        # F_i at point p from F_{i-1} at p and p+1, gap = x_p - x_{p+1} (TaylorSeer's Delta)
        derivs = [(derivs[p] - derivs[p + 1]) / (pts_x[p] - pts_x[p + 1]) for p in range(len(derivs) - 1)]
        term *= (x - pts_x[0]) / i
        out = out + term * derivs[0]
    return out


def relative_norm(diff: torch.Tensor, ref: torch.Tensor) -> float:
    """||diff|| / ||ref|| (L2 over all elements; ref ~ 0 gives inf unless diff is 0 too)."""
    num = float(torch.linalg.vector_norm(diff.to(_work_dtype(diff))))
    den = float(torch.linalg.vector_norm(ref.to(_work_dtype(ref))))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def embedded_error(xs: Sequence[float], ys: Sequence[torch.Tensor], x: float, order: int,
                   reference: str = "lower") -> float | None:
    """||p_order(x) - p_ref(x)|| / ||p_order(x)|| with ref = order - 1 ("lower") or order + 1
    ("higher"); None when the reference cannot be formed (order 0 / too few points)."""
    if reference == "higher":
        if len(xs) < order + 2:
            return None
        preds = newton_predictions(xs, ys, x, order + 1)
        return relative_norm(preds[order] - preds[order + 1], preds[order])
    if reference != "lower":
        raise ValueError(f"reference must be 'lower' or 'higher', got {reference!r}")
    if order == 0 or len(xs) < order + 1:
        return None
    preds = newton_predictions(xs, ys, x, order)
    return relative_norm(preds[order] - preds[order - 1], preds[order])
