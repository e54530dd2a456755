"""Error-compensated rounding (onnxcomp.linalg.gptq): pure numpy, no ONNX."""

import numpy as np
import pytest

from onnxcomp.linalg.gptq import compensated_rounding, damped_inverse_factor, output_error


def _grid(step: float):
    def nearest(v):
        return np.round(v / step) * step
    return nearest


def _correlated(rng, groups: int, d: int, n: int = 4000) -> np.ndarray:
    mix = rng.standard_normal((groups, d, d)) / np.sqrt(d) + np.eye(d)
    x = np.einsum("gde,gne->gnd", mix, rng.standard_normal((groups, n, d)))
    return np.einsum("gnd,gne->gde", x, x) / n


def test_compensation_beats_nearest_rounding_on_correlated_inputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 24, 40))
    h = _correlated(rng, 2, 40)
    nearest = _grid(0.5)
    plain = nearest(w)
    comp = compensated_rounding(w, h, nearest)
    assert np.allclose(comp / 0.5, np.round(comp / 0.5))  # every entry on the grid
    assert output_error(w, comp, h) < 0.75 * output_error(w, plain, h)  # measured 0.62


@pytest.mark.parametrize("block", [1, 7, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_the_lazy_block_update_does_not_change_the_result(block, act_order):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 5, 30))
    h = _correlated(rng, 2, 30)
    ref = compensated_rounding(w, h, _grid(0.25), block=1000, act_order=act_order)
    assert np.array_equal(compensated_rounding(w, h, _grid(0.25), block=block, act_order=act_order), ref)


def test_act_order_rounds_the_busiest_columns_first_and_returns_the_original_order():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, 6, 12))
    h = _correlated(rng, 2, 12)
    h[:, 3, :] *= 50.0
    h[:, :, 3] *= 50.0  # column 3 dominates
    seen = []

    def nearest(v):
        seen.append(v.copy())
        return np.round(v)

    q = compensated_rounding(w, h, nearest, act_order=True)
    assert np.array_equal(seen[0][:, :, 0], w[:, :, 3])  # the busiest column goes first, untouched
    assert np.array_equal(q[:, :, 3], np.round(w[:, :, 3]))


@pytest.mark.parametrize("act_order", [False, True])
def test_a_diagonal_hessian_leaves_nearest_rounding(act_order):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4, 6))
    h = np.broadcast_to(np.diag(rng.uniform(0.5, 2.0, 6)), (3, 6, 6))
    assert np.array_equal(compensated_rounding(w, h, _grid(0.3), act_order=act_order), _grid(0.3)(w))


def test_inputs_never_seen_keep_the_factor_finite():
    h = np.zeros((1, 4, 4))
    h[0, :2, :2] = [[2.0, 1.0], [1.0, 2.0]]
    u = damped_inverse_factor(h)
    assert np.all(np.isfinite(u)) and np.allclose(u, np.triu(u))
    q = compensated_rounding(np.ones((1, 2, 4)) * 0.4, h, _grid(1.0))
    assert np.all(np.isfinite(q))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"w \[G, R, D\]"):
        compensated_rounding(np.zeros((2, 3)), np.zeros((3, 3)), _grid(1.0))
