"""Misuse of the loss: the same pinned message from both frameworks.

Each case builds the same tiny network, ``logits = tanh(x @ w1) @ w2`` on a
batch of 4 with 5 classes, in PyTorch and in a TensorFlow graph, plants one
fault in the arguments and checks the exception type and its whole message.
"""

import inspect
import math

import numpy as np
import pytest

import torch_impl

_RNG = np.random.default_rng(7)
_X = _RNG.normal(size=(4, 3))
_W1 = _RNG.normal(size=(3, 6))
_W2 = _RNG.normal(size=(6, 5))
_W3 = _RNG.normal(size=(6, 5))
_Z = _RNG.normal(size=(4, 6))
_LABELS = np.eye(5)[[0, 3, 1, 4]]

FRAMEWORKS = ["torch", pytest.param("tf", marks=pytest.mark.tf)]


class _TorchOps:
    """The few operations the cases need, in PyTorch."""

    def __init__(self):
        import torch

        self.torch = torch

    def constant(self, array, dtype="float64"):
        return self.torch.tensor(array, dtype=getattr(self.torch, dtype))

    def leaf(self, array):
        return self.constant(array).requires_grad_(True)

    def matmul(self, a, b):
        if isinstance(b, np.ndarray):
            b = self.constant(b)
        return a @ b

    def tanh(self, a):
        return self.torch.tanh(a)

    def stop_gradient(self, a):
        return a.detach()

    def reshape(self, a, shape):
        return a.reshape(shape)


class _TFOps:
    """The same operations in TensorFlow (called while tracing a graph)."""

    def __init__(self):
        import tensorflow as tf

        self.tf = tf

    def constant(self, array, dtype="float64"):
        return self.tf.constant(array, dtype=getattr(self.tf, dtype))

    def leaf(self, array):
        return self.constant(array)

    def matmul(self, a, b):
        if isinstance(b, np.ndarray):
            b = self.constant(b)
        return self.tf.matmul(a, b)

    def tanh(self, a):
        return self.tf.tanh(a)

    def stop_gradient(self, a):
        return self.tf.stop_gradient(a)

    def reshape(self, a, shape):
        return self.tf.reshape(a, shape)


def _base(ops):
    x = ops.leaf(_X)
    h = ops.tanh(ops.matmul(x, _W1))
    logits = ops.matmul(h, _W2)
    return {
        "logits": logits,
        "one_hot_labels": ops.constant(_LABELS),
        "layers_list": [x, h],
    }


def _call(framework, make_kwargs):
    """Builds the arguments with `make_kwargs(ops)` and calls the loss."""
    if framework == "torch":
        return torch_impl.large_margin(**make_kwargs(_TorchOps()))

    import tensorflow as tf

    import tf_impl

    @tf.function(autograph=False)
    def graph():
        return tf_impl.large_margin(**make_kwargs(_TFOps()))

    return graph()


def _value(loss):
    return float(loss.detach() if hasattr(loss, "detach") else loss)


def _with(**overrides):
    def make(ops):
        return {**_base(ops), **overrides}

    return make


def _int_logits(ops):
    kwargs = _base(ops)
    kwargs["logits"] = ops.constant(np.zeros((4, 5)), dtype="int64")
    return kwargs


def _logits_shape(shape):
    def make(ops):
        kwargs = _base(ops)
        kwargs["logits"] = ops.reshape(kwargs["logits"], shape)
        return kwargs

    return make


def _labels(array):
    def make(ops):
        return {**_base(ops), "one_hot_labels": ops.constant(array)}

    return make


def _layers(layers):
    def make(ops):
        return {**_base(ops), "layers_list": layers}

    return make


def _single_tensor_layers(ops):
    kwargs = _base(ops)
    kwargs["layers_list"] = kwargs["layers_list"][1]
    return kwargs


def _unused_layer(ops):
    # Differentiable (requires grad in PyTorch) but not used by the logits.
    kwargs = _base(ops)
    kwargs["layers_list"] = [kwargs["layers_list"][0], ops.leaf(_Z)]
    return kwargs


def _detached_layer(ops):
    # g is computed from x, but the logits see it only through a stop-gradient.
    x = ops.leaf(_X)
    h = ops.tanh(ops.matmul(x, _W1))
    g = ops.tanh(ops.matmul(x, _W1 * 2.0))
    logits = ops.matmul(h, _W2) + ops.matmul(ops.stop_gradient(g), _W3)
    return {
        "logits": logits,
        "one_hot_labels": ops.constant(_LABELS),
        "layers_list": [x, g],
    }


