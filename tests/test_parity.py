"""The port against the reference: the option grid, the traps of REFERENCE.md s4.

Every test here runs real TensorFlow and real PyTorch.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import torch_impl
from parity import compare, config, data, run, weights

pytestmark = pytest.mark.tf

NORMS = {"l1": 1, "l2": 2, "linf": math.inf}


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _batch(digits, arch, size, seed=0):
    x_train, _ = run._input_for(digits, arch)
    index = next(data.batches(len(x_train), size, seed=seed))
    return x_train[index], digits.y_train[index]


def _check(cfg, w, x, y, port=None):
    return run.run_static(cfg, w, x, y, torch_port=port)


def _failures(rows):
    return [r.message for r in rows if r.failed]


TOY_GRID = list(itertools.product(NORMS, (1, 2, 5), (True, False), (False, True)))


@pytest.mark.parametrize(
    "norm,top_k,worst,exact",
    TOY_GRID,
    ids=[
        f"{n}-k{k}-{'worst' if w else 'sum'}-{'exact' if e else 'approx'}"
        for n, k, w, e in TOY_GRID
    ],
)
def test_toy_network_grid_float64(digits, norm, top_k, worst, exact):
    cfg = config.Config(
        arch="toy",
        layers=("input", "conv_layer0"),
        dist_norm=NORMS[norm],
        top_k=top_k,
        worst_case=worst,
        exact=exact,
        batch_size=8,
    )
    x, y = _batch(digits, "toy", 8)
    rows = _check(cfg, weights.init_weights("toy", seed=1), x, y)
    assert _failures(rows) == []
    assert len(rows) > 10


REFERENCE_GRID = [
    # (norm, top_k, worst, exact): the reference config first, then the modes
    # that reach every branch of the loss: sum over k, k > 1, exact.
    ("linf", 1, True, False),
    ("l2", 2, False, True),
    ("l1", 5, True, True),
    ("l2", 5, False, False),
]


@pytest.mark.parametrize("batch_norm", ["train", "eval"])
@pytest.mark.parametrize(
    "norm,top_k,worst,exact",
    REFERENCE_GRID,
    ids=[
        f"{n}-k{k}-{'worst' if w else 'sum'}-{'exact' if e else 'approx'}"
        for n, k, w, e in REFERENCE_GRID
    ],
)
def test_reference_network_float64(digits, batch_norm, norm, top_k, worst, exact):
    cfg = config.Config(
        layers=config.ALL_LAYERS,
        dist_norm=NORMS[norm],
        top_k=top_k,
        worst_case=worst,
        exact=exact,
        batch_norm=batch_norm,
        batch_size=32,
    )
    x, y = _batch(digits, "mnist", 32)
    rows = _check(cfg, weights.init_weights("mnist", input_size=8, seed=2), x, y)
    assert _failures(rows) == []


@pytest.mark.parametrize("exact", [False, True], ids=["approx", "exact"])
def test_reference_network_float32_within_table(digits, exact):
    # The calibration's batch (256) and its worst case (top_k 5, batch norm
    # in training mode): float32 rounding there is amplified by the batch
    # statistics, so a change of kernel or memory layout on one side shows.
    cfg = config.Config(
        layers=config.ALL_LAYERS,
        exact=exact,
        top_k=5,
        dtype="float32",
        batch_size=256,
    )
    x, y = _batch(digits, "mnist", 256)
    rows = _check(cfg, weights.init_weights("mnist", input_size=8, seed=0), x, y)
    assert _failures(rows) == []


def _zero_logits_weights():
    w = weights.init_weights("mnist", input_size=8, seed=0)
    w["logits/kernel"] = np.zeros_like(w["logits/kernel"])
    w["logits/bias"] = np.zeros_like(w["logits/bias"])
    return w


def test_all_equal_logits_ties_and_zero_gradient_norm(digits):
    x, y = _batch(digits, "mnist", 16)
    cfg = config.Config(layers=config.ALL_LAYERS, top_k=1, batch_size=16)
    from parity import tf_side, torch_side

    w = _zero_logits_weights()
    expected = tf_side.quantities(cfg, w, x, y)
    # What the reference must give, by hand: p = 1/10 everywhere, so diff = 0,
    # every gradient norm is 0, dist = 0 / epsilon = 0 and the loss is
    # relu(gamma - max(0, lower)) - gamma = 0.
    np.testing.assert_array_equal(expected["probabilities"], np.full((16, 10), 0.1))
    assert expected["loss"] == 0.0
    assert np.all(expected["grad_norm/input"] == 0.0)
    # The lowest index that is not the label wins the tie.
    np.testing.assert_array_equal(expected["top_k_index"][:, 0], np.where(y == 0, 1, 0))
    rows = compare.compare_all(
        torch_side.quantities(cfg, w, x, y), expected, dtype="float64", config=cfg
    )
    assert _failures(rows) == []


def _max_to_one_class(**kwargs):
    """A port that routes a tied maximum's gradient to one class (torch.max)."""
    original = torch.Tensor.amax

    def one_index(self, dim=None, keepdim=False):
        return torch.max(self, dim=dim, keepdim=keepdim).values

    torch.Tensor.amax = one_index
    try:
        return torch_impl.large_margin_parts(**kwargs)
    finally:
        torch.Tensor.amax = original


