"""One framework-neutral weight set, and every layout conversion, in one place.

The neutral layout is the reference's own (TensorFlow's):

- convolution kernels ``[kh, kw, in, out]`` (HWIO);
- dense kernels ``[in, out]``; the first dense layer's rows are in NHWC flatten
  order (height, width, channel), as the reference flattens;
- batch norm ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` ``[C]``;
- activations and layer gradients NHWC ``[batch, height, width, channels]``.

PyTorch keeps kernels OIHW and dense kernels ``[out, in]`` and runs NCHW, so
the first dense kernel's rows are permuted to NCHW order here: the PyTorch
network then flattens natively and still computes the reference's function.
Everything is numpy, so fixtures can be read and converted without either
framework.
"""

import numpy as np

__all__ = [
    "ARCHITECTURES",
    "activation_to_nchw",
    "activation_to_neutral",
    "init_weights",
    "layer_names",
    "neutral_to_torch",
    "torch_key",
    "torch_to_neutral",
]

# name -> (kind, PyTorch state_dict key). Kinds drive the layout conversion.
_MNIST = {
    "conv_layer0/kernel": ("conv", "conv_layer0.conv.weight"),
    "conv_layer0/batch_norm/gamma": ("vector", "conv_layer0.batch_norm.weight"),
    "conv_layer0/batch_norm/beta": ("vector", "conv_layer0.batch_norm.bias"),
    "conv_layer0/batch_norm/moving_mean": (
        "moving",
        "conv_layer0.batch_norm.running_mean",
    ),
    "conv_layer0/batch_norm/moving_variance": (
        "moving",
        "conv_layer0.batch_norm.running_var",
    ),
    "conv_layer1/kernel": ("conv", "conv_layer1.conv.weight"),
    "conv_layer1/batch_norm/gamma": ("vector", "conv_layer1.batch_norm.weight"),
    "conv_layer1/batch_norm/beta": ("vector", "conv_layer1.batch_norm.bias"),
    "conv_layer1/batch_norm/moving_mean": (
        "moving",
        "conv_layer1.batch_norm.running_mean",
    ),
    "conv_layer1/batch_norm/moving_variance": (
        "moving",
        "conv_layer1.batch_norm.running_var",
    ),
    "fc_layer0/kernel": ("dense_after_flatten", "fc_layer0.weight"),
    "fc_layer0/bias": ("vector", "fc_layer0.bias"),
    "logits/kernel": ("dense", "logits.weight"),
    "logits/bias": ("vector", "logits.bias"),
}

_TOY = {
    "conv_layer0/kernel": ("conv", "conv_layer0.conv.weight"),
    "conv_layer0/bias": ("vector", "conv_layer0.conv.bias"),
    "logits/kernel": ("dense", "logits.weight"),
    "logits/bias": ("vector", "logits.bias"),
}

# Architecture name -> parameter table, endpoint names, default input size.
ARCHITECTURES = {
    "mnist": {
        "params": _MNIST,
        "endpoints": ("conv_layer0", "conv_layer1", "fc_layer0"),
        "input_size": 28,
    },
    "toy": {"params": _TOY, "endpoints": ("conv_layer0",), "input_size": 12},
}


