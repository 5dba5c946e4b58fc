"""The benchmark command and the naive port it times for contrast.

No timing is asserted here: speed claims belong to ``python -m parity.bench``.
These tests check that the naive port is a correct port (it computes the same
loss and gradients as `torch_impl`), that the command runs end to end and
writes every case, and the ratio arithmetic of its table.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_impl
from parity import bench, config, naive, tolerances
from parity import compare as compare_lib
from parity import weights as weights_lib

BATCH = 4
INPUT_SIZE = 8


def _loss_and_gradients(loss_fn, cfg, seed=0):
    """The loss and its gradients w.r.t. the input and every parameter."""
    neutral = weights_lib.init_weights("mnist", input_size=INPUT_SIZE, seed=seed)
    model = torch_impl.build_model("mnist", neutral, dtype=torch.float64)
    model.train(cfg.training)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((BATCH, 1, INPUT_SIZE, INPUT_SIZE)))
    x.requires_grad_(True)
    labels = torch.from_numpy(rng.integers(0, 10, size=BATCH))
    logits, endpoints = model(x)
    layers = [x if n == "input" else endpoints[n] for n in cfg.layers]
    sizes = config.layer_sizes([tuple(t.shape) for t in layers])
    loss = loss_fn(
        logits=logits,
        one_hot_labels=F.one_hot(labels, 10).to(torch.float64),
        layers_list=layers,
        **cfg.loss_kwargs(sizes),
    )
    names = ["input"] + [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [x] + list(model.parameters()))
    out = {"loss": loss.detach().numpy()}
    for name, g in zip(names, grads, strict=True):
        out[f"loss_gradient/{name}"] = g.numpy()
    return out


def _rows(actual, expected):
    rows = []
    for key in expected:
        tol = tolerances.lookup(key, "float64")
        rows.append(
            compare_lib.compare_arrays(
                key,
                actual[key],
                expected[key],
                rtol=tol.rtol,
                atol=tol.atol,
                actual_side="naive port",
                expected_side="torch_impl",
            )
        )
    return rows


NAIVE_CONFIGS = {
    "reference,approx,bn=train": config.Config(),
    "exact,k=3,norm=2,sum,bn=train": config.Config(
        exact=True, top_k=3, dist_norm=2, worst_case=False
    ),
    "exact,k=2,norm=1,clipped,bn=eval": config.Config(
        exact=True,
        top_k=2,
        dist_norm=1,
        batch_norm="eval",
        gamma=0.5,
        alpha=2.0,
        layers=("input", "conv_layer0", "conv_layer1", "fc_layer0"),
    ),
}


@pytest.mark.parametrize("cfg", NAIVE_CONFIGS.values(), ids=NAIVE_CONFIGS.keys())
def test_naive_port_matches_torch_impl(cfg):
    expected = _loss_and_gradients(torch_impl.large_margin, cfg)
    actual = _loss_and_gradients(naive.large_margin, cfg)

    rows = _rows(actual, expected)

    failed = [r.message for r in rows if r.failed]
    assert not failed, "\n".join(failed)
    assert len(rows) == len(expected)


def test_naive_port_comparison_catches_a_silent_approximation():
    # The planted fault: exact mode asked of torch_impl, the approximation
    # computed by the naive port. The loss is the same; its gradients are not.
    cfg = config.Config(exact=True)
    expected = _loss_and_gradients(torch_impl.large_margin, cfg)

    def approximate(**kwargs):
        return naive.large_margin(**{**kwargs, "use_approximation": True})

    actual = _loss_and_gradients(approximate, cfg)

    rows = {r.key: r for r in _rows(actual, expected)}
    assert not rows["loss"].failed
    assert rows["loss_gradient/conv_layer0.conv.weight"].failed


def _fake_results():
    def case(name, framework, mode, batch_size, median_s):
        return {
            "case": {"name": name, "framework": framework, "mode": mode},
            "batch_size": batch_size,
            "per_example_s": median_s / batch_size,
        }

    cases = [
        case("torch_approx", "torch", "approx", 256, 1.2),
        case("torch_exact", "torch", "exact", 256, 2.0),
        case("torch_xent", "torch", "xent", 256, 1.0),
        case("tf_approx", "tf", "approx", 256, 2.4),
        case("tf_exact", "tf", "exact", 256, 1.0),
        case("tf_xent", "tf", "xent", 256, 2.0),
        case("naive_approx", "naive", "approx", 8, 0.3),
    ]
    return {"cases": {c["case"]["name"]: c for c in cases}}


def test_summarize_ratios_are_per_example_against_the_right_baseline():
    results = bench.summarize(_fake_results())

    cases = results["cases"]
    assert cases["torch_approx"]["ratio_to_xent"] == pytest.approx(1.2)
    assert cases["torch_approx"]["ratio_to_tf"] == pytest.approx(0.5)
    assert cases["tf_approx"]["ratio_to_xent"] == pytest.approx(1.2)
    assert cases["tf_xent"]["ratio_to_tf"] == pytest.approx(1.0)
    # The naive port at batch 8: 0.3 / 8 per example against 1.2 / 256.
    assert cases["naive_approx"]["ratio_to_xent"] == pytest.approx(0.3 / 8 / (1 / 256))
    targets = results["targets"]
    assert targets["approx_vs_own_xent"]["met"] is True
    assert targets["torch_vs_tf_approx"]["met"] is True
    # The planted slow exact mode: twice TensorFlow's time is reported unmet.
    assert targets["torch_vs_tf_exact"]["value"] == pytest.approx(2.0)
    assert targets["torch_vs_tf_exact"]["met"] is False
    assert targets["naive_approx_vs_torch_approx"]["value"] == pytest.approx(8.0)
    assert targets["naive_approx_vs_torch_approx"]["met"] is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "--repeats must be at least 1. Received: 0"),
        (["--input-size", "10"], "--input-size must be a multiple of 4"),
        (["--cases", "torch_approx,nope"], "Received: unknown=['nope']"),
    ],
    ids=["repeats", "input-size", "unknown-case"],
)
def test_bench_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)

    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.tf
def test_bench_runs_end_to_end_and_writes_every_case(tmp_path):
    path = tmp_path / "bench.json"
    argv = [
        "--repeats=2",
        "--warmup=0",
        "--batch-size=4",
        f"--input-size={INPUT_SIZE}",
        "--naive-batch=2",
        "--threads=1",
        "--isolate=framework",
        f"--json={path}",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    done = subprocess.run(
        [sys.executable, "-m", "parity.bench", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(path.read_text())
    assert set(results["cases"]) == {c.name for c in bench.CASES}
    for name, res in results["cases"].items():
        assert res["repeats"] == (1 if name == "naive_approx_full" else 2), name
        assert math.isfinite(res["median_s"]) and res["median_s"] > 0, name
        assert res["memory"]["peak_mib"] > 0, name
        assert res["threads"] == 1, name
    assert results["cases"]["naive_approx"]["batch_size"] == 2
    assert results["cases"]["naive_approx_full"]["batch_size"] == 4
    assert set(results["targets"]) == {
        "approx_vs_own_xent",
        "torch_vs_tf_approx",
        "torch_vs_tf_exact",
        "naive_approx_full_vs_torch_approx",
    }
    assert "torch_approx.median_s " in done.stdout
    assert "target approx_vs_own_xent" in done.stdout


def _literal_block(block, x):
    # The reference's order: ReLU twice, then max-pool, then batch norm.
    return block.batch_norm(F.max_pool2d(F.relu(F.relu(block.convolve(x))), 2, 2))


def _block_derivatives(forward, block, x):
    out = forward(x)
    # A first-order gradient w.r.t. the input, then the gradient of its norm
    # w.r.t. the kernel: second order, as the exact mode needs.
    (g,) = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.abs().sum(), block.conv.weight)
    return out, g, gg


@pytest.mark.parametrize("training", [True, False], ids=["bn=train", "bn=eval"])
def test_reordered_conv_block_equals_the_reference_order_exactly(training):
    from torch_impl.models import _ConvBlock

    torch.manual_seed(0)
    block = _ConvBlock(1, 4).to(torch.float64).train(training)
    # Small integers make exact zeros and ties inside pooling windows.
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (3, 1, 8, 8), generator=gen).to(torch.float64)
    x.requires_grad_(True)
    with torch.no_grad():
        block.conv.weight.copy_(torch.randint(-1, 2, block.conv.weight.shape))

    def literal_without_relu(t):
        # The planted fault: the ReLU left out.
        return block.batch_norm(F.max_pool2d(block.convolve(t), 2, 2))

    expected = _block_derivatives(lambda t: _literal_block(block, t), block, x)
    actual = _block_derivatives(block, block, x)
    faulty = _block_derivatives(literal_without_relu, block, x)

    exact = tolerances.TOLERANCES["float64"]["exact"]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=exact.rtol, atol=exact.atol)
    assert not torch.equal(faulty[0], expected[0])


@pytest.mark.parametrize(
    "layout, expected_strides",
    [("nchw", (64, 64, 8, 1)), ("channels_last", (64, 1, 8, 1))],
)
def test_the_torch_input_layout_is_the_one_asked_for(layout, expected_strides):
    # A 1-channel NCHW view of NHWC data has channels_last strides too; the
    # benchmark must not leave the layout to that.
    x_nhwc = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    x = bench._torch_input(x_nhwc, layout)
    assert x.stride() == expected_strides
    assert x.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(x.numpy()[:, 0], x_nhwc[..., 0])
