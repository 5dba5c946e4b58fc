"""NaN and inf: the loss passes them on as the reference does, the harness fails them.

Three parts. The loss: a NaN or inf planted in the logits or in a layer gives
the same non-finite pattern in every part of the loss, in both frameworks.
The comparison: any non-finite value makes its row fail, naming the quantity
and the side. The known divergence: the real case of the 2-norm's gradient at
zero (an all-zero image through the reference network) is reported as
``KNOWN``, and applied here as a strict expected failure of the plain
comparison, so that a change on either side shows up.
"""

import dataclasses
import math

import numpy as np
import pytest

import torch_impl
from parity import compare, divergences, tolerances
from parity import config as config_lib

_RNG = np.random.default_rng(11)
_X = _RNG.normal(size=(3, 3))
_W1 = _RNG.normal(size=(3, 6))
_W2 = _RNG.normal(size=(6, 4))
_LABELS = np.eye(4)[[0, 2, 3]]

_OPTIONS = {
    "k1": {"top_k": 1},
    "k3-norm1-sum-exact": {
        "top_k": 3,
        "dist_norm": 1,
        "worst_case_loss": False,
        "use_approximation": False,
    },
}


def _planted(where, value):
    """Inputs ``[3, 3]`` and a logit offset ``[3, 4]`` with one planted value."""
    x, offset = _X.copy(), np.zeros((3, 4))
    if where == "layer":
        x[1, 0] = value
    else:
        offset[1, 2] = value
    return x, offset


def _flatten(parts, to_numpy, loss_gradient):
    out = {
        k: to_numpy(parts[k])
        for k in ("loss", "probabilities", "difference", "top_k_index")
    }
    for i, layer in enumerate(parts["layers"]):
        for k in ("gradient", "grad_norm", "distance", "clip_branch", "loss"):
            out[f"{k}/{i}"] = to_numpy(layer[k])
    out["loss_gradient"] = loss_gradient
    return out


def _torch_parts(x, offset, options):
    import torch

    x = torch.tensor(x, requires_grad=True)
    h = torch.tanh(x @ torch.tensor(_W1))  # [3, 6]
    logits = h @ torch.tensor(_W2) + torch.tensor(offset)  # [3, 4]
    parts = torch_impl.large_margin_parts(
        logits=logits,
        one_hot_labels=torch.tensor(_LABELS),
        layers_list=[x, h],
        **options,
    )
    (grad,) = torch.autograd.grad(parts["loss"], [x])
    return _flatten(parts, lambda t: t.detach().numpy(), grad.numpy())


def _tf_parts(x, offset, options):
    import tensorflow as tf

    import tf_impl

    @tf.function(autograph=False)
    def graph():
        x_t = tf.constant(x)
        h = tf.tanh(x_t @ _W1)
        logits = h @ _W2 + offset
        parts = tf_impl.large_margin_parts(
            logits=logits,
            one_hot_labels=tf.constant(_LABELS),
            layers_list=[x_t, h],
            **options,
        )
        return parts, tf.gradients(parts["loss"], [x_t])[0]

    parts, grad = graph()
    return _flatten(parts, lambda t: t.numpy(), grad.numpy())


