"""Row-by-row comparison of two dicts of quantities.

Structure is compared before values, in a fixed order: name present, shape,
dtype, non-finite values, then the values. Integer quantities (the discrete
decisions) must be equal. The reference side is `expected` (TensorFlow, or a
fixture made by it), the side under test is `actual` (PyTorch).
"""

import dataclasses
import fnmatch

import numpy as np

from parity import divergences as divergences_lib
from parity import tolerances

__all__ = [
    "ERROR_KEY",
    "Row",
    "compare_all",
    "compare_arrays",
    "compare_sides",
    "first_failure",
]

PASS, FAIL, KNOWN, SKIP = "PASS", "FAIL", "KNOWN", "SKIP"


@dataclasses.dataclass
class Row:
    """One compared quantity.

    ``max_abs`` and ``max_rel`` are the greatest absolute and relative
    differences; ``abs_index`` and ``rel_index`` where they occur.
    """

    key: str
    shape: tuple = ()
    status: str = PASS
    mismatched: int = 0
    total: int = 0
    max_abs: float = 0.0
    abs_index: tuple = ()
    max_rel: float = 0.0
    rel_index: tuple = ()
    rtol: float = 0.0
    atol: float = 0.0
    message: str = ""

    @property
    def quantity(self):
        return self.key.split("/", 1)[0]

    @property
    def layer(self):
        parts = self.key.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def failed(self):
        return self.status == FAIL

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["abs_index"] = list(self.abs_index)
        d["rel_index"] = list(self.rel_index)
        d["quantity"] = self.quantity
        d["layer"] = self.layer
        return d


def _mismatch_message(row, expected_side, actual_side):
    return (
        f"{row.key}: mismatched elements {row.mismatched} / {row.total}; "
        f"greatest absolute difference {row.max_abs:.3g} at index "
        f"{row.abs_index} (allowed atol {row.atol:g} x scale); greatest "
        f"relative difference {row.max_rel:.3g} at index {row.rel_index} "
        f"(allowed rtol {row.rtol:g}); expected is {expected_side}, actual is "
        f"{actual_side}"
    )


def _nonfinite_part(side, array):
    bad = np.argwhere(~np.isfinite(array))
    first = tuple(int(i) for i in bad[0])
    return (
        f"{len(bad)} non-finite value(s) on the {side} side, first at "
        f"index {first} ({array[first] if array.ndim else array})"
    )


def _nonfinite_message(key, sides):
    """Names every side with a NaN or inf, the reference side first.

    Args:
        key: the quantity.
        sides: ``(side name, array)`` pairs, each with a non-finite value.
    """
    return f"{key}: " + "; ".join(_nonfinite_part(s, a) for s, a in sides)


