"""The portable fixtures: replay without TensorFlow, integrity, planted faults.

The committed fixtures under ``fixtures/`` are verified against the PyTorch
port in a subprocess where TensorFlow cannot be imported, and (marked ``tf``)
against the TensorFlow reference. Damaged fixtures must be refused with a
message naming the case and the tensor; a fault planted in the PyTorch loss
must fail at the quantities it touches.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from parity import fixtures
from parity import weights as weights_lib

FIXTURES = fixtures.default_folder()
ROOT = os.path.dirname(FIXTURES)
SMALL = "trap-ties-k1"

# Runs parity.fixtures' main where TensorFlow (and the modules that need it)
# cannot be imported, as in an environment without it, and checks afterwards
# that nothing imported them.
_TF_FREE = textwrap.dedent(
    """
    import sys

    # None in sys.modules is how Python spells "not importable": `import`
    # raises ModuleNotFoundError and importlib.util.find_spec returns None,
    # exactly as where TensorFlow is not installed.
    for name in ("tensorflow", "tf_impl", "keras"):
        sys.modules[name] = None
    from parity import fixtures

    code = fixtures.main(sys.argv[1:])
    leaked = [
        m for m, module in sys.modules.items()
        if module is not None and m.split(".")[0] in ("tensorflow", "tf_impl")
        or m == "parity.tf_side"
    ]
    if leaked:
        print("imported without need:", leaked)
        sys.exit(3)
    sys.exit(code)
    """
)


def _run_tf_free(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-c", _TF_FREE, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.fixture()
def small_case(tmp_path):
    """A private copy of one committed case, safe to damage."""
    folder = tmp_path / SMALL
    shutil.copytree(os.path.join(FIXTURES, SMALL), folder)
    return folder


def _manifest(folder):
    with open(folder / "manifest.json") as f:
        return json.load(f)


def _write_manifest(folder, manifest):
    with open(folder / "manifest.json", "w") as f:
        json.dump(manifest, f)


def _plugin(tmp_path, body):
    path = tmp_path / "plugin.py"
    path.write_text("import torch_impl\n\n\n" + textwrap.dedent(body))
    return str(path)


# ------------------------------------------------ the committed fixtures pass


def test_committed_set_is_complete_and_small():
    present = [os.path.basename(p) for p in fixtures.find_cases(FIXTURES)]
    assert present == sorted(fixtures.case_names())
    size = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(FIXTURES)
        for f in files
    )
    assert size < 16 * 2**20


def test_verify_torch_without_tensorflow(tmp_path):
    report = tmp_path / "report.json"
    result = _run_tf_free("verify", "--impl", "torch", "--quiet", "--json", str(report))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["passed"]
    assert [c["case"] for c in doc["fixtures"]] == sorted(fixtures.case_names())
    keys = {r["key"].split("::", 1)[1] for r in doc["rows"]}
    # onnxruntime's forward rows and the training run's rows are there.
    assert {"onnx/logits", "onnx/activation/conv_layer1"} <= keys
    assert "final_moving/conv_layer0/batch_norm/moving_mean" in keys


def test_verify_tf_free_refuses_tf_impl_cleanly():
    result = _run_tf_free("verify", "--impl", "tf", SMALL)
    # The TF lane cannot run without TensorFlow: a usage error, not a traceback.
    assert result.returncode == 2
    assert "--impl tf needs TensorFlow" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.tf
def test_verify_tf_passes_on_a_few_cases(capsys):
    cases = ["toy-p2-k3-sum-exact", "trap-ties-k3"]
    assert (
        fixtures.main(["verify", "--impl", "tf", "--quiet", "--no-onnx", *cases]) == 0
    )
    assert "result PASS" in capsys.readouterr().out


# -------------------------------------------------------------- onnxruntime


def test_every_model_passes_the_onnx_checker():
    import onnx

    for folder in fixtures.find_cases(FIXTURES):
        case = fixtures.load_case(folder)
        if case.kind == "static":
            onnx.checker.check_model(onnx.load(case.model_path), full_check=True)


def test_onnxruntime_reproduces_the_forward_pass():
    case = fixtures.load_case(os.path.join(FIXTURES, "digits-bn-eval"))
    rows = fixtures.onnx_rows(case)
    assert [r.key for r in rows] == [
        "onnx/logits",
        "onnx/activation/conv_layer0",
        "onnx/activation/conv_layer1",
        "onnx/activation/fc_layer0",
    ]
    assert all(r.status == "PASS" for r in rows), [r.message for r in rows]


def test_onnx_export_with_an_nchw_flatten_is_caught():
    from parity import onnx_export

    case = fixtures.load_case(os.path.join(FIXTURES, "digits-bn-eval"))
    # Plant the classic port fault: fc_layer0's rows in NCHW flatten order.
    kernel = case.weights["fc_layer0/kernel"]  # [2*2*64, 512], rows (h, w, c)
    wrong = kernel.reshape(2, 2, 64, 512).transpose(2, 0, 1, 3).reshape(256, 512)
    model = onnx_export.export("mnist", {**case.weights, "fc_layer0/kernel": wrong})
    actual = onnx_export.run(model, case.inputs)
    assert np.abs(actual["logits"] - case.expected["logits"]).max() > 1e-3
    np.testing.assert_array_equal(
        actual["activation/conv_layer1"].shape,
        case.expected["activation/conv_layer1"].shape,
    )


# ------------------------------------------------------------ integrity


def test_a_tampered_tensor_is_named(small_case):
    arrays = fixtures.read_npz(small_case / "tensors.npz")
    arrays["expected/loss"] = arrays["expected/loss"] + 1e-9
    fixtures.write_npz(str(small_case / "tensors.npz"), arrays)
    with pytest.raises(
        fixtures.FixtureError,
        match=(f"case {SMALL}: checksum mismatch for tensor expected/loss"),
    ):
        fixtures.load_case(str(small_case))


def test_a_flipped_byte_is_refused(small_case):
    path = small_case / "tensors.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(fixtures.FixtureError, match=f"case {SMALL}: "):
        fixtures.load_case(str(small_case))


def test_a_truncated_file_is_refused(small_case):
    path = small_case / "tensors.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        fixtures.FixtureError,
        match=(
            rf"case {SMALL}: tensors.npz has {len(data) // 2} bytes, the manifest says "
            rf"{len(data)} \(truncated or replaced\)"
        ),
    ):
        fixtures.load_case(str(small_case))


def test_a_missing_tensor_is_named(small_case):
    arrays = fixtures.read_npz(small_case / "tensors.npz")
    del arrays["expected/logits"]
    fixtures.write_npz(str(small_case / "tensors.npz"), arrays)
    with pytest.raises(
        fixtures.FixtureError,
        match=(f"case {SMALL}: tensor expected/logits is missing from tensors.npz"),
    ):
        fixtures.load_case(str(small_case))


@pytest.mark.parametrize("path", ["../x.npz", "/etc/passwd", "sub/../../x.npz"])
def test_a_manifest_path_that_leaves_the_case_is_refused(small_case, path):
    manifest = _manifest(small_case)
    manifest["files"]["tensors"]["path"] = path
    _write_manifest(small_case, manifest)
    with pytest.raises(
        fixtures.FixtureError,
        match=(f"case {SMALL}: tensors file path leaves the case folder"),
    ):
        fixtures.load_case(str(small_case))


def test_a_tensor_name_that_leaves_the_namespace_is_refused(small_case):
    manifest = _manifest(small_case)
    manifest["tensors"]["../x"] = manifest["tensors"].pop("expected/loss")
    _write_manifest(small_case, manifest)
    with pytest.raises(fixtures.FixtureError, match="tensor name leaves the case"):
        fixtures.load_case(str(small_case))


def test_an_unknown_schema_version_is_refused(small_case):
    manifest = _manifest(small_case)
    manifest["schema_version"] = 99
    _write_manifest(small_case, manifest)
    with pytest.raises(
        fixtures.FixtureError,
        match=(
            f"case {SMALL}: unknown schema version; this harness reads 1. "
            "Received: schema_version=99"
        ),
    ):
        fixtures.load_case(str(small_case))


def test_a_pickled_tensor_is_refused(small_case):
    arrays = fixtures.read_npz(small_case / "tensors.npz")
    manifest = _manifest(small_case)
    objects = np.array([{"a": 1}], dtype=object)
    import io
    import zipfile

    # np.savez would pickle an object array; write one by hand into the zip.
    member = io.BytesIO()
    np.lib.format.write_array(member, objects, allow_pickle=True)
    fixtures.write_npz(str(small_case / "tensors.npz"), arrays)
    with zipfile.ZipFile(small_case / "tensors.npz", "a") as z:
        z.writestr("extra/objects.npy", member.getvalue())
    manifest["tensors"]["extra/objects"] = {
        "shape": [1],
        "dtype": "object",
        "sha256": "",
        "role": "expected",
    }
    _write_manifest(small_case, manifest)
    with pytest.raises(
        fixtures.FixtureError,
        match=("tensor extra/objects cannot be read .*allow_pickle"),
    ):
        fixtures.load_case(str(small_case))


def test_verify_reports_a_damaged_case_as_a_failed_row(small_case, capsys):
    path = small_case / "tensors.npz"
    path.write_bytes(path.read_bytes()[:100])
    code = fixtures.main(["verify", "--fixtures", str(small_case.parent), "--no-onnx"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"case {SMALL}: tensors.npz has 100 bytes" in out


# ------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "no-such-case"], "no such case"),
        (["verify", "--impl", "nowhere:fn"], "--impl does not import"),
        (["verify", "--fixtures", "/no/such/folder"], "no fixtures folder"),
        (["build", "no-such-case"], "unknown case"),
    ],
    ids=["unknown-case", "bad-plugin", "no-folder", "build-unknown-case"],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        fixtures.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the CUDA lane is exercised by --device cuda")
    with pytest.raises(SystemExit) as info:
        fixtures.main(["verify", "--device", "cuda", SMALL])
    assert info.value.code == 2
    assert "--device cuda, but PyTorch sees no GPU" in capsys.readouterr().err


# ---------------------------------------------------------- planted faults


def _statuses(rows):
    return {r.key: r.status for r in rows}


def test_a_loss_averaged_over_k_fails_at_the_loss(tmp_path):
    spec = _plugin(
        tmp_path,
        """
        def mean_over_k(**kwargs):
            # Fault: the mean over the K classes instead of their sum.
            return torch_impl.large_margin(**kwargs) / kwargs["top_k"]
        """,
    )
    case = fixtures.load_case(os.path.join(FIXTURES, "toy-p2-k3-sum-approx"))
    rows = fixtures.verify_case(
        case, fixtures.implementation(f"{spec}:mean_over_k"), onnx=False
    )
    status = _statuses(rows)
    failed = sorted(k for k, s in status.items() if s == "FAIL")
    assert failed == sorted(
        ["layer_loss/input", "layer_loss/conv_layer0", "loss"]
        + [k for k in status if k.startswith("loss_gradient/")]
    )
    assert status["logits"] == status["activation/conv_layer0"] == "PASS"
    assert status["distance/input"] == "SKIP"  # a plug-in reports only its loss


def test_a_sign_flip_fails_verify(tmp_path, capsys):
    spec = _plugin(
        tmp_path,
        """
        def sign_flip(**kwargs):
            return -torch_impl.large_margin(**kwargs)
        """,
    )
    code = fixtures.main(
        [
            "verify",
            "--impl",
            f"{spec}:sign_flip",
            "--no-onnx",
            "--quiet",
            "toy-pinf-k1-worst-approx",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "part first at toy-pinf-k1-worst-approx::layer_loss/input" in out


def test_a_sign_flip_fails_the_training_case_at_step_0(tmp_path):
    spec = _plugin(
        tmp_path,
        """
        def sign_flip(**kwargs):
            return -torch_impl.large_margin(**kwargs)
        """,
    )
    case = fixtures.load_case(os.path.join(FIXTURES, "train-digits-5-steps"))
    # The first step is enough to see the fault, and five cost five times more.
    case = dataclasses.replace(case, manifest={**case.manifest, "steps": 1})
    rows = fixtures.verify_case(case, fixtures.implementation(f"{spec}:sign_flip"))
    status = _statuses(rows)
    assert status["train_learning_rate/step0000"] == "PASS"
    assert status["train_margin_loss/step0000"] == "FAIL"
    assert "train_margin_loss/step0001" not in status


def test_the_builtin_port_passes_the_same_cases():
    impl = fixtures.implementation("torch")
    for name in ("toy-p2-k3-sum-approx", "toy-pinf-k1-worst-approx", "trap-clip"):
        case = fixtures.load_case(os.path.join(FIXTURES, name))
        rows = fixtures.verify_case(case, impl, onnx=False)
        assert not any(r.failed for r in rows), [r.message for r in rows if r.failed]


# ------------------------------------------------------------- the build


@pytest.mark.tf
def test_build_is_deterministic_and_reproduces_the_committed_case(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert fixtures.main(["build", "--out", str(first), SMALL]) == 0
    fixtures.build(str(second), [SMALL])
    for name in ("tensors.npz", "model.onnx", "manifest.json"):
        assert (first / SMALL / name).read_bytes() == (
            second / SMALL / name
        ).read_bytes()
    committed = fixtures.load_case(os.path.join(FIXTURES, SMALL))
    rebuilt = fixtures.load_case(str(first / SMALL))
    if committed.manifest["generator"] == rebuilt.manifest["generator"]:
        assert committed.manifest["tensors"] == rebuilt.manifest["tensors"]
    assert sorted(os.listdir(first)) == [SMALL]  # no staging folder left


@pytest.mark.tf
def test_an_interrupted_build_leaves_the_previous_fixtures(tmp_path, monkeypatch):
    out = tmp_path / "fixtures"
    shutil.copytree(os.path.join(FIXTURES, SMALL), out / SMALL)
    before = (out / SMALL / "tensors.npz").read_bytes()
    # A trap whose condition the data does not meet makes the build raise
    # after the first case was written to the staging folder.
    broken = fixtures.CaseSpec(
        "broken", fixtures.CASES["toy-p2-k1-worst-approx"].config, "", trap="clip"
    )
    monkeypatch.setitem(fixtures.CASES, "broken", broken)
    with pytest.raises(fixtures.FixtureError, match="the clip trap needs"):
        fixtures.build(str(out), [SMALL, "broken"])
    assert (out / SMALL / "tensors.npz").read_bytes() == before
    assert sorted(os.listdir(out)) == [SMALL]


def test_write_npz_is_byte_identical_and_loads_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a/b": rng.normal(size=(3, 4)), "labels": np.arange(5)}
    fixtures.write_npz(str(tmp_path / "1.npz"), arrays)
    fixtures.write_npz(str(tmp_path / "2.npz"), arrays)
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    with np.load(tmp_path / "1.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(f["a/b"], arrays["a/b"])


def test_weights_layout_is_the_neutral_one():
    case = fixtures.load_case(os.path.join(FIXTURES, "digits-bn-train"))
    table = weights_lib.ARCHITECTURES["mnist"]["params"]
    assert set(case.weights) == set(table)
    assert case.weights["conv_layer1/kernel"].shape == (5, 5, 32, 64)  # HWIO
    assert case.weights["fc_layer0/kernel"].shape == (256, 512)  # [in, out]
    assert case.inputs.shape == (32, 8, 8, 1)  # NHWC
