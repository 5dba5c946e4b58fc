"""Portable fixtures: the reference's numbers on disk, replayable without it.

``python -m parity.fixtures build`` runs the TensorFlow reference on a fixed
set of cases and writes one folder per case::

    fixtures/<case>/manifest.json   schema version, config, versions, tensors
    fixtures/<case>/tensors.npz     inputs, labels, weights, expected values
    fixtures/<case>/model.onnx      the network and its weights (float32)

``python -m parity.fixtures verify`` replays an implementation against them
and prints the same kind of table as ``python -m parity.run``, with the same
exit codes: 0 every row passes, 1 a row fails (a fixture that fails its own
integrity checks is a failed row), 2 a usage error. It needs only the
framework under test: ``--impl torch`` imports neither TensorFlow nor
`tf_impl`. onnxruntime runs each ``model.onnx`` as a third, independent
forward pass and its rows are reported as ``onnx/<quantity>``.

The format is documented for porters in ``fixtures/README.md``.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
import zlib

import numpy as np

from parity import __version__, determinism, report, tolerances
from parity import compare as compare_lib
from parity import config as config_lib
from parity import data as data_lib
from parity import weights as weights_lib

__all__ = [
    "CASES",
    "CaseSpec",
    "FixtureError",
    "Implementation",
    "LoadedCase",
    "SCHEMA_VERSION",
    "build",
    "build_case",
    "case_names",
    "default_folder",
    "find_cases",
    "implementation",
    "load_case",
    "main",
    "onnx_rows",
    "read_npz",
    "tensor_sha256",
    "training_rows",
    "verify_case",
    "write_npz",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.npz"
MODEL = "model.onnx"
# A fixed zip member date (the earliest zip can store), so that building twice
# writes byte-identical archives.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# Tensor names: slash-separated words; no empty, "." or ".." component.
# The key under which parity.torch_side and parity.tf_side report a loss call
# that raised, instead of the loss quantities.
_ERROR_KEY = "__error__"
_NAME = re.compile(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-.]+)*")


class FixtureError(ValueError):
    """A fixture that cannot be trusted or read; names the case and tensor."""


def default_folder():
    """The repository's ``fixtures/`` folder."""
    return os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures"
    )