def compare_arrays(
    key,
    actual,
    expected,
    *,
    rtol,
    atol,
    actual_side="PyTorch",
    expected_side="TensorFlow",
    scale=None,
):
    """Compares one quantity and returns its `Row`.

    Args:
        key: quantity name, such as ``gradient/conv_layer0/k0``.
        actual: the side under test, array-like, or None if missing.
        expected: the reference side, array-like, or None if missing.
        rtol: relative tolerance.
        atol: absolute tolerance, in units of the larger tensor's magnitude.
        actual_side: shown in messages.
        expected_side: shown in messages.
        scale: a magnitude that `atol` is in units of when it exceeds the
            tensors' own (for a loss, the size of its terms: see
            `compare_all`).

    Returns:
        A `Row`; its status is ``FAIL`` on a missing name, a shape or dtype
        difference, any non-finite value on either side, a difference in an
        integer quantity, or a value outside the tolerance.
    """
    row = Row(key=key, rtol=rtol, atol=atol)
    if actual is None or expected is None:
        missing = actual_side if actual is None else expected_side
        row.status, row.message = FAIL, f"{key}: missing on the {missing} side"
        return row
    actual, expected = np.asarray(actual), np.asarray(expected)
    row.shape, row.total = expected.shape, int(expected.size)
    if actual.shape != expected.shape:
        row.status = FAIL
        row.message = (
            f"{key}: shape {actual.shape} on the {actual_side} side, "
            f"{expected.shape} on the {expected_side} side"
        )
        return row
    if actual.dtype != expected.dtype:
        row.status = FAIL
        row.message = (
            f"{key}: dtype {actual.dtype} on the {actual_side} side, "
            f"{expected.dtype} on the {expected_side} side"
        )
        return row

    floating = np.issubdtype(expected.dtype, np.floating)
    if floating:
        sides = [
            (side, array)
            for side, array in ((expected_side, expected), (actual_side, actual))
            if not np.isfinite(array).all()
        ]
        if sides:
            row.status = FAIL
            row.message = _nonfinite_message(key, sides)
            # Elements non-finite on either side.
            row.mismatched = int((~(np.isfinite(actual) & np.isfinite(expected))).sum())
            return row
    if row.total == 0:
        return row

    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    diff = np.abs(a - e)
    scale = max(np.abs(e).max(), np.abs(a).max(), scale or 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(e))
    if floating:
        bad = diff > atol * scale + rtol * np.abs(e)
    else:
        bad = diff != 0
    row.mismatched = int(bad.sum())
    i_abs = np.unravel_index(int(np.argmax(diff)), diff.shape)
    i_rel = np.unravel_index(int(np.argmax(rel)), rel.shape)
    row.max_abs, row.abs_index = float(diff[i_abs]), tuple(int(i) for i in i_abs)
    row.max_rel, row.rel_index = float(rel[i_rel]), tuple(int(i) for i in i_rel)
    if row.mismatched:
        row.status = FAIL
        row.message = _mismatch_message(row, expected_side, actual_side)
    return row


def compare_all(
    actual,
    expected,
    *,
    dtype,
    config=None,
    divergences=divergences_lib.KNOWN_DIVERGENCES,
    overrides=None,
    actual_side="PyTorch",
    expected_side="TensorFlow",
    skip_missing_internals=False,
):
    """Compares every quantity, in the expected side's order.

    Args:
        actual: dict key -> array, the side under test.
        expected: dict key -> array, the reference.
        dtype: ``"float64"`` or ``"float32"``, selects the tolerance table.
        config: the `Config`, used to decide which known divergences apply.
        divergences: records of known, deliberate differences; a failing row
            that one of them explains is marked ``KNOWN``.
        overrides: tolerance overrides, see `tolerances.lookup`.
        actual_side: shown in messages.
        expected_side: shown in messages.
        skip_missing_internals: mark loss internals absent from `actual` as
            ``SKIP`` instead of ``FAIL`` when `actual` reports none of them (a
            plug-in that returns only its loss). A port that reports some
            internals must report them all.

    Returns:
        A list of `Row`, one per expected key, then one per key only in
        `actual`.
    """
    loss_scales = _loss_scales(expected, config)
    loss_only = skip_missing_internals and not any(_is_internal(k) for k in actual)
    rows = []
    for key in _data_flow_order(expected):
        a = actual.get(key)
        if a is None and loss_only and _is_internal(key):
            rows.append(
                Row(
                    key=key,
                    shape=np.shape(expected[key]),
                    status=SKIP,
                    message=f"{key}: not reported by the {actual_side} loss",
                )
            )
            continue
        tol = tolerances.lookup(key, dtype, overrides)
        row = compare_arrays(
            key,
            a,
            expected[key],
            rtol=tol.rtol,
            atol=tol.atol,
            actual_side=actual_side,
            expected_side=expected_side,
            scale=loss_scales.get(key),
        )
        if row.failed and a is not None:
            record = divergences_lib.explain(divergences, config, key, a, expected[key])
            if record is not None:
                row.status = KNOWN
                row.message = (
                    f"{row.message} [known divergence {record.name}: {record.what}]"
                )
        rows.append(row)
    for key in actual:
        if key not in expected:
            rows.append(
                Row(
                    key=key,
                    shape=np.shape(actual[key]),
                    status=FAIL,
                    message=f"{key}: missing on the {expected_side} side",
                )
            )
    return rows


