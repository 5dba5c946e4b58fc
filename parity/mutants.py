"""A catalogue of faulty PyTorch ports ("mutants"), each caught and located.

A parity check that says PASS is worth what it would have caught. Each mutant
here is one fault that public ports of the large-margin loss carry, planted in
an otherwise correct `parity.torch_side.Port`, together with the setting that
can reveal it (several faults only show on ties, in the exact mode, with batch
norm in training mode, or after optimizer steps) and the row where the
harness should put the blame: the first diverging quantity, in data-flow
order.

``python -m parity.mutants`` runs every mutant through the checks of
``parity.run`` and prints one line per mutant; it exits 0 only when every
mutant is caught at its expected row and the unmodified port passes every
setting the mutants use. `check_port` runs any port, a user's plug-in
included, under those same settings.

Exit codes: 0 all caught and the port passes, 1 otherwise, 2 a usage error.
"""

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import torch_impl
from parity import compare, report, spec, torch_side
from parity import config as config_lib
from parity import data as data_lib
from parity import weights as weights_lib

__all__ = [
    "MUTANTS",
    "SETTINGS",
    "Mutant",
    "MutantResult",
    "PortCheck",
    "Setting",
    "check_mutant",
    "check_port",
    "main",
    "rows_of",
    "run_catalogue",
]

BATCH_SIZE = 64
SEED = 0


