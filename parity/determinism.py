"""The frameworks' determinism switches, set in one place.

A float64 report must come out the same, row for row, when a check is run
twice with the same seed on the same machine. Both frameworks have a switch
that makes their kernels choose deterministic algorithms (or raise where none
exists): `torch.use_deterministic_algorithms` and TensorFlow's
`enable_op_determinism`. Neither framework is imported until asked for, so
that a PyTorch-only check does not load TensorFlow.
"""

import contextlib
import importlib.util
import os

__all__ = ["determinism", "determinism_state", "set_determinism"]

FRAMEWORKS = ("torch", "tensorflow")

# cuBLAS needs a fixed workspace for deterministic matrix products on CUDA;
# it must be set before the first CUDA call. Harmless on CPU.
_CUBLAS_WORKSPACE = ":4096:8"


def _available(framework):
    return importlib.util.find_spec(framework) is not None


def _check_frameworks(frameworks):
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    if unknown:
        raise ValueError(
            f"`frameworks` must be drawn from {FRAMEWORKS}. "
            f"Received: frameworks={tuple(frameworks)!r}"
        )


def determinism_state(frameworks=FRAMEWORKS):
    """Which determinism switches are on now.

    Args:
        frameworks: the frameworks to ask; absent ones are left out.

    Returns:
        A dict framework name -> bool.

    Raises:
        ValueError: if a framework is not ``"torch"`` or ``"tensorflow"``.
    """
    _check_frameworks(frameworks)
    state = {}
    if "torch" in frameworks and _available("torch"):
        import torch

        state["torch"] = torch.are_deterministic_algorithms_enabled()
    if "tensorflow" in frameworks and _available("tensorflow"):
        from tensorflow.python.framework import config as tf_config

        state["tensorflow"] = tf_config.is_op_determinism_enabled()
    return state


def set_determinism(seed=None, *, frameworks=FRAMEWORKS, enabled=True):
    """Turns the frameworks' determinism switches on (or off).

    Args:
        seed: if not None, also seeds each framework's global generator
            (the harness draws its own data from seeded numpy generators, so
            this matters only to user code that draws from the frameworks).
        frameworks: which frameworks to set; an absent one is skipped.
        enabled: False turns the switches off again.

    Returns:
        The state before the call, as `determinism_state` gives it, so that a
        caller can restore it.

    Raises:
        ValueError: if a framework is not ``"torch"`` or ``"tensorflow"``.
    """
    _check_frameworks(frameworks)
    before = determinism_state(frameworks)
    if "torch" in before:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
        import torch

        torch.use_deterministic_algorithms(enabled)
        if seed is not None:
            torch.manual_seed(seed)
    if "tensorflow" in before:
        import tensorflow as tf
        from tensorflow.python.framework import config as tf_config

        # The public API has only the "enable" half of the switch.
        if enabled:
            tf.config.experimental.enable_op_determinism()
        else:
            tf_config.disable_op_determinism()
        if seed is not None:
            tf.random.set_seed(seed)
    return before


@contextlib.contextmanager
def determinism(seed=None, *, frameworks=FRAMEWORKS):
    """Determinism switches on inside the block, restored after it.

    Args:
        seed: as in `set_determinism`.
        frameworks: as in `set_determinism`.

    Yields:
        The state before the block.
    """
    before = set_determinism(seed, frameworks=frameworks)
    try:
        yield before
    finally:
        for framework, enabled in before.items():
            set_determinism(frameworks=(framework,), enabled=enabled)
