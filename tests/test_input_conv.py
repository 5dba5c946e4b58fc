"""`torch_impl.conv.input_conv2d`: the first layer's convolution with a fast backward.

It must be `F.conv2d` to every order of differentiation, and compute only the
gradients the running backward pass asks for. The expected values come from
`F.conv2d` (oneDNN's kernels) and from central differences, never from the
function under test.
"""

import pytest
import torch
import torch.nn.functional as F

from torch_impl import conv as conv_lib
from torch_impl.conv import input_conv2d

# Measured: the largest difference from F.conv2d over the cases below was
# 5e-13 on values of order 1e2 (float64): summation order alone.
ATOL = 1e-11


def _inputs(seed=0, batch=3, size=9, channels=4, k=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=gen, dtype=torch.float64)
    w = torch.randn(channels, 1, k, k, generator=gen, dtype=torch.float64)
    return x.requires_grad_(True), w.requires_grad_(True)


def _reference(x, w):
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


def _derivatives(conv, x, w):
    """Value, first-order gradients, and the exact mode's second-order ones."""
    y = conv(x, w)
    s = (y.tanh() ** 2).sum()
    gx, gw = torch.autograd.grad(s, [x, w], create_graph=True)
    # What the exact mode differentiates: a norm of the input gradient.
    n = gx.abs().sum() + (gx**2).sum()
    ggw, ggx = torch.autograd.grad(n, [w, x])
    return y, gx, gw, ggw, ggx


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_same_function_and_derivatives_as_conv2d(k, seed):
    x, w = _inputs(seed=seed, k=k)
    names = ("value", "grad_x", "grad_w", "second_w", "second_x")
    got = _derivatives(input_conv2d, x, w)
    want = _derivatives(_reference, x, w)
    for name, a, e in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=ATOL, msg=name)


def test_gradcheck_and_gradgradcheck_against_central_differences():
    x, w = _inputs(batch=2, size=6, channels=2, k=3)
    assert torch.autograd.gradcheck(input_conv2d, (x, w))
    assert torch.autograd.gradgradcheck(input_conv2d, (x, w))


def test_a_planted_fault_in_the_input_gradient_is_caught(monkeypatch):
    # The comparison above must be able to fail: taps placed one pixel off.
    original = conv_lib._grad_input
    monkeypatch.setattr(
        conv_lib, "_grad_input", lambda g, w: torch.roll(original(g, w), 1, -1)
    )
    x, w = _inputs()
    got = _derivatives(input_conv2d, x, w)[1]
    want = _derivatives(_reference, x, w)[1]
    assert (got - want).abs().max() > 1e-3


def _count_calls(monkeypatch):
    calls = {"input": 0, "weight": 0}
    grad_input, grad_weight = conv_lib._grad_input, conv_lib._grad_weight

    def counted_input(*args):
        calls["input"] += 1
        return grad_input(*args)

    def counted_weight(*args):
        calls["weight"] += 1
        return grad_weight(*args)

    monkeypatch.setattr(conv_lib, "_grad_input", counted_input)
    monkeypatch.setattr(conv_lib, "_grad_weight", counted_weight)
    return calls


@pytest.mark.parametrize(
    "wrt, expected",
    [
        ("x", {"input": 1, "weight": 0}),  # the margin loss's first pass
        ("w", {"input": 0, "weight": 1}),  # the training step's pass
        ("both", {"input": 1, "weight": 1}),
    ],
)
def test_only_the_asked_gradients_are_computed(monkeypatch, wrt, expected):
    calls = _count_calls(monkeypatch)
    x, w = _inputs()
    inputs = {"x": [x], "w": [w], "both": [x, w]}[wrt]
    torch.autograd.grad(input_conv2d(x, w).sum(), inputs)
    assert calls == expected


