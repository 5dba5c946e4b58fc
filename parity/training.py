"""Short training runs of both frameworks side by side, and where they part.

Both sides start from the same neutral weights and consume the same batches
from `parity.data.batches`, in the same order. Each step gives one record per
side (`CURVES`); after the last step every parameter, optimizer slot and
batch-norm moving statistic is compared in neutral layout. The first step at
which any curve leaves its tolerance is reported with the quantity.

This module imports neither framework at import time; `compare_training`
imports both.
"""

import csv
import dataclasses
import hashlib

import numpy as np

from parity import compare, report, tolerances
from parity import data as data_lib

__all__ = [
    "CURVES",
    "Recipe",
    "TrainingResult",
    "compare_training",
    "drift",
    "plot",
    "reference_trainer",
    "to_document",
    "torch_state",
    "torch_trainer",
    "write_csv",
]

# Per-step quantities, in data-flow order (the parts of the loss before their
# sum, the loss before its gradient, the update last); the first divergence
# within a step is the first of these that fails.
CURVES = (
    "learning_rate",
    "margin_loss",
    "xent_loss",
    "l2_loss",
    "total_loss",
    "accuracy",
    "grad_norm",
    "clipped_grad_norm",
    "param_norm",
    "moving_norm",
)


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        )


def _non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(
            f"`{name}` must be a non-negative number. Received: {name}={value!r}"
        )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training recipe. Defaults are the reference's (REFERENCE.md section 3).

    Total loss = ``margin_weight * margin + xent_weight * cross_entropy +
    l2_weight * sum_v sum(v**2) / 2`` over all trainable variables; gradients
    clipped by global norm `clip_norm`; TF1 RMSProp with learning rate
    ``learning_rate * decay_rate ** floor(step / decay_steps)``.

    Raises:
        ValueError: if a weight is negative, a rate, step count, clip norm or
            batch size is not positive, or `rms_decay` / `rms_momentum` is
            outside ``[0, 1)``.
    """

    margin_weight: float = 1.0
    xent_weight: float = 0.0
    l2_weight: float = 5e-4
    learning_rate: float = 0.1
    decay_rate: float = 0.96
    decay_steps: int = 2000
    clip_norm: float = 5.0
    rms_decay: float = 0.9
    rms_momentum: float = 0.0
    rms_epsilon: float = 1e-2
    batch_size: int = 256

    def __post_init__(self):
        for name in ("margin_weight", "xent_weight", "l2_weight"):
            _non_negative(name, getattr(self, name))
        for name in ("learning_rate", "decay_rate", "clip_norm", "rms_epsilon"):
            _positive(name, getattr(self, name))
        for name in ("decay_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"`{name}` must be a positive integer. Received: {name}={value!r}"
                )
        for name in ("rms_decay", "rms_momentum"):
            value = getattr(self, name)
            _non_negative(name, value)
            if value >= 1:
                raise ValueError(
                    f"`{name}` must be in [0, 1). Received: {name}={value!r}"
                )

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


@dataclasses.dataclass
class TrainingResult:
    """The outcome of `compare_training`.

    Attributes:
        rows: `parity.compare.Row` per curve and step (keys such as
            ``train_total_loss/step0003``), then one per final parameter
            (``final_param/<name>``), slot (``final_slot/rms/<name>``,
            ``final_slot/momentum/<name>``) and moving statistic
            (``final_moving/<name>``), in neutral names and layout.
        actual: per-step records of the PyTorch side (dicts with ``step`` and
            every name of `CURVES`).
        expected: the same for the TensorFlow side.
        first_divergence: None, or ``(step, quantity)`` of the first failing
            row: a name of `CURVES`, or a final-state key at the last step.
        heldout: ``{"actual": accuracy, "expected": accuracy}`` on the test
            split, batch norm in inference mode, ties counted correct.
        tolerances: what was applied: the rule and the bounds.
        expected_state: the TensorFlow side's final state (``"param"``,
            ``"rms"``, ``"momentum"``, ``"moving"``: neutral name -> array),
            kept so that a later call can reuse this reference run.
        actual_state: the PyTorch side's final state, in the same form.
        fingerprint: identifies the inputs of the reference run.
    """

    rows: list
    actual: list
    expected: list
    first_divergence: object
    heldout: dict
    tolerances: dict
    expected_state: dict = dataclasses.field(default_factory=dict, repr=False)
    actual_state: dict = dataclasses.field(default_factory=dict, repr=False)
    fingerprint: str = ""

    def to_dict(self):
        """`to_document` with the rows added."""
        return {**to_document(self), "rows": [r.to_dict() for r in self.rows]}


def torch_trainer(cfg, recipe, weights, port=None, device="cpu"):
    """A `torch_impl.train.Trainer` of `port` (the built-in one if None) for `cfg`.

    The network is `port`'s, built from the neutral `weights` in `cfg`'s dtype.
    """
    import torch_impl.train
    from parity import torch_side

    port = port or torch_side.Port()
    dtype = torch_side.torch_dtype(cfg.dtype)
    model = port.build_model(cfg.arch, weights, dtype=dtype, device=device)
    return torch_impl.train.Trainer(
        model,
        recipe,
        layers=cfg.layers,
        loss_kwargs=cfg.loss_kwargs,
        loss=port.loss,
        overrides=port.recipe,
    )


def reference_trainer(cfg, recipe, weights, loss_fn=None):
    """A `tf_impl.train.ReferenceTrainer` for `cfg` (its loss `loss_fn` if given)."""
    import tf_impl.train
    from parity import tf_side

    return tf_impl.train.ReferenceTrainer(
        cfg.arch,
        weights,
        recipe,
        layers=cfg.layers,
        loss_kwargs=cfg.loss_kwargs,
        dtype=tf_side.tf_dtype(cfg.dtype),
        loss_fn=loss_fn,
    )


def torch_state(trainer, arch):
    """The final state of a `torch_impl.train.Trainer`, in neutral names.

    Args:
        trainer: the trainer.
        arch: the network's architecture name, for the layout conversion.

    Returns:
        A dict with ``"param"``, ``"rms"``, ``"momentum"`` and ``"moving"``,
        each a dict of neutral name -> numpy array in neutral layout; slots
        the optimizer does not keep under TF1's names are absent.
    """
    import torch

    names = {id(p): n for n, p in trainer.model.named_parameters()}
    param = {names[id(p)]: p.detach().cpu().numpy() for p in trainer.params}
    slots = {"rms": {}, "momentum": {}}
    for p in trainer.params:
        state = trainer.optimizer.state.get(p, {})
        for slot in slots:
            if isinstance(state.get(slot), torch.Tensor):
                slots[slot][names[id(p)]] = state[slot].detach().cpu().numpy()
    moving = {
        n: b.detach().cpu().numpy()
        for n, b in trainer.model.named_buffers()
        if n.endswith("running_mean") or n.endswith("running_var")
    }
    from parity import weights as neutral

    return {
        "param": neutral.torch_to_neutral(arch, param),
        "rms": neutral.torch_to_neutral(arch, slots["rms"]),
        "momentum": neutral.torch_to_neutral(arch, slots["momentum"]),
        "moving": neutral.torch_to_neutral(arch, moving),
    }


_FINAL_PREFIX = {
    "param": "final_param",
    "rms": "final_slot/rms",
    "momentum": "final_slot/momentum",
    "moving": "final_moving",
}


def _beyond_horizon(key, dtype, shape=()):
    horizon = tolerances.TRAINING_TOLERANCES[dtype].horizon
    return compare.Row(
        key=key,
        shape=shape,
        status=compare.SKIP,
        message=(
            f"{key}: not compared: {dtype} runs of this recipe are compared "
            f"up to step {horizon}, after which their trajectories decorrelate "
            "(parity.tolerances.TRAINING_TOLERANCES)"
        ),
    )


def _curve_rows(actual, expected, dtype):
    rows = []
    for a, e in zip(actual, expected, strict=True):
        step = e["step"]
        for name in CURVES:
            key = f"train_{name}/step{step:04d}"
            tol = tolerances.training_tolerance(name, dtype, step)
            if tol is None:
                rows.append(_beyond_horizon(key, dtype))
                continue
            rows.append(
                compare.compare_arrays(
                    key,
                    np.asarray(a[name], np.float64),
                    np.asarray(e[name], np.float64),
                    rtol=tol.rtol,
                    atol=tol.atol,
                )
            )
    return rows


def _final_rows(actual_state, expected_state, dtype, last_step):
    rows = []
    for part, prefix in _FINAL_PREFIX.items():
        tol = tolerances.training_tolerance(prefix.split("/")[0], dtype, last_step)
        a_part, e_part = actual_state[part], expected_state[part]
        for name in list(e_part) + [n for n in a_part if n not in e_part]:
            key = f"{prefix}/{name}"
            if tol is None:
                rows.append(_beyond_horizon(key, dtype, np.shape(e_part.get(name))))
                continue
            rows.append(
                compare.compare_arrays(
                    key,
                    a_part.get(name),
                    e_part.get(name),
                    rtol=tol.rtol,
                    atol=tol.atol,
                )
            )
    return rows


def drift(result):
    """The measured differences of a run, in the units of the tolerance table.

    Curves: per step, ``|actual - expected| / max(|actual|, |expected|)`` (0
    where both are 0). Final states: per group, the greatest ``max |actual -
    expected| / scale`` over its tensors, ``scale`` being the larger magnitude
    of the two tensors (the table's atol unit). Tensors missing on one side
    are left out.

    Returns:
        ``{"curves": {name: [float per step]}, "final": {group: float}}``,
        groups being ``param``, ``rms``, ``momentum`` and ``moving``.
    """
    curves = {}
    for name in CURVES:
        values = []
        for a, e in zip(result.actual, result.expected, strict=True):
            scale = max(abs(a[name]), abs(e[name]))
            values.append(0.0 if scale == 0 else abs(a[name] - e[name]) / scale)
        curves[name] = values
    final = {}
    for part in _FINAL_PREFIX:
        worst = 0.0
        a_part = result.actual_state.get(part, {})
        for name, e in result.expected_state.get(part, {}).items():
            a = a_part.get(name)
            if a is None or np.shape(a) != np.shape(e):
                continue
            a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
            scale = max(np.abs(a).max(initial=0.0), np.abs(e).max(initial=0.0))
            if scale > 0:
                worst = max(worst, float(np.abs(a - e).max() / scale))
        final[part] = worst
    return {"curves": curves, "final": final}


def _first_divergence(rows, last_step):
    for row in rows:
        if not row.failed:
            continue
        if row.key.startswith("train_"):
            name, step = row.key[len("train_") :].split("/step")
            return int(step), name
        return last_step, row.key
    return None


def _fingerprint(cfg, recipe, weights, dataset, steps):
    digest = hashlib.sha256()
    digest.update(
        repr((sorted(cfg.to_dict().items()), recipe.to_dict(), steps)).encode()
    )
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name], np.float64).tobytes())
    for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def compare_training(
    cfg,
    recipe,
    weights,
    dataset,
    *,
    steps,
    port=None,
    device="cpu",
    progress=True,
    reference=None,
):
    """Trains both frameworks for `steps` steps and compares them.

    Args:
        cfg: the `parity.config.Config`: network, loss options, dtype, seed.
            Its `batch_norm` must be ``"train"``.
        recipe: the `Recipe`; its `batch_size` sets the batches.
        weights: neutral weight set both sides start from.
        dataset: a `parity.data.Dataset`; training draws from its train split,
            the held-out accuracy uses its test split.
        steps: number of updates, ``>= 1``.
        port: the `parity.torch_side.Port` under test (its `build_model`,
            `loss` and `recipe` overrides); the built-in port if None.
        device: PyTorch device. TensorFlow places its ops itself.
        progress: show one tqdm bar for both frameworks.
        reference: a `TrainingResult` of an earlier call with the same `cfg`,
            `recipe`, `weights`, `dataset` and `steps`; its TensorFlow run is
            reused instead of trained again (several ports against one
            reference).

    Returns:
        A `TrainingResult`.

    Raises:
        ValueError: if `cfg.batch_norm` is not ``"train"``, `steps` is not a
            positive integer, or the batch size exceeds the training split.
        ValueError: if `reference` was made from other inputs.
    """
    if cfg.batch_norm != "train":
        raise ValueError(
            "training needs batch norm in training mode. "
            f"Received: batch_norm={cfg.batch_norm!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"`steps` must be a positive integer. Received: steps={steps!r}"
        )
    batches = data_lib.batches(len(dataset.x_train), recipe.batch_size, seed=cfg.seed)
    fingerprint = _fingerprint(cfg, recipe, weights, dataset, steps)
    if reference is not None and reference.fingerprint != fingerprint:
        raise ValueError(
            "`reference` must come from the same config, recipe, weights, data "
            "and steps. Received: a reference with another fingerprint"
        )

    import torch
    from tqdm import tqdm

    from parity import torch_side
    from parity import weights as neutral

    torch_dtype = torch_side.torch_dtype(cfg.dtype)
    actual_trainer = torch_trainer(cfg, recipe, weights, port, device)
    expected_trainer = None
    if reference is None:
        expected_trainer = reference_trainer(cfg, recipe, weights)

    def to_torch(x_nhwc):
        x = neutral.activation_to_nchw(x_nhwc)
        return torch.from_numpy(x).to(device=device, dtype=torch_dtype)

    actual = []
    expected = [] if reference is None else list(reference.expected)
    bar = tqdm(
        range(steps), desc="training", unit="step", disable=None if progress else True
    )
    for step in bar:
        index = next(batches)
        x, y = dataset.x_train[index], dataset.y_train[index]
        if expected_trainer is not None:
            expected.append(expected_trainer.step(x, y))
        y_torch = torch.from_numpy(y).to(device)
        actual.append(actual_trainer.step(to_torch(x), y_torch))
        bar.set_postfix(
            expected=f"{expected[step]['total_loss']:.4g}",
            actual=f"{actual[step]['total_loss']:.4g}",
        )
    bar.close()

    y_test = torch.from_numpy(dataset.y_test).to(device)
    if expected_trainer is not None:
        expected_state = expected_trainer.state()
        expected_heldout = expected_trainer.accuracy(dataset.x_test, dataset.y_test)
    else:
        expected_state = reference.expected_state
        expected_heldout = reference.heldout["expected"]
    last = steps - 1
    rows = _curve_rows(actual, expected, cfg.dtype)
    actual_state = torch_state(actual_trainer, cfg.arch)
    rows += _final_rows(actual_state, expected_state, cfg.dtype, last)
    heldout = {
        "actual": actual_trainer.accuracy(to_torch(dataset.x_test), y_test),
        "expected": expected_heldout,
    }
    return TrainingResult(
        rows=rows,
        actual=actual,
        expected=expected,
        first_divergence=_first_divergence(rows, last),
        heldout=heldout,
        tolerances=tolerances.training_tolerance_summary(cfg.dtype, steps),
        expected_state=expected_state,
        actual_state=actual_state,
        fingerprint=fingerprint,
    )


def to_document(result):
    """The JSON-ready record of a training comparison, without its rows.

    Returns:
        A dict with ``steps``, ``actual`` and ``expected`` (per-step records),
        ``first_divergence`` (None or ``{"step", "quantity"}``), ``heldout``
        and ``tolerances``.
    """
    first = result.first_divergence
    return {
        "steps": len(result.expected),
        "actual": [dict(r) for r in result.actual],
        "expected": [dict(r) for r in result.expected],
        "first_divergence": (
            None if first is None else {"step": first[0], "quantity": first[1]}
        ),
        "heldout": dict(result.heldout),
        "tolerances": result.tolerances,
    }


def write_csv(result, path):
    """Writes one row per step: ``step``, then each curve of both sides.

    Columns are ``<curve>_actual`` (PyTorch) and ``<curve>_expected``
    (TensorFlow). The file is written to a temporary name and renamed.
    """
    header = ["step"] + [
        f"{n}_{side}" for n in CURVES for side in ("actual", "expected")
    ]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for a, e in zip(result.actual, result.expected, strict=True):
                row = [e["step"]]
                for name in CURVES:
                    row += [repr(a[name]), repr(e[name])]
                writer.writerow(row)

    report.atomic_write(path, write)


def _allowed(rows, name, step, actual, expected):
    # The bound the row applied, as compare_arrays applies it; NaN (not drawn)
    # for a step past the horizon.
    row = rows.get(f"train_{name}/step{step:04d}")
    if row is None or row.status == compare.SKIP:
        return np.nan
    scale = max(abs(actual), abs(expected))
    return row.atol * scale + row.rtol * abs(expected)


# Curves drawn by `plot`, one column each.
_PLOTTED = ("total_loss", "margin_loss", "xent_loss", "grad_norm", "param_norm")


def plot(result, path):
    """Writes a PNG: each curve of both sides overlaid, their difference below.

    The top row overlays PyTorch (actual) and TensorFlow (expected); the
    bottom row shows ``|actual - expected|`` on a log scale with the bound
    each step allowed (dashed). A vertical line marks the first divergence,
    if any. Uses matplotlib's Agg backend; the
    file is written to a temporary name and renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    steps = [e["step"] for e in result.expected]
    rows = {r.key: r for r in result.rows}
    fig = Figure(figsize=(3.2 * len(_PLOTTED), 5.6), layout="constrained")
    axes = fig.subplots(2, len(_PLOTTED), sharex=True, squeeze=False)
    for col, name in enumerate(_PLOTTED):
        a = np.array([r[name] for r in result.actual], np.float64)
        e = np.array([r[name] for r in result.expected], np.float64)
        top, bottom = axes[0, col], axes[1, col]
        top.plot(
            steps, e, "-", color="tab:orange", lw=2.5, label="TensorFlow (expected)"
        )
        top.plot(steps, a, "--", color="tab:blue", lw=1.2, label="PyTorch (actual)")
        top.set_title(name)
        top.ticklabel_format(axis="y", useOffset=False)
        diff = np.abs(a - e)
        # log scale: a zero difference is drawn at the smallest positive one.
        positive = diff[diff > 0]
        floor = positive.min() / 10 if positive.size else 1e-300
        bottom.semilogy(
            steps, np.maximum(diff, floor), ".-", color="tab:red", label="difference"
        )
        allowed = [
            _allowed(rows, name, s, x, y) for s, x, y in zip(steps, a, e, strict=True)
        ]
        bottom.semilogy(steps, allowed, "--", color="0.5", label="allowed")
        bottom.set_xlabel("step")
        if col == 0:
            bottom.set_ylabel("|actual - expected|")
            top.legend(fontsize="small")
            bottom.legend(fontsize="small")
        if result.first_divergence is not None:
            for ax in (top, bottom):
                ax.axvline(result.first_divergence[0], color="k", ls=":", lw=1)
    title = "training curves"
    if result.first_divergence is not None:
        step, quantity = result.first_divergence
        title += f": first divergence at step {step} ({quantity})"
    else:
        title += ": no divergence within the compared steps"
    skipped = sum(r.status == "SKIP" for r in result.rows)
    notes = ["a zero difference is drawn a decade below the smallest non-zero one"]
    if skipped:
        notes.append(
            f"{skipped} rows past the dtype's horizon are not compared (SKIP); "
            "no 'allowed' line there"
        )
    fig.suptitle(title + "\n" + "; ".join(notes), fontsize="medium")

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=90)

    report.atomic_write(path, write)
