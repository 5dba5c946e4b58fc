"""Large-margin loss (Elsayed et al., 2018), PyTorch port of the TF1 reference.

The reference is the TensorFlow 1 graph code published with the paper; this
port follows the step-by-step statement of it in REFERENCE.md section 1.
"""

import torch
import torch.nn.functional as F
from torch import nn

from parity import spec

__all__ = ["LargeMarginLoss", "large_margin", "large_margin_parts"]


def _dtype_name(dtype):
    # "torch.int64" -> "int64", TensorFlow's spelling, so both messages agree.
    return str(dtype).removeprefix("torch.")


def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor. "
            f"Received: {name} of type {type(value).__name__}"
        )


def _check(logits, one_hot_labels, layers_list, top_k, dist_norm, layers_weights):
    """Checks the arguments; returns the dual norm order and the layer weights.

    The messages are `parity.spec`'s, shared with the TensorFlow reference,
    except two that only PyTorch can meet: an argument that is not a tensor,
    and a layer that does not require grad.
    """
    spec.check_layers(layers_list)
    _check_tensor("logits", logits)
    _check_tensor("one_hot_labels", one_hot_labels)
    spec.check_logits(
        tuple(logits.shape),
        tuple(one_hot_labels.shape),
        logits.is_floating_point(),
        _dtype_name(logits.dtype),
    )
    spec.check_top_k(top_k, logits.shape[1])
    q = spec.dual_norm_order(dist_norm)
    weights = spec.check_layers_weights(layers_weights, len(layers_list))
    for i, layer in enumerate(layers_list):
        _check_tensor(f"layers_list[{i}]", layer)
        if not layer.requires_grad:
            # Autograd records nothing about such a tensor, so it cannot tell
            # whether the logits depend on it. The usual cause is an input
            # whose requires_grad was not set before the forward pass.
            raise ValueError(
                f"`layers_list[{i}]` does not require grad, so autograd cannot "
                "differentiate the logits with respect to it; call "
                "requires_grad_() on it before the forward pass. Received: "
                f"layers_list[{i}].requires_grad=False"
            )
    if not logits.requires_grad:
        # No layer can be upstream of logits that carry no graph (computed
        # under no_grad or from detached tensors); autograd.grad would fail
        # with a message naming none of them.
        raise ValueError(spec.missing_layer_message(0))
    return q, weights


def _top_k(other, top_k, with_index):
    """The K largest values of `other` per row, with the reference's tie rules.

    TensorFlow's `reduce_max` shares the gradient of a tied maximum equally
    among the tied entries; `torch.amax` does the same, `torch.max(dim=...)`
    would send it all to one index. For K > 1, TensorFlow's `top_k` puts the
    lower index first among equal values and routes the gradient to the chosen
    entries only; a stable descending sort followed by `gather` does the same,
    whereas `torch.topk` makes no promise about ties.

    Args:
        other: ``[batch_size, num_classes]`` probabilities, correct class zeroed.
        top_k: K.
        with_index: also return the indices; for K = 1 the value alone needs
            no sort.

    Returns:
        A pair: values ``[batch_size, K]`` and their class indices
        ``[batch_size, K]`` (for K = 1 the lowest tied index), or None for the
        indices when neither `with_index` nor K > 1 asks for them.
    """
    index = None
    if with_index or top_k > 1:
        # The indices are a discrete decision: no gradient flows through them.
        index = torch.sort(other.detach(), dim=1, descending=True, stable=True)
        index = index.indices[:, :top_k]
    if top_k == 1:
        return other.amax(dim=1, keepdim=True), index
    return other.gather(1, index), index


def _dual_norm(grad, q):
    """Per-example q-norm of `grad`, ``[batch_size, ...] -> [batch_size]``.

    The norm reduces over every axis but the first, in whatever memory layout
    `grad` has: no flattened copy, and no materialised ``abs(grad)`` (the
    reduction takes the absolute value on the fly). The inf-norm's gradient
    is shared equally among tied maxima, as ``reduce_max(abs(.))``'s is.

    For q = 2, `torch.linalg.vector_norm` has gradient 0 at the zero vector,
    where TensorFlow's square-root formula gives NaN. The port keeps PyTorch's
    0 on purpose; the harness reports the difference as a known divergence
    (`parity.divergences`).
    """
    if grad.dim() == 1:
        grad = grad[:, None]
    dims = tuple(range(1, grad.dim()))
    return torch.linalg.vector_norm(grad, ord=q, dim=dims)


def clip_branch(dist, gamma, alpha_factor):
    """Which clip of step 11 each distance falls in: -1 lower, 0 none, 1 upper.

    The lower clip is active when `dist < lower` (at equality the gradient
    goes to `dist`); the upper when `max(dist, lower) >= upper` (the relu's
    gradient at 0 is 0). Built with `torch.where`, not masked assignment,
    which would synchronise with the device.
    """
    lower = gamma * (1.0 - alpha_factor)
    none = torch.zeros((), dtype=torch.int8, device=dist.device)
    branch = torch.where(dist < lower, torch.full_like(none, -1), none)
    upper = torch.clamp(dist, min=lower) >= gamma
    return torch.where(upper, torch.full_like(none, 1), branch)


