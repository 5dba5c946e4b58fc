"""Known, deliberate differences between the reference and the port, as data.

A record explains a failing row only when its condition holds for the config
and the row's numbers; the report then shows the row as ``KNOWN`` with the
record's name, never as a pass. Tests apply each record as a strict expected
failure, so that a change on either side shows up.
"""

import dataclasses
import fnmatch

import numpy as np

from parity import tolerances

__all__ = ["Divergence", "KNOWN_DIVERGENCES", "explain"]


@dataclasses.dataclass(frozen=True)
class Divergence:
    """One known difference.

    Attributes:
        name: short identifier, shown in reports.
        what: what differs.
        why: why the port keeps its behaviour.
        quantities: glob patterns of the quantity keys it can touch.
        dtypes: dtypes where it shows.
        devices: devices where it shows.
    """

    name: str
    what: str
    why: str
    quantities: tuple
    dtypes: tuple = ("float64", "float32")
    devices: tuple = ("cpu", "cuda")

    def applies(self, config):
        """Whether the config can produce the divergence."""
        if self.name == "l2_norm_gradient_at_zero":
            return config is not None and config.exact and config.dist_norm == 2
        return False

    def explains(self, config, key, actual, expected):
        """Whether this record explains the difference in row `key`."""
        if not any(fnmatch.fnmatch(key, p) for p in self.quantities):
            return False
        if config is None or not self.applies(config):
            return False
        if config.dtype not in self.dtypes:
            return False
        actual, expected = np.asarray(actual), np.asarray(expected)
        if not np.issubdtype(expected.dtype, np.floating):
            return False
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            return False
        # TensorFlow NaN where PyTorch is finite; nothing else is excused.
        if not (np.isnan(expected).any() and np.isfinite(actual).all()):
            return False
        # Where the reference is finite, the port must still agree with it
        # within the row's tolerance: a NaN elsewhere in the tensor must not
        # excuse a wrong value here.
        finite = np.isfinite(expected)
        if finite.any():
            tol = tolerances.lookup(key, config.dtype)
            a, e = actual[finite], expected[finite]
            scale = max(np.abs(a).max(), np.abs(e).max())
            if (np.abs(a - e) > tol.atol * scale + tol.rtol * np.abs(e)).any():
                return False
        return True


KNOWN_DIVERGENCES = (
    Divergence(
        name="l2_norm_gradient_at_zero",
        what=(
            "with dist_norm=2 in the exact mode, an example whose layer "
            "gradient is exactly zero, and whose distance lies between the "
            "clips (so that its gradient norm receives a non-zero gradient), "
            "gives NaN loss gradients in TensorFlow (the square root's "
            "derivative at 0) and finite ones in PyTorch "
            "(torch.linalg.vector_norm's subgradient 0)"
        ),
        why=(
            "a NaN would poison every parameter of the batch; the port keeps "
            "PyTorch's subgradient, which is the limit the reference would "
            "reach with any epsilon inside the root"
        ),
        quantities=("loss_gradient/*",),
    ),
)


def explain(records, config, key, actual, expected):
    """The first record that explains row `key`, or None."""
    for record in records:
        if record.explains(config, key, actual, expected):
            return record
    return None
