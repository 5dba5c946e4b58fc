"""PyTorch port of the large-margin loss, its reference network and recipe."""

from torch_impl.loss import LargeMarginLoss, large_margin, large_margin_parts
from torch_impl.models import MnistNet, ToyNet, build_model
from torch_impl.optim import TF1RMSProp
from torch_impl.train import Trainer

__all__ = [
    "LargeMarginLoss",
    "MnistNet",
    "ToyNet",
    "build_model",
    "large_margin",
    "large_margin_parts",
    "TF1RMSProp",
    "Trainer",
]