def _loss_scales(expected, config):
    """The size of the largest term of each loss row, from the reference side.

    A layer's loss is a mean over the batch of sums over k of clipped
    distances, ``-min(gamma, max(dist, lower))`` (REFERENCE.md section 1,
    steps 10-12). Where the terms cancel, the loss is far smaller than its
    terms, and than their rounding error: its absolute tolerance is then in
    units of its largest term, as a tensor's is in units of its largest
    element. Needs the config's clips and the reference's distances; without
    them the loss rows keep their own magnitude.

    Returns:
        A dict ``layer_loss/<layer>`` and ``loss`` -> scale.
    """
    if config is None:
        return {}
    gamma = float(config.gamma)
    lower = gamma * (1.0 - float(config.alpha))
    scales = {}
    for key, dist in expected.items():
        if not key.startswith("distance/"):
            continue
        dist = np.asarray(dist, dtype=np.float64)  # [B, K]
        if dist.ndim != 2 or dist.size == 0 or not np.isfinite(dist).all():
            continue
        if config.worst_case:
            dist = dist.min(axis=1, keepdims=True)  # [B, 1]
        terms = np.minimum(gamma, np.maximum(dist, lower))  # [B, K or 1]
        layer = key.split("/", 1)[1]
        scales[f"layer_loss/{layer}"] = float(np.abs(terms).sum(axis=1).max())
    if scales:
        scales["loss"] = max(scales.values())
    return scales


def _data_flow_order(keys):
    """`keys` with ``logits`` moved after the ``activation/`` rows it is made from.

    Both lanes list the logits first; a fault in a layer must be blamed on
    that layer's activation, not on the logits downstream of it.
    """
    keys = list(keys)
    activations = [i for i, k in enumerate(keys) if k.startswith("activation/")]
    if "logits" in keys and activations:
        keys.remove("logits")
        keys.insert(activations[-1], "logits")
    return keys


_INTERNALS = (
    "top_k_index",
    "clip_branch/*",
    "probabilities",
    "difference",
    "gradient/*",
    "grad_norm/*",
    "distance/*",
)


def _is_internal(key):
    return any(fnmatch.fnmatch(key, p) for p in _INTERNALS)


ERROR_KEY = "__error__"


def compare_sides(actual, expected, *, config, loss_only_ok):
    """`compare_all` on two lanes' quantities, with their loss-call errors as rows.

    A lane whose loss raised carries its message under ``ERROR_KEY``; it
    becomes a failed ``loss_call/<side>`` row after the forward rows, which
    could still be compared. Neither dict is modified.

    Args:
        actual: the PyTorch lane's quantities.
        expected: the TensorFlow lane's (or a fixture's) quantities.
        config: the `Config`.
        loss_only_ok: a port that reports only its loss may leave the
            internals out (they are SKIP, not FAIL).

    Returns:
        The rows, in data-flow order.
    """
    errors = []
    for side, values in (("TensorFlow", expected), ("PyTorch", actual)):
        if ERROR_KEY in values:
            errors.append(
                Row(key=f"loss_call/{side}", status=FAIL, message=values[ERROR_KEY])
            )
    actual = {k: v for k, v in actual.items() if k != ERROR_KEY}
    expected = {k: v for k, v in expected.items() if k != ERROR_KEY}
    rows = compare_all(
        actual,
        expected,
        dtype=config.dtype,
        config=config,
        skip_missing_internals=loss_only_ok,
    )
    if errors:
        forward = [r for r in rows if r.quantity in ("input", "logits", "activation")]
        rest = [r for r in rows if r not in forward]
        for r in rest:
            if r.failed and "missing on" in r.message:
                r.message = f"{r.key}: not computed, the loss call failed"
        rows = forward + errors + rest
    return rows


def first_failure(rows):
    """The first failing row in data-flow order, or None."""
    return next((r for r in rows if r.failed), None)
