"""The reference training recipe in both frameworks, side by side (issue 3).

Runs are short: the bundled 8x8 digits, batches of 32, five steps. The staircase
is given a decay every 2 steps so that it shows within the run. The TensorFlow
reference run is made once per recipe and reused for every planted fault
(`compare_training(reference=...)`).
"""

import csv
import math
import re

import numpy as np
import pytest
import torch

import torch_impl
from parity import config, data, tolerances, training, weights
from parity.torch_side import Port
from torch_impl.optim import TF1RMSProp
from torch_impl.train import Trainer, clip_by_global_norm

STEPS = 5
RECIPE = training.Recipe(batch_size=32, decay_steps=2)
VALUE = tolerances.lookup("loss", "float64")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def start():
    return weights.init_weights("mnist", input_size=8, seed=0)


@pytest.fixture(scope="module")
def margin_run(digits, start):
    """The reference config (margin loss alone), float64, the built-in port."""
    return training.compare_training(
        config.Config(), RECIPE, start, digits, steps=STEPS, progress=False
    )


def _failures(result):
    return [r.message for r in result.rows if r.failed]


# -- TF1RMSProp against numbers worked out by hand --------------------------


def test_tf1_rmsprop_matches_hand_computed_steps():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = TF1RMSProp([p], lr=0.1, decay=0.9, momentum=0.5, epsilon=0.01)
    grad = torch.tensor([0.5, 2.0], dtype=torch.float64)

    p.grad = grad.clone()
    opt.step()
    # ms starts at 1: ms = 0.9 * 1 + 0.1 * g**2 = [0.925, 1.3]
    # mom = 0.1 * g / sqrt(ms + 0.01) = [0.05 / sqrt(0.935), 0.2 / sqrt(1.31)]
    #     = [0.0517088..., 0.1747408...]
    ms1 = [0.925, 1.3]
    mom1 = [0.05 / math.sqrt(0.935), 0.2 / math.sqrt(1.31)]
    expected_p1 = [1.0 - mom1[0], -2.0 - mom1[1]]
    torch.testing.assert_close(
        opt.state[p]["rms"], torch.tensor(ms1, dtype=torch.float64), **VALUE.__dict__
    )
    torch.testing.assert_close(
        opt.state[p]["momentum"],
        torch.tensor(mom1, dtype=torch.float64),
        **VALUE.__dict__,
    )
    torch.testing.assert_close(
        p.detach(), torch.tensor(expected_p1, dtype=torch.float64), **VALUE.__dict__
    )

    p.grad = grad.clone()
    opt.step()
    # ms = 0.9 * ms1 + 0.1 * g**2 = [0.8575, 1.57]
    # mom = 0.5 * mom1 + 0.1 * g / sqrt(ms + 0.01)
    #     = 0.5 * mom1 + [0.05 / sqrt(0.8675), 0.2 / sqrt(1.58)]
    ms2 = [0.8575, 1.57]
    mom2 = [
        0.5 * mom1[0] + 0.05 / math.sqrt(0.8675),
        0.5 * mom1[1] + 0.2 / math.sqrt(1.58),
    ]
    expected_p2 = [expected_p1[0] - mom2[0], expected_p1[1] - mom2[1]]
    torch.testing.assert_close(
        opt.state[p]["rms"], torch.tensor(ms2, dtype=torch.float64), **VALUE.__dict__
    )
    torch.testing.assert_close(
        p.detach(), torch.tensor(expected_p2, dtype=torch.float64), **VALUE.__dict__
    )


