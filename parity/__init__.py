"""Parity harness: the PyTorch port against the TensorFlow reference.

Importing this package imports neither framework; each lane imports its own.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
