"""The reference's training recipe in TensorFlow, with TF1's own pieces.

One training step is one `tf.function` (no autograph) that differentiates with
`tf.gradients`, as the TF1 graph did, and uses TF1's real components:
`tf.compat.v1.train.RMSPropOptimizer` (the ``ResourceApplyRMSProp`` kernel, slots
``rms`` initialised to ones and ``momentum``), `tf.clip_by_global_norm`,
`tf.compat.v1.train.exponential_decay` with ``staircase=True`` on a global
step that `apply_gradients` increments, `tf.nn.l2_loss` and
`tf.nn.softmax_cross_entropy_with_logits`. The recipe object is read by
attribute (see `parity.training.Recipe`).
"""

import math

import tensorflow as tf

from tf_impl.loss import large_margin_parts
from tf_impl.models import BN_DECAY, ReferenceNet

__all__ = ["ReferenceTrainer"]


class ReferenceTrainer:
    """Trains `ReferenceNet` with the reference recipe, one batch per `step`.

    TF1 turns Python floats into float32 tensors: `RMSPropOptimizer` holds
    its decay, momentum and epsilon as float32 and casts them to the
    variable's dtype, and `exponential_decay` casts a float decay rate the
    same way, so a float64 reference would train with ``float32(0.9)`` and
    ``float32(0.96)``. Every hyperparameter is therefore passed as a tensor
    of the run's dtype; in float32 that is what TF1 did anyway.

    Batch-norm moving statistics are updated with TF1's batch-norm rule,
    ``moving -= (moving - batch) * (1 - 0.9)``, from the batch statistics of
    `ReferenceNet.forward` (the variance already Bessel-corrected), in the
    same step as the update, as TF1's ``UPDATE_OPS`` dependency did.

    Args:
        arch: ``"mnist"`` or ``"toy"``.
        weights: neutral weight set.
        recipe: the recipe (attributes of `parity.training.Recipe`).
        layers: names of the margin layers: ``"input"`` or endpoint names.
        loss_kwargs: ``sizes -> dict`` of the margin loss's keyword arguments.
        dtype: ``tf.float64`` or ``tf.float32``.
        loss_fn: the margin loss; `tf_impl.large_margin_parts` if None.
    """

    def __init__(
        self, arch, weights, recipe, *, layers, loss_kwargs, dtype, loss_fn=None
    ):
        self.model = ReferenceNet(arch, weights, dtype)
        self.recipe = recipe
        self.layers = tuple(layers)
        self.loss_kwargs = loss_kwargs
        self.loss_fn = loss_fn or large_margin_parts
        self.dtype = dtype
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False)

        def constant(value):
            return tf.constant(value, dtype)

        self._lr0 = constant(recipe.learning_rate)
        self._decay_rate = constant(recipe.decay_rate)
        self._clip_norm = constant(recipe.clip_norm)
        self.optimizer = tf.compat.v1.train.RMSPropOptimizer(
            learning_rate=self._learning_rate,
            decay=constant(recipe.rms_decay),
            momentum=constant(recipe.rms_momentum),
            epsilon=constant(recipe.rms_epsilon),
        )
        self._step_fn = None

    def _learning_rate(self):
        # Reads the global step before apply_gradients increments it: the
        # first update is step 0.
        return tf.compat.v1.train.exponential_decay(
            self._lr0,
            self.global_step,
            self.recipe.decay_steps,
            self._decay_rate,
            staircase=True,
        )

    def _build(self):
        recipe = self.recipe
        model = self.model
        variables = model.trainable
        dtype = self.dtype

        @tf.function(autograph=False)
        def step_fn(x, y):
            lr = self._learning_rate()
            logits, endpoints, updates = model.forward(x, training=True)
            layers = [x if n == "input" else endpoints[n] for n in self.layers]
            sizes = [math.prod(t.shape.as_list()[1:]) for t in layers]
            one_hot = tf.one_hot(y, logits.shape[1], dtype=logits.dtype)
            out = self.loss_fn(
                logits=logits,
                one_hot_labels=one_hot,
                layers_list=layers,
                **self.loss_kwargs(sizes),
            )
            margin = out["loss"] if isinstance(out, dict) else out
            xent = tf.reduce_mean(
                tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)
            )
            l2 = tf.add_n([tf.nn.l2_loss(v) for v in variables])
            total = (
                recipe.margin_weight * margin
                + recipe.xent_weight * xent
                + recipe.l2_weight * l2
            )
            true_logit = tf.gather(logits, y, axis=1, batch_dims=1)
            # A tie with the true class counts as correct (in_top_k's rule;
            # in_top_k itself takes float32 only).
            correct = true_logit >= tf.reduce_max(logits, axis=1)
            accuracy = tf.reduce_mean(tf.cast(correct, logits.dtype))

            grads = tf.gradients(total, variables)
            clipped, norm = tf.clip_by_global_norm(grads, self._clip_norm)
            clipped_norm = tf.linalg.global_norm(clipped)
            moving_ops = [
                moving.assign_sub((moving - batch) * (1.0 - BN_DECAY))
                for moving, batch in updates
            ]
            with tf.control_dependencies(moving_ops):
                train_op = self.optimizer.apply_gradients(
                    zip(clipped, variables, strict=True), global_step=self.global_step
                )
            with tf.control_dependencies([train_op]):
                param_norm = tf.linalg.global_norm([tf.identity(v) for v in variables])
                # A network without batch norm has no moving statistics.
                moving = [tf.identity(m) for m, _ in updates]
                moving_norm = (
                    tf.linalg.global_norm(moving) if moving else tf.zeros([], dtype)
                )
            return {
                "learning_rate": lr,
                "total_loss": total,
                "margin_loss": margin,
                "xent_loss": xent,
                "l2_loss": l2,
                "accuracy": accuracy,
                "grad_norm": norm,
                "clipped_grad_norm": clipped_norm,
                "param_norm": param_norm,
                "moving_norm": moving_norm,
            }

        return step_fn

    def step(self, x_nhwc, labels):
        """One update on a batch.

        Args:
            x_nhwc: ``[batch_size, height, width, 1]`` array.
            labels: ``[batch_size]`` int64 class indices.

        Returns:
            A dict of floats with the keys of `torch_impl.train.Trainer.step`.
        """
        if self._step_fn is None:
            self._step_fn = self._build()
        step = int(self.global_step.numpy())
        out = self._step_fn(
            tf.constant(x_nhwc, self.dtype), tf.constant(labels, tf.int64)
        )
        record = {"step": step}
        record.update({k: float(v.numpy()) for k, v in out.items()})
        return record

    def state(self):
        """Final state in neutral names: parameters, slots, moving statistics.

        Returns:
            A dict with ``"param"``, ``"rms"``, ``"momentum"`` and ``"moving"``,
            each a dict of neutral name -> numpy array.
        """
        out = {"param": {}, "rms": {}, "momentum": {}, "moving": {}}
        for name, v in self.model.variables_by_name.items():
            if not v.trainable:
                out["moving"][name] = v.numpy()
                continue
            out["param"][name] = v.numpy()
            for slot in ("rms", "momentum"):
                s = self.optimizer.get_slot(v, slot)
                if s is not None:
                    out[slot][name] = s.numpy()
        return out

    def accuracy(self, x_nhwc, labels, *, chunk=500):
        """Accuracy with batch norm in inference mode; ties count as correct.

        Args:
            x_nhwc: ``[N, height, width, 1]`` array.
            labels: ``[N]`` int64 class indices.
            chunk: examples per forward pass, to bound memory.
        """
        correct = 0
        for start in range(0, len(labels), chunk):
            x = tf.constant(x_nhwc[start : start + chunk], self.dtype)
            y = tf.constant(labels[start : start + chunk], tf.int64)
            logits, _ = self.model(x, training=False)
            true_logit = tf.gather(logits, y, axis=1, batch_dims=1)
            hit = true_logit >= tf.reduce_max(logits, axis=1)
            correct += int(tf.reduce_sum(tf.cast(hit, tf.int64)).numpy())
        return correct / len(labels)
