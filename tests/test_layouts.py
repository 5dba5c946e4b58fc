"""Layout conversions, checked against plain numpy maths in the neutral layout."""

import numpy as np
import pytest
import torch

import torch_impl
from parity import weights


@pytest.mark.parametrize("arch", ["mnist", "toy"])
def test_neutral_torch_round_trip_is_identity(arch):
    w = weights.init_weights(arch, input_size=8 if arch == "mnist" else 12, seed=3)
    back = weights.torch_to_neutral(arch, weights.neutral_to_torch(arch, w))
    assert set(back) == set(w)
    for name in w:
        np.testing.assert_array_equal(back[name], w[name])


def _mnist(seed=0):
    w = weights.init_weights("mnist", input_size=8, seed=seed)
    model = torch_impl.build_model("mnist", w).eval()
    x = np.random.default_rng(seed).uniform(size=(3, 8, 8, 1))
    with torch.no_grad():
        logits, ep = model(torch.from_numpy(weights.activation_to_nchw(x)))
    return w, x, logits.numpy(), {k: v.numpy() for k, v in ep.items()}


def test_first_dense_layer_reads_nhwc_flatten_order():
    w, _, _, ep = _mnist()
    e1 = weights.activation_to_neutral(ep["conv_layer1"])  # [B, H, W, C]
    flat = e1.reshape(len(e1), -1)  # NHWC order, as the reference flattens
    expected = np.maximum(flat @ w["fc_layer0/kernel"] + w["fc_layer0/bias"], 0)
    np.testing.assert_allclose(ep["fc_layer0"], expected, rtol=1e-12, atol=1e-12)


def test_first_dense_layer_fault_is_visible():
    # Planted fault: the kernel rows taken in NCHW order (no permutation).
    w, _, _, ep = _mnist()
    e1 = ep["conv_layer1"]  # NCHW
    wrong = np.maximum(
        e1.reshape(len(e1), -1) @ w["fc_layer0/kernel"] + w["fc_layer0/bias"], 0
    )
    assert np.abs(wrong - ep["fc_layer0"]).max() > 1e-3


def test_conv_kernel_layout_matches_hwio_maths():
    w, x, _, _ = _mnist(seed=1)
    model = torch_impl.build_model("mnist", w)
    with torch.no_grad():
        conv = model.conv_layer0.conv(torch.from_numpy(weights.activation_to_nchw(x)))
    conv = weights.activation_to_neutral(conv.numpy())  # [B, 8, 8, 32]
    kernel = w["conv_layer0/kernel"]  # [5, 5, 1, 32], HWIO
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    # "same" padding, stride 1: output (i, j) reads rows i..i+4, columns j..j+4.
    for i, j in [(0, 0), (3, 5), (7, 2)]:
        window = padded[:, i : i + 5, j : j + 5, :]  # [B, 5, 5, 1]
        expected = np.einsum("bhwi,hwio->bo", window, kernel)
        np.testing.assert_allclose(conv[:, i, j, :], expected, rtol=1e-12, atol=1e-12)


def test_activation_layouts_invert():
    a = np.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(
        weights.activation_to_nchw(weights.activation_to_neutral(a)), a
    )
    assert weights.activation_to_neutral(a)[1, 2, 3, 0] == a[1, 0, 2, 3]


def test_build_model_keeps_float64_weights_exactly():
    # load_state_dict copies into the parameters' dtype: casting after loading
    # would round the weights through float32.
    w = weights.init_weights("mnist", input_size=8, seed=2)
    model = torch_impl.build_model("mnist", w, dtype=torch.float64)
    got = model.conv_layer0.conv.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(got, w["conv_layer0/kernel"])


def test_unknown_or_missing_weights_are_named():
    w = weights.init_weights("toy", seed=0)
    w.pop("logits/bias")
    w["extra"] = np.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing=\['logits/bias'\], unknown=\['extra'\]"
    ):
        weights.neutral_to_torch("toy", w)
    with pytest.raises(ValueError, match="Received: arch='resnet'"):
        weights.init_weights("resnet")