def test_backward_fills_both_grads():
    x, w = _inputs()
    input_conv2d(x, w).pow(2).sum().backward()
    want = torch.autograd.grad(_reference(x, w).pow(2).sum(), [x, w])
    torch.testing.assert_close(x.grad, want[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(w.grad, want[1], rtol=0, atol=ATOL)


def test_without_the_engine_query_both_gradients_are_computed_and_right(
    monkeypatch,
):
    # An older or newer PyTorch without `_will_engine_execute_node`: slower,
    # still right.
    calls = _count_calls(monkeypatch)
    monkeypatch.delattr(torch._C, "_will_engine_execute_node")
    x, w = _inputs()
    (gx,) = torch.autograd.grad(input_conv2d(x, w).pow(2).sum(), [x])
    (want,) = torch.autograd.grad(_reference(x, w).pow(2).sum(), [x])
    torch.testing.assert_close(gx, want, rtol=0, atol=ATOL)
    assert calls == {"input": 1, "weight": 1}


def test_an_input_without_grad_gets_no_input_gradient(monkeypatch):
    calls = _count_calls(monkeypatch)
    x, w = _inputs()
    x = x.detach()
    (gw,) = torch.autograd.grad(input_conv2d(x, w).sum(), [w])
    (want,) = torch.autograd.grad(_reference(x, w).sum(), [w])
    torch.testing.assert_close(gw, want, rtol=0, atol=ATOL)
    assert calls == {"input": 0, "weight": 1}


@pytest.mark.parametrize(
    "shape_x, shape_w",
    [((2, 3, 6, 6), (4, 3, 3, 3)), ((2, 1, 6, 6), (4, 1, 2, 2))],
    ids=["3 channels", "even kernel"],
)
def test_other_shapes_take_conv2d(shape_x, shape_w):
    x = torch.randn(shape_x, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape_w, dtype=torch.float64, requires_grad=True)
    y = input_conv2d(x, w)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    torch.testing.assert_close(y, _reference(x, w), rtol=0, atol=0)


def test_the_network_uses_it_for_the_image_only():
    import torch_impl
    from parity import weights as weights_lib

    neutral = weights_lib.init_weights("mnist", input_size=8, seed=0)
    model = torch_impl.build_model("mnist", neutral, dtype=torch.float64)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    _, endpoints = model(x)
    seen, stack = set(), [endpoints["conv_layer1"].grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    names = {type(node).__name__ for node in seen}
    assert "_InputConvBackward" in names
    assert "ConvolutionBackward0" in names  # conv_layer1 keeps oneDNN's


def test_torch_func_transforms_match_conv2d():
    # Per-example gradients with vmap, and a gradient of a gradient's norm.
    import torch.func as func

    x, w = _inputs()

    def derivatives(conv):
        def per_example(xi):
            return conv(xi[None], w).tanh().sum()

        def input_grad_norm(w_):
            inner = func.grad(lambda t: conv(t, w_).pow(3).sum())(x)
            return inner.abs().sum()

        return func.vmap(func.grad(per_example))(x), func.grad(input_grad_norm)(w)

    for a, e in zip(derivatives(input_conv2d), derivatives(_reference), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=ATOL)


def test_forward_mode_and_hessian_match_conv2d():
    import torch.func as func

    x, w = _inputs()
    x, w = x.detach(), w.detach()
    tangents = (torch.ones_like(x), torch.ones_like(w))

    def derivatives(conv):
        _, jvp = func.jvp(conv, (x, w), tangents)
        hessian = func.hessian(lambda w_: conv(x, w_).tanh().sum())(w)
        return jvp, hessian

    for a, e in zip(derivatives(input_conv2d), derivatives(_reference), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=ATOL)


def test_vmap_over_kernels_with_an_unbatched_cotangent():
    import torch.func as func

    x, w = _inputs()
    x, w = x.detach(), w.detach()
    kernels = torch.stack([w, 2 * w])
    cotangent = torch.randn(x.shape[0], w.shape[0], *x.shape[2:], dtype=x.dtype)

    def vjps(conv):
        return func.vmap(lambda w_: func.vjp(conv, x, w_)[1](cotangent))(kernels)

    for a, e in zip(vjps(input_conv2d), vjps(_reference), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=ATOL)


def test_the_input_gradient_is_contiguous_like_conv2d_s():
    # User code may .view() it.
    x, w = _inputs()
    (gx,) = torch.autograd.grad(input_conv2d(x, w).sum(), x)
    assert gx.is_contiguous()
    gx.view(x.shape[0], -1)


def test_torch_compile_with_fullgraph_traces_conv2d():
    x, w = _inputs()
    compiled = torch.compile(
        lambda a, b: input_conv2d(a, b).sum(), backend="eager", fullgraph=True
    )
    (got,) = torch.autograd.grad(compiled(x, w), x)
    (want,) = torch.autograd.grad(_reference(x, w).sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_the_output_layout_is_conv2d_s_for_an_input_made_from_nhwc():
    # A 1-channel NCHW view of NHWC data has channels_last strides too, and
    # F.conv2d then answers in channels_last: the layers after it, and how
    # their float32 reductions round, follow. input_conv2d must do the same.
    gen = torch.Generator().manual_seed(0)
    nhwc = torch.randn(3, 9, 9, 1, generator=gen, dtype=torch.float64)
    x = nhwc.permute(0, 3, 1, 2).requires_grad_(True)
    _, w = _inputs()
    got, want = input_conv2d(x, w), _reference(x, w)
    assert got.stride() == want.stride()
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The backward takes its channels_last branches: to second order too.
    got = _derivatives(input_conv2d, x, w)
    want = _derivatives(_reference, x, w)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=ATOL)
