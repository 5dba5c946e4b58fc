"""Real handwritten digits: scikit-learn's bundled set, or MNIST from a folder.

Images are scaled to [0, 1] the way the reference scales MNIST: divided by the
maximum pixel value (16 for the bundled digits, 255 for MNIST), with no mean
or standard-deviation normalisation. Nothing is downloaded.
"""

import dataclasses
import gzip
import math
import os
import struct
import zipfile

import numpy as np

__all__ = ["DataError", "Dataset", "batches", "load"]


class DataError(ValueError):
    """A data folder or file that cannot be read, with the path in the message."""


@dataclasses.dataclass
class Dataset:
    """Images ``[N, H, W, 1]`` float64 in [0, 1] and labels ``[N]`` int64.

    ``train`` and ``test`` split the examples; for MNIST they are the files'
    own split, for the digits the first 80% (1,437) and the rest (360).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_size(self):
        return self.x_train.shape[1]


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0)[..., None].astype(np.float64)  # [1797, 8, 8, 1]
    y = d.target.astype(np.int64)
    split = int(round(0.8 * len(y)))
    return Dataset("digits", x[:split], y[:split], x[split:], y[split:])


_IDX = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}


def _read_idx(path, ndim):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read MNIST file {path}: {e}") from e
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"MNIST file {path} is truncated: {len(raw)} bytes")
    zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or dims != ndim:
        raise DataError(
            f"MNIST file {path} is not an IDX file of {ndim}-D unsigned bytes "
            f"(header {raw[:4].hex()})"
        )
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    # math.prod on Python ints: numpy's product of huge dimensions overflows.
    if body.size != math.prod(shape):
        raise DataError(
            f"MNIST file {path} is truncated: header says shape {shape}, "
            f"found {body.size} values"
        )
    return body.reshape(shape)


def _find(data_dir, stem):
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def _mnist(data_dir):
    if data_dir is None:
        raise DataError("--data mnist needs --data-dir DIR. Received: data_dir=None")
    if not os.path.isdir(data_dir):
        raise DataError(f"MNIST folder does not exist. Received: data_dir={data_dir!r}")
    npz = os.path.join(data_dir, "mnist.npz")
    if os.path.isfile(npz):
        try:
            with np.load(npz, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            reason = "it needs pickle, which is refused" if "pickle" in str(e) else e
            raise DataError(f"cannot read {npz} as plain arrays: {reason}") from e
    else:
        arrays = {}
        for key, (stem, ndim) in _IDX.items():
            path = _find(data_dir, stem)
            if path is None:
                raise DataError(
                    f"MNIST folder {data_dir!r} has neither mnist.npz nor {stem}[.gz]"
                )
            arrays[key] = _read_idx(path, ndim)
        arrays = {
            "x_train": arrays["train_images"],
            "y_train": arrays["train_labels"],
            "x_test": arrays["test_images"],
            "y_test": arrays["test_labels"],
        }
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"MNIST {split} images and labels do not match in {data_dir!r}: "
                f"images {x.shape}, labels {y.shape}"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DataError(f"MNIST {split} labels outside 0..9 in {data_dir!r}")
        # Pixels are bytes 0..255, as in the IDX files and Keras' mnist.npz;
        # floats (already scaled, or NaN) would be scaled wrongly here.
        if x.dtype != np.uint8:
            raise DataError(
                f"MNIST {split} images in {data_dir!r} must be uint8 pixels 0..255. "
                f"Received: dtype={x.dtype}"
            )

    def images(x):
        return (np.asarray(x, np.float64) / 255.0)[..., None]

    return Dataset(
        "mnist",
        images(arrays["x_train"]),
        np.asarray(arrays["y_train"], np.int64),
        images(arrays["x_test"]),
        np.asarray(arrays["y_test"], np.int64),
    )


def load(name="digits", data_dir=None):
    """Loads a dataset.

    Args:
        name: ``"digits"`` (bundled with scikit-learn) or ``"mnist"``.
        data_dir: for MNIST, a folder holding the four IDX files (plain or
            .gz) or a Keras-style ``mnist.npz``.

    Returns:
        A `Dataset`.

    Raises:
        DataError: if the folder or a file is missing, unreadable or malformed.
        ValueError: if `name` is unknown.
    """
    if name == "digits":
        return _digits()
    if name == "mnist":
        return _mnist(data_dir)
    raise ValueError(f"`data` must be 'digits' or 'mnist'. Received: data={name!r}")


def batches(num_examples, batch_size, *, seed=0):
    """Yields index arrays of a seeded shuffle, epoch after epoch, forever.

    Both frameworks draw their batches from this one sampler, so they see the
    same examples in the same order. A last incomplete batch is dropped.

    Args:
        num_examples: size of the training split.
        batch_size: examples per batch.
        seed: seed of the numpy generator.

    Raises:
        ValueError: if `batch_size` exceeds `num_examples`.
    """
    if batch_size > num_examples:
        raise ValueError(
            f"`batch_size` must not exceed the {num_examples} training examples. "
            f"Received: batch_size={batch_size}"
        )
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num_examples)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