# --------------------------------------------------------------------------
# Settings: the configs, weights and training runs that reveal the faults.


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where a port is checked: one config, one weight set, optional training.

    Attributes:
        name: short id shown in the table.
        config: the `Config` of the static check (and of training).
        weights: ``"glorot"`` (seeded Glorot weights) or ``"tie"`` (the same
            with an all-zero logits layer, so that every logit is equal: the
            tie trap of REFERENCE.md section 4).
        steps: training steps; 0 is a static check of one batch.
        recipe: overrides of `parity.training.Recipe` fields for training.
        why: what the setting exercises, for the legend.
    """

    name: str
    config: config_lib.Config
    weights: str = "glorot"
    steps: int = 0
    recipe: tuple = ()
    why: str = ""

    @property
    def training(self):
        return self.steps > 0

    def label(self):
        text = self.config.label()
        if self.weights == "tie":
            text += ",tie-trap"
        if self.steps:
            text += f",train {self.steps} steps"
            if self.recipe:
                text += "," + ",".join(f"{k}={v}" for k, v in self.recipe)
        return text


def _config(**overrides):
    return config_lib.Config(batch_size=BATCH_SIZE, seed=SEED, **overrides)


SETTINGS = {
    s.name: s
    for s in (
        Setting(
            "default",
            _config(),
            why="the reference's training config: inf-norm, K=1, worst case, "
            "approximation, batch norm in training mode",
        ),
        Setting(
            "exact",
            _config(exact=True),
            why="use_approximation=False: second-order terms",
        ),
        Setting(
            "k3-sum-l2",
            _config(top_k=3, worst_case=False, dist_norm=2),
            why="K=3 summed over k (no worst case), 2-norm",
        ),
        Setting(
            "tie-k1",
            _config(),
            weights="tie",
            why="all-equal logits: nine tied maxima, zero layer gradients",
        ),
        Setting(
            "tie-k3",
            _config(top_k=3),
            weights="tie",
            why="all-equal logits with K=3: top-k ties",
        ),
        Setting(
            "train",
            _config(),
            steps=3,
            recipe=(("decay_steps", 2),),
            why="3 training steps of the reference recipe, learning-rate "
            "staircase every 2 steps so that a decay falls inside the run",
        ),
    )
}


def _weights(kind, input_size):
    weights = weights_lib.init_weights("mnist", input_size=input_size, seed=SEED)
    if kind == "tie":
        weights["logits/kernel"] = np.zeros_like(weights["logits/kernel"])
        weights["logits/bias"] = np.zeros_like(weights["logits/bias"])
    return weights


@functools.lru_cache(maxsize=1)
def _dataset():
    return data_lib.load("digits")


def _batch(dataset, batch_size, seed):
    # The first batch of the shared sampler, as parity.run takes it.
    index = next(data_lib.batches(len(dataset.x_train), batch_size, seed=seed))
    return dataset.x_train[index], dataset.y_train[index]


# --------------------------------------------------------------------------
# Loss mutants: torch_impl.loss.large_margin_parts with one fault planted.


def _dual_norm(grad, q):
    flat = grad.reshape(grad.shape[0], -1)  # [B, prod(layer shape)]
    if q == math.inf:
        return flat.abs().amax(dim=1)
    if q == 1:
        return flat.abs().sum(dim=1)
    return torch.linalg.vector_norm(flat, ord=2, dim=1)


def _select(other, top_k, fault):
    """Values ``[B, K]`` and indices ``[B, K]`` of the top-k, faulty or not."""
    if fault == "max_one_class" and top_k == 1:
        # torch.max(dim=) routes a tied maximum's whole gradient to one index.
        values, index = torch.max(other, dim=1, keepdim=True)
        return values, index
    if fault == "unstable_top_k":
        # torch.topk makes no promise on ties; on this project's CPU it puts
        # a higher index first. Where it happens to be stable, a stable sort
        # of the reversed row stands in for it: the higher index first.
        if _topk_is_stable():
            return _higher_index_first(other, top_k)
        return torch.topk(other, top_k, dim=1)
    index = torch.sort(other.detach(), dim=1, descending=True, stable=True)
    index = index.indices[:, :top_k]
    if top_k == 1:
        return other.amax(dim=1, keepdim=True), index
    return other.gather(1, index), index


def _higher_index_first(other, top_k):
    """An unstable top-k: among equal values, the higher index comes first."""
    rev = torch.sort(other.detach().flip(1), dim=1, descending=True, stable=True)
    index = other.shape[1] - 1 - rev.indices[:, :top_k]  # [B, K]
    return other.gather(1, index), index


@functools.lru_cache(maxsize=1)
def _topk_is_stable():
    ties = torch.full((1, 10), 0.1, dtype=torch.float64)
    return torch.topk(ties, 3, dim=1).indices.tolist() == [[0, 1, 2]]


def _gradients(diff, layers_list, top_k, create_graph, fault):
    """Per k, the tuple of layer gradients ``d(sum_b diff[b, k]) / d h_l``."""
    per_k = []
    for k in range(top_k):
        if fault == "per_example_gradients":
            # d diff[b, k] / d h_l[b] for each b alone, one backward pass per
            # example, batched over one-hot output gradients: each result
            # [B, B, ...] keeps its diagonal, and the cross-example terms
            # through batch statistics are lost.
            batch = diff.shape[0]
            eye = torch.eye(batch, dtype=diff.dtype, device=diff.device)
            grads = torch.autograd.grad(
                diff[:, k],
                layers_list,
                grad_outputs=eye,
                retain_graph=True,
                create_graph=create_graph,
                is_grads_batched=True,
            )
            index = torch.arange(batch, device=diff.device)
            per_k.append(tuple(g[index, index] for g in grads))
        elif fault == "backward_grad":
            # .backward() and .grad: the layers' gradients are right, but the
            # same backward pass adds d(sum_b diff)/d theta into every
            # parameter's .grad, where the optimizer will find it.
            for layer in layers_list:
                if not layer.is_leaf:
                    layer.retain_grad()
                layer.grad = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # create_graph reference-cycle note
                diff[:, k].sum().backward(retain_graph=True, create_graph=create_graph)
            per_k.append(tuple(layer.grad for layer in layers_list))
            for layer in layers_list:
                layer.grad = None
        else:
            per_k.append(
                torch.autograd.grad(
                    diff[:, k].sum(),
                    layers_list,
                    retain_graph=True,
                    create_graph=create_graph and fault != "no_second_order",
                )
            )
    return per_k


def _faulty_parts(
    fault,
    *,
    logits,
    one_hot_labels,
    layers_list,
    gamma,
    alpha_factor,
    top_k,
    dist_norm,
    epsilon,
    use_approximation,
    worst_case_loss,
    layers_weights,
):
    """`torch_impl.large_margin_parts` with the fault `fault` planted.

    The correct steps are those of REFERENCE.md section 1; each ``fault ==``
    branch is one departure from them, named in `MUTANTS`.
    """
    q = spec.dual_norm_order(dist_norm)
    if fault == "primal_norm":
        q = spec.check_dist_norm(dist_norm)
    weights = spec.check_layers_weights(layers_weights, len(layers_list))
    labels = one_hot_labels.to(logits.dtype)

    prob = logits if fault == "logits_for_probabilities" else F.softmax(logits, dim=1)
    correct = (prob * labels).sum(dim=1, keepdim=True)  # [B, 1]
    if fault == "inplace_zero_correct":
        # softmax's backward reads its output, which this overwrites: autograd
        # refuses at the first gradient.
        other = prob
        other[labels.bool()] = 0.0
    else:
        other = prob * (1.0 - labels)  # [B, C]
    top, top_index = _select(other, top_k, fault)  # [B, K]
    diff = correct - top  # [B, K]

    per_k = _gradients(diff, layers_list, top_k, not use_approximation, fault)

    norms = []
    for i, weight in enumerate(weights):
        norm = torch.stack([_dual_norm(g[i], q) for g in per_k], dim=1)  # [B, K]
        if fault != "layer_weight_ignored":
            norm = norm / weight
        if use_approximation:
            norm = norm.detach()
        norms.append(norm)

    distances = []
    for norm in norms:
        if fault == "epsilon_floor":
            dist = diff / torch.clamp(norm, min=epsilon)
        elif fault == "inplace_difference":
            # Divides the difference in place, column by column, to save a
            # copy: every layer's distance is a view of the same storage, and
            # each layer after the first divides an already divided value.
            for k in range(top_k):
                diff[:, k].div_(norm[:, k] + epsilon)
            dist = diff
        else:
            dist = diff / (norm + epsilon)  # [B, K]
        distances.append(dist)

    layer_parts = []
    lower = gamma * (1.0 - alpha_factor)
    for i in range(len(weights)):
        dist = distances[i]
        clipped = dist.amin(dim=1, keepdim=True) if worst_case_loss else dist
        v = clipped + F.relu(lower - clipped)
        loss_b = F.relu(gamma - v) - gamma  # [B, K or 1]
        if fault == "no_gamma_shift":
            loss_b = F.relu(gamma - v)
        elif fault == "loss_sign_flipped":
            loss_b = -loss_b
        reduced = loss_b.mean(dim=1) if fault == "mean_over_k" else loss_b.sum(dim=1)
        layer_parts.append(
            {
                "gradient": torch.stack([g[i] for g in per_k]),  # [K, B, ...]
                "grad_norm": norms[i],
                "distance": dist,
                "clip_branch": torch_impl.loss.clip_branch(
                    clipped.detach(), gamma, alpha_factor
                ),
                "loss": reduced.mean(),
            }
        )

    loss = torch.stack([p["loss"] for p in layer_parts]).mean()
    return {
        "loss": loss,
        "probabilities": prob,
        "difference": diff,
        "top_k_index": top_index,
        "layers": layer_parts,
    }


def _loss_mutant(fault):
    """A loss with `large_margin`'s keyword signature and the fault planted."""

    def loss(
        *,
        logits,
        one_hot_labels,
        layers_list,
        gamma=spec.DEFAULTS["gamma"],
        alpha_factor=spec.DEFAULTS["alpha_factor"],
        top_k=spec.DEFAULTS["top_k"],
        dist_norm=spec.DEFAULTS["dist_norm"],
        epsilon=spec.DEFAULTS["epsilon"],
        use_approximation=spec.DEFAULTS["use_approximation"],
        worst_case_loss=spec.DEFAULTS["worst_case_loss"],
        layers_weights=spec.DEFAULTS["layers_weights"],
    ):
        return _faulty_parts(
            fault,
            logits=logits,
            one_hot_labels=one_hot_labels,
            layers_list=layers_list,
            gamma=gamma,
            alpha_factor=alpha_factor,
            top_k=top_k,
            dist_norm=dist_norm,
            epsilon=epsilon,
            use_approximation=use_approximation,
            worst_case_loss=worst_case_loss,
            layers_weights=layers_weights,
        )

    loss.__name__ = loss.__qualname__ = f"large_margin_{fault}"
    return loss


