"""Computing the PyTorch loss has no side effects and repeats bit for bit.

The loss differentiates with `torch.autograd.grad`, which returns gradients
instead of accumulating them: no parameter's ``.grad``, nor the input's, may
change, whatever it held before. Each check is shown to catch a planted
fault: a loss that runs a hidden backward pass, and one that drifts between
calls.
"""

import math

import numpy as np
import pytest
import torch

import torch_impl
from parity import weights as weights_lib

_OPTIONS = {
    "default": {},
    "reference": {"dist_norm": math.inf, "alpha_factor": 4.0, "epsilon": 1e-6},
    "k2-exact": {"top_k": 2, "use_approximation": False, "dist_norm": 2},
    "k3-sum-exact-norm1": {
        "top_k": 3,
        "worst_case_loss": False,
        "use_approximation": False,
        "dist_norm": 1,
        "gamma": 0.5,
    },
}


def _network(seed=0, batch_size=6):
    """The reference network on 8x8 inputs, batch norm in training mode."""
    weights = weights_lib.init_weights("mnist", input_size=8, seed=seed)
    model = torch_impl.build_model("mnist", weights, dtype=torch.float64)
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.uniform(size=(batch_size, 1, 8, 8)), requires_grad=True)
    labels = torch.tensor(rng.integers(0, 10, size=batch_size))
    logits, endpoints = model(x)
    layers = [x, endpoints["conv_layer0"], endpoints["conv_layer1"]]
    one_hot = torch.nn.functional.one_hot(labels, 10).to(torch.float64)
    return model, x, logits, one_hot, layers


def _grad_snapshot(model, x):
    """name -> (the .grad object, a copy of its value), the input included."""
    tensors = dict(model.named_parameters())
    tensors["input"] = x
    return {
        name: (t.grad, None if t.grad is None else t.grad.clone())
        for name, t in tensors.items()
    }


def _changed_grads(model, x, before):
    """Names whose .grad differs from `before`, by identity or by any bit."""
    changed = []
    for name, (obj, value) in _grad_snapshot(model, x).items():
        old_obj, old_value = before[name]
        if obj is not old_obj:
            changed.append(name)
        elif value is not None and not torch.equal(value, old_value):
            changed.append(name)
    return changed


def _preset_grads(model, x, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for t in [*model.parameters(), x]:
        t.grad = torch.randn(t.shape, generator=generator, dtype=t.dtype)


def _leaky_loss(**kwargs):
    # A planted fault: a hidden backward pass before returning the loss.
    loss = torch_impl.large_margin(**kwargs)
    loss.backward(retain_graph=True)
    return loss


def _loss_kwargs(logits, one_hot, layers, options):
    return dict(logits=logits, one_hot_labels=one_hot, layers_list=layers, **options)


@pytest.mark.parametrize("preset", [False, True], ids=["grad-none", "grad-preset"])
@pytest.mark.parametrize("options", list(_OPTIONS.values()), ids=list(_OPTIONS))
def test_loss_leaves_every_grad_as_it_was(options, preset):
    model, x, logits, one_hot, layers = _network()
    if preset:
        _preset_grads(model, x)
    before = _grad_snapshot(model, x)

    loss = torch_impl.large_margin(**_loss_kwargs(logits, one_hot, layers, options))
    torch_impl.large_margin_parts(**_loss_kwargs(logits, one_hot, layers, options))

    assert loss.requires_grad
    assert _changed_grads(model, x, before) == []


def test_module_leaves_every_grad_as_it_was():
    model, x, logits, one_hot, layers = _network()
    _preset_grads(model, x)
    before = _grad_snapshot(model, x)

    torch_impl.LargeMarginLoss(top_k=2)(logits, one_hot.argmax(dim=1), layers)

    assert _changed_grads(model, x, before) == []


@pytest.mark.parametrize("preset", [False, True], ids=["grad-none", "grad-preset"])
def test_hidden_backward_is_caught(preset):
    model, x, logits, one_hot, layers = _network()
    if preset:
        _preset_grads(model, x)
    before = _grad_snapshot(model, x)

    _leaky_loss(**_loss_kwargs(logits, one_hot, layers, {}))

    changed = _changed_grads(model, x, before)
    assert "input" in changed
    assert "logits.weight" in changed


def test_loss_changes_neither_inputs_nor_model_state():
    model, x, logits, one_hot, layers = _network()
    tensors = [logits, one_hot, *layers]
    values = [t.detach().clone() for t in tensors]
    flags = [t.requires_grad for t in tensors]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    torch_impl.large_margin(
        **_loss_kwargs(logits, one_hot, layers, _OPTIONS["k2-exact"])
    )

    assert all(torch.equal(t, v) for t, v in zip(tensors, values, strict=True))
    assert [t.requires_grad for t in tensors] == flags
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_backward_after_the_loss_gives_the_plain_gradient():
    # No hidden accumulation: .grad after one backward equals autograd.grad.
    model, x, logits, one_hot, layers = _network()
    loss = torch_impl.large_margin(**_loss_kwargs(logits, one_hot, layers, {}))
    params = [x, *model.parameters()]
    expected = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    loss.backward()

    for p, e in zip(params, expected, strict=True):
        actual = p.grad if p.grad is not None else None
        if e is None:
            assert actual is None or not actual.any()
        else:
            assert torch.equal(actual, e)


def _parts_arrays(parts):
    """Every tensor of a `large_margin_parts` result, as numpy, by name."""
    out = {k: parts[k].detach().numpy() for k in parts if k != "layers"}
    for i, layer in enumerate(parts["layers"]):
        for k, v in layer.items():
            out[f"{k}/{i}"] = v.detach().numpy()
    return out


def _bitwise_differences(actual, expected):
    return [
        k
        for k in expected
        if actual[k].dtype != expected[k].dtype
        or actual[k].shape != expected[k].shape
        or actual[k].tobytes() != expected[k].tobytes()
    ]


@pytest.mark.parametrize("options", list(_OPTIONS.values()), ids=list(_OPTIONS))
def test_two_calls_on_one_batch_are_bitwise_identical(options):
    model, x, logits, one_hot, layers = _network()
    kwargs = _loss_kwargs(logits, one_hot, layers, options)

    first = torch_impl.large_margin_parts(**kwargs)
    second = torch_impl.large_margin_parts(**kwargs)
    params = [x, *model.parameters()]
    first_grads = torch.autograd.grad(first["loss"], params, retain_graph=True)
    second_grads = torch.autograd.grad(second["loss"], params, retain_graph=True)

    actual, expected = _parts_arrays(second), _parts_arrays(first)
    assert _bitwise_differences(actual, expected) == []
    for a, e in zip(second_grads, first_grads, strict=True):
        assert torch.equal(a, e)
    assert torch.equal(
        torch_impl.large_margin(**kwargs), torch_impl.large_margin(**kwargs)
    )


def test_drift_between_calls_is_caught():
    # A planted fault: the second call's loss is off by one unit in the last
    # place, which only a bitwise comparison sees.
    model, x, logits, one_hot, layers = _network()
    kwargs = _loss_kwargs(logits, one_hot, layers, {})
    first = _parts_arrays(torch_impl.large_margin_parts(**kwargs))
    second = _parts_arrays(torch_impl.large_margin_parts(**kwargs))
    second["loss"] = np.nextafter(second["loss"], np.inf)

    assert _bitwise_differences(second, first) == ["loss"]