def test_torch_rmsprop_is_not_tf1_rmsprop():
    # The planted fault of the training tests, on the same two numbers: ms
    # starts at 0 and epsilon is outside the root, so the first step is
    # lr * g / (sqrt(0.1 g**2) + eps), about 3 * lr * sign(g).
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = torch.optim.RMSprop([p], lr=0.1, alpha=0.9, eps=0.01)
    p.grad = torch.tensor([0.5, 2.0], dtype=torch.float64)
    opt.step()
    first = [0.05 / (math.sqrt(0.025) + 0.01), 0.2 / (math.sqrt(0.4) + 0.01)]
    torch.testing.assert_close(
        p.detach(),
        torch.tensor([1.0 - first[0], -2.0 - first[1]], dtype=torch.float64),
        **VALUE.__dict__,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "`lr` must be in (0.0, inf). Received: lr=0.0"),
        (
            {"lr": 0.1, "decay": 1.0},
            "`decay` must be in [0.0, 1.0). Received: decay=1.0",
        ),
        ({"lr": 0.1, "epsilon": -1.0}, "Received: epsilon=-1.0"),
    ],
    ids=["lr_zero", "decay_one", "epsilon_negative"],
)
def test_tf1_rmsprop_rejects_bad_hyperparameters(kwargs, message):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=re.escape(message)):
        TF1RMSProp([p], **kwargs)


# -- clipping and the recipe's arguments -------------------------------------


@pytest.mark.tf
def test_clip_by_global_norm_is_tensorflows_rule_at_the_boundary():
    import tensorflow as tf

    # Global norm sqrt(3**2 + 4**2) = 5, and the clip 5 + 5e-7 sits within
    # torch's 1e-6 of it: TensorFlow leaves the gradient alone, so must we;
    # torch.nn.utils.clip_grad_norm_ scales it by (5 + 5e-7) / (5 + 1e-6).
    grads = [np.array([3.0, 0.0]), np.array([[4.0]])]
    clip = 5.0 + 5e-7
    expected, _ = tf.clip_by_global_norm([tf.constant(g) for g in grads], clip)
    actual = clip_by_global_norm([torch.tensor(g) for g in grads], clip)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a.numpy(), e.numpy())
    np.testing.assert_array_equal(actual[0].numpy(), grads[0])

    holders = [torch.zeros(g.shape, dtype=torch.float64) for g in grads]
    for h, g in zip(holders, grads, strict=True):
        h.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(holders, clip)
    assert holders[0].grad[0].item() < 3.0


def test_recipe_and_trainer_reject_bad_arguments(start):
    with pytest.raises(ValueError, match="Received: decay_steps=0"):
        training.Recipe(decay_steps=0)
    with pytest.raises(ValueError, match=r"Received: rms_decay=1\.0"):
        training.Recipe(rms_decay=1.0)
    model = torch_impl.build_model("mnist", start)
    cfg = config.Config()
    with pytest.raises(ValueError, match=r"Received: unknown=\['optimiser'\]"):
        Trainer(
            model,
            RECIPE,
            layers=cfg.layers,
            loss_kwargs=cfg.loss_kwargs,
            overrides={"optimiser": None},
        )
    with pytest.raises(ValueError, match="Received: l2='none'"):
        Trainer(
            model,
            RECIPE,
            layers=cfg.layers,
            loss_kwargs=cfg.loss_kwargs,
            overrides={"l2": "none"},
        )


@pytest.mark.tf
def test_compare_training_rejects_inference_batch_norm_and_a_foreign_reference(
    digits, start, margin_run
):
    with pytest.raises(ValueError, match="Received: batch_norm='eval'"):
        training.compare_training(
            config.Config(batch_norm="eval"), RECIPE, start, digits, steps=1
        )
    with pytest.raises(ValueError, match="another fingerprint"):
        training.compare_training(
            config.Config(),
            RECIPE,
            start,
            digits,
            steps=STEPS - 1,
            reference=margin_run,
            progress=False,
        )


def test_training_tolerance_grows_per_step_and_stops_at_the_horizon():
    for dtype, rule in tolerances.TRAINING_TOLERANCES.items():
        first = tolerances.training_tolerance("total_loss", dtype, 0)
        second = tolerances.training_tolerance("total_loss", dtype, 1)
        assert (first.rtol, first.atol) == (rule.rtol, rule.atol)
        assert second.rtol == pytest.approx(rule.rtol * rule.growth)
    horizon = tolerances.TRAINING_TOLERANCES["float32"].horizon
    assert tolerances.training_tolerance("final_param", "float32", horizon + 1) is None
    assert tolerances.training_tolerance("final_param", "float64", 99) is not None
    with pytest.raises(ValueError, match="Received: dtype='float16'"):
        tolerances.training_tolerance("total_loss", "float16", 0)