# --------------------------------------------------------------------------
# Network mutants: torch_impl.build_model, then one layout or layer fault.


def _build_flatten_nchw(arch, weights, *, dtype=torch.float64, device="cpu", **kw):
    model = torch_impl.build_model(arch, weights, dtype=dtype, device=device, **kw)
    # The TF kernel's rows are in NHWC order; loaded without the permutation
    # into a network that flattens NCHW, every row meets the wrong feature.
    kernel = np.asarray(weights["fc_layer0/kernel"]).T  # [out, in], NHWC rows
    with torch.no_grad():
        model.fc_layer0.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
    return model


def _build_kernel_hw_swapped(arch, weights, *, dtype=torch.float64, device="cpu", **kw):
    model = torch_impl.build_model(arch, weights, dtype=dtype, device=device, **kw)
    with torch.no_grad():
        for i in range(2):
            # HWIO -> OIWH instead of OIHW: right shape for square kernels,
            # wrong orientation (the Glorot kernels are not symmetric).
            kernel = np.asarray(weights[f"conv_layer{i}/kernel"]).transpose(3, 2, 1, 0)
            conv = getattr(model, f"conv_layer{i}").conv
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
    return model


def _build_batch_norm(momentum=None, eps=None):
    def build(arch, weights, *, dtype=torch.float64, device="cpu", **kw):
        model = torch_impl.build_model(arch, weights, dtype=dtype, device=device, **kw)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                if momentum is not None:
                    module.momentum = momentum
                if eps is not None:
                    module.eps = eps
        return model

    return build


