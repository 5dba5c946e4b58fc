"""The one tolerance table: per dtype, values and gradients apart.

An element passes when

    |actual - expected| <= atol * scale + rtol * |expected|

where ``scale`` is the largest magnitude in either tensor. ``atol`` is thus
relative to the tensor as a whole: a layer gradient scaled by ``1 / epsilon``
keeps a meaningful bound, and a tensor that is all zeros on one side fails
against a non-zero one.

How the numbers were measured: ``python -m parity.calibrate --seeds 1``
runs both frameworks over the whole option grid (dist_norm x top_k in
{1, 2, 5} x worst-case x exact x batch-norm mode), on the reference network
with the bundled digits (batch 256, every layer) and on the toy network
(batch 32), in both dtypes: 288 configs. It prints, per class and dtype, the
greatest difference seen in atol units (|actual - expected| / scale) and in
rtol units (|actual - expected| / |expected|, over elements of at least 1e-3
of the scale). The floors below come from that run on 2026-12-03, on this
project's 2-core CPU (TensorFlow 2.21 CPU, PyTorch 2.13 CPU). Each ``atol`` is
its floor times a margin of 20 to 100, rounded up to a power of ten, so that
the table is neither loose enough to hide a real fault nor tight enough to
flake. ``rtol`` is set equal to ``atol``: near the tensor's scale the two
units coincide, and the small elements whose relative error is larger (the
rtol floor) already pass through ``atol * scale``. The mutant catalogue
(``python -m parity.mutants``) is the check that it is not too loose.
"""

import dataclasses

__all__ = [
    "CLASSES",
    "TOLERANCES",
    "TRAINING_TOLERANCES",
    "Tolerance",
    "TrainingTolerance",
    "lookup",
    "tolerance_class",
    "training_tolerance",
    "training_tolerance_summary",
]


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
        # floor: atol 2.6e-14, rtol 3.2e-12 (288 configs, 2026-12-03)
        "value": Tolerance(rtol=1e-12, atol=1e-12),
        # floor: atol 2.3e-14, rtol 3.9e-12
        "gradient": Tolerance(rtol=1e-12, atol=1e-12),
        # floor: atol 3.4e-14, rtol 3.9e-12
        "scaled": Tolerance(rtol=1e-12, atol=1e-12),
    },
    "float32": {
        "exact": Tolerance(rtol=0.0, atol=0.0),
        # floor: atol 4.3e-6, rtol 1.5e-3
        "value": Tolerance(rtol=1e-4, atol=1e-4),
        # floor: atol 1.1e-5, rtol 1.4e-3
        "gradient": Tolerance(rtol=1e-3, atol=1e-3),
        # floor: atol 2.4e-5, rtol 2.5e-3 (distances and loss gradients divide
        # by a gradient norm, which float32 rounding moves the most)
        "scaled": Tolerance(rtol=1e-3, atol=1e-3),
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


@dataclasses.dataclass(frozen=True)
class TrainingTolerance:
    """The bound of training quantities: ``Tolerance`` at step 0, growing.

    At step ``s`` (from 0) the bound is ``rtol * growth**s`` and ``atol *
    growth**s``. Steps after `horizon` are not compared (None: every step).
    """

    rtol: float
    atol: float
    growth: float
    horizon: object = None


# Training curves (``train_<curve>``) and final states (``final_param``,
# ``final_slot``, ``final_moving``) of `parity.training`, one rule per dtype.
# The recipe is chaotic: the margin loss divides by gradient norms, so a
# rounding difference in the parameters comes back much larger in the loss
# and its gradient, and every update feeds it forward. The measured drift is
# therefore geometric in the step, and so is the bound.
#
# How measured: `parity.training.drift` (relative difference per step for
# curves; max |difference| / tensor scale for final states) of 20-step runs
# on the bundled digits, batch 256, default recipe, reference config, with
# the reference layers and with --layers all, seeds 0 and 1; and of 5-step
# runs at batch 32 (the tests' setting), seeds 0..2. 2-core CPU, TensorFlow
# 2.21 CPU, PyTorch 2.13 CPU, 2026-12-03.
TRAINING_TOLERANCES = {
    # Worst curve drift: 8e-16 at step 0, 3e-13 at step 1 (a step left
    # unclipped), 2e-11 at step 11, 3e-10 at step 19; it grows by about 2 per
    # step. Final states after 20 steps: 1.5e-10 (momentum slot), 6e-11
    # (parameters), 2e-11 (rms slot), 1e-11 (moving statistics). The bound
    # doubles per step from 1e-12, keeping a margin of 7 at step 1 and over
    # 100 from step 4 on; at step 19 it is 5e-7 (rtol) and 5e-8 (atol).
    "float64": TrainingTolerance(rtol=1e-12, atol=1e-13, growth=2.0, horizon=None),
    # Worst curve drift: 7e-7 at step 0, 4e-5 at step 1, 1e-3 at step 2,
    # 1e-2 at step 3 and 3e-1 at step 4 (the margin loss with --layers all at
    # batch 256): the two float32 runs decorrelate within five steps, so no
    # bound after that would mean anything. The bound grows tenfold per step
    # from 1e-4 and stops at step 2, where it reaches 1e-2 (the single-batch
    # float32 bound of quantities divided by a gradient norm); later steps and
    # the final state of longer runs are reported as not compared.
    "float32": TrainingTolerance(rtol=1e-4, atol=1e-5, growth=10.0, horizon=2),
}


def training_tolerance(quantity, dtype, step):
    """The `Tolerance` of a training quantity at `step`, or None past the horizon.

    Args:
        quantity: a curve name such as ``total_loss``, or a final-state
            prefix such as ``final_param``; all share the dtype's rule.
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
    rule = TRAINING_TOLERANCES[dtype]
    if rule.horizon is not None and step > rule.horizon:
        return None
    factor = rule.growth**step
    return Tolerance(rtol=rule.rtol * factor, atol=rule.atol * factor)


def training_tolerance_summary(dtype, steps):
    """What `training_tolerance` applies over `steps` steps, for reports."""
    rule = TRAINING_TOLERANCES[dtype]
    last = steps - 1 if rule.horizon is None else min(steps - 1, rule.horizon)
    bound = training_tolerance("total_loss", dtype, max(last, 0))
    return {
        "rule": f"bound(step) = base * {rule.growth:g}**step",
        "base": {"rtol": rule.rtol, "atol": rule.atol},
        "growth": rule.growth,
        "horizon": rule.horizon,
        "last_compared_step": last,
        "at_last_compared_step": {"rtol": bound.rtol, "atol": bound.atol},
    }
