"""A convolution of a one-channel input with a backward pass that is fast on CPU.

The reference network's first layer convolves the 1-channel image with 32
5x5 kernels. The margin loss differentiates the logits with respect to the
image, so every step runs that convolution's input gradient, which a
cross-entropy step never needs. On CPU, oneDNN's backward kernels for a
1-channel convolution are slow: profiled in `parity.bench` (2 threads,
float32, batch 256, 28x28, NCHW), `convolution_backward` took about 35 ms
for the input gradient and 36 ms for the kernel gradient, against about 8 ms
for the forward pass, for a third of a GFLOP each. Written as one batched
matrix product and a shifted sum (input gradient) or an unfold and a batched
matrix product (kernel gradient), they take about 8 and 14 ms. In
channels_last oneDNN's kernel gradient is fast (5 ms) and is kept, and its
input gradient (22 ms) is replaced by one matrix product over every pixel
and the same shifted sum (8 ms).

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


def _channels_last(grad):
    """Whether `grad` is laid out channels_last (and not also NCHW)."""
    try:
        return not grad.is_contiguous() and grad.is_contiguous(
            memory_format=torch.channels_last
        )
    except RuntimeError:  # inside vmap, which cannot answer for channels_last
        return False


def _shifted_sum(taps, h, w, k):
    """``sum_ij shift_ij(taps[i][j])``: k x k tensors ``[B, H, W]`` -> ``[B, 1, H, W]``.

    Each tap is added into a zero-padded buffer at its own offset. The taps
    come as nested lists from `unbind`, not from indexing: in the exact
    mode's second pass each indexing would scatter its gradient into a zeroed
    copy of all the taps (a fifth of that step's time, profiled), where
    unbind stacks them once.
    """
    p = k // 2
    first = taps[0][0]
    out = first.new_zeros(first.shape[0], h + 2 * p, w + 2 * p)
    for i, row in enumerate(taps):
        for j, tap in enumerate(row):
            out[:, i : i + h, j : j + w] += tap
    return out[:, None, p : p + h, p : p + w].contiguous()


def _grad_input(grad, weight):
    """``[B, C, H, W]`` output gradient -> ``[B, 1, H, W]`` input gradient.

    Each of the k*k kernel taps contributes ``sum_c weight[c, tap] *
    grad[:, c]`` at its own shift: one matrix product gives all the taps
    (batched per example for NCHW, one product over every pixel for
    channels_last, with no copy of `grad` in either layout), and a sum of
    shifted slices places them.
    """
    b, c, h, w = grad.shape
    k = weight.shape[-1]
    kernel = weight.reshape(c, k * k)
    if _channels_last(grad):
        pixels = grad.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view
        # Tap-major, so that each tap is contiguous for the shifted sum: the
        # pixel-major product left them strided, and the sum took 19 ms
        # where it now takes about 4 (profiled as above).
        z = (kernel.t() @ pixels.t()).view(k, k, b, h, w)
        taps = [row.unbind(0) for row in z.unbind(0)]
    else:
        per_example = kernel.t().expand(b, k * k, c)
        z = torch.bmm(per_example, grad.reshape(b, c, h * w)).view(b, k, k, h, w)
        taps = [row.unbind(1) for row in z.unbind(1)]
    return _shifted_sum(taps, h, w, k)


def _grad_weight(grad, x, weight):
    """``[B, C, H, W]`` output gradient -> ``[C, 1, k, k]`` kernel gradient.

    For a channels_last `grad` oneDNN's own kernel is the fast one (about
    5 ms against 15, profiled as above); for NCHW it is the slow one.
    """
    b, c, h, w = grad.shape
    k = weight.shape[-1]
    if _channels_last(grad):
        p = k // 2
        mask = [False, True, False]  # the kernel's gradient alone
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1, mask
        )[1]
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
            grad_weight = _grad_weight(grad, x, weight)
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
    # leaf it can only answer inside .backward(), not autograd.grad(). A
    # slice keeps the strides; view_as would not. That matters: a 1-channel
    # NCHW tensor made from NHWC data has the strides of channels_last too,
    # and then F.conv2d returns channels_last, the network after it runs in
    # that layout, and float32 reductions (batch norm's above all) round as
    # TensorFlow's NHWC kernels do. With view_as the float32 parity floor in
    # batch-norm training mode rose from 5e-6 to 4e-2 (`parity.calibrate`).
    return _InputConv.apply(x[:], weight[:])
