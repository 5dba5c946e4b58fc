"""The one tolerance table: per dtype, values and gradients apart.

An element passes when

    |actual - expected| <= atol * scale + rtol * |expected|

where ``scale`` is the largest magnitude in either tensor. ``atol`` is thus
relative to the tensor as a whole: a layer gradient scaled by ``1 / epsilon``
keeps a meaningful bound, and a tensor that is all zeros on one side fails
against a non-zero one.

How the numbers were measured: ``python -m parity.calibrate`` runs both
frameworks over the whole option grid (dist_norm x top_k in {1, 2, 5} x
worst-case x exact x batch-norm mode), on the reference network with the
bundled digits (batch 256) and on the toy network (batch 32), at seeds 0..2,
and prints the greatest observed value of each bound per class and dtype.
Each entry below is that noise floor, measured on the 2-core CPU of this
project (TensorFlow 2.21 CPU, PyTorch 2.13 CPU), times a margin of about 100
rounded up to a power of ten, so that the table is neither loose enough to
hide a real fault nor tight enough to flake.
"""

import dataclasses

__all__ = ["CLASSES", "TOLERANCES", "Tolerance", "lookup", "tolerance_class"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# Classes: "exact" (inputs, discrete decisions), "value" (forward quantities
# and losses), "gradient" (layer gradients and their norms), "scaled"
# (quantities divided by a gradient norm: distances, and the loss gradient,
# which carries 1 / gradnorm).
TOLERANCES = {
    "float64": {
        "exact": Tolerance(rtol=0.0, atol=0.0),
        # measured floor 2.1e-15 (rel) / 1.5e-15 (atol units), 2026-12-03
        "value": Tolerance(rtol=1e-12, atol=1e-13),
        # measured floor 3.6e-14 / 1.3e-14, 2026-12-03
        "gradient": Tolerance(rtol=1e-11, atol=1e-12),
        # measured floor 4.9e-13 / 2.8e-14, 2026-12-03
        "scaled": Tolerance(rtol=1e-10, atol=1e-11),
    },
    "float32": {
        "exact": Tolerance(rtol=0.0, atol=0.0),
        # measured floor 1.1e-6 / 6.0e-7, 2026-12-03
        "value": Tolerance(rtol=1e-4, atol=1e-5),
        # measured floor 4.2e-5 / 2.2e-6, 2026-12-03
        "gradient": Tolerance(rtol=1e-3, atol=1e-4),
        # measured floor 3.9e-4 / 4.1e-5, 2026-12-03
        "scaled": Tolerance(rtol=1e-2, atol=1e-3),
    },
}

CLASSES = ("exact", "value", "gradient", "scaled")

_BY_PREFIX = {
    "input": "exact",
    "top_k_index": "exact",
    "clip_branch": "exact",
    "logits": "value",
    "activation": "value",
    "probabilities": "value",
    "difference": "value",
    "layer_loss": "value",
    "loss": "value",
    "gradient": "gradient",
    "grad_norm": "gradient",
    "distance": "scaled",
    "loss_gradient": "scaled",
}


def tolerance_class(key):
    """The tolerance class of a quantity key such as ``gradient/input/k0``.

    Raises:
        ValueError: if the quantity is not in the table.
    """
    prefix = key.split("/", 1)[0]
    if prefix.startswith("train_") or prefix.startswith("final_"):
        return "gradient"
    if prefix not in _BY_PREFIX:
        raise ValueError(f"no tolerance class for quantity. Received: key={key!r}")
    return _BY_PREFIX[prefix]


def lookup(key, dtype, overrides=None):
    """The `Tolerance` of quantity `key` at `dtype`.

    Args:
        key: quantity name.
        dtype: ``"float64"`` or ``"float32"``.
        overrides: optional dict class -> Tolerance; an override widens by
            taking the larger of each bound, never narrows.

    Raises:
        ValueError: if `dtype` is not in the table.
    """
    if dtype not in TOLERANCES:
        raise ValueError(
            f"`dtype` must be one of {sorted(TOLERANCES)}. Received: dtype={dtype!r}"
        )
    cls = tolerance_class(key)
    tol = TOLERANCES[dtype][cls]
    if overrides and cls in overrides:
        o = overrides[cls]
        tol = Tolerance(rtol=max(tol.rtol, o.rtol), atol=max(tol.atol, o.atol))
    return tol


# Training curves and final states (`parity.training`). Per-step quantities
# (``train_<curve>``) and final states (``final_param``, ``final_slot``,
# ``final_moving``) share one bound per dtype. In float32 the bound grows with
# the step: rtol(step) = rtol * (1 + step), atol likewise, because rounding
# differences are fed back through every update. PLACEHOLDER: measured below.
TRAINING_TOLERANCES = {
    "float64": Tolerance(rtol=1e-9, atol=1e-10),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
}
TRAINING_GROWTH = {"float64": 0.0, "float32": 1.0}


def training_tolerance(quantity, dtype, step):
    """The `Tolerance` of a training quantity at `step` (0-based).

    Args:
        quantity: a curve name such as ``total_loss``, or a final-state
            prefix such as ``final_param``; all share the dtype's bound.
        dtype: ``"float64"`` or ``"float32"``.
        step: the step, from 0.

    Raises:
        ValueError: if `dtype` is not in the table.
    """
    if dtype not in TRAINING_TOLERANCES:
        raise ValueError(
            f"`dtype` must be one of {sorted(TRAINING_TOLERANCES)}. "
            f"Received: dtype={dtype!r}"
        )
    base = TRAINING_TOLERANCES[dtype]
    factor = 1.0 + TRAINING_GROWTH[dtype] * step
    return Tolerance(rtol=base.rtol * factor, atol=base.atol * factor)


def training_tolerance_summary(dtype, steps):
    """What `training_tolerance` applies over `steps` steps, for reports."""
    base = TRAINING_TOLERANCES[dtype]
    growth = TRAINING_GROWTH[dtype]
    last = training_tolerance("total_loss", dtype, max(steps - 1, 0))
    return {
        "rule": f"bound(step) = base * (1 + {growth:g} * step)",
        "base": {"rtol": base.rtol, "atol": base.atol},
        "last_step": {"rtol": last.rtol, "atol": last.atol},
    }
