"""The PyTorch lane: runs a port on neutral weights and inputs, returns numpy.

A `Port` bundles what can differ between ports: the loss function and how the
network is built. Mutants (`parity.mutants`) and user plug-ins are ports.
"""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

import torch_impl
from parity import compare
from parity import config as config_lib
from parity import weights as neutral

__all__ = ["LossCallError", "Port", "quantities", "torch_dtype"]


ERROR_KEY = compare.ERROR_KEY


def torch_dtype(name):
    return {"float64": torch.float64, "float32": torch.float32}[name]


@dataclasses.dataclass
class Port:
    """A PyTorch port under test.

    Attributes:
        name: shown in reports.
        loss: a function with `large_margin`'s keyword signature, returning a
            scalar tensor or a dict shaped like `large_margin_parts`' result.
        build_model: ``(arch, weights, dtype=, device=) -> nn.Module``.
        recipe: training-recipe overrides read by `parity.training` (passed
            to `torch_impl.train.Trainer`); an empty dict is the reference
            recipe. Keys:

            - ``"optimizer"``: ``(params, lr, recipe) -> torch.optim.Optimizer``;
              default `torch_impl.optim.TF1RMSProp` with the recipe's decay,
              momentum and epsilon. Slots are compared under TF1's names
              ``"rms"`` and ``"momentum"``.
            - ``"l2"``: ``"all"`` (default: the L2 term over every trainable
              variable, in the loss, clipped with it), ``"weights_only"``
              (kernels only) or ``"weight_decay"`` (no term in the loss;
              ``l2_weight * v`` added to each gradient after clipping).
            - ``"lr_schedule"``: ``(step, recipe) -> lr`` for the update
              numbered `step` from 0, set on the optimizer before it; default
              the staircase as a `LambdaLR` stepped once per update.
            - ``"clip"``: ``(grads, clip_norm) -> grads``; default
              `torch_impl.train.clip_by_global_norm`, TensorFlow's rule.

            Batch-norm momentum faults belong to `build_model`, not here.
    """

    name: str = "torch_impl"
    loss: object = torch_impl.large_margin_parts
    build_model: object = torch_impl.build_model
    recipe: dict = dataclasses.field(default_factory=dict)


def _np(t):
    # A copy: a port that later writes into a tensor in place must not change
    # rows already taken from it.
    return t.detach().cpu().numpy().copy()


def _decision(t):
    """A discrete decision as int64; a non-integer one keeps its dtype and fails."""
    a = _np(t)
    return a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a


class LossCallError(RuntimeError):
    """The port's loss raised or returned something that is not a scalar loss."""


def _call_loss(port, kwargs):
    try:
        out = port.loss(**kwargs)
    except (Exception, SystemExit) as e:  # a port under test may fail in any way
        raise LossCallError(
            f"the {port.name} loss raised {type(e).__name__}: {e}"
        ) from e
    parts = out if isinstance(out, dict) else {"loss": out}
    loss = parts.get("loss")
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = (
            tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        )
        raise LossCallError(
            f"the {port.name} loss must return a scalar tensor. Received: {shape}"
        )
    return parts


_PART_KEYS = ("probabilities", "difference", "top_k_index", "layers")
_LAYER_KEYS = ("gradient", "grad_norm", "distance", "clip_branch", "loss")


def _internals(port, parts, names):
    """The loss internals of a dict-returning port, as rows.

    Raises:
        LossCallError: if the dict lacks a key or holds something that is not
            a tensor, or its ``layers`` do not match the layers asked for.
    """
    missing = [k for k in _PART_KEYS if k not in parts]
    if missing:
        raise LossCallError(
            f"the {port.name} loss returned a dict without {missing}. Received: "
            f"keys={sorted(parts)}"
        )
    layers = parts["layers"]
    if not isinstance(layers, (list, tuple)) or len(layers) != len(names):
        raise LossCallError(
            f"the {port.name} loss must return one entry of `layers` per layer "
            f"({len(names)}). Received: layers={type(layers).__name__} of "
            f"{len(layers) if isinstance(layers, (list, tuple)) else 'no'} entries"
        )
    for i, part in enumerate(layers):
        bad = [k for k in _LAYER_KEYS if not isinstance(part.get(k), torch.Tensor)]
        if not isinstance(part, dict) or bad:
            raise LossCallError(
                f"the {port.name} loss's layers[{i}] must hold tensors {bad}. "
                f"Received: {type(part).__name__}"
            )
    for k in ("probabilities", "difference", "top_k_index"):
        if not isinstance(parts[k], torch.Tensor):
            raise LossCallError(
                f"the {port.name} loss's {k!r} must be a tensor. "
                f"Received: {type(parts[k]).__name__}"
            )
    out = {"top_k_index": _decision(parts["top_k_index"])}
    for name, part in zip(names, layers, strict=True):
        out[f"clip_branch/{name}"] = _decision(part["clip_branch"])
    out["probabilities"] = _np(parts["probabilities"])
    out["difference"] = _np(parts["difference"])
    for name, part in zip(names, layers, strict=True):
        grad = neutral.activation_to_neutral(_np(part["gradient"]))
        for k in range(grad.shape[0]):
            out[f"gradient/{name}/k{k}"] = grad[k]
        out[f"grad_norm/{name}"] = _np(part["grad_norm"])
        out[f"distance/{name}"] = _np(part["distance"])
        out[f"layer_loss/{name}"] = _np(part["loss"])
    return out