def layer_names(arch):
    """Names a margin layer can have in `arch`: the input, then each endpoint."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"`arch` must be one of {sorted(ARCHITECTURES)}. Received: arch={arch!r}"
        )
    return ("input",) + ARCHITECTURES[arch]["endpoints"]


def _table(arch):
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"`arch` must be one of {sorted(ARCHITECTURES)}. Received: arch={arch!r}"
        )
    return ARCHITECTURES[arch]["params"]


def torch_key(arch, name):
    """The PyTorch state_dict key of the neutral parameter `name`."""
    return _table(arch)[name][1]


def _flatten_shape(rows, channels=64):
    # The first dense layer reads a square [h, w, channels] map.
    side = int(round((rows / channels) ** 0.5))
    if side * side * channels != rows:
        raise ValueError(
            "fc_layer0/kernel rows must be h * w * 64 for a square map. "
            f"Received: rows={rows}"
        )
    return side, side, channels


def neutral_to_torch(arch, weights):
    """Converts a neutral weight set to a PyTorch state_dict of numpy arrays.

    Args:
        arch: ``"mnist"`` or ``"toy"``.
        weights: dict of neutral name -> array, in the neutral layout.

    Returns:
        A dict of PyTorch state_dict key -> array (C-contiguous copies).

    Raises:
        ValueError: if a parameter is missing or unknown.
    """
    table = _table(arch)
    if set(weights) != set(table):
        raise ValueError(
            f"weights for {arch!r} must be exactly {sorted(table)}. Received: "
            f"missing={sorted(set(table) - set(weights))}, "
            f"unknown={sorted(set(weights) - set(table))}"
        )
    out = {}
    for name, (kind, key) in table.items():
        w = np.asarray(weights[name])
        if kind == "conv":
            w = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif kind == "dense":
            w = w.T  # [in, out] -> [out, in]
        elif kind == "dense_after_flatten":
            h, wd, c = _flatten_shape(w.shape[0])
            # rows (h, w, c) -> (c, h, w), then [in, out] -> [out, in]
            w = w.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(h * wd * c, -1).T
        out[key] = np.ascontiguousarray(w)
    return out


def torch_to_neutral(arch, state):
    """Converts PyTorch-layout arrays (weights or their gradients) to neutral.

    The inverse of `neutral_to_torch`; keys absent from `state` are skipped,
    so a dict of parameter gradients (no moving statistics) converts too.

    Args:
        arch: ``"mnist"`` or ``"toy"``.
        state: dict of PyTorch state_dict key -> array.

    Returns:
        A dict of neutral name -> array.
    """
    out = {}
    for name, (kind, key) in _table(arch).items():
        if key not in state:
            continue
        w = np.asarray(state[key])
        if kind == "conv":
            w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "dense":
            w = w.T
        elif kind == "dense_after_flatten":
            h, wd, c = _flatten_shape(w.shape[1])
            w = w.T.reshape(c, h, wd, -1).transpose(1, 2, 0, 3).reshape(h * wd * c, -1)
        out[name] = np.ascontiguousarray(w)
    return out


def activation_to_neutral(array):
    """NCHW ``[B, C, H, W]`` -> NHWC ``[B, H, W, C]``; 2-D arrays unchanged.

    Also accepts ``[K, B, C, H, W]`` stacks of layer gradients.
    """
    array = np.asarray(array)
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    if array.ndim == 5:
        return np.ascontiguousarray(array.transpose(0, 1, 3, 4, 2))
    return array


def activation_to_nchw(array):
    """NHWC ``[B, H, W, C]`` -> NCHW ``[B, C, H, W]``; 2-D arrays unchanged."""
    array = np.asarray(array)
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    return array


def _glorot(rng, shape, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def init_weights(arch, *, input_size=None, num_classes=10, seed=0, perturb=True):
    """A seeded neutral weight set, float64.

    Kernels are Glorot-uniform, as in the reference. With `perturb`, biases,
    batch-norm scale, offset and moving statistics are drawn away from their
    initial 0/1 too, so that a swapped or ignored one shows in a comparison.

    Args:
        arch: ``"mnist"`` or ``"toy"``.
        input_size: the input's height and width; the architecture's default
            if None.
        num_classes: number of logits.
        seed: seed of the numpy generator.
        perturb: draw biases and batch-norm parameters at random.

    Returns:
        A dict of neutral name -> float64 array.
    """
    _table(arch)
    size = input_size or ARCHITECTURES[arch]["input_size"]
    rng = np.random.default_rng(seed)

    def vector(n, center, spread):
        if perturb:
            return center + rng.uniform(-spread, spread, size=n)
        return np.full(n, float(center))

    if arch == "toy":
        return {
            "conv_layer0/kernel": _glorot(rng, (3, 3, 1, 8), 9, 72),
            "conv_layer0/bias": vector(8, 0.0, 0.1),
            "logits/kernel": _glorot(rng, (8, num_classes), 8, num_classes),
            "logits/bias": vector(num_classes, 0.0, 0.1),
        }

    weights = {}
    channels = 1
    for i, filters in enumerate((32, 64)):
        prefix = f"conv_layer{i}"
        weights[f"{prefix}/kernel"] = _glorot(
            rng, (5, 5, channels, filters), 25 * channels, 25 * filters
        )
        weights[f"{prefix}/batch_norm/gamma"] = vector(filters, 1.0, 0.2)
        weights[f"{prefix}/batch_norm/beta"] = vector(filters, 0.0, 0.2)
        weights[f"{prefix}/batch_norm/moving_mean"] = vector(filters, 0.0, 0.1)
        weights[f"{prefix}/batch_norm/moving_variance"] = vector(filters, 1.0, 0.3)
        channels = filters
    flat = (size // 4) ** 2 * 64
    weights["fc_layer0/kernel"] = _glorot(rng, (flat, 512), flat, 512)
    weights["fc_layer0/bias"] = vector(512, 0.0, 0.05)
    weights["logits/kernel"] = _glorot(rng, (512, num_classes), 512, num_classes)
    weights["logits/bias"] = vector(num_classes, 0.0, 0.05)
    return weights
