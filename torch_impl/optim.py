"""The reference's optimizer, TF1 RMSProp, as a PyTorch optimizer.

No library ships TF1's RMSProp for PyTorch: `torch.optim.RMSprop` starts its
accumulator at 0 and adds epsilon outside the square root, so it is not a
drop-in replacement (REFERENCE.md section 3).
"""

import torch

__all__ = ["TF1RMSProp"]


def _check_number(name, value, low, high, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(
            f"`{name}` must be in {left}{low}, {high}{right}. "
            f"Received: {name}={value!r}"
        )


class TF1RMSProp(torch.optim.Optimizer):
    """RMSProp with the semantics of TF1's `tf.compat.v1.train.RMSPropOptimizer`.

    For every parameter ``v`` with gradient ``g``:

    Formula:

        ms  <- ms + (g * g - ms) * (1 - decay)        # ms starts at 1
        mom <- momentum * mom + lr * g / sqrt(ms + epsilon)
        v   <- v - mom

    The operations are in the order of TensorFlow's ``ApplyRMSProp`` kernel,
    so that float64 runs agree to the last bits; ``ms + (g*g - ms) * (1 -
    decay)`` is ``decay * ms + (1 - decay) * g * g`` up to rounding.

    Warning:
        This differs from `torch.optim.RMSprop` (``alpha`` = decay, ``eps``)
        in exactly three places:

        1. the accumulator ``ms`` starts at **1** (TF1's ones initializer),
           where PyTorch's ``square_avg`` starts at 0; PyTorch's first steps
           are therefore far larger (``g / sqrt(0.1 g**2)``, about
           ``3.16 * sign(g)`` times the learning rate);
        2. epsilon is added **inside** the square root, ``sqrt(ms + eps)``,
           where PyTorch computes ``sqrt(square_avg) + eps``;
        3. the learning rate is applied **inside** the momentum accumulator
           (``mom = momentum * mom + lr * g / ...``; ``v -= mom``), where
           PyTorch accumulates ``g / ...`` and multiplies by the learning
           rate afterwards. The two agree for a constant learning rate but
           not across a decay of it, when ``momentum > 0``.

        TF1's slot names are kept: the state of a parameter holds ``"rms"``
        (the accumulator ``ms``) and ``"momentum"`` (``mom``), which TF1
        stores even when ``momentum = 0`` (then it is the last update).

    Args:
        params: iterable of parameters or of parameter-group dicts.
        lr: learning rate, ``> 0``.
        decay: discount of the accumulator, in ``[0, 1)``.
        momentum: momentum, in ``[0, 1)``.
        epsilon: added to the accumulator inside the square root, ``> 0``.

    Raises:
        ValueError: if `lr` or `epsilon` is not positive.
        ValueError: if `decay` or `momentum` is outside ``[0, 1)``.
        TypeError: if a hyperparameter is not a number.
        RuntimeError: in `step`, if a gradient is sparse.

    Example:

        >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> opt = TF1RMSProp([p], lr=0.1)
        >>> p.grad = p.detach().clone()
        >>> opt.step()
        >>> opt.state[p]["rms"]  # 0.9 * 1 + 0.1 * g**2
        tensor([1.0000, 1.3000], dtype=torch.float64)
    """

    def __init__(self, params, lr, decay=0.9, momentum=0.0, epsilon=1e-2):
        _check_number("lr", lr, 0.0, float("inf"), low_open=True, high_open=True)
        _check_number("decay", decay, 0.0, 1.0, high_open=True)
        _check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        _check_number("epsilon", epsilon, 0.0, float("inf"), low_open=True)
        defaults = {"lr": lr, "decay": decay, "momentum": momentum, "epsilon": epsilon}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one update.

        Args:
            closure: optional callable that re-evaluates the model and returns
                the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, decay = group["lr"], group["decay"]
            momentum, epsilon = group["momentum"], group["epsilon"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError(
                        "TF1RMSProp does not support sparse gradients. "
                        f"Received: a sparse gradient of shape {tuple(g.shape)}"
                    )
                state = self.state[p]
                if not state:
                    state["rms"] = torch.ones_like(
                        p, memory_format=torch.preserve_format
                    )
                    state["momentum"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                ms, mom = state["rms"], state["momentum"]
                ms.add_((g * g - ms) * (1.0 - decay))
                mom.mul_(momentum).add_((g * lr) / torch.sqrt(ms + epsilon))
                p.sub_(mom)
        return loss
