"""The reference networks as standard ONNX models, and an onnxruntime forward.

`export` builds the graph with `onnx.helper` from a neutral weight set
(`parity.weights`). It is a third, independent statement of the forward pass:
neither TensorFlow nor PyTorch is involved in building or running it.

Layout choices, which `fixtures/README.md` repeats for porters:

- The graph input ``input`` is NCHW ``[batch, 1, height, width]``, as ONNX
  expects. Endpoint outputs are NCHW too (``conv_layer0``, ``conv_layer1``) or
  ``[batch, units]`` (``fc_layer0``); `run` returns them NHWC, the neutral
  layout, so that they compare directly with the fixtures.
- The initializers are exactly the neutral weights, under their neutral
  names, in the neutral layout (with ``batch_norm="train"`` without the moving
  statistics, which that graph does not read); shapes and epsilons are
  ``Constant`` nodes. Convolution kernels stay HWIO and a ``Transpose`` node
  turns them into ONNX's OIHW; dense kernels stay ``[in, out]`` and feed
  ``MatMul``.
- The reference flattens in NHWC order, so the graph transposes the last
  feature map to NHWC before its ``Reshape``: the first dense kernel keeps the
  reference's row order.
- Batch norm: with ``batch_norm="eval"`` a ``BatchNormalization`` node with the
  moving statistics; with ``batch_norm="train"`` the batch statistics are
  computed in the graph (``ReduceMean`` of the batch, biased variance), which
  is what the reference's training-mode forward does. The moving-statistics
  update is not part of either graph.
- The model is float32. onnxruntime's CPU provider has no float64 ``Conv``
  kernel, and a model that its most common runtime cannot load would help no
  porter. The fixtures' weights and inputs are chosen float32-representable,
  so the float32 initializers hold exactly the fixture's weights; only the
  arithmetic is float32, and `parity.fixtures` compares the onnxruntime
  outputs with the float32 tolerances.
"""

import numpy as np

from parity import __version__
from parity import weights as neutral

__all__ = ["BN_EPSILON", "OPSET", "export", "output_names", "run"]

OPSET = 17
# IR version 8 is the one that goes with opset 17; older runtimes load it.
IR_VERSION = 8
# The reference's batch-norm epsilon (REFERENCE.md section 2).
BN_EPSILON = 1e-5


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self, helper, numpy_helper):
        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes = []
        self.initializers = []
        self._count = 0

    def weight(self, name, array):
        """An initializer: the graph's weights and nothing else."""
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def constant(self, name, array):
        """A ``Constant`` node, for shapes and epsilons that are not weights."""
        tensor = self.numpy_helper.from_array(np.asarray(array), name)
        self.nodes.append(
            self.helper.make_node("Constant", [], [name], name=name, value=tensor)
        )
        return name

    def node(self, op, inputs, output=None, **attributes):
        self._count += 1
        output = output or f"{op.lower()}_{self._count}"
        self.nodes.append(
            self.helper.make_node(
                op, inputs, [output], name=f"{op}_{self._count}", **attributes
            )
        )
        return output


def _oihw(g, kernel_name):
    # Neutral HWIO [kh, kw, in, out] -> ONNX OIHW [out, in, kh, kw].
    return g.node("Transpose", [kernel_name], perm=[3, 2, 0, 1])


def _batch_norm(g, h, prefix, training, channels):
    gamma, beta = f"{prefix}/batch_norm/gamma", f"{prefix}/batch_norm/beta"
    if not training:
        return g.node(
            "BatchNormalization",
            [
                h,
                gamma,
                beta,
                f"{prefix}/batch_norm/moving_mean",
                f"{prefix}/batch_norm/moving_variance",
            ],
            epsilon=BN_EPSILON,
        )
    # Training mode: statistics of this batch over [batch, height, width],
    # the biased variance, as the reference normalises.
    mean = g.node("ReduceMean", [h], axes=[0, 2, 3], keepdims=1)  # [1, C, 1, 1]
    centered = g.node("Sub", [h, mean])
    var = g.node(
        "ReduceMean", [g.node("Mul", [centered, centered])], axes=[0, 2, 3], keepdims=1
    )
    eps = g.constant(f"{prefix}/batch_norm/epsilon", np.array(BN_EPSILON, np.float32))
    std = g.node("Sqrt", [g.node("Add", [var, eps])])
    shape = g.constant(
        f"{prefix}/batch_norm/channel_shape", np.array([1, channels, 1, 1], np.int64)
    )
    scale = g.node("Reshape", [gamma, shape])
    offset = g.node("Reshape", [beta, shape])
    return g.node(
        "Add", [g.node("Mul", [g.node("Div", [centered, std]), scale]), offset]
    )


def output_names(arch):
    """The graph's output names: ``logits`` then the endpoints."""
    return ("logits",) + tuple(neutral.ARCHITECTURES[arch]["endpoints"])


