"""The comparison itself: every way it can pass has a planted fault it catches."""

import numpy as np
import pytest

from parity import compare, config, report, tolerances

TOL = tolerances.TOLERANCES["float64"]["value"]


def _row(actual, expected, key="logits"):
    return compare.compare_arrays(
        key, np.asarray(actual), np.asarray(expected), rtol=TOL.rtol, atol=TOL.atol
    )


def test_equal_arrays_pass():
    row = _row([[1.0, 2.0]], [[1.0, 2.0]])
    assert row.status == compare.PASS
    assert (row.mismatched, row.total) == (0, 2)


def test_value_outside_tolerance_fails_with_index_and_sides():
    row = _row([[1.0, 2.0 + 1e-6]], [[1.0, 2.0]])
    assert row.status == compare.FAIL
    assert row.mismatched == 1
    assert row.abs_index == (0, 1)
    assert row.max_abs == pytest.approx(1e-6)
    assert "mismatched elements 1 / 2" in row.message
    assert "expected is TensorFlow, actual is PyTorch" in row.message


def test_within_tolerance_passes_but_just_outside_fails():
    e = np.array([1.0])
    inside = e * (1 + 0.5 * TOL.rtol)
    outside = e * (1 + 20 * (TOL.rtol + TOL.atol))
    assert _row(inside, e).status == compare.PASS
    assert _row(outside, e).status == compare.FAIL


def test_shape_difference_fails_before_values():
    row = _row(np.zeros((2, 3)), np.zeros((3, 2)))
    assert row.status == compare.FAIL
    assert (
        row.message
        == "logits: shape (2, 3) on the PyTorch side, (3, 2) on the TensorFlow side"
    )


def test_dtype_difference_fails():
    row = _row(np.zeros(2, np.float32), np.zeros(2, np.float64))
    assert row.status == compare.FAIL
    assert (
        "dtype float32 on the PyTorch side, float64 on the TensorFlow side"
        in row.message
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("side", ["actual", "expected"])
def test_non_finite_on_one_side_never_passes(bad, side):
    clean = np.array([1.0, 2.0])
    dirty = np.array([1.0, bad])
    a, e = (dirty, clean) if side == "actual" else (clean, dirty)
    row = _row(a, e)
    assert row.status == compare.FAIL
    name = "PyTorch" if side == "actual" else "TensorFlow"
    assert f"non-finite value(s) on the {name} side, first at index (1,)" in row.message


def test_non_finite_on_both_sides_also_fails():
    row = _row([np.nan], [np.nan])
    assert row.status == compare.FAIL


def test_discrete_decisions_are_exact():
    row = compare.compare_arrays(
        "top_k_index", np.array([[1], [2]]), np.array([[1], [3]]), rtol=1.0, atol=1.0
    )
    assert row.status == compare.FAIL
    assert row.abs_index == (1, 0)


def test_zero_tensor_against_nonzero_fails():
    row = compare.compare_arrays(
        "loss_gradient/logits/bias", np.zeros(3), np.full(3, 1e-20), rtol=0.1, atol=0.1
    )
    assert row.status == compare.FAIL


def test_missing_name_fails_on_the_right_side():
    rows = compare.compare_all(
        {"logits": np.zeros(1)}, {"logits": np.zeros(1), "loss": 0.0}, dtype="float64"
    )
    assert [r.status for r in rows] == ["PASS", "FAIL"]
    assert rows[1].message == "loss: missing on the PyTorch side"
    extra = compare.compare_all(
        {"loss": 0.0, "logits": np.zeros(1)}, {"logits": np.zeros(1)}, dtype="float64"
    )
    assert extra[-1].message == "loss: missing on the TensorFlow side"


def test_first_failure_is_in_data_flow_order():
    expected = {"logits": np.zeros(2), "difference": np.zeros(2), "loss": np.array(0.0)}
    actual = {"logits": np.zeros(2), "difference": np.ones(2), "loss": np.array(1.0)}
    rows = compare.compare_all(actual, expected, dtype="float64")
    assert compare.first_failure(rows).key == "difference"
    assert "part first at difference" in report.summary(rows)
    assert report.exit_code(rows) == 1


def test_known_divergence_needs_its_config_and_its_pattern():
    nan = np.array([np.nan, 1.0])
    fine = np.array([0.0, 1.0])
    exact2 = config.Config(exact=True, dist_norm=2)
    approx2 = config.Config(exact=False, dist_norm=2)
    key = "loss_gradient/conv_layer0/kernel"
    (known,) = compare.compare_all(
        {key: fine}, {key: nan}, dtype="float64", config=exact2
    )
    assert known.status == compare.KNOWN
    assert "l2_norm_gradient_at_zero" in known.message
    (failed,) = compare.compare_all(
        {key: fine}, {key: nan}, dtype="float64", config=approx2
    )
    assert failed.status == compare.FAIL
    # NaN on the PyTorch side is never excused.
    (torch_nan,) = compare.compare_all(
        {key: nan}, {key: fine}, dtype="float64", config=exact2
    )
    assert torch_nan.status == compare.FAIL


def test_tolerance_override_only_widens():
    narrow = tolerances.Tolerance(rtol=0.0, atol=0.0)
    wide = tolerances.Tolerance(rtol=1.0, atol=1.0)
    base = tolerances.lookup("logits", "float64")
    assert tolerances.lookup("logits", "float64", {"value": narrow}) == base
    assert tolerances.lookup("logits", "float64", {"value": wide}) == wide


def test_unknown_quantity_has_no_tolerance():
    with pytest.raises(ValueError, match="Received: key='bogus'"):
        tolerances.tolerance_class("bogus")
