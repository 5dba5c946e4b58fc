"""Framework-free rules shared by both loss implementations.

The PyTorch port and the TensorFlow reference check their arguments with the
functions here, so that the same misuse gives the same message on both sides.
Nothing in this module imports a deep-learning framework.
"""

import math

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

    Raises:
        ValueError: if `dist_norm` is not 1, 2 or inf.
    """
    if isinstance(dist_norm, bool) or dist_norm not in (1, 2, math.inf):
        raise ValueError(
            f"`dist_norm` must be 1, 2 or inf. Received: dist_norm={dist_norm!r}"
        )
    return math.inf if dist_norm == math.inf else int(dist_norm)


def dual_norm_order(dist_norm):
    """Returns the order of the dual norm: 1 -> inf, 2 -> 2, inf -> 1."""
    return {1: math.inf, 2: 2, math.inf: 1}[check_dist_norm(dist_norm)]


def check_top_k(top_k, num_classes):
    """Checks that `top_k` is an integer in ``1..num_classes``.

    Raises:
        TypeError: if `top_k` is not an integer.
        ValueError: if `top_k` is below 1 or above `num_classes`.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"`top_k` must be an integer. Received: top_k={top_k!r}")
    if not 1 <= top_k <= num_classes:
        raise ValueError(
            f"`top_k` must be between 1 and the number of classes "
            f"({num_classes}). Received: top_k={top_k}"
        )


def check_logits(logits_shape, labels_shape, is_floating, dtype_name):
    """Checks the logits and one-hot labels by their shapes and dtype.

    Raises:
        ValueError: if the logits are not 2-D, or the labels' shape differs.
        TypeError: if the logits are not floating point.
    """
    if len(logits_shape) != 2:
        raise ValueError(
            "`logits` must be 2-D, [batch_size, num_classes]. "
            f"Received: logits.shape={tuple(logits_shape)}"
        )
    if not is_floating:
        raise TypeError(
            f"`logits` must be floating point. Received: logits.dtype={dtype_name}"
        )
    if tuple(labels_shape) != tuple(logits_shape):
        raise ValueError(
            "`one_hot_labels` must have the shape of `logits` "
            f"{tuple(logits_shape)}. Received: "
            f"one_hot_labels.shape={tuple(labels_shape)}"
        )


def check_layers(layers_list):
    """Checks that `layers_list` is a non-empty list or tuple.

    Raises:
        ValueError: if `layers_list` is None or empty.
    """
    if layers_list is None or len(layers_list) == 0:
        raise ValueError(
            "`layers_list` must name at least one layer. "
            f"Received: layers_list={layers_list!r}"
        )


def check_layers_weights(layers_weights, num_layers):
    """Returns the per-layer weights as floats, all 1 when None.

    Raises:
        ValueError: if the length differs from the number of layers, or an
            entry is zero, negative or not finite.
    """
    if layers_weights is None:
        return [1.0] * num_layers
    weights = [float(w) for w in layers_weights]
    if len(weights) != num_layers:
        raise ValueError(
            f"`layers_weights` must have one entry per layer ({num_layers}). "
            f"Received: layers_weights={list(layers_weights)!r}"
        )
    for w in weights:
        if not math.isfinite(w) or w <= 0:
            raise ValueError(
                "`layers_weights` entries must be finite and positive. "
                f"Received: layers_weights={list(layers_weights)!r}"
            )
    return weights


def missing_layer_message(index):
    """The message for a layer that the logits do not depend on."""
    return (
        f"the logits do not depend on layers_list[{index}]: its gradient is "
        "undefined, so no distance to the boundary can be computed. "
        f"Received: a layer at layers_list[{index}] that is not upstream of "
        "`logits`"
    )