# --------------------------------------------------------------------------
# The catalogue.


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One planted fault.

    Attributes:
        name: short id.
        description: one line of what real ports get wrong.
        port: the faulty `Port`.
        setting: name of the `Setting` (in `SETTINGS`) that reveals it.
        expected_row: the key prefix of the first row that should fail, such
            as ``"loss_gradient/"`` or ``"train_loss/step0001"``.
        kind: ``"loss"``, ``"network"`` or ``"training"``.
    """

    name: str
    description: str
    port: torch_side.Port
    setting: str
    expected_row: str
    kind: str = "loss"


def _loss(name, description, setting, expected_row):
    port = torch_side.Port(name=name, loss=_loss_mutant(name))
    return Mutant(name, description, port, setting, expected_row, "loss")


def _network(name, description, build, setting, expected_row):
    port = torch_side.Port(name=name, build_model=build)
    return Mutant(name, description, port, setting, expected_row, "network")


_LOSS_MUTANTS = (
    _loss(
        "no_second_order",
        "exact mode without create_graph=True: silently the approximation",
        "exact",
        "loss_gradient/",
    ),
    _loss(
        "mean_over_k",
        "mean over the k competing classes where the reference sums",
        "k3-sum-l2",
        "layer_loss/input",
    ),
    _loss(
        "layer_weight_ignored",
        "gradient norm not divided by the per-layer weight",
        "default",
        "grad_norm/input",
    ),
    _loss(
        "primal_norm",
        "the norm of dist_norm taken where its dual belongs",
        "default",
        "grad_norm/input",
    ),
    _loss(
        "max_one_class",
        "torch.max(dim=) for K=1: a tied maximum's gradient goes to one class",
        "tie-k1",
        "loss_gradient/logits/kernel",
    ),
    _loss(
        "unstable_top_k",
        "torch.topk on ties: not the lower index first",
        "tie-k3",
        "top_k_index",
    ),
    _loss(
        "epsilon_floor",
        "max(norm, epsilon) where the reference adds epsilon",
        "default",
        "distance/input",
    ),
    _loss(
        "per_example_gradients",
        "per-example layer gradients, not the gradient of the batch sum",
        "default",
        "gradient/input/k0",
    ),
    _loss(
        "logits_for_probabilities",
        "the margin taken on logits instead of softmax probabilities",
        "default",
        "probabilities",
    ),
    _loss(
        "no_gamma_shift",
        "the -gamma shift of the clipped loss dropped (gradients unchanged)",
        "default",
        "layer_loss/input",
    ),
    _loss(
        "loss_sign_flipped",
        "the clipped loss negated",
        "default",
        "layer_loss/input",
    ),
    _loss(
        "inplace_difference",
        "distance computed by dividing the difference in place, layer by layer",
        "default",
        "clip_branch/input",
    ),
    _loss(
        "inplace_zero_correct",
        "correct class zeroed in place in the softmax output autograd needs",
        "default",
        "loss_call/PyTorch",
    ),
    _loss(
        "backward_grad",
        "per-class gradients via .backward() and .grad: piled into parameters",
        "default",
        "loss_gradient/conv_layer0/kernel",
    ),
)

_NETWORK_MUTANTS = (
    _network(
        "flatten_nchw",
        "TF dense kernel loaded without permuting rows to NCHW flatten order",
        _build_flatten_nchw,
        "default",
        "activation/fc_layer0",
    ),
    _network(
        "kernel_hw_swapped",
        "conv kernel HWIO -> OIWH: height and width swapped",
        _build_kernel_hw_swapped,
        "default",
        "activation/conv_layer0",
    ),
    _network(
        "batch_norm_epsilon",
        "batch-norm epsilon 1e-3 (Keras's default) instead of 1e-5",
        _build_batch_norm(eps=1e-3),
        "default",
        "activation/conv_layer0",
    ),
)


def _torch_rmsprop(params, lr, recipe):
    return torch.optim.RMSprop(
        params,
        lr=lr,
        alpha=recipe.rms_decay,
        eps=recipe.rms_epsilon,
        momentum=recipe.rms_momentum,
    )


def _staircase_off_by_one(step, recipe):
    # The global step after its increment: every decay comes one update early.
    return recipe.learning_rate * recipe.decay_rate ** (
        (step + 1) // recipe.decay_steps
    )


def _training(name, description, recipe, setting, expected_row, build=None):
    port = torch_side.Port(name=name, recipe=recipe)
    if build is not None:
        port.build_model = build
    return Mutant(name, description, port, setting, expected_row, "training")


_TRAINING_MUTANTS = (
    _training(
        "batch_norm_momentum",
        "batch-norm momentum=0.9 in PyTorch's convention (TF's 0.9 is 0.1)",
        {},
        "train",
        "train_moving_norm/step0000",
        build=_build_batch_norm(momentum=0.9),
    ),
    _training(
        "torch_rmsprop",
        "torch.optim.RMSprop for TF1 RMSProp: accumulator from 0, eps outside",
        {"optimizer": _torch_rmsprop},
        "train",
        "train_param_norm/step0000",
    ),
    _training(
        "weight_decay_for_l2",
        "weight decay added to the gradient in place of the L2 loss term",
        {"l2": "weight_decay"},
        "train",
        "train_total_loss/step0000",
    ),
    _training(
        "l2_weights_only",
        "L2 over kernels only, not biases and batch-norm scale and offset",
        {"l2": "weights_only"},
        "train",
        "train_l2_loss/step0000",
    ),
    _training(
        "staircase_off_by_one",
        "learning-rate staircase from the incremented step: decays 1 step early",
        {"lr_schedule": _staircase_off_by_one},
        "train",
        "train_learning_rate/step0001",
    ),
)

MUTANTS = {m.name: m for m in _LOSS_MUTANTS + _NETWORK_MUTANTS + _TRAINING_MUTANTS}


# --------------------------------------------------------------------------
# Running the checks.


@dataclasses.dataclass
class PortCheck:
    """One port under one setting: its rows and where it first fails."""

    setting: Setting
    rows: list
    first: object  # compare.Row or None

    @property
    def passed(self):
        return self.first is None


@dataclasses.dataclass
class MutantResult:
    """One mutant's check."""

    mutant: Mutant
    check: PortCheck

    @property
    def caught(self):
        return self.check.first is not None

    @property
    def first_row(self):
        first = self.check.first
        return "" if first is None else first.key

    @property
    def located(self):
        """Whether the first failing row is the one the fault should produce."""
        return self.caught and self.first_row.startswith(self.mutant.expected_row)

    def to_dict(self):
        first = self.check.first
        return {
            "mutant": self.mutant.name,
            "kind": self.mutant.kind,
            "description": self.mutant.description,
            "setting": self.check.setting.name,
            "config": self.check.setting.label(),
            "caught": self.caught,
            "first_row": first.to_dict() if first else None,
            "expected_row": self.mutant.expected_row,
            "located": self.located,
        }