def _large_margin(
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
    with_parts,
):
    """The loss, and with `with_parts` every intermediate quantity.

    The training path (`with_parts` False) keeps nothing it does not need: no
    sort for K = 1, no stacked copy of the layer gradients, no clip branches.
    Nothing here reads a tensor's value on the host, so a step on a GPU never
    waits inside the loss.
    """
    q, weights = _check(
        logits, one_hot_labels, layers_list, top_k, dist_norm, layers_weights
    )
    labels = one_hot_labels.to(logits.dtype)

    prob = F.softmax(logits, dim=1)
    correct = (prob * labels).sum(dim=1, keepdim=True)  # [B, 1]
    # The correct class is zeroed, not removed (step 3).
    other = prob * (1.0 - labels)  # [B, C]
    top, top_index = _top_k(other, top_k, with_parts)  # [B, K]
    diff = correct - top  # [B, K]

    # One backward pass per k serves every layer. It differentiates the batch
    # sum (step 6), so cross-example terms through batch norm are kept.
    # Without create_graph the "exact" mode would silently be the approximate
    # one: the returned gradients would carry no graph.
    per_k = []
    for k in range(top_k):
        grads = torch.autograd.grad(
            diff[:, k].sum(),
            layers_list,
            retain_graph=True,
            create_graph=not use_approximation,
            allow_unused=True,
        )
        for i, g in enumerate(grads):
            if g is None:
                raise ValueError(spec.missing_layer_message(i))
        per_k.append(grads)

    lower = gamma * (1.0 - alpha_factor)
    layer_parts = []
    for i, weight in enumerate(weights):
        norms = [_dual_norm(grads[i], q) for grads in per_k]  # K x [B]
        norm = norms[0][:, None] if top_k == 1 else torch.stack(norms, dim=1)
        norm = norm / weight  # [B, K]
        if use_approximation:
            norm = norm.detach()
        dist = diff / (norm + epsilon)  # [B, K]; epsilon added, not a floor
        clipped = dist.amin(dim=1, keepdim=True) if worst_case_loss else dist
        v = clipped + F.relu(lower - clipped)
        loss_b = F.relu(gamma - v) - gamma  # [B, K or 1]
        part = {"loss": loss_b.sum(dim=1).mean()}
        if with_parts:
            if top_k == 1:
                grad = per_k[0][i].unsqueeze(0)  # [1, B, ...], a view
            else:
                grad = torch.stack([grads[i] for grads in per_k])  # [K, B, ...]
            part.update(
                gradient=grad,
                grad_norm=norm,
                distance=dist,
                clip_branch=clip_branch(clipped.detach(), gamma, alpha_factor),
            )
        layer_parts.append(part)

    loss = torch.stack([p["loss"] for p in layer_parts]).mean()
    if not with_parts:
        return {"loss": loss}
    return {
        "loss": loss,
        "probabilities": prob,
        "difference": diff,
        "top_k_index": top_index,
        "layers": layer_parts,
    }