@pytest.mark.tf
def test_float32_steps_past_the_horizon_are_reported_not_compared(digits, start):
    horizon = tolerances.TRAINING_TOLERANCES["float32"].horizon
    result = training.compare_training(
        config.Config(dtype="float32"),
        RECIPE,
        start,
        digits,
        steps=horizon + 2,
        progress=False,
    )
    assert _failures(result) == []
    by_status = {}
    for row in result.rows:
        by_status.setdefault(row.status, set()).add(row.key)
    assert f"train_total_loss/step{horizon:04d}" in by_status["PASS"]
    assert f"train_total_loss/step{horizon + 1:04d}" in by_status["SKIP"]
    assert "final_param/logits/kernel" in by_status["SKIP"]
    assert result.tolerances["horizon"] == horizon


# -- five float64 steps agree ------------------------------------------------


@pytest.mark.tf
def test_five_float64_steps_agree_with_the_margin_loss(margin_run):
    assert _failures(margin_run) == []
    assert margin_run.first_divergence is None
    assert len(margin_run.actual) == len(margin_run.expected) == STEPS
    # The run exercises what it claims to: the staircase decays at step 2 and
    # 4, the clip is active, and the margin loss is what is trained.
    rates = [r["learning_rate"] for r in margin_run.expected]
    assert rates == [0.1, 0.1, 0.1 * 0.96, 0.1 * 0.96, 0.1 * 0.96**2]
    assert all(r["grad_norm"] > RECIPE.clip_norm for r in margin_run.expected)
    keys = {r.key for r in margin_run.rows}
    assert "final_slot/rms/conv_layer0/kernel" in keys
    assert "final_slot/momentum/logits/bias" in keys
    assert "final_moving/conv_layer1/batch_norm/moving_variance" in keys
    assert "train_total_loss/step0004" in keys
    assert set(margin_run.heldout) == {"actual", "expected"}
    assert margin_run.heldout["actual"] == margin_run.heldout["expected"]


@pytest.mark.tf
def test_five_float64_steps_agree_with_cross_entropy_alone(digits, start):
    recipe = training.Recipe(
        margin_weight=0.0, xent_weight=1.0, batch_size=32, decay_steps=2
    )
    result = training.compare_training(
        config.Config(), recipe, start, digits, steps=STEPS, progress=False
    )
    assert _failures(result) == []
    assert result.first_divergence is None
    # Cross-entropy falls when it alone is trained.
    assert result.expected[-1]["xent_loss"] < result.expected[0]["xent_loss"]


# -- each recipe fault, planted in the PyTorch side, is caught ---------------


def _torch_rmsprop(params, lr, recipe):
    return torch.optim.RMSprop(
        params,
        lr=lr,
        alpha=recipe.rms_decay,
        eps=recipe.rms_epsilon,
        momentum=recipe.rms_momentum,
    )


def _bn_momentum_09(arch, neutral_weights, *, dtype, device):
    # 0.9 is TF's decay; in PyTorch's convention it weights the batch.
    model = torch_impl.build_model(arch, neutral_weights, dtype=dtype, device=device)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.9
    return model


