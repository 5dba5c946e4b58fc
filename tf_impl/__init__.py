"""The large-margin reference in current TensorFlow, with the port's signature."""

from tf_impl.loss import large_margin, large_margin_parts
from tf_impl.models import ReferenceNet
from tf_impl.train import ReferenceTrainer

__all__ = ["ReferenceNet", "large_margin", "large_margin_parts", "ReferenceTrainer"]