@pytest.mark.tf
@pytest.mark.parametrize("options", list(_OPTIONS.values()), ids=list(_OPTIONS))
@pytest.mark.parametrize(
    "where, value",
    [
        ("layer", np.nan),
        ("layer", np.inf),
        ("layer", -np.inf),
        ("logits", np.nan),
        ("logits", np.inf),
        ("logits", -np.inf),
    ],
    ids=["layer-nan", "layer-inf", "layer-neginf", "nan", "inf", "neginf"],
)
def test_non_finite_flows_through_as_in_the_reference(where, value, options):
    actual = _torch_parts(*_planted(where, value), options)
    expected = _tf_parts(*_planted(where, value), options)

    for key, e in expected.items():
        a = np.asarray(actual[key])
        e = np.asarray(e)
        if not np.issubdtype(e.dtype, np.floating):
            np.testing.assert_array_equal(a, e, err_msg=key)
            continue
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=key)
        np.testing.assert_array_equal(np.isposinf(a), np.isposinf(e), err_msg=key)
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(e), err_msg=key)
        finite = np.isfinite(e)
        tol = tolerances.lookup("distance", "float64")  # the loosest class
        np.testing.assert_allclose(
            a[finite], e[finite], rtol=tol.rtol, atol=1e-12, err_msg=key
        )
    # A NaN anywhere, or +inf in the logits (inf - inf in the softmax), is not
    # hidden: the loss is NaN on both sides.
    if np.isnan(value) or (where == "logits" and value > 0):
        assert np.isnan(actual["loss"]) and np.isnan(expected["loss"])


def test_torch_nan_in_logits_reaches_the_loss():
    # The same claim without TensorFlow: no clip or max swallows a NaN.
    for options in _OPTIONS.values():
        actual = _torch_parts(*_planted("logits", np.nan), options)

        assert np.isnan(actual["loss"])
        assert np.isnan(actual["loss_gradient"]).any()


# --- The comparison fails every non-finite value ------------------------------


def _clean_pair():
    rng = np.random.default_rng(3)
    expected = {
        "input": rng.uniform(size=(2, 4, 4, 1)),
        "logits": rng.normal(size=(2, 3)),
        "gradient/input/k0": rng.normal(size=(2, 4, 4, 1)),
        "loss": np.float64(0.25),
        "loss_gradient/logits/bias": rng.normal(size=3),
    }
    actual = {k: np.array(v, copy=True) for k, v in expected.items()}
    return actual, expected


def test_clean_pair_passes():
    actual, expected = _clean_pair()

    rows = compare.compare_all(actual, expected, dtype="float64")

    assert [r.status for r in rows] == [compare.PASS] * len(rows)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "side, side_name", [("actual", "PyTorch"), ("expected", "TensorFlow")]
)
@pytest.mark.parametrize("key", ["gradient/input/k0", "loss_gradient/logits/bias"])
def test_non_finite_is_a_failure_naming_quantity_and_side(key, side, side_name, value):
    actual, expected = _clean_pair()
    target = actual if side == "actual" else expected
    target[key].reshape(-1)[1] = value

    rows = compare.compare_all(actual, expected, dtype="float64")
    first = compare.first_failure(rows)

    assert [r.key for r in rows if r.failed] == [key]
    assert first.key == key
    index = np.unravel_index(1, target[key].shape)
    assert first.message == (
        f"{key}: 1 non-finite value(s) on the {side_name} side, first at index "
        f"{tuple(int(i) for i in index)} ({value})"
    )


def test_non_finite_on_both_sides_names_both():
    actual, expected = _clean_pair()
    actual["logits"][1, 2] = np.nan
    expected["logits"][0, 1] = np.inf

    row = compare.first_failure(compare.compare_all(actual, expected, dtype="float64"))

    assert row.key == "logits"
    assert row.mismatched == 2
    assert row.message == (
        "logits: 1 non-finite value(s) on the TensorFlow side, first at index "
        "(0, 1) (inf); 1 non-finite value(s) on the PyTorch side, first at index "
        "(1, 2) (nan)"
    )


def test_identical_nan_still_fails():
    # Equal NaNs are not agreement: the harness never passes what it could
    # not compare.
    actual, expected = _clean_pair()
    actual["loss"] = np.float64(np.nan)
    expected["loss"] = np.float64(np.nan)

    row = compare.first_failure(compare.compare_all(actual, expected, dtype="float64"))

    assert row.key == "loss"
    assert "on the TensorFlow side" in row.message
    assert "on the PyTorch side" in row.message