def forward(port, cfg, weights, x_nhwc, device="cpu"):
    """Builds the model and runs it; returns ``(model, x, logits, endpoints)``."""
    dtype = torch_dtype(cfg.dtype)
    model = port.build_model(cfg.arch, weights, dtype=dtype, device=device)
    model.train(cfg.training)
    x = torch.from_numpy(neutral.activation_to_nchw(x_nhwc)).to(device, dtype)
    x.requires_grad_(True)
    logits, endpoints = model(x)
    return model, x, logits, endpoints


def quantities(cfg, weights, x_nhwc, labels, port=None, device="cpu"):
    """Every compared quantity of the PyTorch side, neutral layout, numpy.

    Args:
        cfg: the `Config`.
        weights: neutral weight set.
        x_nhwc: ``[B, H, W, 1]`` inputs.
        labels: ``[B]`` class indices.
        port: the `Port` under test; the built-in port if None.
        device: PyTorch device.

    Returns:
        A dict of quantity name -> array. Loss internals are present only when
        the port's loss returns them.
    """
    port = port or Port()
    model, x, logits, endpoints = forward(port, cfg, weights, x_nhwc, device)
    layers = [x if name == "input" else endpoints[name] for name in cfg.layers]
    sizes = config_lib.layer_sizes([tuple(t.shape) for t in layers])
    kwargs = cfg.loss_kwargs(sizes)
    one_hot = F.one_hot(torch.from_numpy(labels).to(device), logits.shape[1])
    one_hot = one_hot.to(logits.dtype)

    # The input as the network saw it, brought back to NHWC by the shared code.
    out = {"input": neutral.activation_to_neutral(_np(x)), "logits": _np(logits)}
    for name, t in endpoints.items():
        out[f"activation/{name}"] = neutral.activation_to_neutral(_np(t))
    try:
        out.update(_loss_rows(port, cfg, model, x, logits, one_hot, layers, kwargs))
    except LossCallError as e:
        # The forward rows can still be compared; the loss rows cannot.
        out[ERROR_KEY] = str(e)
    except Exception as e:  # what a port returned broke the loss rows
        out[ERROR_KEY] = f"the {port.name} loss's result: {type(e).__name__}: {e}"
    return out


def _loss_rows(port, cfg, model, x, logits, one_hot, layers, kwargs):
    def call(layer_list, **overrides):
        # A copy of the list: a port that mutates it must not break the harness.
        return _call_loss(
            port,
            dict(
                logits=logits,
                one_hot_labels=one_hot,
                layers_list=list(layer_list),
                **{**kwargs, **overrides},
            ),
        )

    parts = call(layers)
    loss = parts["loss"]
    params = [(n, p) for n, p in model.named_parameters()]
    # Gradients are read as a training loop reads them, from .grad after
    # backward(): a loss that itself writes into the parameters' .grad
    # (per-class gradients taken with .backward()) shows in loss_gradient.
    inputs = [x] + [p for _, p in params]
    if not loss.requires_grad:
        raise LossCallError(
            f"the {port.name} loss has no graph back to the network: it cannot be "
            "differentiated. Received: a loss tensor with requires_grad=False"
        )
    # retain_graph: a plug-in's per-layer losses are computed below.
    loss.backward(inputs=inputs, retain_graph=True)
    # Unused inputs get no .grad: their gradient is zero, as tf.gradients'
    # None is read on the TensorFlow side.
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in inputs]

    out = {}
    if isinstance(parts, dict) and len(parts) > 1:
        out.update(_internals(port, parts, cfg.layers))
    else:
        # A plug-in that returns only its loss: each layer's loss from a call
        # with that layer alone (the total is the mean over layers).
        for i, name in enumerate(cfg.layers):
            single = {}
            if kwargs["layers_weights"] is not None:
                single["layers_weights"] = [kwargs["layers_weights"][i]]
            out[f"layer_loss/{name}"] = _np(call([layers[i]], **single)["loss"])
    out["loss"] = _np(loss)

    out["loss_gradient/input"] = neutral.activation_to_neutral(_np(grads[0]))
    by_key = {n: _np(g) for (n, _), g in zip(params, grads[1:], strict=True)}
    for name, g in neutral.torch_to_neutral(cfg.arch, by_key).items():
        out[f"loss_gradient/{name}"] = g
    return out
