"""Newton extrapolation in sigma is exact for polynomials of degree <= order."""

import pytest
import torch

from scope.extrapolation import (embedded_error, newton_extrapolate, newton_predictions,
                                 taylor_extrapolate)

SIGMAS = [0.97, 0.81, 0.52]          # non-uniform, decreasing like a shifted flow schedule
TARGET = 0.33


def poly_tensors(degree: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coeffs = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for _ in range(degree + 1)]

    def f(s: float) -> torch.Tensor:
        return sum(c * s ** i for i, c in enumerate(coeffs))
    return f


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("degree", [0, 1, 2])
def test_order_k_is_exact_for_degree_at_most_k(order, degree):
    f = poly_tensors(degree, seed=degree)
    ys = [f(s) for s in SIGMAS]
    pred = newton_extrapolate(SIGMAS, ys, TARGET, order)
    if degree <= order:
        torch.testing.assert_close(pred, f(TARGET), rtol=1e-12, atol=1e-12,
                                   msg=f"order {order} should reproduce a degree-{degree} residual")
    else:
        assert (pred - f(TARGET)).abs().max() > 1e-6, f"order {order} cannot be exact for degree {degree}"


def test_extrapolation_uses_the_newest_points():
    f = poly_tensors(1)
    xs = [0.99, 0.9, 0.7, 0.4]
    ys = [torch.full((2,), 123.0, dtype=torch.float64)] + [f(s) for s in xs[1:]]   # oldest is garbage
    torch.testing.assert_close(newton_extrapolate(xs, ys, 0.2, 2), f(0.2), rtol=1e-12, atol=1e-12)


def test_predictions_nest_and_embedded_error_is_the_last_term():
    f = poly_tensors(2, seed=3)
    ys = [f(s) for s in SIGMAS]
    p = newton_predictions(SIGMAS, ys, TARGET, 2)
    torch.testing.assert_close(p[0], ys[-1])                       # order 0 = reuse the newest
    torch.testing.assert_close(p[1], newton_extrapolate(SIGMAS, ys, TARGET, 1))
    expected = float(torch.linalg.vector_norm(p[2] - p[1]) / torch.linalg.vector_norm(p[2]))
    assert embedded_error(SIGMAS, ys, TARGET, 2) == pytest.approx(expected)
    assert embedded_error(SIGMAS, ys, TARGET, 0) is None
    assert embedded_error(SIGMAS[1:], ys[1:], TARGET, 1, reference="higher") is None


def test_embedded_error_vanishes_when_data_has_lower_degree():
    f = poly_tensors(1, seed=4)
    ys = [f(s) for s in SIGMAS]
    assert embedded_error(SIGMAS, ys, TARGET, 2) == pytest.approx(0.0, abs=1e-12)
    assert embedded_error(SIGMAS[1:], ys[1:], TARGET, 0, reference="higher") > 0.0


def test_taylor_in_step_index_matches_taylorseer_rule():
    # steps 0, 3, 6 are full; prediction at step 8 (k = 2 after the last full step)
    xs, ys = [0.0, 3.0, 6.0], [torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([10.0])]
    f1 = (10.0 - 4.0) / 3.0
    f1_prev = (4.0 - 1.0) / 3.0
    f2 = (f1 - f1_prev) / 3.0
    assert taylor_extrapolate(xs, ys, 8.0, 1).item() == pytest.approx(10.0 + f1 * 2)
    assert taylor_extrapolate(xs, ys, 8.0, 2).item() == pytest.approx(10.0 + f1 * 2 + f2 * 4 / 2)


def test_duplicate_coordinates_are_rejected():
    with pytest.raises(ValueError, match="distinct coordinates"):
        newton_extrapolate([0.5, 0.5], [torch.zeros(1), torch.ones(1)], 0.2, 1)
