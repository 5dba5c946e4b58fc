"""The configuration of one parity check: network, loss options, data, dtype."""

import dataclasses
import math

from parity import spec, weights

__all__ = ["ALL_LAYERS", "Config", "REFERENCE_LAYERS", "layer_sizes"]

ALL_LAYERS = weights.layer_names("mnist")
# The reference's training choice of margin layers (REFERENCE.md section 3).
REFERENCE_LAYERS = ("input", "conv_layer0", "conv_layer1")


@dataclasses.dataclass(frozen=True)
class Config:
    """One check. Defaults are the reference's MNIST training config.

    `layer_weights` is ``"size"`` (elements per example of each layer, the
    reference's choice for inf), ``"none"`` (all 1), or ``"auto"``: ``size``
    when `dist_norm` is inf, else ``none``.
    """

    arch: str = "mnist"
    layers: tuple = REFERENCE_LAYERS
    dist_norm: float = math.inf
    top_k: int = 1
    worst_case: bool = True
    exact: bool = False
    gamma: float = 10000.0
    alpha: float = 4.0
    epsilon: float = 1e-6
    layer_weights: str = "auto"
    batch_norm: str = "train"
    dtype: str = "float64"
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self):
        spec.check_dist_norm(self.dist_norm)
        if self.arch not in ("mnist", "toy"):
            raise ValueError(
                f"`arch` must be 'mnist' or 'toy'. Received: arch={self.arch!r}"
            )
        # Names only: which names a network has is checked where the network
        # is chosen (the command line, a fixture's manifest); tests build
        # their own small networks with other names.
        layers = self.layers
        if (
            not isinstance(layers, tuple)
            or not all(isinstance(n, str) and n for n in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ValueError(
                f"`layers` must be distinct layer names. Received: layers={layers!r}"
            )
        for name, low in (("gamma", 0.0), ("epsilon", None), ("alpha", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"`{name}` must be a number. Received: {name}={value!r}"
                )
            if not math.isfinite(value) or (low is not None and value <= low):
                rule = "finite and positive" if low is not None else "finite"
                raise ValueError(f"`{name}` must be {rule}. Received: {name}={value!r}")
        if self.epsilon < 0:
            raise ValueError(
                f"`epsilon` must be 0 or more. Received: epsilon={self.epsilon!r}"
            )
        if self.layer_weights not in ("auto", "size", "none"):
            raise ValueError(
                "`layer_weights` must be 'auto', 'size' or 'none'. "
                f"Received: layer_weights={self.layer_weights!r}"
            )
        if self.batch_norm not in ("train", "eval"):
            raise ValueError(
                "`batch_norm` must be 'train' or 'eval'. "
                f"Received: batch_norm={self.batch_norm!r}"
            )
        if self.dtype not in ("float64", "float32"):
            raise ValueError(
                "`dtype` must be 'float64' or 'float32'. "
                f"Received: dtype={self.dtype!r}"
            )
        if not self.layers:
            raise ValueError(
                f"`layers` must not be empty. Received: layers={self.layers!r}"
            )
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(
                f"`batch_size` must be a positive integer. "
                f"Received: batch_size={self.batch_size!r}"
            )

    @property
    def training(self):
        """Batch norm uses batch statistics."""
        return self.batch_norm == "train"

    def loss_kwargs(self, sizes):
        """Keyword arguments of `large_margin` for per-layer sizes `sizes`."""
        mode = self.layer_weights
        if mode == "auto":
            mode = "size" if self.dist_norm == math.inf else "none"
        weights = [float(s) for s in sizes] if mode == "size" else None
        return {
            "gamma": float(self.gamma),
            "alpha_factor": float(self.alpha),
            "top_k": int(self.top_k),
            "dist_norm": self.dist_norm,
            "epsilon": float(self.epsilon),
            "use_approximation": not self.exact,
            "worst_case_loss": bool(self.worst_case),
            "layers_weights": weights,
        }

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["dist_norm"] = "inf" if self.dist_norm == math.inf else int(self.dist_norm)
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if not isinstance(d.get("layers"), list):
            raise ValueError(
                "`layers` must be a list of names. "
                f"Received: layers={d.get('layers')!r}"
            )
        d["layers"] = tuple(d["layers"])
        d["dist_norm"] = math.inf if d["dist_norm"] == "inf" else int(d["dist_norm"])
        return cls(**d)

    def label(self):
        """A short id such as ``norm=inf,k=1,worst,approx,bn=train``."""
        norm = "inf" if self.dist_norm == math.inf else int(self.dist_norm)
        return (
            f"{self.arch},norm={norm},k={self.top_k},"
            f"{'worst' if self.worst_case else 'sum'},"
            f"{'exact' if self.exact else 'approx'},bn={self.batch_norm},{self.dtype}"
        )


def layer_sizes(shapes):
    """Elements per example of each layer, from its shape ``[B, ...]``."""
    return [math.prod(s[1:]) for s in shapes]
