"""``python -m parity.run``: exit codes, reports, plug-ins."""

import json
import textwrap
import xml.etree.ElementTree as ET

import pytest

from parity import run

FAST = ["--batch-size", "16", "--steps", "0", "--quiet"]


def _main(args, capsys=None):
    try:
        return run.main(args)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layers", "input,conv9"], "--layers must be 'all' or a comma list"),
        (["--top-k", "11"], "Received: --top-k=11"),
        (["--steps", "-1"], "Received: --steps=-1"),
        (["--data", "mnist"], "--data mnist needs --data-dir DIR"),
        (["--torch-loss", "no_such_module_xyz:fn"], "--torch-loss does not import"),
        (["--torch-loss", "nocolon"], "must be 'module:function'"),
        (["--batch-size", "5000"], "Received: batch_size=5000"),
    ],
    ids=[
        "layer",
        "top-k",
        "steps",
        "mnist-dir",
        "plugin-import",
        "plugin-spec",
        "batch",
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message, capsys):
    assert _main(FAST + args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_mnist_folder_with_corrupt_file_is_one_clear_line(tmp_path, capsys):
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (tmp_path / name).write_bytes(b"\x00\x00\x08")
    assert _main(["--data", "mnist", "--data-dir", str(tmp_path)] + FAST) == 2
    err = capsys.readouterr().err
    assert "is truncated" in err and "train-images-idx3-ubyte" in err


@pytest.mark.tf
def test_main_job_passes_and_writes_json_and_junit(tmp_path, capsys):
    out_json, out_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code = _main(
        ["--layers", "all", "--json", str(out_json), "--junit", str(out_xml)] + FAST
    )
    assert code == 0
    doc = json.loads(out_json.read_text())
    assert doc["schema_version"] == 1 and doc["passed"] is True
    assert doc["first_failure"] is None
    assert doc["config"]["layers"] == [
        "input",
        "conv_layer0",
        "conv_layer1",
        "fc_layer0",
    ]
    keys = [r["key"] for r in doc["rows"]]
    # Data-flow order: inputs, forward, decisions, internals, loss, gradients.
    assert keys[0] == "input" and keys[1] == "activation/conv_layer0"
    assert keys.index("activation/fc_layer0") < keys.index("logits")
    assert keys.index("logits") < keys.index("top_k_index")
    assert keys.index("top_k_index") < keys.index("probabilities") < keys.index("loss")
    assert keys[-1].startswith("loss_gradient/")
    suite = ET.parse(out_xml).getroot()
    assert suite.get("tests") == str(len(keys)) and suite.get("failures") == "0"


BROKEN_PLUGIN = """
import torch_impl

def mean_over_k(**kwargs):
    # A port that averages over k where the reference sums.
    import torch
    parts = torch_impl.large_margin_parts(**kwargs)
    k = kwargs["top_k"]
    return parts["loss"] / k

def raises(**kwargs):
    raise RuntimeError("my port is broken")

def not_scalar(**kwargs):
    return kwargs["logits"].sum(dim=1)
"""


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_port.py"
    path.write_text(textwrap.dedent(BROKEN_PLUGIN))
    return str(path)


@pytest.mark.tf
def test_plugin_averaging_over_k_is_flagged_at_the_first_quantity(plugin, tmp_path):
    out = tmp_path / "r.json"
    code = _main(
        [
            "--torch-loss",
            f"{plugin}:mean_over_k",
            "--top-k",
            "3",
            "--no-worst-case",
            "--json",
            str(out),
        ]
        + FAST
    )
    assert code == 1
    doc = json.loads(out.read_text())
    # The plug-in reports only its loss: internals are SKIP, the per-layer
    # loss (from single-layer calls) is the first row that can differ.
    assert doc["first_failure"]["key"] == "layer_loss/input"
    statuses = {r["key"]: r["status"] for r in doc["rows"]}
    assert statuses["logits"] == "PASS"
    assert statuses["probabilities"] == "SKIP"
    # Then checked as a mutant is: under the catalogue's static settings too,
    # where K=3 summed over k also catches it.
    assert statuses["k3-sum-l2::layer_loss/input"] == "FAIL"
    assert statuses["tie-k3::logits"] == "PASS"


@pytest.mark.tf
@pytest.mark.parametrize(
    "name,message",
    [
        ("raises", "RuntimeError: my port is broken"),
        ("not_scalar", "must return a scalar tensor. Received: (16,)"),
    ],
)
def test_plugin_that_fails_is_a_reported_failure(plugin, tmp_path, name, message):
    out = tmp_path / "r.json"
    code = _main(
        ["--torch-loss", f"{plugin}:{name}", "--json", str(out), "--no-catalogue"]
        + FAST
    )
    assert code == 1
    doc = json.loads(out.read_text())
    rows = {r["key"]: r for r in doc["rows"]}
    assert rows["logits"]["status"] == "PASS"  # the other checks still ran
    assert rows["loss_call/PyTorch"]["status"] == "FAIL"
    assert message in rows["loss_call/PyTorch"]["message"]


@pytest.mark.tf
def test_same_seed_gives_the_same_report(tmp_path):
    docs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        assert _main(["--json", str(out)] + FAST) == 0
        docs.append(
            [
                (r["key"], r["max_abs"], r["max_rel"])
                for r in json.loads(out.read_text())["rows"]
            ]
        )
    assert docs[0] == docs[1]
