"""A deliberately naive PyTorch port of the large-margin loss, for contrast.

`parity.bench` times it next to `torch_impl` to show what the usual way of
porting costs. It computes the same function as `torch_impl.large_margin`
(REFERENCE.md section 1), but the way many public ports are written: a Python
loop over the examples and the K classes, with one autograd call per element,
so ``B x K`` backward passes through the whole batch's graph where
`torch_impl` needs K. Each pass costs about as much as the one pass of the
batch, so the step grows with the square of the batch size.

It is a correct port all the same: the gradient of step 6 is the gradient of
the **batch sum**, which it assembles as the sum of the per-element gradients
(``d sum_b diff[b, k] / dh = sum_b d diff[b, k] / dh``), so the cross-example
terms of batch norm in training mode are kept. Taking only row ``b`` of each
per-element gradient, as some ports do, would be a different loss there.

Do not train with it; it exists to be timed and checked.
"""

import torch
import torch.nn.functional as F

from parity import spec

__all__ = ["large_margin"]


def _dual_norm(grad, q):
    # One example's gradient, any shape -> scalar. The same norm as
    # torch_impl's (vector_norm, gradient 0 at the zero vector for q = 2).
    return torch.linalg.vector_norm(grad.reshape(-1), ord=q)


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
    """The large-margin loss, one example and one class at a time.

    Arguments, value and errors for bad arguments are those of
    `torch_impl.large_margin`; only the cost differs.

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
        layers_weights: one positive weight per layer; all 1 if None.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if `dist_norm` is not 1, 2 or inf.
        ValueError: if `top_k` is outside ``1..num_classes``.
        ValueError: if `layers_weights` has the wrong length or a bad entry.
        ValueError: if `layers_list` is empty or the logits do not depend on
            one of its layers (named by index).
    """
    spec.check_layers(layers_list)
    batch_size, num_classes = logits.shape
    spec.check_top_k(top_k, num_classes)
    q = spec.dual_norm_order(dist_norm)
    weights = spec.check_layers_weights(layers_weights, len(layers_list))
    labels = one_hot_labels.to(logits.dtype)

    prob = F.softmax(logits, dim=1)
    diffs = []  # diffs[b][k], scalars
    for b in range(batch_size):
        correct = (prob[b] * labels[b]).sum()
        other = prob[b] * (1.0 - labels[b])
        if top_k == 1:
            # amax shares a tied maximum's gradient, as TF's reduce_max.
            top = [other.amax()]
        else:
            order = torch.sort(other.detach(), descending=True, stable=True).indices
            top = [other[j] for j in order[:top_k]]
        diffs.append([correct - t for t in top])

    # grads[k][i]: gradient of sum_b diff[b, k] w.r.t. layer i, one backward
    # pass per element (b, k).
    grads = []
    for k in range(top_k):
        total = [None] * len(layers_list)
        for b in range(batch_size):
            element = torch.autograd.grad(
                diffs[b][k],
                layers_list,
                retain_graph=True,
                create_graph=not use_approximation,
                allow_unused=True,
            )
            for i, g in enumerate(element):
                if g is None:
                    raise ValueError(spec.missing_layer_message(i))
                total[i] = g if total[i] is None else total[i] + g
        grads.append(total)

    lower = gamma * (1.0 - alpha_factor)
    layer_losses = []
    for i, weight in enumerate(weights):
        example_losses = []
        for b in range(batch_size):
            dists = []
            for k in range(top_k):
                norm = _dual_norm(grads[k][i][b], q) / weight
                if use_approximation:
                    norm = norm.detach()
                dists.append(diffs[b][k] / (norm + epsilon))
            if worst_case_loss:
                dists = [torch.stack(dists).amin()]
            loss_b = 0.0
            for dist in dists:
                v = dist + F.relu(lower - dist)
                loss_b = loss_b + (F.relu(gamma - v) - gamma)
            example_losses.append(loss_b)
        layer_losses.append(torch.stack(example_losses).mean())
    return torch.stack(layer_losses).mean()
