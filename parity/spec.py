"""Framework-free rules shared by both loss implementations.

The PyTorch port and the TensorFlow reference check their arguments with the
functions here, so that the same misuse gives the same message on both sides.
Every message names the argument and ends with "Received: name=value". Nothing
in this module imports a deep-learning framework.
"""

import math
import numbers

__all__ = [
    "DEFAULTS",
    "check_dist_norm",
    "check_layers",
    "check_layers_weights",
    "check_logits",
    "check_top_k",
    "dual_norm_order",
    "missing_layer_message",
]

# The reference's keyword arguments and their defaults (REFERENCE.md section 1).
DEFAULTS = {
    "gamma": 10000.0,
    "alpha_factor": 2.0,
    "top_k": 1,
    "dist_norm": 2,
    "epsilon": 1e-8,
    "use_approximation": True,
    "worst_case_loss": True,
    "layers_weights": None,
}


def check_dist_norm(dist_norm):
    """Returns `dist_norm` as 1, 2 or `math.inf`.

    Args:
        dist_norm: the norm of the distance, 1, 2 or inf (int or float).

    Returns:
        ``1``, ``2`` or ``math.inf``.

    Raises:
        ValueError: if `dist_norm` is not 1, 2 or inf (a bool, a string or a
            NaN is none of them).
    """
    valid = (
        isinstance(dist_norm, numbers.Real)
        and not isinstance(dist_norm, bool)
        and dist_norm in (1, 2, math.inf)
    )
    if not valid:
        raise ValueError(
            f"`dist_norm` must be 1, 2 or inf. Received: dist_norm={dist_norm!r}"
        )
    return math.inf if dist_norm == math.inf else int(dist_norm)


def dual_norm_order(dist_norm):
    """Returns the order of the dual norm: 1 -> inf, 2 -> 2, inf -> 1.

    Raises:
        ValueError: if `dist_norm` is not 1, 2 or inf.
    """
    return {1: math.inf, 2: 2, math.inf: 1}[check_dist_norm(dist_norm)]


def check_top_k(top_k, num_classes):
    """Checks that `top_k` is an integer in ``1..num_classes``.

    Args:
        top_k: K, the number of competing classes.
        num_classes: the logits' second dimension; None when not known
            statically (a TensorFlow graph), which skips the upper bound.

    Raises:
        TypeError: if `top_k` is not an integer (a bool or a float is not).
        ValueError: if `top_k` is below 1 or above `num_classes`.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"`top_k` must be an integer. Received: top_k={top_k!r}")
    if top_k < 1 or (num_classes is not None and top_k > num_classes):
        raise ValueError(
            f"`top_k` must be between 1 and the number of classes "
            f"({num_classes}). Received: top_k={int(top_k)}"
        )


def _compatible(actual_shape, expected_shape):
    # A None dimension (unknown in a TensorFlow graph) matches any size.
    if len(actual_shape) != len(expected_shape):
        return False
    pairs = zip(actual_shape, expected_shape, strict=True)
    return all(a is None or e is None or a == e for a, e in pairs)


def check_logits(logits_shape, labels_shape, is_floating, dtype_name):
    """Checks the logits and one-hot labels by their shapes and dtype.

    Args:
        logits_shape: the logits' shape, a sequence of ints (None for a
            dimension unknown in a graph), or None when even the rank is
            unknown.
        labels_shape: the one-hot labels' shape, the same way.
        is_floating: whether the logits' dtype is floating point.
        dtype_name: the logits' dtype as shown in messages, such as
            ``"int64"`` (no framework prefix, so that both sides agree).

    Raises:
        ValueError: if the logits are not 2-D, or the labels' shape differs.
        TypeError: if the logits are not floating point.
    """
    if logits_shape is None or len(logits_shape) != 2:
        shown = "<unknown rank>" if logits_shape is None else tuple(logits_shape)
        raise ValueError(
            "`logits` must be 2-D, [batch_size, num_classes]. "
            f"Received: logits.shape={shown}"
        )
    if not is_floating:
        raise TypeError(
            f"`logits` must be floating point. Received: logits.dtype={dtype_name}"
        )
    if labels_shape is None or not _compatible(
        tuple(labels_shape), tuple(logits_shape)
    ):
        shown = "<unknown rank>" if labels_shape is None else tuple(labels_shape)
        raise ValueError(
            "`one_hot_labels` must have the shape of `logits` "
            f"{tuple(logits_shape)}. Received: one_hot_labels.shape={shown}"
        )


def check_layers(layers_list):
    """Checks that `layers_list` is a non-empty list or tuple.

    Args:
        layers_list: the tensors the distance is measured in.

    Raises:
        ValueError: if `layers_list` is None or empty.
        TypeError: if `layers_list` is not a list or tuple (a single tensor
            would otherwise be iterated row by row).
    """
    if layers_list is None or (
        isinstance(layers_list, (list, tuple)) and len(layers_list) == 0
    ):
        raise ValueError(
            "`layers_list` must name at least one layer. "
            f"Received: layers_list={layers_list!r}"
        )
    if not isinstance(layers_list, (list, tuple)):
        raise TypeError(
            "`layers_list` must be a list or tuple of tensors. "
            f"Received: layers_list of type {type(layers_list).__name__}"
        )


def _as_floats(values):
    # None when `values` is not a sequence of numbers; text is not one.
    if isinstance(values, (str, bytes)):
        return None
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def check_layers_weights(layers_weights, num_layers):
    """Returns the per-layer weights as floats, all 1 when None.

    Args:
        layers_weights: None, or one number per layer.
        num_layers: the length of `layers_list`.

    Returns:
        A list of `num_layers` floats.

    Raises:
        TypeError: if `layers_weights` is not a sequence of numbers.
        ValueError: if its length differs from the number of layers, or an
            entry is zero, negative or not finite.
    """
    if layers_weights is None:
        return [1.0] * num_layers
    weights = _as_floats(layers_weights)
    if weights is None:
        raise TypeError(
            "`layers_weights` must be a list with one number per layer. "
            f"Received: layers_weights={layers_weights!r}"
        )
    if len(weights) != num_layers:
        raise ValueError(
            f"`layers_weights` must have one entry per layer ({num_layers}). "
            f"Received: layers_weights={weights!r}"
        )
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w <= 0:
            raise ValueError(
                "`layers_weights` entries must be finite and positive, but "
                f"entry {i} is {w!r}. Received: layers_weights={weights!r}"
            )
    return weights


def missing_layer_message(index):
    """The message for a layer that the logits do not depend on.

    Both frameworks use it: TensorFlow when `tf.gradients` returns None for
    the layer, PyTorch when `torch.autograd.grad` does.

    Args:
        index: the layer's position in `layers_list`.

    Returns:
        The message of the `ValueError`.
    """
    return (
        f"`layers_list[{index}]` is not upstream of `logits`: the logits do not "
        "depend on it, so its gradient and the distance to the boundary are "
        f"undefined. Received: layers_list[{index}], a tensor the logits do "
        "not depend on"
    )
