"""The reference's training recipe in PyTorch, one step at a time.

REFERENCE.md section 3 states the recipe: total loss = margin weight x margin
loss + cross-entropy weight x cross-entropy + L2 weight x the sum over all
trainable variables of ``sum(v**2) / 2``; gradients clipped by global norm
with TensorFlow's rule; TF1 RMSProp (`torch_impl.optim.TF1RMSProp`) with a
staircase learning-rate decay; batch-norm moving statistics updated on every
step. The recipe object is read by attribute (see `parity.training.Recipe`),
so this module imports nothing from the harness.
"""

import math

import torch
import torch.nn.functional as F

from torch_impl.loss import large_margin_parts
from torch_impl.optim import TF1RMSProp

__all__ = [
    "RECIPE_OVERRIDES",
    "Trainer",
    "clip_by_global_norm",
    "global_norm",
    "staircase_lr",
]

# Keys a caller may override in `Trainer(overrides=...)`; `parity.torch_side.Port`
# documents them.
RECIPE_OVERRIDES = ("optimizer", "l2", "lr_schedule", "clip")
_L2_MODES = ("all", "weights_only", "weight_decay")


def global_norm(tensors):
    """``sqrt(sum_i sum(t_i**2))`` over a list of tensors, as a 0-d tensor.

    An empty list (a network without batch norm has no moving statistics)
    gives 0.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.sqrt(sum((t * t).sum() for t in tensors))


def clip_by_global_norm(grads, clip_norm):
    """Scales `grads` by ``clip_norm / max(global_norm, clip_norm)``, TF's rule.

    `tf.clip_by_global_norm` computes the scale as ``clip_norm *
    min(1 / norm, 1 / clip_norm)``; this function does the same operations.

    Warning:
        `torch.nn.utils.clip_grad_norm_` is not this rule: it scales by
        ``min(clip_norm / (norm + 1e-6), 1)``. Above the clip it shrinks the
        gradient by an extra factor ``norm / (norm + 1e-6)`` (visible in
        float64), and for a norm in ``(clip_norm - 1e-6, clip_norm]`` it
        clips where TensorFlow leaves the gradient alone.

    Args:
        grads: list of gradient tensors.
        clip_norm: the largest global norm kept, ``> 0``.

    Returns:
        The list of scaled gradients (new tensors).
    """
    norm = global_norm(grads)
    one = torch.ones((), dtype=norm.dtype, device=norm.device)
    scale = clip_norm * torch.minimum(one / norm, one / clip_norm)
    return [g * scale for g in grads]


def staircase_lr(step, recipe):
    """``learning_rate * decay_rate ** floor(step / decay_steps)``, step from 0.

    The learning rate of the update numbered `step` (the first update is step
    0), as TF1's `exponential_decay(staircase=True)` gives it for the global
    step read before that update increments it.
    """
    return recipe.learning_rate * recipe.decay_rate ** (step // recipe.decay_steps)


def _default_optimizer(params, lr, recipe):
    return TF1RMSProp(
        params,
        lr=lr,
        decay=recipe.rms_decay,
        momentum=recipe.rms_momentum,
        epsilon=recipe.rms_epsilon,
    )


class Trainer:
    """Trains a network with the reference recipe, one batch per `step`.

    The learning-rate staircase is a `torch.optim.lr_scheduler.LambdaLR`
    stepped once per update: its closed form ``base_lr * decay_rate ** (step
    // decay_steps)`` is TF1's formula, operation for operation (`StepLR`
    multiplies the current rate again at every decay and can differ in the
    last bits).

    Args:
        model: a module returning ``(logits, endpoints)`` for an NCHW batch.
        recipe: the recipe (attributes of `parity.training.Recipe`).
        layers: names of the margin layers: ``"input"`` or endpoint names.
        loss_kwargs: ``sizes -> dict`` of the margin loss's keyword arguments,
            given the elements per example of each layer.
        loss: the margin loss, with `large_margin_parts`' keyword signature,
            returning a scalar or a dict with ``"loss"``.
        overrides: recipe faults or variants, a dict with any of
            ``"optimizer"`` (``(params, lr, recipe) -> optimizer``), ``"l2"``
            (``"all"``, ``"weights_only"``: kernels only, or
            ``"weight_decay"``: ``l2_weight * v`` added to the gradient after
            clipping instead of the term in the loss), ``"lr_schedule"``
            (``(step, recipe) -> lr``, set on the optimizer before each
            update) and ``"clip"`` (``(grads, clip_norm) -> grads``).

    Raises:
        ValueError: if `overrides` has an unknown key or an unknown ``"l2"``
            mode.
    """

    def __init__(
        self, model, recipe, *, layers, loss_kwargs, loss=None, overrides=None
    ):
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(RECIPE_OVERRIDES))
        if unknown:
            raise ValueError(
                f"recipe overrides must be among {list(RECIPE_OVERRIDES)}. "
                f"Received: unknown={unknown}"
            )
        self.l2_mode = overrides.get("l2", "all")
        if self.l2_mode not in _L2_MODES:
            raise ValueError(
                f"`l2` must be one of {list(_L2_MODES)}. Received: l2={self.l2_mode!r}"
            )

        self.model = model
        self.recipe = recipe
        self.layers = tuple(layers)
        self.loss_kwargs = loss_kwargs
        self.loss = loss or large_margin_parts
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._clip = overrides.get("clip", clip_by_global_norm)
        self._lr_schedule = overrides.get("lr_schedule")
        make_optimizer = overrides.get("optimizer", _default_optimizer)
        self.optimizer = make_optimizer(self.params, recipe.learning_rate, recipe)
        self.scheduler = None
        if self._lr_schedule is None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer,
                lambda step: recipe.decay_rate ** (step // recipe.decay_steps),
            )
        self.step_count = 0

    def _losses(self, x, labels):
        logits, endpoints = self.model(x)
        layers = [x if name == "input" else endpoints[name] for name in self.layers]
        sizes = [math.prod(t.shape[1:]) for t in layers]
        one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        out = self.loss(
            logits=logits,
            one_hot_labels=one_hot,
            layers_list=layers,
            **self.loss_kwargs(sizes),
        )
        margin = out["loss"] if isinstance(out, dict) else out
        xent = F.cross_entropy(logits, labels)
        kernels = [p for p in self.params if p.dim() >= 2]
        l2_vars = kernels if self.l2_mode == "weights_only" else self.params
        l2 = sum((p * p).sum() / 2 for p in l2_vars)
        total = self.recipe.margin_weight * margin + self.recipe.xent_weight * xent
        if self.l2_mode != "weight_decay":
            total = total + self.recipe.l2_weight * l2
        # A tie with the true class counts as correct, as in_top_k counts it.
        true_logit = logits.gather(1, labels[:, None])[:, 0]
        correct = true_logit >= logits.amax(dim=1)
        accuracy = correct.to(logits.dtype).mean()
        return total, margin, xent, l2, accuracy

    def step(self, x, labels):
        """One update on a batch.

        Args:
            x: ``[batch_size, 1, height, width]`` on the model's device and dtype.
            labels: ``[batch_size]`` int64 class indices.

        Returns:
            A dict of floats: ``step``, ``learning_rate``, ``total_loss``,
            ``margin_loss``, ``xent_loss``, ``l2_loss``, ``accuracy`` (on the
            batch, before the update), ``grad_norm`` (before clipping),
            ``clipped_grad_norm``, ``param_norm`` (after the update) and
            ``moving_norm`` (global norm of the batch-norm moving statistics,
            after their update).
        """
        step = self.step_count
        if self._lr_schedule is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr_schedule(step, self.recipe)
        lr = self.optimizer.param_groups[0]["lr"]

        self.model.train()
        if "input" in self.layers:
            x = x.detach().requires_grad_(True)
        total, margin, xent, l2, accuracy = self._losses(x, labels)
        grads = torch.autograd.grad(total, self.params)
        grads = [g.detach() for g in grads]
        norm = global_norm(grads)
        clipped = self._clip(grads, self.recipe.clip_norm)
        if self.l2_mode == "weight_decay":
            clipped = [
                g + self.recipe.l2_weight * p.detach()
                for g, p in zip(clipped, self.params, strict=True)
            ]
        clipped_norm = global_norm(clipped)
        for p, g in zip(self.params, clipped, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_count += 1

        with torch.no_grad():
            param_norm = global_norm([p.detach() for p in self.params])
            moving_norm = global_norm(self.moving_statistics())
        return {
            "step": step,
            "learning_rate": float(lr),
            "total_loss": float(total.detach()),
            "margin_loss": float(margin.detach()),
            "xent_loss": float(xent.detach()),
            "l2_loss": float(l2.detach()),
            "accuracy": float(accuracy),
            "grad_norm": float(norm),
            "clipped_grad_norm": float(clipped_norm),
            "param_norm": float(param_norm),
            "moving_norm": float(moving_norm),
        }

    def moving_statistics(self):
        """The batch-norm running means and variances, in module order."""
        return [
            b
            for name, b in self.model.named_buffers()
            if name.endswith("running_mean") or name.endswith("running_var")
        ]

    @torch.no_grad()
    def accuracy(self, x, labels, *, chunk=500):
        """Accuracy with batch norm in inference mode; ties count as correct.

        Args:
            x: ``[N, 1, height, width]`` on the model's device and dtype.
            labels: ``[N]`` int64 class indices.
            chunk: examples per forward pass, to bound memory.
        """
        was_training = self.model.training
        self.model.eval()
        correct = 0
        for start in range(0, len(labels), chunk):
            logits, _ = self.model(x[start : start + chunk])
            y = labels[start : start + chunk]
            true_logit = logits.gather(1, y[:, None])[:, 0]
            correct += int((true_logit >= logits.amax(dim=1)).sum())
        self.model.train(was_training)
        return correct / len(labels)
