"""Large-margin loss (Elsayed et al., 2018), the reference in current TensorFlow.

Written from REFERENCE.md section 1, in the graph style of the TF1 original:
the gradient of the probability difference comes from `tf.gradients`, so the
loss must be built inside `tf.function` or a `tf.compat.v1` graph.
"""

import math

import tensorflow as tf

from parity import spec

__all__ = ["large_margin", "large_margin_parts"]


def _static_shape(tensor):
    # A list of ints and Nones, or None when even the rank is unknown.
    shape = tensor.shape
    return None if shape.rank is None else tuple(shape.as_list())


def _check(logits, one_hot_labels, layers_list, top_k, dist_norm, layers_weights):
    """Checks the arguments; returns them as tensors, the dual order, the weights.

    The messages are `parity.spec`'s, shared with the PyTorch port. Only the
    static shapes are checked: a dimension unknown when the graph is built
    matches any size.
    """
    if tf.executing_eagerly():
        raise RuntimeError(
            "large_margin differentiates the logits with respect to the layers "
            "with tf.gradients, which needs a graph: call it inside tf.function "
            "or a tf.compat.v1 graph. Received: eager tensors"
        )
    spec.check_layers(layers_list)
    logits = tf.convert_to_tensor(logits)
    one_hot_labels = tf.convert_to_tensor(one_hot_labels)
    logits_shape = _static_shape(logits)
    spec.check_logits(
        logits_shape,
        _static_shape(one_hot_labels),
        logits.dtype.is_floating,
        logits.dtype.name,
    )
    spec.check_top_k(top_k, logits_shape[1])
    q = spec.dual_norm_order(dist_norm)
    weights = spec.check_layers_weights(layers_weights, len(layers_list))
    return logits, one_hot_labels, q, weights


def _dual_norm(grad, q):
    """Per-example q-norm of `grad` flattened, ``[batch_size, ...] -> [batch_size]``.

    The 2-norm is the square root of a sum of squares, as in the reference, so
    its gradient at the zero vector is NaN (PyTorch's is 0).
    """
    flat = tf.reshape(grad, [tf.shape(grad)[0], -1])
    if q == math.inf:
        return tf.reduce_max(tf.abs(flat), axis=1)
    if q == 1:
        return tf.reduce_sum(tf.abs(flat), axis=1)
    return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1))


def _clip_branch(dist, gamma, alpha_factor):
    lower = gamma * (1.0 - alpha_factor)
    v = tf.maximum(dist, lower)
    branch = tf.where(dist < lower, tf.constant(-1, tf.int8), tf.constant(0, tf.int8))
    return tf.where(v >= gamma, tf.constant(1, tf.int8), branch)


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

    Same arguments and result layout as `torch_impl.large_margin_parts`, with
    layer gradients in the layers' own (NHWC) layout.
    """
    logits, labels, q, weights = _check(
        logits, one_hot_labels, layers_list, top_k, dist_norm, layers_weights
    )
    labels = tf.cast(labels, logits.dtype)

    prob = tf.nn.softmax(logits, axis=1)
    correct = tf.reduce_sum(prob * labels, axis=1, keepdims=True)  # [B, 1]
    other = prob * (1.0 - labels)  # [B, C], correct class zeroed
    # top_k puts the lower index first among ties; its indices are the
    # discrete decision reported for every K.
    top_values, top_index = tf.math.top_k(other, k=top_k, sorted=True)
    if top_k == 1:
        # reduce_max shares a tied maximum's gradient equally.
        top = tf.reduce_max(other, axis=1, keepdims=True)
    else:
        top = top_values
    diff = correct - top  # [B, K]

    per_k = []
    for k in range(top_k):
        # tf.gradients differentiates the sum over the batch (step 6).
        grads = tf.gradients(diff[:, k], layers_list)
        for i, g in enumerate(grads):
            if g is None:
                raise ValueError(spec.missing_layer_message(i))
        per_k.append(grads)

    layer_parts = []
    lower = gamma * (1.0 - alpha_factor)
    for i, weight in enumerate(weights):
        grad = tf.stack([grads[i] for grads in per_k])  # [K, B, ...]
        norms = [_dual_norm(grads[i], q) for grads in per_k]
        norm = tf.stack(norms, axis=1) / weight  # [B, K]
        if use_approximation:
            norm = tf.stop_gradient(norm)
        dist = diff / (norm + epsilon)  # [B, K]
        if worst_case_loss:
            clipped = tf.reduce_min(dist, axis=1, keepdims=True)
        else:
            clipped = dist
        v = clipped + tf.nn.relu(lower - clipped)
        loss_b = tf.nn.relu(gamma - v) - gamma
        layer_parts.append(
            {
                "gradient": grad,
                "grad_norm": norm,
                "distance": dist,
                "clip_branch": _clip_branch(clipped, gamma, alpha_factor),
                "loss": tf.reduce_mean(tf.reduce_sum(loss_b, axis=1)),
            }
        )

    loss = tf.reduce_mean(tf.stack([p["loss"] for p in layer_parts]))
    return {
        "loss": loss,
        "probabilities": prob,
        "difference": diff,
        "top_k_index": top_index,
        "layers": layer_parts,
    }


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
    """Large-margin loss of Elsayed et al., the TensorFlow reference.

    The formula, arguments and errors are those of `torch_impl.large_margin`;
    REFERENCE.md section 1 states them step by step.

    Args:
        logits: ``[batch_size, num_classes]`` floating-point logits.
        one_hot_labels: ``[batch_size, num_classes]`` one-hot labels.
        layers_list: tensors the logits depend on, in the same graph.
        gamma: the desired margin; the loss's upper clip.
        alpha_factor: the lower clip is ``gamma * (1 - alpha_factor)``.
        top_k: K, the number of competing classes.
        dist_norm: 1, 2 or inf, the norm of the distance.
        epsilon: added to the gradient norm before dividing.
        use_approximation: if True, the gradient norm is under stop_gradient.
        worst_case_loss: if True, only the smallest distance over k counts.
        layers_weights: one positive weight per layer; all 1 if None.

    Returns:
        A scalar tensor.

    Raises:
        RuntimeError: if called eagerly, outside a graph.
        ValueError: if `dist_norm` is not 1, 2 or inf.
        ValueError: if `top_k` is outside ``1..num_classes``.
        ValueError: if `layers_weights` has the wrong length or a zero,
            negative or non-finite entry.
        ValueError: if `logits` is not 2-D or `one_hot_labels` differs in shape.
        ValueError: if `layers_list` is empty or the logits do not depend on
            one of its layers (named by index).
        TypeError: if `logits` is not floating point or `top_k` not an integer.
        TypeError: if `layers_list` is not a list or tuple, or
            `layers_weights` not a sequence of numbers.

    References:
        Elsayed, Krishnan, Mobahi, Regan and Bengio, "Large Margin Deep
        Networks for Classification", NeurIPS 2018, arXiv:1803.05598.
    """
    return large_margin_parts(
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
    )["loss"]