# ---------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One fixture case: a config plus how its weights and batch are made.

    Attributes:
        name: folder name.
        config: the `Config`.
        description: one line for the manifest and the README.
        weights: ``"seeded"`` (`init_weights` at the config's seed) or
            ``"zeros"`` (every parameter 0: all-equal logits).
        kind: ``"static"`` (one batch, every quantity) or ``"training"``.
        recipe: for training cases, `parity.training.Recipe` fields.
        steps: for training cases, the number of updates.
        trap: ``"ties"`` or ``"clip"``: the build checks that the reference
            really produced the trap (every gradient norm 0; every clip
            branch present), so that a change of data cannot defuse it.
    """

    name: str
    config: config_lib.Config
    description: str
    weights: str = "seeded"
    trap: str = ""
    kind: str = "static"
    recipe: dict = None
    steps: int = 0


def _toy_grid():
    specs = []
    for norm in (1, 2, math.inf):
        for top_k in (1, 3):
            for worst in (True, False):
                for exact in (False, True):
                    label = "inf" if norm == math.inf else str(norm)
                    name = (
                        f"toy-p{label}-k{top_k}-{'worst' if worst else 'sum'}-"
                        f"{'exact' if exact else 'approx'}"
                    )
                    cfg = config_lib.Config(
                        arch="toy",
                        layers=("input", "conv_layer0"),
                        dist_norm=norm,
                        top_k=top_k,
                        worst_case=worst,
                        exact=exact,
                        batch_norm="eval",
                        batch_size=8,
                    )
                    description = (
                        "toy network (conv 3x3, ReLU, mean, dense) on the digits "
                        f"padded to 12x12; {cfg.label().split(',', 1)[1]}"
                    )
                    specs.append(CaseSpec(name, cfg, description))
    return specs


def _cases():
    specs = _toy_grid()
    for bn in ("train", "eval"):
        cfg = config_lib.Config(arch="mnist", batch_norm=bn, batch_size=32)
        specs.append(
            CaseSpec(
                f"digits-bn-{bn}",
                cfg,
                "reference network on the bundled digits (8x8), the reference's "
                f"margin config, batch norm in {bn} mode",
            )
        )
    for top_k, norm in ((1, 2), (3, math.inf)):
        cfg = config_lib.Config(
            arch="toy",
            layers=("input", "conv_layer0"),
            dist_norm=norm,
            top_k=top_k,
            batch_norm="eval",
            batch_size=8,
            exact=top_k == 3,
        )
        specs.append(
            CaseSpec(
                f"trap-ties-k{top_k}",
                cfg,
                "tie trap: all weights zero, so all logits are equal, the 9 "
                "other classes tie and every gradient norm is 0 (dist = 0, "
                "gradients scale with 1/epsilon); "
                + (
                    "K=1: the max shares its gradient among the tied classes"
                    if top_k == 1
                    else "K=3, exact: top-k takes the lowest tied indices"
                ),
                weights="zeros",
                trap="ties",
            )
        )
    cfg = config_lib.Config(
        arch="toy",
        layers=("input", "conv_layer0"),
        dist_norm=2,
        gamma=1.0,
        alpha=2.0,
        batch_norm="eval",
        batch_size=16,
    )
    specs.append(
        CaseSpec(
            "trap-clip",
            cfg,
            "clip-boundary trap: gamma 1 and alpha 2 put examples in the "
            "upper clip, the lower clip and between",
            trap="clip",
        )
    )
    cfg = config_lib.Config(arch="mnist", batch_norm="train", batch_size=16)
    specs.append(
        CaseSpec(
            "train-digits-5-steps",
            cfg,
            "five steps of the reference recipe (TF1 RMSProp, global-norm clip, "
            "L2 on every variable, batch norm updated) on the bundled digits, "
            "batch 16",
            kind="training",
            recipe={"batch_size": 16},
            steps=5,
        )
    )
    return {s.name: s for s in specs}


CASES = _cases()


def case_names():
    """Every case defined by this harness, in build order."""
    return list(CASES)


def _float32_exact(array):
    # Weights are rounded to float32-representable values so that the float32
    # model.onnx holds exactly the fixture's weights (see parity.onnx_export).
    return np.asarray(array, np.float32).astype(np.float64)


def _case_inputs(spec):
    cfg = spec.config
    dataset = data_lib.load("digits")
    x_train = dataset.x_train
    if cfg.arch == "toy":
        # The toy network reads 12x12: the 8x8 digits padded by 2 zero pixels,
        # as parity.run does.
        x_train = np.pad(x_train, ((0, 0), (2, 2), (2, 2), (0, 0)))
    index = next(data_lib.batches(len(x_train), cfg.batch_size, seed=cfg.seed))
    x = _float32_exact(x_train[index])
    labels = dataset.y_train[index].astype(np.int64)
    size = x.shape[1]
    weights = weights_lib.init_weights(
        cfg.arch, input_size=size if cfg.arch == "mnist" else None, seed=cfg.seed
    )
    if spec.weights == "zeros":
        weights = {k: np.zeros_like(v) for k, v in weights.items()}
    weights = {k: _float32_exact(v) for k, v in weights.items()}
    return x, labels, weights


# ------------------------------------------------------------- npz and hashes


def tensor_sha256(array):
    """SHA-256 of an array's C-order bytes, little-endian, as hex."""
    array = np.asarray(array)
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<")))
    return hashlib.sha256(array.tobytes()).hexdigest()


def write_npz(path, arrays):
    """Writes `arrays` as a deflated ``.npz`` with fixed member dates.

    Unlike `np.savez`, the result depends only on the arrays and their order:
    building twice gives byte-identical files. The file is written under a
    temporary name and renamed.

    Args:
        path: the ``.npz`` path.
        arrays: dict name -> array; names may contain ``/``.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue(), compresslevel=9)
    _atomic_write(path, buffer.getvalue(), mode="wb")


def _atomic_write(path, data, mode="w"):
    report.atomic_write(path, data, mode=mode)
    # mkstemp creates 0600 files; fixtures are data to share.
    os.chmod(path, 0o644)


def read_npz(path):
    """Reads every array of an ``.npz`` with ``allow_pickle=False``.

    Returns:
        A dict name -> array.
    """
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def _file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------- building


def _versions():
    import onnx
    import tensorflow as tf

    return {
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "parity": __version__,
    }


def _tensor_entry(name, array, role):
    key = name.split("/", 1)[-1]
    if role != "expected":
        cls = "exact"
    elif key.startswith(("train_", "final_")):
        # Training quantities follow tolerances.training_tolerance, recorded
        # in the manifest's "tolerances"; they have no class of the table.
        cls = "training"
    else:
        cls = tolerances.tolerance_class(key)
    return {
        "role": role,
        "shape": list(array.shape),
        "dtype": array.dtype.name,
        "sha256": tensor_sha256(array),
        "tolerance_class": cls,
    }


def _check_trap(spec, expected):
    layers = spec.config.layers
    if spec.trap == "ties":
        norms = [expected[f"grad_norm/{name}"] for name in layers]
        if any(np.any(n != 0) for n in norms):
            raise FixtureError(
                f"case {spec.name}: the tie trap needs every gradient norm 0"
            )
    if spec.trap == "clip":
        seen = set()
        for name in layers:
            seen |= {int(v) for v in np.unique(expected[f"clip_branch/{name}"])}
        if seen != {-1, 0, 1}:
            raise FixtureError(
                f"case {spec.name}: the clip trap needs clip branches -1, 0 and 1, "
                f"the reference produced {sorted(seen)}"
            )


def _training_arrays(spec, weights):
    """Runs the TensorFlow reference trainer; returns the expected arrays."""
    import tensorflow as tf

    import tf_impl.train
    from parity import training

    cfg = spec.config
    recipe = training.Recipe(**spec.recipe)
    dataset = data_lib.load("digits")
    batches = data_lib.batches(len(dataset.x_train), recipe.batch_size, seed=cfg.seed)
    index = np.stack([next(batches) for _ in range(spec.steps)])  # [steps, B]
    x = _float32_exact(dataset.x_train[index])  # [steps, B, H, W, 1]
    labels = dataset.y_train[index].astype(np.int64)  # [steps, B]
    trainer = tf_impl.train.ReferenceTrainer(
        cfg.arch,
        weights,
        recipe,
        layers=cfg.layers,
        loss_kwargs=cfg.loss_kwargs,
        dtype={"float64": tf.float64, "float32": tf.float32}[cfg.dtype],
    )
    records = [trainer.step(x[i], labels[i]) for i in range(spec.steps)]
    expected = _records_to_arrays(records)
    expected.update(_state_to_arrays(trainer.state()))
    return x, labels, expected


def _loss_kwargs(cfg, x):
    """The keyword arguments the reference loss was called with, JSON-ready."""
    height, width = x.shape[-3], x.shape[-2]
    # Elements per example of each possible margin layer (REFERENCE.md
    # section 2; the toy network keeps the input size).
    per_example = {
        "input": height * width,
        "conv_layer0": height * width * 8
        if cfg.arch == "toy"
        else (height // 2) * (width // 2) * 32,
        "conv_layer1": (height // 4) * (width // 4) * 64,
        "fc_layer0": 512,
    }
    kwargs = cfg.loss_kwargs([per_example[name] for name in cfg.layers])
    if kwargs["dist_norm"] == math.inf:
        kwargs["dist_norm"] = "inf"
    return kwargs


def _records_to_arrays(records):
    from parity import training

    return {
        f"train_{name}": np.array([r[name] for r in records], np.float64)
        for name in training.CURVES
    }


_STATE_PREFIX = {
    "param": "final_param",
    "rms": "final_slot/rms",
    "momentum": "final_slot/momentum",
    "moving": "final_moving",
}


def _state_to_arrays(state):
    out = {}
    for part, prefix in _STATE_PREFIX.items():
        for name, value in state[part].items():
            out[f"{prefix}/{name}"] = np.asarray(value)
    return out


def _arrays_to_training(expected, steps):
    from parity import training

    records = [
        {"step": i, **{n: float(expected[f"train_{n}"][i]) for n in training.CURVES}}
        for i in range(steps)
    ]
    state = {part: {} for part in _STATE_PREFIX}
    for part, prefix in _STATE_PREFIX.items():
        for key, value in expected.items():
            if key.startswith(prefix + "/"):
                state[part][key[len(prefix) + 1 :]] = value
    return records, state


def build_case(spec, folder, *, versions=None):
    """Runs the reference on one case and writes its three files to `folder`.

    Args:
        spec: the `CaseSpec`.
        folder: an empty or new folder.
        versions: the generating versions for the manifest; read if None.

    Returns:
        The manifest, as a dict.

    Raises:
        FixtureError: if a trap case does not produce what it is meant to.
    """
    from parity import onnx_export, tf_side

    cfg = spec.config
    x, labels, weights = _case_inputs(spec)
    if spec.kind == "training":
        x, labels, expected = _training_arrays(spec, weights)
    else:
        expected = tf_side.quantities(cfg, weights, x, labels)
        _check_trap(spec, expected)

    arrays = {"inputs": x, "labels": labels}
    roles = {"inputs": "input", "labels": "label"}
    for name, value in weights.items():
        arrays[f"weights/{name}"] = value
        roles[f"weights/{name}"] = "weight"
    for key, value in expected.items():
        arrays[f"expected/{key}"] = np.asarray(value)
        roles[f"expected/{key}"] = "expected"

    os.makedirs(folder, exist_ok=True)
    write_npz(os.path.join(folder, TENSORS), arrays)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "case": spec.name,
        "kind": spec.kind,
        "description": spec.description,
        "config": cfg.to_dict(),
        "loss_kwargs": _loss_kwargs(cfg, x),
        "generator": versions or _versions(),
    }
    files = [("tensors", TENSORS)]
    if spec.kind == "static":
        model = onnx_export.export(
            cfg.arch, weights, batch_norm=cfg.batch_norm, input_size=x.shape[1]
        )
        _atomic_write(os.path.join(folder, MODEL), model.SerializeToString(), "wb")
        files.append(("model", MODEL))
        manifest["onnx"] = {
            "input": "input",
            "input_layout": "NCHW",
            "dtype": "float32",
            "outputs": list(onnx_export.output_names(cfg.arch)),
            "output_layout": "NCHW for 4-D endpoints",
            "batch_norm": cfg.batch_norm,
        }
        manifest["tolerances"] = {
            cls: dataclasses.asdict(tol)
            for cls, tol in tolerances.TOLERANCES[cfg.dtype].items()
        }
    else:
        from parity import training

        manifest["recipe"] = training.Recipe(**spec.recipe).to_dict()
        manifest["steps"] = spec.steps
        manifest["tolerances"] = tolerances.training_tolerance_summary(
            cfg.dtype, spec.steps
        )
    manifest["files"] = {}
    manifest["tensors"] = {n: _tensor_entry(n, a, roles[n]) for n, a in arrays.items()}
    for role, filename in files:
        path = os.path.join(folder, filename)
        manifest["files"][role] = {
            "path": filename,
            "bytes": os.path.getsize(path),
            "sha256": _file_sha256(path),
        }
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    _atomic_write(os.path.join(folder, MANIFEST), text)
    return manifest


def build(out=None, names=None, *, log=None):
    """Builds cases into `out`, replacing each case folder only at the end.

    Every case is first written under a temporary folder inside `out`; only
    when all of them are built are the old case folders swapped out, so an
    interrupted build leaves the previous fixtures intact.

    Args:
        out: the fixtures folder; `default_folder()` if None.
        names: case names; every case if None.
        log: called with ``(name, seconds)`` after each case.

    Returns:
        A dict case name -> seconds spent.

    Raises:
        ValueError: if a name is not a defined case.
    """
    out = out or default_folder()
    names = list(names or CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s). Received: cases={unknown}")
    os.makedirs(out, exist_ok=True)
    # Deterministic kernels, so that building twice gives the same bytes.
    determinism.set_determinism(frameworks=("tensorflow",))
    versions = _versions()

    staging = tempfile.mkdtemp(dir=out, prefix=".build-")
    times = {}
    try:
        for name in names:
            started = time.perf_counter()
            build_case(CASES[name], os.path.join(staging, name), versions=versions)
            times[name] = time.perf_counter() - started
            if log is not None:
                log(name, times[name])
        trash = tempfile.mkdtemp(dir=out, prefix=".old-")
        for name in names:
            target = os.path.join(out, name)
            if os.path.exists(target):
                os.replace(target, os.path.join(trash, name))
            os.replace(os.path.join(staging, name), target)
        shutil.rmtree(trash)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return times


# -------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadedCase:
    """A case read back and checked.

    Attributes:
        name: the case folder's name.
        folder: its path.
        manifest: the parsed manifest.
        config: the `Config`.
        inputs: ``[B, H, W, 1]`` NHWC.
        labels: ``[B]`` class indices.
        weights: neutral weight set.
        expected: dict quantity key -> array, as made by the reference.
        model_path: path of ``model.onnx``; None for training cases.
    """

    name: str
    folder: str
    manifest: dict
    config: config_lib.Config
    inputs: np.ndarray
    labels: np.ndarray
    weights: dict
    expected: dict
    model_path: str

    @property
    def kind(self):
        """``"static"`` or ``"training"``."""
        return self.manifest["kind"]


def _inside(case, folder, relative, what):
    if not isinstance(relative, str) or not relative:
        raise FixtureError(
            f"case {case}: {what} path must be a file name. Received: path={relative!r}"
        )
    if os.path.isabs(relative) or "\\" in relative or relative.startswith("~"):
        raise FixtureError(
            f"case {case}: {what} path leaves the case folder. "
            f"Received: path={relative!r}"
        )
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root or path == root:
        raise FixtureError(
            f"case {case}: {what} path leaves the case folder. "
            f"Received: path={relative!r}"
        )
    return path


def _check_file(case, path, entry):
    size = os.path.getsize(path)
    if size != entry.get("bytes"):
        raise FixtureError(
            f"case {case}: {entry['path']} has {size} bytes, the manifest says "
            f"{entry.get('bytes')} (truncated or replaced)"
        )


def _read_manifest(case, folder):
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise FixtureError(f"case {case}: {MANIFEST} is missing in {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FixtureError(f"case {case}: {MANIFEST} is not readable JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise FixtureError(f"case {case}: {MANIFEST} must hold a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FixtureError(
            f"case {case}: unknown schema version; this harness reads "
            f"{SCHEMA_VERSION}. Received: schema_version={version!r}"
        )
    for field in ("config", "files", "tensors"):
        if not isinstance(manifest.get(field), dict):
            raise FixtureError(f"case {case}: {MANIFEST} has no {field!r} object")
    return manifest


def _read_tensors(case, path, listed, size):
    def unreadable(e):
        actual = os.path.getsize(path)
        if actual != size:
            return FixtureError(
                f"case {case}: {TENSORS} has {actual} bytes, the manifest says "
                f"{size} (truncated or replaced); it cannot be read ({e})"
            )
        return FixtureError(f"case {case}: {TENSORS} is not a readable npz ({e})")

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise unreadable(e) from e
    for name in listed:
        if not _NAME.fullmatch(name):
            raise FixtureError(
                f"case {case}: tensor name leaves the case's namespace. "
                f"Received: tensor={name!r}"
            )
    present = {m[: -len(".npy")] for m in members if m.endswith(".npy")}
    stray = sorted(
        (set(members) - {f"{n}.npy" for n in present}) | (present - set(listed))
    )
    if stray:
        raise FixtureError(
            f"case {case}: tensor {stray[0]} in {TENSORS} is not in the manifest"
        )
    for name in listed:
        if name not in present:
            raise FixtureError(f"case {case}: tensor {name} is missing from {TENSORS}")

    arrays = {}
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise unreadable(e) from e
    with f:
        for name, entry in listed.items():
            try:
                array = f[name]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                # A damaged member fails its CRC or inflation; an object array
                # is refused because allow_pickle is False.
                raise FixtureError(
                    f"case {case}: tensor {name} cannot be read ({type(e).__name__}: "
                    f"{e})"
                ) from e
            _check_tensor(case, name, array, entry)
            arrays[name] = array
    return arrays


def _check_tensor(case, name, array, entry):
    if not isinstance(entry, dict):
        raise FixtureError(f"case {case}: tensor {name} has no manifest entry")
    if list(array.shape) != entry.get("shape"):
        raise FixtureError(
            f"case {case}: tensor {name} has shape {list(array.shape)}, the manifest "
            f"says {entry.get('shape')}"
        )
    if array.dtype.name != entry.get("dtype"):
        raise FixtureError(
            f"case {case}: tensor {name} has dtype {array.dtype.name}, the manifest "
            f"says {entry.get('dtype')}"
        )
    if tensor_sha256(array) != entry.get("sha256"):
        raise FixtureError(
            f"case {case}: checksum mismatch for tensor {name} (SHA-256 "
            f"{tensor_sha256(array)[:12]}..., the manifest says "
            f"{str(entry.get('sha256'))[:12]}...)"
        )


def load_case(folder):
    """Reads one case folder and checks it against its manifest.

    Checks, in order: the manifest parses and has the known schema version;
    file paths stay inside the folder; file sizes match (a truncated file);
    every listed tensor is present with its shape, dtype and SHA-256, and no
    unlisted one; the files' own SHA-256.

    Args:
        folder: the case folder.

    Returns:
        A `LoadedCase`.

    Raises:
        FixtureError: on any failed check, naming the case and the tensor.
    """
    case = os.path.basename(os.path.normpath(folder))
    manifest = _read_manifest(case, folder)
    kind = manifest.get("kind")
    if kind not in ("static", "training"):
        raise FixtureError(
            f"case {case}: `kind` must be 'static' or 'training'. "
            f"Received: kind={kind!r}"
        )
    roles = ("tensors", "model") if kind == "static" else ("tensors",)
    files = manifest["files"]
    for role in roles:
        if not isinstance(files.get(role), dict):
            raise FixtureError(f"case {case}: {MANIFEST} lists no {role} file")
    paths = {}
    for role in roles:
        entry = files[role]
        paths[role] = _inside(case, folder, entry.get("path"), f"{role} file")
        if not os.path.isfile(paths[role]):
            raise FixtureError(f"case {case}: {role} file {entry['path']} is missing")

    # Tensors first, so that a changed tensor is named; then the files whole.
    arrays = _read_tensors(
        case, paths["tensors"], manifest["tensors"], files["tensors"].get("bytes")
    )
    for role in roles:
        _check_file(case, paths[role], files[role])
        if _file_sha256(paths[role]) != files[role].get("sha256"):
            raise FixtureError(
                f"case {case}: checksum mismatch for file {files[role]['path']}"
            )
    try:
        cfg = config_lib.Config.from_dict(manifest["config"])
        if kind == "training":
            from parity import training

            training.Recipe.from_dict(manifest["recipe"])
            steps = manifest["steps"]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"`steps` must be positive. Received: steps={steps!r}")
    except (TypeError, ValueError, KeyError) as e:
        raise FixtureError(
            f"case {case}: the manifest's config is invalid ({e})"
        ) from e

    for name in ("inputs", "labels"):
        if name not in arrays:
            raise FixtureError(f"case {case}: tensor {name} is missing from {TENSORS}")
    weights = {
        n.split("/", 1)[1]: a for n, a in arrays.items() if n.startswith("weights/")
    }
    expected = {
        n.split("/", 1)[1]: a for n, a in arrays.items() if n.startswith("expected/")
    }
    return LoadedCase(
        name=case,
        folder=folder,
        manifest=manifest,
        config=cfg,
        inputs=arrays["inputs"],
        labels=arrays["labels"],
        weights=weights,
        expected=expected,
        model_path=paths.get("model"),
    )


def find_cases(folder, names=None):
    """Case folders under `folder` (those holding a manifest), sorted by name.

    Raises:
        ValueError: if a requested case has no folder.
    """
    present = sorted(
        n
        for n in os.listdir(folder)
        if not n.startswith(".") and os.path.isfile(os.path.join(folder, n, MANIFEST))
    )
    if names:
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(f"no such case under {folder}. Received: cases={missing}")
        present = list(names)
    return [os.path.join(folder, n) for n in present]


# ------------------------------------------------------------------ verifying


@dataclasses.dataclass
class Implementation:
    """What `verify_case` replays: a name, a lane and an optional loss."""

    name: str
    lane: str  # "torch" or "tf"
    loss: object = None
    side: str = "PyTorch"


def implementation(spec):
    """The `Implementation` for ``--impl`` value `spec`.

    Args:
        spec: ``"torch"``, ``"tf"``, or a plug-in loss ``module:function`` or
            ``path.py:function`` run on the PyTorch side.

    Raises:
        ValueError: (`parity.plugins.PluginError`) if the plug-in does not load.
    """
    if spec == "torch":
        return Implementation("torch_impl", "torch")
    if spec == "tf":
        return Implementation("tf_impl", "tf", side="TensorFlow")
    from parity import plugins

    fn = plugins.load_spec(spec, argument="--impl")
    return Implementation(spec, "torch", loss=fn, side=f"PyTorch ({spec})")


def _actual(case, impl, device):
    cfg = case.config
    if impl.lane == "tf":
        from parity import tf_side

        return tf_side.quantities(
            cfg, case.weights, case.inputs, case.labels, loss_fn=impl.loss
        )
    from parity import torch_side

    port = (
        torch_side.Port()
        if impl.loss is None
        else torch_side.Port(name=impl.name, loss=impl.loss)
    )
    return torch_side.quantities(
        cfg, case.weights, case.inputs, case.labels, port=port, device=device
    )


def onnx_rows(case):
    """onnxruntime on ``model.onnx`` against the fixture's forward quantities.

    The model is float32 (see `parity.onnx_export`), so the rows use the
    float32 tolerances of each quantity's class.
    """
    from parity import onnx_export

    actual = onnx_export.run(case.model_path, case.inputs)
    rows = []
    for key, value in actual.items():
        tol = tolerances.lookup(key, "float32")
        rows.append(
            compare_lib.compare_arrays(
                f"onnx/{key}",
                value,
                case.expected.get(key),
                rtol=tol.rtol,
                atol=tol.atol,
                actual_side="onnxruntime (float32)",
                expected_side="fixture",
            )
        )
    return rows


def _replay_training(case, impl, device):
    """Trains `impl` on the case's batches; returns (records, state)."""
    from parity import training

    cfg = case.config
    recipe = training.Recipe.from_dict(case.manifest["recipe"])
    steps = case.manifest["steps"]
    if impl.lane == "tf":
        import tensorflow as tf

        import tf_impl.train

        trainer = tf_impl.train.ReferenceTrainer(
            cfg.arch,
            case.weights,
            recipe,
            layers=cfg.layers,
            loss_kwargs=cfg.loss_kwargs,
            dtype={"float64": tf.float64, "float32": tf.float32}[cfg.dtype],
            loss_fn=impl.loss,
        )
        records = [trainer.step(case.inputs[i], case.labels[i]) for i in range(steps)]
        return records, trainer.state()

    import torch

    import torch_impl.train
    from parity import torch_side

    port = (
        torch_side.Port()
        if impl.loss is None
        else torch_side.Port(name=impl.name, loss=impl.loss)
    )
    dtype = torch_side.torch_dtype(cfg.dtype)
    model = port.build_model(cfg.arch, case.weights, dtype=dtype, device=device)
    trainer = torch_impl.train.Trainer(
        model,
        recipe,
        layers=cfg.layers,
        loss_kwargs=cfg.loss_kwargs,
        loss=port.loss,
        overrides=port.recipe,
    )
    records = []
    for i in range(steps):
        x = weights_lib.activation_to_nchw(case.inputs[i])
        x = torch.from_numpy(x).to(device=device, dtype=dtype)
        y = torch.from_numpy(case.labels[i]).to(device)
        records.append(trainer.step(x, y))
    return records, training.torch_state(trainer, cfg.arch)


def training_rows(case, impl, *, device="cpu"):
    """Replays a training case: per-step curves, then the final state.

    Tolerances are `parity.tolerances.training_tolerance`'s, applied by
    `parity.training`'s own row builders.
    """
    from parity import training

    steps = case.manifest["steps"]
    expected_records, expected_state = _arrays_to_training(case.expected, steps)
    try:
        records, state = _replay_training(case, impl, device)
    except (ValueError, TypeError, RuntimeError) as e:
        return [
            compare_lib.Row(
                key="training_step",
                status=compare_lib.FAIL,
                message=f"{impl.side} raised {type(e).__name__}: {e}",
            )
        ]
    dtype = case.config.dtype
    compared = []  # (key, actual, expected, tolerance or None past the horizon)
    for actual, expected in zip(records, expected_records, strict=True):
        step = expected["step"]
        for name in training.CURVES:
            compared.append(
                (
                    f"train_{name}/step{step:04d}",
                    np.asarray(actual[name], np.float64),
                    np.asarray(expected[name], np.float64),
                    tolerances.training_tolerance(name, dtype, step),
                )
            )
    for part, prefix in _STATE_PREFIX.items():
        tol = tolerances.training_tolerance(prefix.split("/")[0], dtype, steps - 1)
        actual, expected = state[part], expected_state[part]
        for name in list(expected) + [n for n in actual if n not in expected]:
            compared.append(
                (f"{prefix}/{name}", actual.get(name), expected.get(name), tol)
            )

    rows = []
    for key, actual, expected, tol in compared:
        if tol is None:
            rows.append(
                compare_lib.Row(
                    key=key,
                    shape=np.shape(expected),
                    status=compare_lib.SKIP,
                    message=f"{key}: past the {dtype} training tolerance's horizon",
                )
            )
            continue
        rows.append(
            compare_lib.compare_arrays(
                key,
                actual,
                expected,
                rtol=tol.rtol,
                atol=tol.atol,
                actual_side=impl.side,
                expected_side="fixture",
            )
        )
    return rows


def verify_case(case, impl, *, device="cpu", onnx=True):
    """Replays `impl` on a loaded case and compares with the fixture.

    Args:
        case: a `LoadedCase`.
        impl: an `Implementation`.
        device: PyTorch device for the torch lane.
        onnx: also run ``model.onnx`` on onnxruntime.

    Returns:
        A list of `parity.compare.Row`.
    """
    if case.kind == "training":
        return training_rows(case, impl, device=device)
    cfg = case.config
    try:
        actual = _actual(case, impl, device)
    except (ValueError, TypeError, RuntimeError) as e:
        actual = {_ERROR_KEY: f"{impl.side} raised {type(e).__name__}: {e}"}
    error = actual.pop(_ERROR_KEY, None)
    rows = compare_lib.compare_all(
        actual,
        case.expected,
        dtype=cfg.dtype,
        config=cfg,
        actual_side=impl.side,
        expected_side="fixture",
        skip_missing_internals=impl.loss is not None,
    )
    if error is not None:
        # The loss call failed: the forward rows still say something, the
        # rest are marked as not computed, after the error itself.
        forward = [r for r in rows if r.quantity in ("input", "logits", "activation")]
        rest = [r for r in rows if r not in forward]
        for r in rest:
            if r.failed and "missing on" in r.message:
                r.message = f"{r.key}: not computed, the loss call failed"
        error_row = compare_lib.Row(
            key="loss_call", status=compare_lib.FAIL, message=error
        )
        rows = forward + [error_row] + rest
    if onnx:
        rows += onnx_rows(case)
    return rows


# ------------------------------------------------------------------------ CLI


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m parity.fixtures",
        description="Build the reference's fixtures, or replay an implementation "
        "against them.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run the TensorFlow reference, write fixtures")
    b.add_argument("--out", default=None, help="fixtures folder (default: fixtures/)")
    b.add_argument("cases", nargs="*", metavar="CASE", help="default: every case")
    v = sub.add_parser("verify", help="replay an implementation against fixtures")
    v.add_argument("--fixtures", default=None, help="folder (default: fixtures/)")
    v.add_argument(
        "--impl",
        default="torch",
        metavar="torch|tf|SPEC",
        help="torch (default), tf, or a PyTorch loss plug-in "
        "'module:function' or 'path.py:function'",
    )
    v.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="PyTorch device (TF32 off on cuda)",
    )
    v.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    v.add_argument("--json", default=None, metavar="PATH")
    v.add_argument(
        "--quiet", action="store_true", help="one line per case instead of its table"
    )
    v.add_argument("cases", nargs="*", metavar="CASE", help="default: every case")
    sub.add_parser("list", help="print the defined cases")
    return p