class _Expected:
    """The TensorFlow side of each setting, computed once.

    Static settings keep the TensorFlow quantities; training settings keep
    the first `TrainingResult`, whose TensorFlow run later calls reuse.
    """

    def __init__(self):
        self._cache = {}
        self.training = {}

    def get(self, setting, weights, x, y):
        key = (setting.config, setting.weights)
        if key not in self._cache:
            from parity import tf_side

            self._cache[key] = tf_side.quantities(setting.config, weights, x, y)
        return dict(self._cache[key])


def _error_row(key, message):
    return compare.Row(key=key, status=compare.FAIL, message=message)


def _static_rows(setting, port, expected, weights, x, y, device):
    # parity.run.run_static's comparison, on a cached expected side, with a
    # port that fails outside its loss (building or running the network)
    # reported as a failed row as well.
    cfg = setting.config
    try:
        actual = torch_side.quantities(cfg, weights, x, y, port=port, device=device)
    except Exception as e:  # a port under test may fail in any way
        # Nothing was computed, not even the forward pass: the error row
        # comes first.
        message = f"the {port.name} port raised {type(e).__name__}: {e}"
        rows = compare.compare_all({}, expected, dtype=cfg.dtype, config=cfg)
        for r in rows:
            r.message = f"{r.key}: not computed, the port failed"
        return [_error_row("port_call/PyTorch", message)] + rows
    return compare.compare_sides(
        actual, expected, config=cfg, loss_only_ok=port.name != "torch_impl"
    )


