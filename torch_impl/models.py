"""The reference MNIST network and a toy network, in PyTorch.

REFERENCE.md section 2 states the reference network. PyTorch runs NCHW; the
first dense layer flattens NCHW natively and `parity.weights` permutes its
kernel rows from the reference's NHWC order when weights are loaded.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from parity import weights as neutral
from torch_impl.conv import input_conv2d

__all__ = ["MnistNet", "ToyNet", "build_model"]

# TF's batch-norm momentum 0.9 is the decay of the moving average:
# moving = 0.9 * moving + 0.1 * batch, which is PyTorch's momentum 0.1.
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5


class _ConvBlock(nn.Module):
    """conv 5x5 "same" without bias, ReLU twice, max-pool 2x2, batch norm.

    Computed as conv, max-pool, one ReLU, batch norm: the same function.
    """

    def __init__(self, in_channels, filters):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, filters, 5, padding=2, bias=False)
        self.batch_norm = nn.BatchNorm2d(filters, eps=BN_EPSILON, momentum=BN_MOMENTUM)

    def convolve(self, x):
        """The convolution alone.

        A 1-channel input (the image) takes `input_conv2d`: the same function
        with a faster backward pass on CPU (see `torch_impl.conv`).
        """
        if self.conv.in_channels == 1:
            return input_conv2d(x, self.conv.weight)
        return self.conv(x)

    def forward(self, x):
        # The reference applies ReLU twice, then max-pools. ReLU is idempotent
        # and monotone, so one ReLU after the pooling is the same function with
        # the same gradients of every order: a window's pooled maximum is
        # positive exactly when its largest entry is, at the same index, and a
        # window with no positive entry gives 0 and no gradient either way. It
        # touches a quarter of the elements (profiled in `parity.bench`).
        h = F.max_pool2d(self.convolve(x), 2, 2)
        return self.batch_norm(F.relu(h))


class MnistNet(nn.Module):
    """The reference MNIST network.

    Args:
        input_size: height and width of the square input (28 for MNIST, 8
            for the bundled digits).
        num_classes: number of logits.
    """

    arch = "mnist"

    def __init__(self, input_size=28, num_classes=10):
        super().__init__()
        self.conv_layer0 = _ConvBlock(1, 32)
        self.conv_layer1 = _ConvBlock(32, 64)
        self.fc_layer0 = nn.Linear((input_size // 4) ** 2 * 64, 512)
        self.logits = nn.Linear(512, num_classes)

    def forward(self, x):
        """Returns logits ``[B, num_classes]`` and the endpoints (NCHW).

        Args:
            x: ``[batch_size, 1, height, width]``.
        """
        e0 = self.conv_layer0(x)
        e1 = self.conv_layer1(e0)
        f = F.relu(self.fc_layer0(e1.flatten(1)))  # [B, C*H*W], NCHW order
        logits = self.logits(f)
        return logits, {"conv_layer0": e0, "conv_layer1": e1, "fc_layer0": f}


class _ToyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=True)

    def forward(self, x):
        return F.relu(self.conv(x))


class ToyNet(nn.Module):
    """Conv 3x3 with 8 filters and ReLU, global average pool, dense 10."""

    arch = "toy"

    def __init__(self, input_size=12, num_classes=10):
        super().__init__()
        self.conv_layer0 = _ToyConv()
        self.logits = nn.Linear(8, num_classes)

    def forward(self, x):
        """Returns logits ``[B, num_classes]`` and ``{"conv_layer0": ...}``."""
        e0 = self.conv_layer0(x)
        logits = self.logits(e0.mean(dim=(2, 3)))  # [B, 8]
        return logits, {"conv_layer0": e0}


def build_model(arch, weights, *, dtype=torch.float64, device="cpu", input_size=None):
    """A network of `arch` holding the neutral `weights`.

    Args:
        arch: ``"mnist"`` or ``"toy"``.
        weights: neutral weight set (see `parity.weights`).
        dtype: parameter dtype.
        device: parameter device.
        input_size: the input's height and width; read off the weights if None.

    Returns:
        The module, in training mode.
    """
    num_classes = np.asarray(weights["logits/bias"]).shape[0]
    if arch == "mnist":
        rows = np.asarray(weights["fc_layer0/kernel"]).shape[0]
        size = input_size or int(round((rows / 64) ** 0.5)) * 4
        model = MnistNet(size, num_classes)
    elif arch == "toy":
        model = ToyNet(input_size or 12, num_classes)
    else:
        raise ValueError(f"`arch` must be 'mnist' or 'toy'. Received: arch={arch!r}")
    # Cast before loading: load_state_dict copies into the existing dtype.
    model = model.to(device=device, dtype=dtype)
    state = {
        k: torch.from_numpy(v)
        for k, v in neutral.neutral_to_torch(arch, weights).items()
    }
    missing = set(model.state_dict()) - set(state)
    # num_batches_tracked is PyTorch bookkeeping with no reference counterpart.
    for key in missing:
        state[key] = model.state_dict()[key]
    model.load_state_dict(state)
    return model