def _torch_device(choice):
    import torch

    if choice == "cuda":
        if not torch.cuda.is_available():
            return None
        # TF32 rounds float32 products to about 1e-3.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return choice


def _verify(args, parser):
    folder = args.fixtures or default_folder()
    try:
        if not os.path.isdir(folder):
            raise ValueError(f"no fixtures folder. Received: --fixtures={folder!r}")
        paths = find_cases(folder, args.cases)
        if not paths:
            raise ValueError(f"no fixture cases found. Received: --fixtures={folder!r}")
        impl = implementation(args.impl)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    device = "cpu"
    if impl.lane == "tf":
        try:
            import tensorflow  # noqa: F401
        except ImportError as e:
            parser.exit(
                2, f"error: --impl tf needs TensorFlow, which does not import ({e})\n"
            )
        determinism.set_determinism(frameworks=("tensorflow",))
    if impl.lane == "torch":
        # Only the lane under test: asking for TensorFlow's switch would
        # import it.
        determinism.set_determinism(frameworks=("torch",))
        device = _torch_device(args.device)
        if device is None:
            parser.exit(2, "error: --device cuda, but PyTorch sees no GPU\n")

    started = time.perf_counter()
    all_rows, per_case, configs = [], [], []
    for path in paths:
        name = os.path.basename(path)
        t0 = time.perf_counter()
        try:
            case = load_case(path)
        except FixtureError as e:
            rows = [
                compare_lib.Row(key="fixture", status=compare_lib.FAIL, message=str(e))
            ]
            cfg_doc = None
        else:
            rows = verify_case(case, impl, device=device, onnx=not args.no_onnx)
            cfg_doc = case.config.to_dict()
        seconds = time.perf_counter() - t0
        failed = sum(r.failed for r in rows)
        if not args.quiet or failed:
            print(report.format_table(rows, title=f"fixture {name} impl {impl.name}"))
        print(f"case {name} rows {len(rows)} failed {failed} seconds {seconds:.2f}")
        for r in rows:
            r.key = f"{name}::{r.key}"
        all_rows += rows
        configs.append(cfg_doc)
        per_case.append(
            {
                "case": name,
                "rows": len(rows),
                "failed": failed,
                "seconds": round(seconds, 3),
            }
        )
    print(
        f"impl {impl.name} device {device} cases {len(paths)} "
        f"seconds {time.perf_counter() - started:.1f}"
    )
    print(report.summary(all_rows))
    if args.json:
        report.write_json(
            args.json,
            rows=all_rows,
            config=configs,
            extra={"fixtures": per_case, "impl": impl.name, "device": device},
        )
    return report.exit_code(all_rows)


def main(argv=None):
    """``python -m parity.fixtures build|verify|list``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, spec in CASES.items():
            print(f"{name:<28} {spec.description}")
        return 0
    if args.command == "verify":
        return _verify(args, parser)

    try:
        names = args.cases or None
        unknown = [n for n in names or () if n not in CASES]
        if unknown:
            raise ValueError(f"unknown case(s). Received: cases={unknown}")
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    started = time.perf_counter()
    out = args.out or default_folder()
    times = build(out, names, log=lambda n, s: print(f"case {n} seconds {s:.2f}"))
    size = sum(
        os.path.getsize(os.path.join(out, n, f))
        for n in times
        for f in os.listdir(os.path.join(out, n))
    )
    print(
        f"cases {len(times)} bytes {size} seconds {time.perf_counter() - started:.1f}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