def export(arch, weights, *, batch_norm="eval", input_size=None, num_classes=None):
    """The network of `arch` with `weights` as an ONNX model (float32, NCHW).

    Args:
        arch: ``"mnist"`` or ``"toy"``.
        weights: neutral weight set; cast to float32.
        batch_norm: ``"eval"`` (moving statistics) or ``"train"`` (batch
            statistics computed in the graph).
        input_size: the input's height and width; read off the weights for
            ``"mnist"`` if None, 12 for ``"toy"``.
        num_classes: read off ``logits/bias`` if None.

    Returns:
        An `onnx.ModelProto` that passes `onnx.checker.check_model`.

    Raises:
        ValueError: if `arch`, `batch_norm` or the weights are invalid.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if arch not in neutral.ARCHITECTURES:
        raise ValueError(
            f"`arch` must be one of {sorted(neutral.ARCHITECTURES)}. "
            f"Received: arch={arch!r}"
        )
    if batch_norm not in ("train", "eval"):
        raise ValueError(
            "`batch_norm` must be 'train' or 'eval'. "
            f"Received: batch_norm={batch_norm!r}"
        )
    table = neutral.ARCHITECTURES[arch]["params"]
    if set(weights) != set(table):
        raise ValueError(
            f"weights for {arch!r} must be exactly {sorted(table)}. Received: "
            f"missing={sorted(set(table) - set(weights))}, "
            f"unknown={sorted(set(weights) - set(table))}"
        )
    num_classes = num_classes or int(np.asarray(weights["logits/bias"]).shape[0])

    g = _Graph(helper, numpy_helper)
    for name, (kind, _) in table.items():
        if kind == "moving" and batch_norm == "train":
            continue  # batch statistics replace them; an unused input would warn
        g.weight(name, np.asarray(weights[name], np.float32))

    outputs = {}
    if arch == "toy":
        size = input_size or neutral.ARCHITECTURES["toy"]["input_size"]
        w = _oihw(g, "conv_layer0/kernel")
        # 3x3 "same": one pixel each side.
        h = g.node("Conv", ["input", w, "conv_layer0/bias"], pads=[1, 1, 1, 1])
        outputs["conv_layer0"] = g.node("Relu", [h], "conv_layer0")
        pooled = g.node(
            "ReduceMean", ["conv_layer0"], axes=[2, 3], keepdims=0
        )  # [B, 8]
        shapes = {"conv_layer0": ["batch", 8, size, size]}
    else:
        rows = np.asarray(weights["fc_layer0/kernel"]).shape[0]
        size = input_size or int(round((rows / 64) ** 0.5)) * 4
        training = batch_norm == "train"
        h = "input"
        shapes = {}
        side = size
        for i, channels in enumerate((32, 64)):
            prefix = f"conv_layer{i}"
            # 5x5 "same" without bias: two pixels each side.
            h = g.node("Conv", [h, _oihw(g, f"{prefix}/kernel")], pads=[2, 2, 2, 2])
            # The reference applies ReLU twice; kept so the graph reads as it.
            h = g.node("Relu", [g.node("Relu", [h])])
            h = g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
            side //= 2
            bn = _batch_norm(g, h, prefix, training, channels)
            h = g.node("Identity", [bn], prefix)
            shapes[prefix] = ["batch", channels, side, side]
        # NCHW [B, 64, h, w] -> NHWC [B, h, w, 64] -> [B, h*w*64], the
        # reference's flatten order, so fc_layer0/kernel keeps its rows.
        nhwc = g.node("Transpose", [h], perm=[0, 2, 3, 1])
        flat_shape = g.constant("flatten_shape", np.array([0, -1], np.int64))
        flat = g.node("Reshape", [nhwc, flat_shape])
        fc = g.node(
            "Add", [g.node("MatMul", [flat, "fc_layer0/kernel"]), "fc_layer0/bias"]
        )
        g.node("Relu", [fc], "fc_layer0")
        pooled = "fc_layer0"
        shapes["fc_layer0"] = ["batch", 512]
    g.node(
        "Add", [g.node("MatMul", [pooled, "logits/kernel"]), "logits/bias"], "logits"
    )
    shapes["logits"] = ["batch", num_classes]

    graph = helper.make_graph(
        g.nodes,
        f"{arch}_net_bn_{batch_norm}" if arch == "mnist" else f"{arch}_net",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", 1, size, size]
            )
        ],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n])
            for n in output_names(arch)
        ],
        g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="parity.onnx_export",
        producer_version=__version__,
        doc_string=(
            f"{arch} network of the large-margin parity harness, batch norm "
            f"{batch_norm}. Input NCHW float32; endpoint outputs NCHW; "
            "initializers are the neutral weights (HWIO conv kernels, [in, out] "
            "dense kernels, NHWC flatten order)."
        ),
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, x_nhwc):
    """Runs `model` on onnxruntime's CPU provider.

    Args:
        model: an `onnx.ModelProto`, serialized bytes, or a path.
        x_nhwc: ``[batch, height, width, 1]`` inputs (any float dtype).

    Returns:
        A dict ``{"logits": ..., "activation/<endpoint>": ...}`` of float64
        arrays, endpoints in the neutral NHWC layout.
    """
    import onnxruntime

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        model, sess_options=options, providers=["CPUExecutionProvider"]
    )
    x = neutral.activation_to_nchw(np.asarray(x_nhwc, np.float32))
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"input": x})
    out = {}
    for name, value in zip(names, values, strict=True):
        key = "logits" if name == "logits" else f"activation/{name}"
        out[key] = neutral.activation_to_neutral(value).astype(np.float64)
    return out
