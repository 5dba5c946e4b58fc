"""The catalogue of faulty ports: each one caught, at the row its fault produces.

One module-scoped run of the whole catalogue (`parity.mutants.run_catalogue`)
serves every test: the TensorFlow side of each setting is computed once.
"""

import json

import pytest

from parity import mutants

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The networks are tiny: one thread is fast, and more threads than free
    # cores slow PyTorch down many times over.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runner():
    return mutants._Runner()


@pytest.fixture(scope="module")
def catalogue(runner):
    results = {
        name: mutants.check_mutant(m, runner=runner)
        for name, m in mutants.MUTANTS.items()
    }
    return results


@pytest.fixture(scope="module")
def baseline(runner):
    from parity import torch_side

    settings = mutants._settings_of(mutants.MUTANTS.values())
    return mutants.check_port(torch_side.Port(), settings, runner=runner)


@pytest.mark.parametrize("name", list(mutants.MUTANTS))
def test_mutant_is_caught_at_its_expected_row(catalogue, name):
    result = catalogue[name]
    assert result.caught, f"{name} passed every row under {result.check.setting.name}"
    assert result.first_row.startswith(result.mutant.expected_row), (
        f"{name}: first failing row {result.first_row}, "
        f"expected {result.mutant.expected_row}: {result.check.first.message}"
    )


@pytest.mark.parametrize("setting", list(mutants.SETTINGS))
def test_unmodified_port_passes_every_setting(baseline, setting):
    check = next(c for c in baseline if c.setting.name == setting)
    assert check.rows, setting
    assert check.passed, check.first.message


def test_every_setting_is_used_by_a_mutant():
    used = {m.setting for m in mutants.MUTANTS.values()}
    assert used == set(mutants.SETTINGS)


def test_catalogue_covers_every_fault_class():
    kinds = {m.kind for m in mutants.MUTANTS.values()}
    assert kinds == {"loss", "network", "training"}
    assert len(mutants.MUTANTS) >= 20


def test_missing_second_order_terms_show_in_a_gradient_not_the_loss(catalogue):
    rows = {r.key: r for r in catalogue["no_second_order"].check.rows}
    assert rows["loss"].status == "PASS"
    assert all(
        r.status == "PASS" for k, r in rows.items() if k.startswith("layer_loss/")
    )
    assert rows["loss_gradient/conv_layer0/kernel"].failed


def test_gamma_shift_changes_the_value_and_no_gradient(catalogue):
    rows = catalogue["no_gamma_shift"].check.rows
    assert [r.key for r in rows if r.failed] == [
        "layer_loss/input",
        "layer_loss/conv_layer0",
        "layer_loss/conv_layer1",
        "loss",
    ]


def test_raising_mutant_is_a_caught_row_with_its_message(catalogue):
    first = catalogue["inplace_zero_correct"].check.first
    assert first.key == "loss_call/PyTorch"
    assert "modified by an inplace operation" in first.message


def test_unstable_top_k_really_picks_other_indices_on_ties(catalogue):
    first = catalogue["unstable_top_k"].check.first
    assert first.key == "top_k_index"
    assert first.mismatched > 0


def test_unstable_stand_in_puts_the_higher_index_first():
    import torch

    other = torch.full((2, 10), 0.1, dtype=torch.float64)
    other[:, 3] = 0.0  # the correct class, zeroed
    values, index = mutants._higher_index_first(other, 3)
    assert index.tolist() == [[9, 8, 7], [9, 8, 7]]
    assert values.tolist() == [[0.1] * 3] * 2


def test_tie_fault_needs_the_tie_trap(runner):
    # Without ties torch.max and amax agree: the default setting passes it.
    check = runner.check(
        mutants.MUTANTS["max_one_class"].port, mutants.SETTINGS["default"]
    )
    assert check.passed, check.first.message


def test_per_example_fault_needs_batch_norm_in_training_mode(runner):
    import dataclasses

    default = mutants.SETTINGS["default"]
    eval_cfg = dataclasses.replace(default.config, batch_norm="eval")
    setting = mutants.Setting("bn-eval", eval_cfg)
    check = runner.check(mutants.MUTANTS["per_example_gradients"].port, setting)
    assert check.passed, check.first.message


def test_check_port_runs_a_scalar_plugin_like_a_mutant(runner):
    import torch_impl
    from parity import torch_side

    port = torch_side.Port(name="plugin", loss=torch_impl.large_margin)
    (check,) = mutants.check_port(port, ["tie-k3"], runner=runner)
    assert check.passed, check.first.message
    assert any(r.status == "SKIP" for r in check.rows)
    keys = [r.key for r in mutants.rows_of([check])]
    assert keys[0] == "tie-k3::input"


def test_port_that_fails_to_build_is_a_caught_row(runner):
    from parity import torch_side

    def build_model(arch, weights, **kwargs):
        raise KeyError("conv_layer0/kernel")

    port = torch_side.Port(name="broken", build_model=build_model)
    (check,) = mutants.check_port(port, ["default"], runner=runner)
    assert check.first.key == "port_call/PyTorch"
    assert (
        check.first.message == "the broken port raised KeyError: 'conv_layer0/kernel'"
    )


def test_check_port_names_an_unknown_setting():
    from parity import torch_side

    with pytest.raises(ValueError, match="Received: settings='nope'"):
        mutants.check_port(torch_side.Port(), ["nope"])


def test_command_line_reports_and_writes_json(tmp_path, capsys):
    path = tmp_path / "mutants.json"
    code = mutants.main(["--quiet", "--only", "no_gamma_shift", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "no_gamma_shift" in out and "CAUGHT" in out
    doc = json.loads(path.read_text())
    (entry,) = doc["mutants"]
    assert entry["caught"] and entry["located"]
    assert entry["first_row"]["key"] == "layer_loss/input"
    assert doc["baseline_passed"] is True


def test_command_line_rejects_an_unknown_mutant(capsys):
    with pytest.raises(SystemExit) as e:
        mutants.main(["--only", "nope"])
    assert e.value.code == 2
    assert "Received: ['nope']" in capsys.readouterr().err