def test_scalar_non_finite_message():
    row = compare.compare_arrays(
        "loss", np.float64(np.inf), np.float64(1.0), rtol=0.0, atol=0.0
    )

    assert row.failed
    assert (
        row.message
        == "loss: 1 non-finite value(s) on the PyTorch side, first at index () (inf)"
    )


# --- The known divergence: the 2-norm's gradient at zero ----------------------

_RECORD = divergences.KNOWN_DIVERGENCES[0]

# The reference network on the bundled 8x8 digits, the first image blanked.
# conv_layer0 has no bias, so that image's pre-activations are 0 and ReLU
# passes no gradient: its input gradient is exactly zero. The reference's
# gamma would clip its distance (diff / epsilon is huge) and block the
# gradient to the norm; gamma = 1e7 keeps it between the clips.
_ZERO_IMAGE = config_lib.Config(
    arch="mnist",
    layers=("input",),
    dist_norm=2,
    exact=True,
    gamma=1e7,
    batch_size=8,
)


def _zero_image_batch():
    from parity import data

    dataset = data.load("digits")
    x = dataset.x_train[:8].copy()
    x[0] = 0.0
    return x, dataset.y_train[:8].copy()


@pytest.fixture(scope="module")
def zero_image_runs():
    """``{dist_norm: (config, actual, expected)}`` for the blank-image batch."""
    pytest.importorskip("tensorflow")
    from parity import tf_side, torch_side
    from parity import weights as weights_lib

    assert not any(
        "bias" in k
        for k in weights_lib.ARCHITECTURES["mnist"]["params"]
        if k.startswith("conv_layer")
    )
    weights = weights_lib.init_weights("mnist", input_size=8, seed=0)
    x, labels = _zero_image_batch()
    runs = {}
    for norm in (2, 1, math.inf):
        cfg = dataclasses.replace(_ZERO_IMAGE, dist_norm=norm)
        actual = torch_side.quantities(cfg, weights, x, labels)
        expected = tf_side.quantities(cfg, weights, x, labels)
        runs[norm] = (cfg, actual, expected)
    return runs


@pytest.mark.tf
def test_zero_image_has_zero_layer_gradient(zero_image_runs):
    _, actual, expected = zero_image_runs[2]

    assert expected["grad_norm/input"][0, 0] == 0.0
    assert actual["grad_norm/input"][0, 0] == 0.0
    assert (expected["grad_norm/input"][1:] > 0).all()
    # Not clipped: the distance of the blank image is below gamma.
    assert expected["clip_branch/input"][0, 0] == 0


@pytest.mark.tf
def test_zero_image_divergence_is_reported_known(zero_image_runs):
    cfg, actual, expected = zero_image_runs[2]

    rows = compare.compare_all(actual, expected, dtype="float64", config=cfg)

    known = [r for r in rows if r.status == compare.KNOWN]
    assert [r.key for r in rows if r.failed] == []
    assert known, "the divergence did not show: no KNOWN row"
    assert {r.key for r in known} == {
        k for k in expected if k.startswith("loss_gradient/")
    }
    for row in known:
        assert "non-finite value(s) on the TensorFlow side" in row.message
        assert f"[known divergence {_RECORD.name}: " in row.message
    others = [r for r in rows if r.status != compare.KNOWN]
    assert {r.status for r in others} == {compare.PASS}
    # PyTorch's side is finite everywhere.
    assert all(np.isfinite(v).all() for v in actual.values())


@pytest.mark.tf
@pytest.mark.xfail(strict=True, reason=_RECORD.what)
def test_zero_image_plain_comparison(zero_image_runs):
    # The plain comparison, with no divergence record: fails while the two
    # frameworks differ. Should either side change, this starts to pass and
    # the strict xfail reports it.
    cfg, actual, expected = zero_image_runs[2]

    rows = compare.compare_all(
        actual, expected, dtype="float64", config=cfg, divergences=()
    )

    assert compare.first_failure(rows) is None


