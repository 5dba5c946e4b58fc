"""Two runs with the same seed give the same float64 quantities, bit for bit.

Each lane (`parity.torch_side`, `parity.tf_side`) runs twice on the same
seeded weights and batch with the frameworks' determinism switches on; every
quantity must match to the last bit, and so must the report rows built from
them. A port that drifts between runs is shown to be caught.
"""

import dataclasses
import functools
import math

import numpy as np
import pytest

from parity import compare, data, determinism
from parity import config as config_lib
from parity import weights as weights_lib

_CONFIGS = {
    # The reference's training config on the reference network, small batch.
    "mnist-reference": config_lib.Config(arch="mnist", batch_size=8),
    # Second-order terms through batch statistics, two layers, K = 2.
    "mnist-exact-k2": config_lib.Config(
        arch="mnist",
        layers=("input", "conv_layer1"),
        dist_norm=2,
        top_k=2,
        exact=True,
        batch_size=8,
    ),
    "toy-norm1-sum": config_lib.Config(
        arch="toy",
        layers=("input", "conv_layer0"),
        dist_norm=1,
        top_k=3,
        worst_case=False,
        gamma=0.5,
        batch_size=16,
    ),
}


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _inputs(cfg, digits):
    index = data.batches(len(digits.y_train), cfg.batch_size, seed=cfg.seed)
    index = next(index)
    size = digits.input_size
    weights = weights_lib.init_weights(cfg.arch, input_size=size, seed=cfg.seed)
    return weights, digits.x_train[index], digits.y_train[index]


def _bitwise_differences(actual, expected):
    """Keys whose arrays differ in name, dtype, shape or any bit."""
    keys = set(actual) ^ set(expected)
    for k in set(actual) & set(expected):
        a, e = np.asarray(actual[k]), np.asarray(expected[k])
        if a.dtype != e.dtype or a.shape != e.shape or a.tobytes() != e.tobytes():
            keys.add(k)
    return sorted(keys)


@pytest.fixture
def switches():
    with determinism.determinism(seed=0) as before:
        yield before


def test_switches_are_set_and_restored():
    before = determinism.determinism_state(frameworks=("torch",))

    with determinism.determinism(frameworks=("torch",)):
        inside = determinism.determinism_state(frameworks=("torch",))

    assert inside == {"torch": True}
    assert determinism.determinism_state(frameworks=("torch",)) == before


@pytest.mark.tf
def test_tensorflow_switch_is_set_and_restored():
    before = determinism.determinism_state(frameworks=("tensorflow",))

    with determinism.determinism(frameworks=("tensorflow",)):
        inside = determinism.determinism_state(frameworks=("tensorflow",))

    assert inside == {"tensorflow": True}
    assert determinism.determinism_state(frameworks=("tensorflow",)) == before


def test_unknown_framework_is_rejected():
    with pytest.raises(ValueError) as info:
        determinism.set_determinism(frameworks=("jax",))

    assert str(info.value) == (
        "`frameworks` must be drawn from ('torch', 'tensorflow'). "
        "Received: frameworks=('jax',)"
    )


@functools.cache
def _runs(lane, name):
    """Two runs of one lane on config `name`, determinism switches on."""
    if lane == "torch":
        from parity import torch_side as side
    else:
        from parity import tf_side as side
    cfg = _CONFIGS[name]
    weights, x, labels = _inputs(cfg, data.load("digits"))
    with determinism.determinism(seed=0):
        return [side.quantities(cfg, weights, x, labels) for _ in range(2)]


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_torch_lane_is_bitwise_repeatable(name):
    first, second = _runs("torch", name)

    assert _bitwise_differences(second, first) == []


@pytest.mark.tf
@pytest.mark.parametrize("name", list(_CONFIGS))
def test_tf_lane_is_bitwise_repeatable(name):
    first, second = _runs("tf", name)

    assert _bitwise_differences(second, first) == []


@pytest.mark.tf
@pytest.mark.parametrize("name", list(_CONFIGS))
def test_report_rows_repeat_row_for_row(name):
    cfg = _CONFIGS[name]

    reports = []
    for actual, expected in zip(_runs("torch", name), _runs("tf", name), strict=True):
        rows = compare.compare_all(actual, expected, dtype=cfg.dtype, config=cfg)
        reports.append([r.to_dict() for r in rows])

    assert reports[0] == reports[1]
    assert {row["status"] for row in reports[0]} == {compare.PASS}


def test_drifting_port_is_caught(digits, switches):
    # A planted fault: a port whose loss moves by one unit in the last place
    # from one run to the next. Seeded, not random: the drift is the count.
    import torch_impl
    from parity import torch_side

    calls = []

    def drifting_loss(**kwargs):
        parts = torch_impl.large_margin_parts(**kwargs)
        calls.append(None)
        if len(calls) > 1:
            parts["loss"] = parts["loss"] * (1.0 + 2.0**-52)
        return parts

    cfg = dataclasses.replace(_CONFIGS["toy-norm1-sum"], dist_norm=math.inf)
    weights, x, labels = _inputs(cfg, digits)
    port = torch_side.Port(name="drifting", loss=drifting_loss)

    first = torch_side.quantities(cfg, weights, x, labels, port=port)
    second = torch_side.quantities(cfg, weights, x, labels, port=port)

    differences = _bitwise_differences(second, first)
    assert "loss" in differences
    assert differences != []
