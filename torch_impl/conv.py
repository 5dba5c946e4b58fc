"""A convolution of a one-channel input with a backward pass that is fast on CPU.

The reference network's first layer convolves the 1-channel image with 32
5x5 kernels. The margin loss differentiates the logits with respect to the
image, so every step runs that convolution's input gradient, which a
cross-entropy step never needs. On CPU, oneDNN's backward kernels for a
1-channel convolution are slow: profiled in `parity.bench` (2 threads,
float32, batch 256, 28x28), `convolution_backward` took about 35 ms for the
input gradient and 36 ms for the kernel gradient, against about 8 ms for the
forward pass, for a third of a GFLOP each. Written as one batched matrix
product and a shifted sum (input gradient) or an unfold and a batched matrix
product (kernel gradient), they take about 8 and 14 ms.

`input_conv2d` keeps oneDNN's forward pass and replaces the backward pass.
The backward is written with differentiable operations, so the exact mode's
second-order terms flow through it, and it computes only the gradients the
running backward pass asks for: the margin loss's first pass wants the image
gradient and not the kernel's, the training step the reverse. Built-in
operations get that from the autograd engine; a custom function has to ask
(`_wanted`).
"""

import torch
import torch.nn.functional as F

__all__ = ["input_conv2d"]


def _wanted(node):
    """Whether the running backward pass will execute `node`.

    Falls back to True (compute the gradient) where the engine cannot say:
    outside a backward pass, or a PyTorch without the query.
    """
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):
        return True


def _grad_input(grad, weight):
    """``[B, C, H, W]`` output gradient -> ``[B, 1, H, W]`` input gradient.

    Each of the k*k kernel taps contributes ``sum_c weight[c, tap] *
    grad[:, c]`` at its own shift: one batched matrix product gives all the
    taps, and a sum of shifted slices places them.
    """
    b, c, h, w = grad.shape
    k = weight.shape[-1]
    p = k // 2
    taps = weight.reshape(c, k * k).t().expand(b, k * k, c)
    z = torch.bmm(taps, grad.reshape(b, c, h * w)).view(b, k, k, h, w)
    # z, not grad: under vmap z is batched when either grad or weight is.
    out = z.new_zeros(b, h + 2 * p, w + 2 * p)
    # unbind, not z[:, i, j]: in the exact mode's second pass each indexing
    # would scatter its gradient into a zeroed copy of the whole of z (a
    # fifth of that step's time, profiled), where unbind stacks them once.
    for i, row in enumerate(z.unbind(1)):
        for j, tap in enumerate(row.unbind(1)):
            out[:, i : i + h, j : j + w] += tap
    return out[:, None, p : p + h, p : p + w].contiguous()


def _grad_weight(grad, x, k):
    """``[B, C, H, W]`` output gradient -> ``[C, 1, k, k]`` kernel gradient."""
    b, c, h, w = grad.shape
    cols = F.unfold(x, k, padding=k // 2)  # [B, k*k, H*W]
    per_example = torch.bmm(grad.reshape(b, c, h * w), cols.transpose(1, 2))
    return per_example.sum(0).view(c, 1, k, k)


class _InputConv(torch.autograd.Function):
    # Under torch.func transforms (grad, vmap, jacrev) the backward's
    # operations are batched like any others.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight):
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, x_t, weight_t):
        x, weight = ctx.saved_tensors
        p = weight.shape[-1] // 2
        out = None
        if x_t is not None:
            out = F.conv2d(x_t, weight, padding=p)
        if weight_t is not None:
            t = F.conv2d(x, weight_t, padding=p)
            out = t if out is None else out + t
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        (x_node, _), (weight_node, _) = ctx.next_functions
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0] and _wanted(x_node):
            grad_x = _grad_input(grad, weight)
        if ctx.needs_input_grad[1] and _wanted(weight_node):
            grad_weight = _grad_weight(grad, x, weight.shape[-1])
        return grad_x, grad_weight


def input_conv2d(x, weight):
    """``F.conv2d(x, weight, padding=k // 2)`` for a 1-channel `x`, no bias.

    The same function and, up to rounding, the same gradients of every order
    (tested against `F.conv2d` and by `gradgradcheck`, in reverse and forward
    mode and under `torch.func`). Off the CPU, and while `torch.compile`
    traces, it is `F.conv2d` itself: the slow kernels it works around are
    oneDNN's, and the compiler cannot see which gradients a pass asks for.

    Args:
        x: ``[batch_size, 1, height, width]``.
        weight: ``[channels, 1, k, k]`` with k odd.

    Returns:
        ``[batch_size, channels, height, width]``.
    """
    k = weight.shape[-1]
    if (
        x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or x.dim() != 4
        or x.shape[1] != 1
        or tuple(weight.shape[1:]) != (1, k, k)
        or k % 2 == 0
    ):
        return F.conv2d(x, weight, padding=k // 2)
    # Views, so that the engine can be asked about each input's node: for a
    # leaf it can only answer inside .backward(), not autograd.grad().
    return _InputConv.apply(x.view_as(x), weight.view_as(weight))
