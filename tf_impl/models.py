"""The reference MNIST network and a toy network, in TensorFlow.

Built from raw ops (`tf.nn`), not `tf.compat.v1.layers`, which needs the
legacy Keras package on TF 2.16 and later. Variables are keyed by the neutral
names of `parity.weights`, whose layout is TensorFlow's own.
"""

import tensorflow as tf

from parity import weights as neutral

__all__ = ["ReferenceNet", "BN_DECAY", "BN_EPSILON"]

BN_DECAY = 0.9
BN_EPSILON = 1e-5


def batch_moments(h):
    """Mean and biased variance over batch, height and width of NHWC `h`.

    Not `tf.nn.moments`: it puts a stop_gradient on the mean inside the
    variance. First-order gradients are unchanged by that, but the exact mode
    differentiates the loss's own gradient, and the second-order terms through
    the batch statistics then come out wrong (by 0.4% to 4% on the reference
    network; central differences agree with this formula and with PyTorch).
    """
    mean = tf.reduce_mean(h, axis=[0, 1, 2])
    var = tf.reduce_mean(tf.square(h - mean), axis=[0, 1, 2])
    return mean, var


class ReferenceNet(tf.Module):
    """The reference MNIST network (``arch="mnist"``) or the toy network.

    Args:
        arch: ``"mnist"`` or ``"toy"``.
        weights: neutral weight set.
        dtype: variable dtype.
    """

    def __init__(self, arch, weights, dtype=tf.float64):
        super().__init__(name=f"{arch}_net")
        table = neutral.ARCHITECTURES[arch]["params"]
        self.arch = arch
        self.dtype = dtype
        self.variables_by_name = {}
        for name, (kind, _) in table.items():
            self.variables_by_name[name] = tf.Variable(
                tf.cast(weights[name], dtype),
                trainable=kind != "moving",
                name=name.replace("/", "_"),
            )

    @property
    def trainable(self):
        """Trainable variables, in the order of the parameter table."""
        return [v for v in self.variables_by_name.values() if v.trainable]

    @property
    def trainable_names(self):
        return [n for n, v in self.variables_by_name.items() if v.trainable]

    def _bn(self, prefix, h, training, updates):
        v = self.variables_by_name
        gamma = v[f"{prefix}/batch_norm/gamma"]
        beta = v[f"{prefix}/batch_norm/beta"]
        mm = v[f"{prefix}/batch_norm/moving_mean"]
        mv = v[f"{prefix}/batch_norm/moving_variance"]
        if training:
            mean, var = batch_moments(h)
            # The reference's fused batch norm feeds the moving variance the
            # unbiased (Bessel-corrected) batch variance.
            n = tf.cast(tf.reduce_prod(tf.shape(h)[:3]), h.dtype)
            updates.append((mm, mean))
            updates.append((mv, var * n / (n - 1.0)))
        else:
            mean, var = mm, mv
        return tf.nn.batch_normalization(h, mean, var, beta, gamma, BN_EPSILON)

    def forward(self, x, training):
        """Logits, endpoints and moving-statistics updates.

        Args:
            x: ``[batch_size, height, width, 1]``, NHWC.
            training: batch norm in training mode (batch statistics).

        Returns:
            ``(logits, endpoints, updates)``; `updates` is a list of
            ``(moving variable, batch statistic)`` pairs, empty in inference.
        """
        v = self.variables_by_name
        updates = []
        if self.arch == "toy":
            h = tf.nn.conv2d(x, v["conv_layer0/kernel"], 1, "SAME")
            e0 = tf.nn.relu(h + v["conv_layer0/bias"])
            pooled = tf.reduce_mean(e0, axis=[1, 2])  # [B, 8]
            logits = tf.matmul(pooled, v["logits/kernel"]) + v["logits/bias"]
            return logits, {"conv_layer0": e0}, updates

        endpoints = {}
        h = x
        for i in range(2):
            prefix = f"conv_layer{i}"
            h = tf.nn.conv2d(h, v[f"{prefix}/kernel"], 1, "SAME")
            h = tf.nn.relu(tf.nn.relu(h))
            h = tf.nn.max_pool2d(h, 2, 2, "VALID")
            h = self._bn(prefix, h, training, updates)
            endpoints[prefix] = h
        flat = tf.reshape(h, [tf.shape(h)[0], -1])  # NHWC flatten order
        f = tf.nn.relu(tf.matmul(flat, v["fc_layer0/kernel"]) + v["fc_layer0/bias"])
        endpoints["fc_layer0"] = f
        logits = tf.matmul(f, v["logits/kernel"]) + v["logits/bias"]
        return logits, endpoints, updates

    def __call__(self, x, training=False):
        logits, endpoints, _ = self.forward(x, training)
        return logits, endpoints