@pytest.mark.tf
@pytest.mark.parametrize("norm", [1, math.inf], ids=["norm1", "norminf"])
def test_zero_image_other_norms_are_finite_and_pass(zero_image_runs, norm):
    cfg, actual, expected = zero_image_runs[norm]

    rows = compare.compare_all(
        actual, expected, dtype="float64", config=cfg, divergences=()
    )

    assert all(np.isfinite(v).all() for v in expected.values())
    assert all(np.isfinite(v).all() for v in actual.values())
    assert {r.status for r in rows} == {compare.PASS}


def test_divergence_excuses_only_its_own_pattern():
    cfg = _ZERO_IMAGE
    key = "loss_gradient/logits/bias"
    expected = np.array([np.nan, 1.0, 2.0])

    assert _RECORD.explains(cfg, key, np.array([0.0, 1.0, 2.0]), expected)
    # A wrong value where TensorFlow is finite is not excused.
    assert not _RECORD.explains(cfg, key, np.array([0.0, 1.5, 2.0]), expected)
    # NaN on the PyTorch side is not the divergence.
    assert not _RECORD.explains(cfg, key, np.array([np.nan, 1.0, 2.0]), expected)
    # Nor a NaN in another quantity, or under another config.
    assert not _RECORD.explains(cfg, "distance/input", np.zeros(3), expected)
    for other in (
        dataclasses.replace(cfg, exact=False),
        dataclasses.replace(cfg, dist_norm=1),
        dataclasses.replace(cfg, dist_norm=math.inf),
    ):
        assert not _RECORD.explains(other, key, np.array([0.0, 1.0, 2.0]), expected)
    assert not _RECORD.explains(None, key, np.array([0.0, 1.0, 2.0]), expected)


def test_divergence_never_turns_a_wrong_row_into_known():
    # compare_all: the record applies, but the port's finite value is wrong.
    key = "loss_gradient/logits/bias"
    actual = {key: np.array([0.0, 1.5, 2.0])}
    expected = {key: np.array([np.nan, 1.0, 2.0])}

    (row,) = compare.compare_all(actual, expected, dtype="float64", config=_ZERO_IMAGE)

    assert row.status == compare.FAIL


# --- Through the real lanes: the first quantity where a NaN appears -----------


def _toy_runs(plant):
    from parity import tf_side, torch_side
    from parity import weights as weights_lib

    cfg = config_lib.Config(
        arch="toy", layers=("input", "conv_layer0"), dist_norm=2, batch_size=4
    )
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(4, 6, 6, 1))
    labels = np.array([0, 3, 7, 9])
    weights = weights_lib.init_weights("toy", input_size=6, seed=5)
    plant(x, weights)
    actual = torch_side.quantities(cfg, weights, x, labels)
    expected = tf_side.quantities(cfg, weights, x, labels)
    return compare.compare_all(actual, expected, dtype="float64", config=cfg)


def _nan_pixel(x, weights):
    x[2, 3, 1, 0] = np.nan


def _nan_logit_bias(x, weights):
    weights["logits/bias"][4] = np.nan


@pytest.mark.tf
@pytest.mark.parametrize(
    "plant, first_key, count, index",
    [
        (_nan_pixel, "input", 1, (2, 3, 1, 0)),
        # The activations are clean; the NaN appears in column 4 of the logits.
        (_nan_logit_bias, "logits", 4, (0, 4)),
    ],
    ids=["input-pixel", "logit-bias"],
)
def test_real_lanes_name_the_first_non_finite_quantity(plant, first_key, count, index):
    rows = _toy_runs(plant)

    first = compare.first_failure(rows)

    assert first.key == first_key
    assert first.message == (
        f"{first_key}: {count} non-finite value(s) on the TensorFlow side, first "
        f"at index {index} (nan); {count} non-finite value(s) on the PyTorch "
        f"side, first at index {index} (nan)"
    )
    assert all(r.status == compare.PASS for r in rows[: rows.index(first)])
    assert not any(r.status == compare.KNOWN for r in rows)
