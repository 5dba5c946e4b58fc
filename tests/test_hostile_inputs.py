"""Hostile plug-ins, files and output paths: a clear failure, never a crash or a pass.

Each case here was found by trying to break the harness.
"""

import json
import os
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from parity import compare, data, report, run, weights

FAST = ["--batch-size", "16", "--steps", "0", "--quiet", "--no-catalogue"]

PLUGINS = """
import sys
import torch
import torch_impl

def exits(**kw):
    sys.exit(0)

def dict_without_top_k(**kw):
    parts = torch_impl.large_margin_parts(**kw)
    parts.pop("top_k_index")
    return parts

def float_top_k(**kw):
    parts = torch_impl.large_margin_parts(**kw)
    parts["top_k_index"] = parts["top_k_index"].double() + 0.5
    return parts

def layers_short(**kw):
    parts = torch_impl.large_margin_parts(**kw)
    parts["layers"] = parts["layers"][:-1]
    return parts

def numpy_gradient(**kw):
    parts = torch_impl.large_margin_parts(**kw)
    parts["layers"][0]["gradient"] = parts["layers"][0]["gradient"].detach().numpy()
    return parts

def detached(**kw):
    value = float(torch_impl.large_margin(**kw).detach())
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)

def raises_on_one_layer(**kw):
    if len(kw["layers_list"]) == 1:
        raise RuntimeError("only one layer?")
    return torch_impl.large_margin(**kw)

def clears_its_list(**kw):
    loss = torch_impl.large_margin(**kw)
    kw["layers_list"].clear()
    return loss
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "hostile.py"
    path.write_text(textwrap.dedent(PLUGINS))
    return str(path)


def _run(args):
    try:
        return run.main(args)
    except SystemExit as e:
        return e.code


@pytest.mark.tf
@pytest.mark.parametrize(
    "name,key,message",
    [
        ("exits", "loss_call/PyTorch", "raised SystemExit"),
        ("dict_without_top_k", "loss_call/PyTorch", "a dict without ['top_k_index']"),
        ("float_top_k", "top_k_index", "dtype float64 on the PyTorch side, int64"),
        ("layers_short", "loss_call/PyTorch", "one entry of `layers` per layer (3)"),
        ("numpy_gradient", "loss_call/PyTorch", "layers[0] must hold tensors"),
        # A leaf loss: no gradient reaches the network, read as zero.
        ("detached", "loss_gradient/input", "mismatched elements"),
        ("raises_on_one_layer", "loss_call/PyTorch", "only one layer?"),
    ],
)
def test_hostile_plugin_fails_its_row(plugin, tmp_path, name, key, message):
    out = tmp_path / "r.json"
    assert _run(FAST + ["--torch-loss", f"{plugin}:{name}", "--json", str(out)]) == 1
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[key]["status"] == "FAIL"
    assert message in rows[key]["message"]
    assert rows["logits"]["status"] == "PASS"


@pytest.mark.tf
def test_plugin_that_clears_its_own_list_is_fine(plugin):
    # The harness passes a copy of the layer list; the loss itself is right.
    assert _run(FAST + ["--torch-loss", f"{plugin}:clears_its_list"]) == 0


def _usage_error(args, capsys):
    assert _run(FAST + args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--gamma", "-1", "`gamma` must be finite and positive. Received: gamma=-1.0"),
        ("--gamma", "nan", "Received: gamma=nan"),
        ("--epsilon", "-1", "`epsilon` must be 0 or more"),
        ("--alpha", "inf", "`alpha` must be finite"),
        ("--layers", "input,input", "`layers` must be distinct layer names"),
    ],
    ids=[
        "gamma-negative",
        "gamma-nan",
        "epsilon-negative",
        "alpha-inf",
        "layers-twice",
    ],
)
def test_nonsense_loss_options_are_usage_errors(option, value, message, capsys):
    assert message in _usage_error([option, value], capsys)


def test_bad_weights_files_are_named(tmp_path, capsys):
    w = weights.init_weights("mnist", input_size=8)
    good = tmp_path / "w.npz"
    np.savez(good, **w)
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:1000])
    err = _usage_error(["--weights", str(tmp_path / "cut.npz")], capsys)
    assert "--weights must be an .npz archive of plain arrays" in err
    w["logits/kernel"] = np.zeros((5, 10))
    np.savez(tmp_path / "shape.npz", **w)
    err = _usage_error(["--weights", str(tmp_path / "shape.npz")], capsys)
    assert "logits/kernel must be real numbers of shape (512, 10)" in err


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    err = _usage_error(["--json", str(tmp_path)], capsys)
    assert "--json must name a file, not a folder" in err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = _usage_error(["--junit", str(blocker / "r.xml")], capsys)
    assert "--junit cannot be written there" in err


def test_truncated_mnist_npz_is_a_data_error(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    content = (tmp_path / "mnist.npz").read_bytes()
    (tmp_path / "mnist.npz").write_bytes(content[:50])
    with pytest.raises(data.DataError, match="as plain arrays"):
        data.load("mnist", str(tmp_path))


def test_float_mnist_images_are_refused(tmp_path):
    arrays = {
        "x_train": np.zeros((2, 4, 4)),
        "y_train": np.zeros(2, np.int64),
        "x_test": np.zeros((1, 4, 4)),
        "y_test": np.zeros(1, np.int64),
    }
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(data.DataError, match="must be uint8 pixels 0..255"):
        data.load("mnist", str(tmp_path))


def test_idx_header_with_huge_dimensions_is_truncated_not_reshaped(tmp_path):
    header = bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") * 3
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / name).write_bytes(header)
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 0]))
    with pytest.raises(data.DataError, match="is truncated"):
        data.load("mnist", str(tmp_path))


def test_json_report_is_strict_json_and_junit_parses(tmp_path):
    row = compare.Row(
        key="loss",
        status=compare.FAIL,
        max_abs=float("nan"),
        message="plug-in said \x00\x01 bye",
    )
    out = tmp_path / "r.json"
    report.write_json(str(out), rows=[row], config={"gamma": float("inf")})
    doc = json.loads(out.read_text(), parse_constant=pytest.fail)
    assert doc["rows"][0]["max_abs"] == "nan" and doc["config"]["gamma"] == "inf"
    xml = tmp_path / "r.xml"
    report.write_junit(str(xml), [row])
    assert ET.parse(xml).getroot().get("failures") == "1"
    assert oct(os.stat(xml).st_mode & 0o777) != oct(0o600)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("schema_version", True, "unknown schema version"),
        ("schema_version", 1.0, "unknown schema version"),
        ("config", "layers-bogus", "must be among"),
    ],
    ids=["schema-true", "schema-float", "bogus-layer"],
)
def test_hostile_manifest_is_refused(tmp_path, field, value, message):
    import shutil

    from parity.fixtures import store

    case = tmp_path / "trap-clip"
    shutil.copytree(os.path.join("fixtures", "trap-clip"), case)
    manifest = json.loads((case / "manifest.json").read_text())
    if field == "config":
        manifest["config"]["layers"] = ["input", "bogus"]
    else:
        manifest[field] = value
    (case / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(store.FixtureError, match=message):
        store.load_case(str(case))


def test_fixtures_build_out_must_be_a_folder(tmp_path, capsys):
    from parity.fixtures import cli

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["build", "--out", str(blocker), "trap-clip"])
    assert exit_info.value.code == 2
    assert "--out must be a folder" in capsys.readouterr().err
