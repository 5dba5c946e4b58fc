"""The loss's public surface: module form, graph modes, a value worked by hand."""

import math

import numpy as np
import pytest
import torch

import torch_impl


def _linear_case(seed=0, batch=4, dim=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim))
    w = rng.normal(size=(dim, 2))
    y = np.array([0, 1, 1, 0][:batch])
    return x, w, y


def _by_hand(x, w, y, *, gamma, alpha, p, eps):
    """Two classes, logits = x @ w, the layer is x itself.

    With two classes, diff = p_y - p_other = tanh(m / 2) where m is the logit
    margin z_y - z_other, so d diff / d x = (1 - diff**2) / 2 * (w_y - w_other).
    """
    z = x @ w
    sign = np.where(y == 0, 1.0, -1.0)
    m = sign * (z[:, 0] - z[:, 1])
    diff = np.tanh(m / 2)
    g = ((1 - diff**2) / 2)[:, None] * (sign[:, None] * (w[:, 0] - w[:, 1])[None, :])
    q = {1: math.inf, 2: 2, math.inf: 1}[p]
    norm = np.linalg.norm(g, ord=q, axis=1)
    dist = diff / (norm + eps)
    lower = gamma * (1 - alpha)
    per_example = -np.minimum(gamma, np.maximum(dist, lower))
    return per_example.mean()


@pytest.mark.parametrize("p", [1, 2, math.inf], ids=["l1", "l2", "linf"])
@pytest.mark.parametrize("gamma", [10000.0, 0.3], ids=["wide", "clipping"])
def test_torch_loss_matches_a_value_worked_by_hand(p, gamma):
    x, w, y = _linear_case()
    expected = _by_hand(x, w, y, gamma=gamma, alpha=2.0, p=p, eps=1e-8)
    xt = torch.tensor(x, requires_grad=True)
    logits = xt @ torch.tensor(w)
    actual = torch_impl.large_margin(
        logits=logits,
        one_hot_labels=torch.nn.functional.one_hot(torch.tensor(y), 2).double(),
        layers_list=[xt],
        gamma=gamma,
        dist_norm=p,
    )
    assert float(actual.detach()) == pytest.approx(expected, rel=1e-12)


def test_module_accepts_class_indices_and_one_hot():
    x, w, y = _linear_case()
    xt = torch.tensor(x, requires_grad=True)
    logits = xt @ torch.tensor(w)
    fn = torch_impl.LargeMarginLoss(gamma=0.3, dist_norm=1)
    by_index = fn(logits, torch.tensor(y), [xt])
    by_one_hot = fn(
        logits, torch.nn.functional.one_hot(torch.tensor(y), 2).double(), [xt]
    )
    assert torch.equal(by_index, by_one_hot)
    expected = _by_hand(x, w, y, gamma=0.3, alpha=2.0, p=1, eps=1e-8)
    assert float(by_index.detach()) == pytest.approx(expected, rel=1e-12)
    assert "gamma=0.3" in repr(fn)


def test_module_rejects_unknown_hyperparameters():
    with pytest.raises(TypeError, match="Received: gama=1.0"):
        torch_impl.LargeMarginLoss(gama=1.0)


@pytest.mark.tf
@pytest.mark.parametrize("p", [1, 2, math.inf], ids=["l1", "l2", "linf"])
def test_tf_loss_same_value_in_tf_function_and_v1_graph(p):
    import tensorflow as tf

    import tf_impl

    x, w, y = _linear_case()
    expected = _by_hand(x, w, y, gamma=0.3, alpha=2.0, p=p, eps=1e-8)
    one_hot = np.eye(2)[y]

    @tf.function
    def in_function(xv):
        return tf_impl.large_margin(
            logits=tf.matmul(xv, w),
            one_hot_labels=one_hot,
            layers_list=[xv],
            gamma=0.3,
            dist_norm=p,
        )

    assert float(in_function(tf.constant(x))) == pytest.approx(expected, rel=1e-12)

    graph = tf.Graph()
    with graph.as_default():
        xp = tf.compat.v1.placeholder(tf.float64, shape=x.shape)
        loss = tf_impl.large_margin(
            logits=tf.matmul(xp, w),
            one_hot_labels=one_hot,
            layers_list=[xp],
            gamma=0.3,
            dist_norm=p,
        )
        with tf.compat.v1.Session(graph=graph) as sess:
            value = sess.run(loss, {xp: x})
    assert float(value) == pytest.approx(expected, rel=1e-12)


@pytest.mark.tf
def test_tf_loss_refuses_eager_tensors():
    import tensorflow as tf

    import tf_impl

    x = tf.constant(np.ones((2, 2)))
    with pytest.raises(
        RuntimeError, match="inside tf.function or a tf.compat.v1 graph"
    ):
        tf_impl.large_margin(logits=x, one_hot_labels=np.eye(2), layers_list=[x])