def _training_rows(setting, port, weights, dataset, device, references):
    from parity import training

    recipe = training.Recipe(
        batch_size=setting.config.batch_size, **dict(setting.recipe)
    )
    try:
        result = training.compare_training(
            setting.config,
            recipe,
            weights,
            dataset,
            steps=setting.steps,
            port=port,
            device=device,
            progress=False,
            reference=references.get(setting),
        )
    except Exception as e:  # a port under test may fail in any way
        return [_error_row("train_call/PyTorch", f"{type(e).__name__}: {e}")]
    references.setdefault(setting, result)
    return list(result.rows)


class _Runner:
    """Runs ports under settings, sharing the data, weights and TF side."""

    def __init__(self, device="cpu"):
        self.device = device
        self.dataset = _dataset()
        self.expected = _Expected()

    def check(self, port, setting):
        weights = _weights(setting.weights, self.dataset.input_size)
        if setting.training:
            rows = _training_rows(
                setting,
                port,
                weights,
                self.dataset,
                self.device,
                self.expected.training,
            )
        else:
            cfg = setting.config
            x, y = _batch(self.dataset, cfg.batch_size, cfg.seed)
            expected = self.expected.get(setting, weights, x, y)
            rows = _static_rows(setting, port, expected, weights, x, y, self.device)
        return PortCheck(setting, rows, compare.first_failure(rows))