def _per_epoch_lr(digits):
    steps_per_epoch = len(digits.x_train) // RECIPE.batch_size

    def schedule(step, recipe):
        epoch = step // steps_per_epoch
        return recipe.learning_rate * recipe.decay_rate ** (epoch // recipe.decay_steps)

    return schedule


FAULTS = {
    # The update of step 0 already differs: the parameters after it.
    "torch_rmsprop": (
        lambda d: Port(recipe={"optimizer": _torch_rmsprop}),
        (0, "param_norm"),
    ),
    # Curves cannot see the moving statistics; their norm after step 0 can.
    "bn_momentum_0.9": (
        lambda d: Port(build_model=_bn_momentum_09),
        (0, "moving_norm"),
    ),
    # The trained loss lacks the L2 term from the start; its parts agree.
    "weight_decay": (
        lambda d: Port(recipe={"l2": "weight_decay"}),
        (0, "total_loss"),
    ),
    # The L2 term leaves out biases and batch-norm parameters.
    "l2_weights_only": (
        lambda d: Port(recipe={"l2": "weights_only"}),
        (0, "l2_loss"),
    ),
    # decay_steps = 2: the first decay is due at step 2.
    "lr_per_epoch": (
        lambda d: Port(recipe={"lr_schedule": _per_epoch_lr(d)}),
        (2, "learning_rate"),
    ),
}


@pytest.fixture(scope="module")
def fault_run(digits, start, margin_run):
    """``fault -> TrainingResult`` against the shared reference run, cached."""
    cache = {}

    def run(fault):
        if fault not in cache:
            cache[fault] = training.compare_training(
                config.Config(),
                RECIPE,
                start,
                digits,
                steps=STEPS,
                port=FAULTS[fault][0](digits),
                progress=False,
                reference=margin_run,
            )
        return cache[fault]

    return run


@pytest.mark.tf
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_recipe_fault_is_caught_at_its_first_step(fault, fault_run):
    result = fault_run(fault)
    first = FAULTS[fault][1]
    assert result.first_divergence == first
    step, quantity = first
    # Nothing failed before that step.
    for row in result.rows:
        if row.key.startswith("train_") and row.failed:
            assert int(row.key.rsplit("/step", 1)[1]) >= step
    failed = {r.key for r in result.rows if r.failed}
    assert f"train_{quantity}/step{step:04d}" in failed


def _torch_clip(grads, clip_norm):
    holders = [torch.zeros_like(g) for g in grads]
    for h, g in zip(holders, grads, strict=True):
        h.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(holders, clip_norm)
    return [h.grad for h in holders]


@pytest.mark.tf
def test_clip_with_its_own_epsilon_is_caught_where_it_matters(
    digits, start, margin_run
):
    # The clip is set 5e-7 above the first step's global norm: TensorFlow does
    # not clip that step, torch's clip_grad_norm_ (norm + 1e-6) does.
    first_norm = margin_run.expected[0]["grad_norm"]
    recipe = training.Recipe(batch_size=32, decay_steps=2, clip_norm=first_norm + 5e-7)
    cfg = config.Config()
    reference = training.compare_training(
        cfg, recipe, start, digits, steps=2, progress=False
    )
    assert reference.expected[0]["clipped_grad_norm"] == pytest.approx(
        first_norm, rel=VALUE.rtol
    )
    assert _failures(reference) == []

    faulty = training.compare_training(
        cfg,
        recipe,
        start,
        digits,
        steps=2,
        progress=False,
        reference=reference,
        port=Port(recipe={"clip": _torch_clip}),
    )
    assert faulty.first_divergence == (0, "clipped_grad_norm")


# -- outputs -------------------------------------------------------------------


@pytest.mark.tf
def test_csv_has_one_row_per_step_and_png_is_an_image(margin_run, tmp_path):
    import matplotlib.image

    csv_path = tmp_path / "curves.csv"
    training.write_csv(margin_run, csv_path)
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == STEPS
    assert [int(r["step"]) for r in table] == list(range(STEPS))
    assert (
        float(table[0]["total_loss_expected"]) == margin_run.expected[0]["total_loss"]
    )
    assert float(table[0]["total_loss_actual"]) == margin_run.actual[0]["total_loss"]

    png_path = tmp_path / "curves.png"
    training.plot(margin_run, png_path)
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.csv", "curves.png"]


@pytest.mark.tf
def test_plot_and_document_of_a_divergence(fault_run, tmp_path):
    result = fault_run("l2_weights_only")
    training.plot(result, tmp_path / "diverged.png")
    with open(tmp_path / "diverged.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(result.heldout["actual"])
    document = training.to_document(result)
    assert document["first_divergence"] == {"step": 0, "quantity": "l2_loss"}
    assert len(document["actual"]) == STEPS