def _all_detached(ops):
    # Logits that carry no graph at all (no parameter requires grad here).
    x = ops.leaf(_X)
    h = ops.tanh(ops.matmul(x, _W1))
    logits = ops.matmul(ops.stop_gradient(h), _W2)
    return {
        "logits": logits,
        "one_hot_labels": ops.constant(_LABELS),
        "layers_list": [h, x],
    }


def _not_upstream(index):
    return (
        f"`layers_list[{index}]` is not upstream of `logits`: the logits do not "
        "depend on it, so its gradient and the distance to the boundary are "
        f"undefined. Received: layers_list[{index}], a tensor the logits do "
        "not depend on"
    )


_NORM = "`dist_norm` must be 1, 2 or inf. Received: dist_norm="
_TOP_K = "`top_k` must be between 1 and the number of classes (5). Received: top_k="
_TOP_K_TYPE = "`top_k` must be an integer. Received: top_k="
_POSITIVE = "`layers_weights` entries must be finite and positive, but entry 1 is "

CASES = [
    ("dist_norm=3", _with(dist_norm=3), ValueError, _NORM + "3"),
    ("dist_norm=0", _with(dist_norm=0), ValueError, _NORM + "0"),
    ("dist_norm=nan", _with(dist_norm=math.nan), ValueError, _NORM + "nan"),
    ("dist_norm=-inf", _with(dist_norm=-math.inf), ValueError, _NORM + "-inf"),
    ("dist_norm='inf'", _with(dist_norm="inf"), ValueError, _NORM + "'inf'"),
    ("dist_norm=True", _with(dist_norm=True), ValueError, _NORM + "True"),
    ("dist_norm=None", _with(dist_norm=None), ValueError, _NORM + "None"),
    ("top_k=0", _with(top_k=0), ValueError, _TOP_K + "0"),
    ("top_k=-1", _with(top_k=-1), ValueError, _TOP_K + "-1"),
    ("top_k=6", _with(top_k=6), ValueError, _TOP_K + "6"),
    ("top_k=2.0", _with(top_k=2.0), TypeError, _TOP_K_TYPE + "2.0"),
    ("top_k=True", _with(top_k=True), TypeError, _TOP_K_TYPE + "True"),
    ("top_k='2'", _with(top_k="2"), TypeError, _TOP_K_TYPE + "'2'"),
    (
        "layers_weights-short",
        _with(layers_weights=[1.0]),
        ValueError,
        "`layers_weights` must have one entry per layer (2). "
        "Received: layers_weights=[1.0]",
    ),
    (
        "layers_weights-long",
        _with(layers_weights=[1.0, 2.0, 3.0]),
        ValueError,
        "`layers_weights` must have one entry per layer (2). "
        "Received: layers_weights=[1.0, 2.0, 3.0]",
    ),
    (
        "layers_weights-zero",
        _with(layers_weights=[1.0, 0.0]),
        ValueError,
        _POSITIVE + "0.0. Received: layers_weights=[1.0, 0.0]",
    ),
    (
        "layers_weights-negative",
        _with(layers_weights=[1, -2]),
        ValueError,
        _POSITIVE + "-2.0. Received: layers_weights=[1.0, -2.0]",
    ),
    (
        "layers_weights-nan",
        _with(layers_weights=[1.0, math.nan]),
        ValueError,
        _POSITIVE + "nan. Received: layers_weights=[1.0, nan]",
    ),
    (
        "layers_weights-inf",
        _with(layers_weights=(1.0, math.inf)),
        ValueError,
        _POSITIVE + "inf. Received: layers_weights=[1.0, inf]",
    ),
    (
        "layers_weights-numpy",
        _with(layers_weights=np.array([2.0, -1.0])),
        ValueError,
        "`layers_weights` entries must be finite and positive, but entry 1 is "
        "-1.0. Received: layers_weights=[2.0, -1.0]",
    ),
    (
        "layers_weights-scalar",
        _with(layers_weights=3.0),
        TypeError,
        "`layers_weights` must be a list with one number per layer. "
        "Received: layers_weights=3.0",
    ),
    (
        "layers_weights-text",
        _with(layers_weights="12"),
        TypeError,
        "`layers_weights` must be a list with one number per layer. "
        "Received: layers_weights='12'",
    ),
    (
        "logits-1d",
        _logits_shape([20]),
        ValueError,
        "`logits` must be 2-D, [batch_size, num_classes]. Received: logits.shape=(20,)",
    ),
    (
        "logits-3d",
        _logits_shape([4, 5, 1]),
        ValueError,
        "`logits` must be 2-D, [batch_size, num_classes]. "
        "Received: logits.shape=(4, 5, 1)",
    ),
    (
        "logits-int",
        _int_logits,
        TypeError,
        "`logits` must be floating point. Received: logits.dtype=int64",
    ),
    (
        "labels-classes",
        _labels(np.eye(4)),
        ValueError,
        "`one_hot_labels` must have the shape of `logits` (4, 5). "
        "Received: one_hot_labels.shape=(4, 4)",
    ),
    (
        "labels-batch",
        _labels(np.eye(5)[:3]),
        ValueError,
        "`one_hot_labels` must have the shape of `logits` (4, 5). "
        "Received: one_hot_labels.shape=(3, 5)",
    ),
    (
        # Class indices where one-hot labels belong: both losses take one-hot
        # labels only (the PyTorch module LargeMarginLoss converts indices).
        "labels-class-indices",
        _labels(np.array([0.0, 3.0, 1.0, 4.0])),
        ValueError,
        "`one_hot_labels` must have the shape of `logits` (4, 5). "
        "Received: one_hot_labels.shape=(4,)",
    ),
    (
        "layers-empty",
        _layers([]),
        ValueError,
        "`layers_list` must name at least one layer. Received: layers_list=[]",
    ),
    (
        "layers-none",
        _layers(None),
        ValueError,
        "`layers_list` must name at least one layer. Received: layers_list=None",
    ),
    (
        "layers-single-tensor",
        _single_tensor_layers,
        TypeError,
        "`layers_list` must be a list or tuple of tensors. Received: layers_list "
        "of type ",
    ),
    ("layer-unused", _unused_layer, ValueError, _not_upstream(1)),
    ("layer-detached", _detached_layer, ValueError, _not_upstream(1)),
    ("logits-detached", _all_detached, ValueError, _not_upstream(0)),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    "make_kwargs, error, message",
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_misuse_message(framework, make_kwargs, error, message):
    with pytest.raises(error) as info:
        _call(framework, make_kwargs)

    actual = str(info.value)
    if message.endswith("of type "):
        # The type's name is the framework's own tensor class.
        assert actual.startswith(message)
    else:
        assert actual == message


def test_every_message_ends_with_what_was_received():
    for case in CASES:
        assert "Received: " in case[3], case[0]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_valid_arguments_pass(framework):
    # The base case itself is valid: the faults above are the only cause.
    loss = _call(framework, _with(dist_norm=math.inf, top_k=5, layers_weights=[3, 6]))

    assert math.isfinite(_value(loss))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_numpy_integer_top_k_is_an_integer(framework):
    loss = _call(framework, _with(top_k=np.int64(2)))

    assert math.isfinite(_value(loss))


# --- PyTorch only -------------------------------------------------------------


def test_torch_layer_without_requires_grad():
    # The usual slip: the input's requires_grad was not set before the forward
    # pass. Autograd recorded nothing, so the message says so, not "unused".
    def make(ops):
        x = ops.constant(_X)
        w1 = ops.leaf(_W1)
        h = ops.tanh(x @ w1)
        return {
            "logits": ops.matmul(h, _W2),
            "one_hot_labels": ops.constant(_LABELS),
            "layers_list": [h, x],
        }

    with pytest.raises(ValueError) as info:
        _call("torch", make)

    assert str(info.value) == (
        "`layers_list[1]` does not require grad, so autograd cannot "
        "differentiate the logits with respect to it; call requires_grad_() on "
        "it before the forward pass. Received: layers_list[1].requires_grad=False"
    )


@pytest.mark.parametrize(
    "name, value",
    [("logits", np.zeros((4, 5))), ("one_hot_labels", _LABELS.tolist())],
)
def test_torch_argument_not_a_tensor(name, value):
    def make(ops):
        return {**_base(ops), name: value}

    with pytest.raises(TypeError) as info:
        _call("torch", make)

    assert str(info.value) == (
        f"`{name}` must be a torch.Tensor. "
        f"Received: {name} of type {type(value).__name__}"
    )


def test_torch_layer_not_a_tensor():
    def make(ops):
        kwargs = _base(ops)
        kwargs["layers_list"] = [kwargs["layers_list"][0], _Z]
        return kwargs

    with pytest.raises(TypeError) as info:
        _call("torch", make)

    assert str(info.value) == (
        "`layers_list[1]` must be a torch.Tensor. "
        "Received: layers_list[1] of type ndarray"
    )


def _module_call(target, **hyperparameters):
    ops = _TorchOps()
    kwargs = _base(ops)
    loss_fn = torch_impl.LargeMarginLoss(**hyperparameters)
    return loss_fn(kwargs["logits"], target, kwargs["layers_list"])


@pytest.mark.parametrize(
    "indices, message",
    [
        pytest.param(
            [0, 3, 5, 1],
            "`target` class indices must be in 0..4. Received: target[2]=5",
            id="above",
        ),
        pytest.param(
            [-1, 3, 2, 1],
            "`target` class indices must be in 0..4. Received: target[0]=-1",
            id="negative",
        ),
        pytest.param(
            [0, 3, 2],
            "`target` must hold one class index per example (4). "
            "Received: target.shape=(3,)",
            id="short",
        ),
    ],
)
def test_torch_module_class_indices(indices, message):
    import torch

    with pytest.raises(ValueError) as info:
        _module_call(torch.tensor(indices))

    assert str(info.value) == message


def test_torch_module_float_class_indices():
    import torch

    with pytest.raises(TypeError) as info:
        _module_call(torch.tensor([0.0, 3.0, 1.0, 4.0]))

    assert str(info.value) == (
        "`target` of shape [batch_size] must hold integer class indices. "
        "Received: target.dtype=float32"
    )


def test_torch_module_indices_equal_one_hot():
    import torch

    indices = torch.tensor([0, 3, 1, 4])
    one_hot = torch.tensor(_LABELS)

    actual = _module_call(indices, top_k=2, dist_norm=1)
    expected = _module_call(one_hot, top_k=2, dist_norm=1)

    assert torch.equal(actual, expected)


@pytest.mark.parametrize(
    "hyperparameters, error, message",
    [
        pytest.param(
            {"gama": 1.0},
            TypeError,
            "LargeMarginLoss takes only the hyperparameters of large_margin "
            "(gamma, alpha_factor, top_k, dist_norm, epsilon, use_approximation, "
            "worst_case_loss, layers_weights). Received: gama=1.0",
            id="unknown",
        ),
        pytest.param({"dist_norm": 3}, ValueError, _NORM + "3", id="dist_norm"),
        pytest.param({"top_k": 0}, ValueError, None, id="top_k"),
        pytest.param({"top_k": 1.5}, TypeError, _TOP_K_TYPE + "1.5", id="top_k-type"),
    ],
)
def test_torch_module_checks_at_construction(hyperparameters, error, message):
    with pytest.raises(error) as info:
        torch_impl.LargeMarginLoss(**hyperparameters)

    if message is not None:
        assert str(info.value) == message
    else:
        assert str(info.value).endswith("Received: top_k=0")


# --- Signatures ----------------------------------------------------------------

_REFERENCE_DEFAULTS = {
    "gamma": 10000,
    "alpha_factor": 2,
    "top_k": 1,
    "dist_norm": 2,
    "epsilon": 1e-8,
    "use_approximation": True,
    "worst_case_loss": True,
    "layers_weights": None,
}


@pytest.mark.tf
@pytest.mark.parametrize("name", ["large_margin", "large_margin_parts"])
def test_signatures_identical(name):
    import tf_impl

    actual = inspect.signature(getattr(torch_impl, name))
    expected = inspect.signature(getattr(tf_impl, name))

    assert actual == expected


@pytest.mark.parametrize("name", ["large_margin", "large_margin_parts"])
def test_signature_keyword_only_with_reference_defaults(name):
    params = inspect.signature(getattr(torch_impl, name)).parameters

    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert list(params) == ["logits", "one_hot_labels", "layers_list"] + list(
        _REFERENCE_DEFAULTS
    )
    for arg in ("logits", "one_hot_labels", "layers_list"):
        assert params[arg].default is inspect.Parameter.empty
    actual = {k: params[k].default for k in _REFERENCE_DEFAULTS}
    assert actual == _REFERENCE_DEFAULTS


def test_positional_call_is_rejected():
    ops = _TorchOps()
    kwargs = _base(ops)

    with pytest.raises(TypeError):
        torch_impl.large_margin(*kwargs.values())