def _settings_of(mutants):
    names = []
    for m in mutants:
        if m.setting not in names:
            names.append(m.setting)
    return [SETTINGS[n] for n in names]


def check_port(port, settings=None, *, device="cpu", progress=False, runner=None):
    """Checks a port exactly as a mutant is checked, under every setting.

    This is what ``parity.run --torch-loss`` plug-ins go through: the
    settings are those the catalogue needs to reveal its faults (ties, the
    exact mode, K > 1, batch norm in training mode, training steps), so a
    port that passes here would have caught every fault of the catalogue.

    Args:
        port: the `Port` under test.
        settings: `Setting`s or their names; every setting the catalogue's
            mutants use if None.
        device: PyTorch device.
        progress: show a tqdm bar on stderr.
        runner: internal, shares the TensorFlow side between calls.

    Returns:
        A list of `PortCheck`, one per setting; a check passed when its
        ``first`` is None.

    Raises:
        ValueError: if a setting name is unknown.
    """
    if settings is None:
        settings = _settings_of(MUTANTS.values())
    resolved = []
    for s in settings:
        if isinstance(s, str):
            if s not in SETTINGS:
                raise ValueError(
                    f"`settings` must name entries of {sorted(SETTINGS)}. "
                    f"Received: settings={s!r}"
                )
            s = SETTINGS[s]
        resolved.append(s)
    runner = runner or _Runner(device)
    out = []
    for s in _progress(resolved, progress, f"{port.name}"):
        out.append(runner.check(port, s))
    return out


def rows_of(checks):
    """The rows of several `PortCheck`s in one list, keys ``<setting>::<key>``.

    For `parity.report`'s table, summary, JSON and JUnit writers.
    """
    return [
        dataclasses.replace(r, key=f"{c.setting.name}::{r.key}")
        for c in checks
        for r in c.rows
    ]


def check_mutant(mutant, *, device="cpu", runner=None):
    """Runs one mutant under its setting; returns a `MutantResult`."""
    runner = runner or _Runner(device)
    return MutantResult(mutant, runner.check(mutant.port, SETTINGS[mutant.setting]))


def run_catalogue(names=None, *, device="cpu", progress=False):
    """Every mutant (or those in `names`), then the unmodified port.

    Returns:
        A pair: the list of `MutantResult`, and the list of `PortCheck` of
        ``Port()`` under every setting those mutants use.

    Raises:
        ValueError: if a name is not in `MUTANTS`.
    """
    names = list(MUTANTS) if names is None else list(names)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        raise ValueError(
            f"mutant names must be among {sorted(MUTANTS)}. Received: {unknown}"
        )
    mutants = [MUTANTS[n] for n in names]
    settings = _settings_of(mutants)
    runner = _Runner(device)
    jobs = [("mutant", m) for m in mutants] + [("baseline", s) for s in settings]
    results, baseline = [], []
    for kind, item in _progress(jobs, progress, "mutants"):
        if kind == "mutant":
            results.append(check_mutant(item, runner=runner))
        else:
            baseline.append(runner.check(torch_side.Port(), item))
    return results, baseline


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm import tqdm

    # disable=None: no bar where stderr is not a terminal.
    return tqdm(items, desc=desc, file=sys.stderr, leave=False, disable=None)


