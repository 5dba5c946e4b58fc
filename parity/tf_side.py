"""The TensorFlow lane: runs the reference on neutral weights and inputs.

The whole computation, outer gradient included, is one `tf.function` that
differentiates with `tf.gradients`, as the TF1 graph did.
"""

import numpy as np
import tensorflow as tf

import tf_impl
from parity import compare
from parity import config as config_lib

# One tf.function per check: retracing is expected, its warning is noise.
tf.get_logger().setLevel("ERROR")

__all__ = ["quantities", "tf_dtype"]


def tf_dtype(name):
    return {"float64": tf.float64, "float32": tf.float32}[name]


ERROR_KEY = compare.ERROR_KEY


def _call_loss(loss_fn, kwargs):
    try:
        out = loss_fn(**kwargs)
    except (Exception, SystemExit) as e:  # a plug-in may fail in any way
        raise RuntimeError(f"the TensorFlow loss raised {type(e).__name__}: {e}") from e
    parts = out if isinstance(out, dict) else {"loss": out}
    loss = parts.get("loss")
    if not isinstance(loss, tf.Tensor) or loss.shape.rank != 0:
        shape = (
            loss.shape.as_list() if isinstance(loss, tf.Tensor) else type(loss).__name__
        )
        raise RuntimeError(
            f"the TensorFlow loss must return a scalar tensor. Received: {shape}"
        )
    return parts


def quantities(cfg, weights, x_nhwc, labels, loss_fn=None):
    """Every compared quantity of the TensorFlow side, neutral layout, numpy.

    Args:
        cfg: the `Config`.
        weights: neutral weight set.
        x_nhwc: ``[B, H, W, 1]`` inputs.
        labels: ``[B]`` class indices.
        loss_fn: a loss with `large_margin`'s signature; the built-in
            `tf_impl.large_margin_parts` if None.

    Returns:
        A dict of quantity name -> array, with the keys of
        `parity.torch_side.quantities`.
    """
    loss_fn = loss_fn or tf_impl.large_margin_parts
    dtype = tf_dtype(cfg.dtype)
    model = tf_impl.ReferenceNet(cfg.arch, weights, dtype)
    names = model.trainable_names

    @tf.function(autograph=False)
    def compute(x, y):
        logits, endpoints = model(x, training=cfg.training)
        layers = [x if n == "input" else endpoints[n] for n in cfg.layers]
        sizes = config_lib.layer_sizes([t.shape.as_list() for t in layers])
        kwargs = cfg.loss_kwargs(sizes)
        one_hot = tf.one_hot(y, logits.shape[1], dtype=logits.dtype)
        parts = _call_loss(
            loss_fn,
            dict(logits=logits, one_hot_labels=one_hot, layers_list=layers, **kwargs),
        )
        if "layers" not in parts:
            single_losses = []
            for i in range(len(layers)):
                single = dict(kwargs)
                if kwargs["layers_weights"] is not None:
                    single["layers_weights"] = [kwargs["layers_weights"][i]]
                single_losses.append(
                    _call_loss(
                        loss_fn,
                        dict(
                            logits=logits,
                            one_hot_labels=one_hot,
                            layers_list=[layers[i]],
                            **single,
                        ),
                    )["loss"]
                )
            parts["single_losses"] = single_losses
        grads = tf.gradients(parts["loss"], [x] + model.trainable)
        grads = [
            tf.zeros_like(v) if g is None else g
            for g, v in zip(grads, [x] + model.trainable, strict=True)
        ]
        return logits, endpoints, parts, grads

    x = tf.constant(x_nhwc, dtype)
    y = tf.constant(labels, tf.int64)
    try:
        logits, endpoints, parts, grads = compute(x, y)
    except Exception as e:  # the loss, or what it returned, broke the graph
        logits, endpoints = model(x, training=cfg.training)
        out = _forward_rows(x, logits, endpoints)
        out[ERROR_KEY] = (
            str(e)
            if isinstance(e, RuntimeError)
            else (f"the TensorFlow loss's result: {type(e).__name__}: {e}")
        )
        return out

    out = _forward_rows(x, logits, endpoints)
    try:
        out.update(_loss_rows(cfg, names, parts, grads))
    except Exception as e:  # a plug-in's dict that does not hold the parts
        out[ERROR_KEY] = f"the TensorFlow loss's result: {type(e).__name__}: {e}"
    return out


def _forward_rows(x, logits, endpoints):
    out = {"input": x.numpy(), "logits": logits.numpy()}
    for name, t in endpoints.items():
        out[f"activation/{name}"] = t.numpy()
    return out


def _decision(t):
    a = t.numpy()
    return a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a


def _loss_rows(cfg, names, parts, grads):
    out = {}
    if "layers" in parts:
        out["top_k_index"] = _decision(parts["top_k_index"])
        for name, part in zip(cfg.layers, parts["layers"], strict=True):
            out[f"clip_branch/{name}"] = _decision(part["clip_branch"])
        out["probabilities"] = parts["probabilities"].numpy()
        out["difference"] = parts["difference"].numpy()
        for name, part in zip(cfg.layers, parts["layers"], strict=True):
            grad = part["gradient"].numpy()
            for k in range(grad.shape[0]):
                out[f"gradient/{name}/k{k}"] = grad[k]
            out[f"grad_norm/{name}"] = part["grad_norm"].numpy()
            out[f"distance/{name}"] = part["distance"].numpy()
            out[f"layer_loss/{name}"] = part["loss"].numpy()
    else:
        for name, single in zip(cfg.layers, parts["single_losses"], strict=True):
            out[f"layer_loss/{name}"] = single.numpy()
    out["loss"] = parts["loss"].numpy()
    out["loss_gradient/input"] = grads[0].numpy()
    for name, g in zip(names, grads[1:], strict=True):
        out[f"loss_gradient/{name}"] = g.numpy()
    return out