def test_all_equal_logits_catch_one_class_tie_routing(digits):
    from parity import torch_side

    x, y = _batch(digits, "mnist", 16)
    cfg = config.Config(layers=config.ALL_LAYERS, top_k=1, batch_size=16)
    port = torch_side.Port(name="max_to_one_class", loss=_max_to_one_class)
    rows = _check(cfg, _zero_logits_weights(), x, y, port)
    first = compare.first_failure(rows)
    assert first is not None
    # Forward values and loss internals agree (the layer gradients are all
    # zero here); the routing shows in the gradient of the logits layer,
    # scaled by 1 / epsilon.
    assert first.key.startswith("loss_gradient/logits/")


def test_small_gamma_reaches_both_clip_boundaries(digits):
    from parity import tf_side, torch_side

    x, y = _batch(digits, "mnist", 64)
    w = weights.init_weights("mnist", input_size=8, seed=0)
    probe = config.Config(layers=("conv_layer0",), batch_size=64)
    dist = tf_side.quantities(probe, w, x, y)["distance/conv_layer0"][:, 0]
    # With random weights most distances are negative: gamma just below the
    # second largest puts two or more examples on the upper clip; alpha puts
    # the lower clip half-way between the fourth and fifth smallest distances.
    # (A clip exactly at a distance would leave that example's branch to the
    # last bit of rounding, which the two frameworks need not share.)
    ranked = np.sort(dist)
    gamma = 0.9 * float(ranked[-2])
    assert gamma > 0
    alpha = 1.0 - float(ranked[3] + ranked[4]) / 2 / gamma
    cfg = config.Config(
        layers=("conv_layer0",), batch_size=64, gamma=gamma, alpha=alpha
    )
    expected = tf_side.quantities(cfg, w, x, y)
    branches = set(expected["clip_branch/conv_layer0"].ravel().tolist())
    assert branches == {-1, 0, 1}
    rows = compare.compare_all(
        torch_side.quantities(cfg, w, x, y), expected, dtype="float64", config=cfg
    )
    assert _failures(rows) == []


def test_exact_mode_batch_norm_train_matches_finite_differences(digits):
    """Second-order terms through batch statistics, checked without either port.

    The expected gradient comes from central differences of the loss value,
    so a reference that drops cross-example second-order terms (as
    tf.nn.moments' stop_gradient does) cannot pass.
    """
    from parity import tf_side, torch_side

    x, y = _batch(digits, "mnist", 16)
    w = weights.init_weights("mnist", input_size=8, seed=1)
    cfg = config.Config(layers=("conv_layer0",), dist_norm=2, exact=True, batch_size=16)
    expected = tf_side.quantities(cfg, w, x, y)
    actual = torch_side.quantities(cfg, w, x, y)
    name = "conv_layer0/batch_norm/beta"
    # h = 1e-5: small enough for truncation error, large enough that rounding
    # of a loss of about 0.6 stays near 1e-11; measured error about 1e-7
    # relative here. The tf.nn.moments fault is 4e-3 to 4e-2 relative.
    h = 1e-5
    for j in range(3):
        plus = {k: v.copy() for k, v in w.items()}
        minus = {k: v.copy() for k, v in w.items()}
        plus[name][j] += h
        minus[name][j] -= h
        fd = (
            float(torch_side.quantities(cfg, plus, x, y)["loss"])
            - float(torch_side.quantities(cfg, minus, x, y)["loss"])
        ) / (2 * h)
        assert expected[f"loss_gradient/{name}"][j] == pytest.approx(fd, rel=1e-4)
        assert actual[f"loss_gradient/{name}"][j] == pytest.approx(fd, rel=1e-4)


def test_finite_differences_catch_tf_nn_moments(digits, monkeypatch):
    """The planted fault behind the check above: tf.nn.moments in the reference."""
    import tensorflow as tf

    from parity import tf_side, torch_side
    from tf_impl import models

    monkeypatch.setattr(
        models, "batch_moments", lambda h: tf.nn.moments(h, axes=[0, 1, 2])
    )
    x, y = _batch(digits, "mnist", 16)
    w = weights.init_weights("mnist", input_size=8, seed=1)
    cfg = config.Config(layers=("conv_layer0",), dist_norm=2, exact=True, batch_size=16)
    expected = tf_side.quantities(cfg, w, x, y)
    rows = compare.compare_all(
        torch_side.quantities(cfg, w, x, y), expected, dtype="float64", config=cfg
    )
    first = compare.first_failure(rows)
    assert first is not None and first.key.startswith("loss_gradient/")


def test_exact_mode_without_second_order_is_caught(digits):
    from parity import torch_side

    def no_second_order(**kwargs):
        parts = torch_impl.large_margin_parts(**{**kwargs, "use_approximation": True})
        return parts

    x, y = _batch(digits, "mnist", 16)
    cfg = config.Config(layers=("input", "conv_layer0"), exact=True, batch_size=16)
    port = torch_side.Port(name="no_second_order", loss=no_second_order)
    first = compare.first_failure(
        _check(cfg, weights.init_weights("mnist", input_size=8), x, y, port)
    )
    # The loss value is the same; only the parameter gradients differ.
    assert first.key.startswith("loss_gradient/")