# --------------------------------------------------------------------------
# Command line.


def _short(text, width):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(results, baseline):
    """The catalogue as a fixed-width table, a settings legend and a verdict."""
    header = (
        f"{'mutant':<25} {'description':<70} {'setting':<10} {'result':<7} "
        f"{'first diverging row':<34} expected row"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        first = r.check.first
        row = "-" if first is None else first.key
        located = "yes" if r.located else f"NO (expected {r.mutant.expected_row})"
        lines.append(
            f"{r.mutant.name:<25} {_short(r.mutant.description, 70):<70} "
            f"{r.check.setting.name:<10} {'CAUGHT' if r.caught else 'MISSED':<7} "
            f"{row:<34} {located}"
        )
        if first is not None and first.key.endswith("_call/PyTorch"):
            # A port that raised: its message is the finding.
            lines.append(f"{'':<25} {_short(first.message, 140)}")
    lines.append("")
    lines.append("unmodified port (torch_impl) under each setting:")
    for check in baseline:
        verdict = "PASS" if check.passed else f"FAIL at {check.first.key}"
        lines.append(
            f"  {check.setting.name:<10} {len(check.rows):>3} rows  {verdict:<8} "
            f"{check.setting.label()}"
        )
    lines.append("")
    lines.append("settings:")
    for s in {c.setting.name: c.setting for c in baseline}.values():
        lines.append(f"  {s.name:<10} {s.why}")
    return "\n".join(lines)


def exit_code(results, baseline):
    """0 when every mutant is caught at its expected row and the port passes."""
    ok = all(r.located for r in results) and all(c.passed for c in baseline)
    return 0 if ok else 1


def _write_json(path, results, baseline, seconds):
    from parity import report

    report.write_json(
        path,
        rows=rows_of(baseline),
        config={c.setting.name: c.setting.label() for c in baseline},
        extra={
            "mutants": [r.to_dict() for r in results],
            "all_caught": all(r.caught for r in results),
            "all_located": all(r.located for r in results),
            "baseline_passed": all(c.passed for c in baseline),
            "seconds": seconds,
        },
    )


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m parity.mutants",
        description="Run the catalogue of faulty PyTorch ports through the parity "
        "checks: every one must be caught, at the row its fault should produce, "
        "and the unmodified port must pass every setting they use.",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        default=None,
        help=f"run only these mutants ({', '.join(MUTANTS)})",
    )
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per framework (default 1: the networks are "
        "tiny, and more threads than free cores slow them down many "
        "times over)",
    )
    return p


def _set_threads(threads):
    torch.set_num_threads(threads)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already initialised: keep its pools
        pass


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS.values():
            print(f"{m.name:<25} {m.kind:<8} {m.setting:<10} {m.description}")
        return 0
    if args.json is not None:
        try:
            report.check_output_path(args.json, "--json")
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
    if args.only:
        unknown = [n for n in args.only if n not in MUTANTS]
        if unknown:
            parser.exit(
                2,
                f"error: --only names unknown mutants. Received: {unknown}; "
                f"known: {', '.join(MUTANTS)}\n",
            )

    if args.threads < 1:
        parser.exit(
            2,
            f"error: --threads must be 1 or more. Received: --threads={args.threads}\n",
        )
    _set_threads(args.threads)
    started = time.perf_counter()
    results, baseline = run_catalogue(args.only, progress=not args.quiet)
    seconds = time.perf_counter() - started
    print(format_table(results, baseline))
    print(f"seconds {seconds:.1f}")
    caught = sum(r.caught for r in results)
    located = sum(r.located for r in results)
    print(
        f"mutants {len(results)} caught {caught} located {located} "
        f"baseline {'PASS' if all(c.passed for c in baseline) else 'FAIL'}"
    )
    if args.json:
        _write_json(args.json, results, baseline, seconds)
    return exit_code(results, baseline)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