def large_margin_parts(
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
    """The large-margin loss with every intermediate quantity.

    Same arguments as `large_margin`. The harness compares these parts with
    the reference's, layer by layer.

    Returns:
        A dict with ``loss`` (scalar), ``probabilities`` ``[B, C]``,
        ``difference`` ``[B, K]``, ``top_k_index`` ``[B, K]`` and ``layers``: a
        list with, per layer, ``gradient`` ``[K, B, ...]``, ``grad_norm``
        ``[B, K]``, ``distance`` ``[B, K]`` (before the worst-case min),
        ``clip_branch`` ``[B, K or 1]`` and ``loss`` (scalar).
    """
    return _large_margin(
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
        with_parts=True,
    )


def large_margin(
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
    """Large-margin loss of Elsayed et al., as the TF1 reference computes it.

    For each layer ``h_l`` the distance of each example to the decision
    boundary is estimated to first order from the gradient of a probability
    difference, and the loss pushes that distance towards ``gamma``.

    Formula:

        p = softmax(logits)
        diff[b, k] = p[b, y_b] - topk_k(p[b] * (1 - y[b]))
        G_lk = d(sum_b diff[b, k]) / d h_l
        dist[b, k] = diff[b, k] / (||G_lk[b]||_q / w_l + epsilon)
        loss_l = mean_b sum_k (relu(gamma - max(dist, gamma (1 - alpha)))
                               - gamma)
        loss = mean_l loss_l

    where ``q`` is the dual of ``dist_norm`` and ``dist`` is first reduced by a
    min over k when `worst_case_loss`. The value lies in
    ``[-gamma, gamma * (alpha_factor - 1)]``.

    Warning:
        TensorFlow and PyTorch differ in three places this function handles:
        tie rules of the top-k selection (see `_top_k`), the gradient of the
        2-norm at zero (see `_dual_norm`), and second-order terms, which need
        ``create_graph=True`` in PyTorch.

    Args:
        logits: ``[batch_size, num_classes]`` floating-point logits.
        one_hot_labels: ``[batch_size, num_classes]`` one-hot labels.
        layers_list: tensors the logits depend on through autograd.
        gamma: the desired margin; the loss's upper clip.
        alpha_factor: the lower clip is ``gamma * (1 - alpha_factor)``.
        top_k: K, the number of competing classes.
        dist_norm: 1, 2 or inf, the norm of the distance.
        epsilon: added to the gradient norm before dividing.
        use_approximation: if True, the gradient norm is a constant to the
            outer gradient; if False, second-order terms flow through it.
        worst_case_loss: if True, only the smallest distance over k counts.
        layers_weights: one positive weight per layer dividing its gradient
            norm; all 1 if None.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if `dist_norm` is not 1, 2 or inf.
        ValueError: if `top_k` is outside ``1..num_classes``.
        ValueError: if `layers_weights` has the wrong length or a zero,
            negative or non-finite entry.
        ValueError: if `logits` is not 2-D or `one_hot_labels` differs in shape.
        ValueError: if `layers_list` is empty or the logits do not depend on
            one of its layers (named by index).
        ValueError: if a layer does not require grad.
        TypeError: if `logits` is not floating point or `top_k` not an integer.
        TypeError: if `layers_list` is not a list or tuple, or
            `layers_weights` not a sequence of numbers.
        TypeError: if `logits`, `one_hot_labels` or a layer is not a tensor.

    References:
        Elsayed, Krishnan, Mobahi, Regan and Bengio, "Large Margin Deep
        Networks for Classification", NeurIPS 2018, arXiv:1803.05598.
    """
    return _large_margin(
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
        with_parts=False,
    )["loss"]


def _one_hot(logits, target):
    """One-hot labels ``[batch_size, num_classes]`` from class indices ``[B]``."""
    _check_tensor("logits", logits)
    # The logits alone: their labels are checked here, as class indices.
    shape = tuple(logits.shape)
    spec.check_logits(
        shape, shape, logits.is_floating_point(), _dtype_name(logits.dtype)
    )
    batch_size, num_classes = shape
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            "`target` of shape [batch_size] must hold integer class indices. "
            f"Received: target.dtype={_dtype_name(target.dtype)}"
        )
    if target.shape[0] != batch_size:
        raise ValueError(
            f"`target` must hold one class index per example ({batch_size}). "
            f"Received: target.shape={tuple(target.shape)}"
        )
    bad = ((target < 0) | (target >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(
            f"`target` class indices must be in 0..{num_classes - 1}. "
            f"Received: target[{i}]={int(target[i])}"
        )
    return F.one_hot(target.long(), num_classes).to(logits.dtype)


class LargeMarginLoss(nn.Module):
    """The large-margin loss as a module, with class-index or one-hot targets.

    Hyperparameters are those of `large_margin` and fixed at construction.
    Call it as ``loss_fn(logits, target, layers_list)``. The TensorFlow
    reference has no such wrapper: it takes one-hot labels only.

    Args:
        **hyperparameters: keyword arguments of `large_margin` other than the
            tensors.

    Raises:
        TypeError: if a hyperparameter is not one of `large_margin`'s.
        ValueError: if `dist_norm` is not 1, 2 or inf, or `top_k` below 1.
        TypeError: if `top_k` is not an integer.
    """

    def __init__(self, **hyperparameters):
        super().__init__()
        unknown = sorted(set(hyperparameters) - set(spec.DEFAULTS))
        if unknown:
            received = ", ".join(f"{k}={hyperparameters[k]!r}" for k in unknown)
            raise TypeError(
                "LargeMarginLoss takes only the hyperparameters of large_margin "
                f"({', '.join(spec.DEFAULTS)}). Received: {received}"
            )
        self.hyperparameters = {**spec.DEFAULTS, **hyperparameters}
        # What can be checked without the logits is checked now.
        spec.check_dist_norm(self.hyperparameters["dist_norm"])
        spec.check_top_k(self.hyperparameters["top_k"], None)

    def forward(self, logits, target, layers_list):
        """Returns the scalar loss.

        Args:
            logits: ``[batch_size, num_classes]``.
            target: class indices ``[batch_size]`` (an integer tensor) or
                one-hot labels ``[batch_size, num_classes]``.
            layers_list: tensors the logits depend on.

        Raises:
            TypeError: if a 1-D `target` is not an integer tensor.
            ValueError: if class indices are not one per example, or outside
                ``0..num_classes-1``.
            ValueError: for the arguments `large_margin` rejects.
        """
        _check_tensor("target", target)
        if target.dim() == 1:
            target = _one_hot(logits, target)
        return large_margin(
            logits=logits,
            one_hot_labels=target,
            layers_list=layers_list,
            **self.hyperparameters,
        )

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.hyperparameters.items())
