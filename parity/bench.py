"""``python -m parity.bench``: the speed of one training step, side by side.

Times one full training step of the reference network (forward, loss,
backward, gradient clipping, TF1 RMSProp update, batch-norm moving
statistics) for:

- the PyTorch port (`torch_impl.large_margin`), approximate and exact mode;
- the TensorFlow reference (`tf_impl.large_margin`) in one `tf.function`,
  approximate and exact mode;
- a cross-entropy step of the same network in each framework, the floor;
- a naive per-example port (`parity.naive`) at a small batch, and once at the
  full batch, for contrast.

The margin configuration is the reference's (REFERENCE.md section 3): layers
input, conv_layer0 and conv_layer1, dist_norm inf, layer weights the
per-example sizes, gamma 1e4, alpha 4, epsilon 1e-6, top_k 1, batch norm in
training mode. The step's loss is ``margin + 5e-4 * L2`` (the cross-entropy
step: ``cross-entropy + 5e-4 * L2``); the reference's ``0 * cross-entropy``
term is left out of both so that the two steps differ by the loss alone.
Weights come from `parity.weights.init_weights` and the data is a seeded
uniform batch; timing does not depend on the values.

Each case runs in a process of its own, with the same number of threads in
every framework (PyTorch intra- and inter-op, TensorFlow intra- and inter-op).
After a warm-up, the parent asks the cases for one step each in turn, round
after round, so that a change of load on the machine falls on every case
alike and the ratios hold. Reported per case: median wall time per step,
quartiles, min and max, median process CPU time (all threads), time per
example, and peak memory. Peak memory on the CPU is the growth of the
process's resident set (Linux ``VmHWM`` after the steps minus ``VmRSS``
before the first one, with the high-water mark reset in between through
``/proc/self/clear_refs``): everything the step made the process hold at
once, allocator caches included, and for TensorFlow the first step's graph
building too. On a GPU it is `torch.cuda.max_memory_allocated` above the
memory allocated before the first step.

The command prints ``key value`` lines per case, then a table; ``--json``
writes every number.
"""

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import sys
import time

import numpy as np

from parity import config as config_lib
from parity import report
from parity import weights as weights_lib

__all__ = ["CASES", "Case", "main", "run_bench", "summarize"]

ARCH = "mnist"
NUM_CLASSES = 10
L2_WEIGHT = 5e-4
CLIP_NORM = 5.0
LEARNING_RATE = 0.1
RMS_DECAY = 0.9
RMS_MOMENTUM = 0.0
RMS_EPSILON = 1e-2
BN_DECAY = 0.9


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed step.

    Attributes:
        name: the key in the report.
        framework: ``"torch"``, ``"tf"`` or ``"naive"`` (PyTorch, `parity.naive`).
        mode: ``"approx"``, ``"exact"`` or ``"xent"`` (cross-entropy only).
        batch: ``"full"`` (``--batch-size``) or ``"naive"`` (``--naive-batch``).
    """

    name: str
    framework: str
    mode: str
    batch: str = "full"


CASES = (
    Case("torch_approx", "torch", "approx"),
    Case("torch_exact", "torch", "exact"),
    Case("torch_xent", "torch", "xent"),
    Case("tf_approx", "tf", "approx"),
    Case("tf_exact", "tf", "exact"),
    Case("tf_xent", "tf", "xent"),
    Case("naive_approx", "naive", "approx", batch="naive"),
    Case("naive_approx_full", "naive", "approx", batch="full"),
)


TORCH_LAYOUTS = ("nchw", "channels_last")


def _torch_input(x_nhwc, layout):
    """The NHWC batch as a PyTorch NCHW tensor held in `layout` (TORCH_LAYOUTS).

    A 1-channel NCHW view of NHWC data has the strides of both layouts, and
    convolution answers it in channels_last. The layout is chosen here, not
    left to that accident (see --torch-layout).
    """
    import torch

    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    x = torch.from_numpy(weights_lib.activation_to_nchw(x_nhwc))
    return x.clone(memory_format=formats[layout])


def _margin_config(mode):
    return config_lib.Config(exact=mode == "exact")


def _synthetic(batch_size, input_size, seed):
    """A seeded batch: NHWC images uniform in [0, 1) and class indices."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, input_size, input_size, 1))
    labels = rng.integers(0, NUM_CLASSES, size=batch_size)
    return x, labels


# --- Memory -----------------------------------------------------------------


def _proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _CpuMemory:
    def start(self):
        self.reset = _reset_peak_rss()
        self.before_kib = _proc_status_kib("VmRSS")

    def result(self):
        peak = _proc_status_kib("VmHWM")
        if peak is None or self.before_kib is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            method = "ru_maxrss (process lifetime peak, including imports)"
            return {"peak_mib": peak / 1024, "peak_delta_mib": None, "method": method}
        method = "VmHWM - VmRSS before the first step" + (
            "" if self.reset else " (high-water mark not reset: includes set-up)"
        )
        return {
            "peak_mib": peak / 1024,
            "peak_delta_mib": (peak - self.before_kib) / 1024,
            "method": method,
        }


class _CudaMemory:
    def __init__(self, torch):
        self.torch = torch

    def start(self):
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        self.before = self.torch.cuda.memory_allocated()

    def result(self):
        peak = self.torch.cuda.max_memory_allocated()
        return {
            "peak_mib": peak / 2**20,
            "peak_delta_mib": (peak - self.before) / 2**20,
            "method": "torch.cuda.max_memory_allocated - memory_allocated before",
        }


# --- Steps ------------------------------------------------------------------


def _torch_step(case, opts, batch_size):
    """Builds one PyTorch training step; returns ``(step, sync, memory, info)``."""
    import torch
    import torch.nn.functional as F

    import torch_impl
    from parity import naive
    from torch_impl.optim import TF1RMSProp
    from torch_impl.train import clip_by_global_norm

    torch.set_num_threads(opts["threads"])
    if torch.get_num_interop_threads() != opts["threads"]:
        # Allowed once per process, before any inter-op work.
        torch.set_num_interop_threads(opts["threads"])
    device = torch.device(opts["device"])
    dtype = {"float32": torch.float32, "float64": torch.float64}[opts["dtype"]]

    neutral = weights_lib.init_weights(
        ARCH, input_size=opts["input_size"], seed=opts["seed"]
    )
    model = torch_impl.build_model(
        ARCH, neutral, dtype=dtype, device=device, input_size=opts["input_size"]
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = TF1RMSProp(
        params,
        lr=LEARNING_RATE,
        decay=RMS_DECAY,
        momentum=RMS_MOMENTUM,
        epsilon=RMS_EPSILON,
    )
    x_nhwc, labels_np = _synthetic(batch_size, opts["input_size"], opts["seed"])
    x = _torch_input(x_nhwc, opts["torch_layout"]).to(device, dtype)
    labels = torch.from_numpy(labels_np).to(device)
    one_hot = F.one_hot(labels, NUM_CLASSES).to(dtype)

    if case.mode != "xent":
        cfg = _margin_config(case.mode)
        # The input is a margin layer: its gradient is part of the loss.
        x.requires_grad_(True)
        loss_fn = naive.large_margin if case.framework == "naive" else None
        loss_fn = loss_fn or torch_impl.large_margin

    def step():
        logits, endpoints = model(x)
        if case.mode == "xent":
            loss = F.cross_entropy(logits, labels)
        else:
            layers = [x if n == "input" else endpoints[n] for n in cfg.layers]
            sizes = config_lib.layer_sizes([tuple(t.shape) for t in layers])
            loss = loss_fn(
                logits=logits,
                one_hot_labels=one_hot,
                layers_list=layers,
                **cfg.loss_kwargs(sizes),
            )
        l2 = sum((p * p).sum() for p in params) / 2
        total = loss + L2_WEIGHT * l2
        grads = torch.autograd.grad(total, params)
        for p, g in zip(params, clip_by_global_norm(grads, CLIP_NORM), strict=True):
            p.grad = g
        optimizer.step()
        return total

    if device.type == "cuda":

        def sync(_):
            torch.cuda.synchronize()

        memory = _CudaMemory(torch)
    else:

        def sync(_):
            pass

        memory = _CpuMemory()
    info = {
        "framework_version": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "layout": opts["torch_layout"],
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }
    return step, sync, memory, info


def _tf_step(case, opts, batch_size):
    """Builds one TensorFlow training step; returns ``(step, sync, memory, info)``."""
    import tensorflow as tf

    import tf_impl

    tf.config.threading.set_intra_op_parallelism_threads(opts["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(opts["threads"])
    dtype = {"float32": tf.float32, "float64": tf.float64}[opts["dtype"]]

    neutral = weights_lib.init_weights(
        ARCH, input_size=opts["input_size"], seed=opts["seed"]
    )
    model = tf_impl.ReferenceNet(ARCH, neutral, dtype)
    variables = model.trainable
    optimizer = tf.compat.v1.train.RMSPropOptimizer(
        learning_rate=tf.constant(LEARNING_RATE, dtype),
        decay=tf.constant(RMS_DECAY, dtype),
        momentum=tf.constant(RMS_MOMENTUM, dtype),
        epsilon=tf.constant(RMS_EPSILON, dtype),
    )
    x_nhwc, labels_np = _synthetic(batch_size, opts["input_size"], opts["seed"])
    x = tf.constant(x_nhwc, dtype)
    labels = tf.constant(labels_np, tf.int64)
    cfg = _margin_config(case.mode)

    @tf.function(autograph=False)
    def train_step(x, labels):
        logits, endpoints, updates = model.forward(x, training=True)
        one_hot = tf.one_hot(labels, NUM_CLASSES, dtype=dtype)
        if case.mode == "xent":
            loss = tf.reduce_mean(
                tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)
            )
        else:
            layers = [x if n == "input" else endpoints[n] for n in cfg.layers]
            sizes = config_lib.layer_sizes([t.shape.as_list() for t in layers])
            loss = tf_impl.large_margin(
                logits=logits,
                one_hot_labels=one_hot,
                layers_list=layers,
                **cfg.loss_kwargs(sizes),
            )
        l2 = tf.add_n([tf.nn.l2_loss(v) for v in variables])
        total = loss + L2_WEIGHT * l2
        grads = tf.gradients(total, variables)
        clipped, _ = tf.clip_by_global_norm(grads, CLIP_NORM)
        moving = [m.assign_sub((m - b) * (1.0 - BN_DECAY)) for m, b in updates]
        with tf.control_dependencies(moving):
            train_op = optimizer.apply_gradients(zip(clipped, variables, strict=True))
        with tf.control_dependencies([train_op]):
            return tf.identity(total)

    def step():
        return train_step(x, labels)

    def sync(total):
        # Reading the result waits for the whole step (the update runs first).
        total.numpy()

    gpus = tf.config.list_physical_devices("GPU")
    info = {
        "framework_version": tf.__version__,
        "device": "GPU:0" if gpus else "CPU",
        "threads": opts["threads"],
        "interop_threads": opts["threads"],
        "compiled": "tf.function(autograph=False), graph mode, no XLA",
    }
    return step, sync, _CpuMemory(), info


def _worker(conn, cases, opts):
    """Runs `cases` (one framework) in this process, on the parent's commands.

    Memory is measured per case over its first command (the warm-up steps,
    or the first timed step without warm-up), with the high-water mark reset
    just before; cases sharing a process run their first commands one after
    the other, so the measurements do not overlap.
    """
    threads = str(opts["threads"])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = threads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        built = {}
        infos = {}
        for case in cases:
            batch_size = opts["batch_size"]
            if case.batch == "naive":
                batch_size = opts["naive_batch"]
            t0 = time.perf_counter()
            build = _tf_step if case.framework == "tf" else _torch_step
            step, sync, memory, info = build(case, opts, batch_size)
            info["batch_size"] = batch_size
            info["setup_s"] = time.perf_counter() - t0
            built[case.name] = (step, sync, memory)
            infos[case.name] = info
        conn.send(("ready", infos))
        measured = {}
        while True:
            command, name, n = conn.recv()
            if command == "stop":
                conn.send(("memory", measured))
                return
            step, sync, memory = built[name]
            if command == "profile":
                conn.send(("profile", _profile(step, sync, n, name)))
                continue
            first = name not in measured
            if first:
                memory.start()
            times = []
            for _ in range(n):
                wall, cpu = time.perf_counter(), time.process_time()
                sync(step())
                times.append((time.perf_counter() - wall, time.process_time() - cpu))
            if first:
                measured[name] = memory.result()
            conn.send(("times", times))
    except Exception as e:  # sent to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _profile(step, sync, n, name):
    """A `torch.profiler` table of `n` steps, by self CPU time; None for TF."""
    if name.startswith("tf_"):
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(n):
            sync(step())
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=45
    )
    return f"{n} steps of {name}, grouped by input shape\n{table}"


class _Runner:
    """The parent's handle on one worker process and its cases."""

    def __init__(self, context, cases, opts):
        self.names = [c.name for c in cases]
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker, args=(child, list(cases), opts), daemon=True
        )
        self.process.start()
        child.close()

    def _receive(self, expected):
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the process of {self.names} ended without an answer "
                f"(exit code {self.process.exitcode})"
            ) from None
        if kind == "error":
            raise RuntimeError(f"cases {self.names} failed: {payload}")
        if kind != expected:
            raise RuntimeError(f"cases {self.names}: got {kind}, not {expected}")
        return payload

    def ready(self):
        return self._receive("ready")

    def run(self, name, n):
        self.conn.send(("run", name, n))
        return self._receive("times")

    def profile(self, name, n):
        self.conn.send(("profile", name, n))
        return self._receive("profile")

    def stop(self):
        self.conn.send(("stop", None, 0))
        result = self._receive("memory")
        self.process.join(timeout=60)
        return result

    def kill(self):
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)


# --- Orchestration and statistics --------------------------------------------


def _stats(times, per):
    wall = np.array([t[0] for t in times])
    cpu = np.array([t[1] for t in times])
    q1, median, q3 = np.percentile(wall, [25, 50, 75])
    return {
        "repeats": len(times),
        "median_s": float(median),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "min_s": float(wall.min()),
        "max_s": float(wall.max()),
        "cpu_median_s": float(np.median(cpu)),
        "per_example_s": float(median / per),
        "times_s": [float(t) for t in wall],
        "cpu_times_s": [float(t) for t in cpu],
    }


def _selected_cases(names, naive_full_repeats):
    cases = [c for c in CASES if names is None or c.name in names]
    if naive_full_repeats == 0:
        cases = [c for c in cases if c.name != "naive_approx_full"]
    return cases


def _groups(cases, isolate):
    if isolate == "case":
        return [[c] for c in cases]
    by_framework = {}
    for c in cases:
        key = "tf" if c.framework == "tf" else "torch"
        by_framework.setdefault(key, []).append(c)
    return list(by_framework.values())


def run_bench(opts, *, cases=None, isolate="case", progress=None):
    """Runs every case and returns the results (no printing).

    Args:
        opts: dict with ``device``, ``dtype``, ``threads``, ``batch_size``,
            ``input_size``, ``naive_batch``, ``seed``, ``warmup``, ``repeats``,
            ``naive_full_repeats`` and optionally ``profile_steps``.
        cases: the `Case` list; all of `CASES` if None.
        isolate: ``"case"``: a process per case (clean memory figures);
            ``"framework"``: one process per framework (faster to start; a
            case's memory figure can then be lowered by memory an earlier
            case left in the allocator).
        progress: optional callable ``(done, total)`` called after each
            round.

    Returns:
        A dict with ``options``, ``machine``, ``cases`` (name -> dict of
        set-up information, timing statistics and memory) and ``profiles``
        (PyTorch case name -> profiler table, when ``opts["profile_steps"]``).

    Raises:
        ValueError: if `isolate` is not ``"case"`` or ``"framework"``.
        RuntimeError: if a case fails in its process.
    """
    if isolate not in ("case", "framework"):
        raise ValueError(
            f"`isolate` must be 'case' or 'framework'. Received: isolate={isolate!r}"
        )
    cases = list(CASES if cases is None else cases)
    context = multiprocessing.get_context("spawn")
    runners = [_Runner(context, group, opts) for group in _groups(cases, isolate)]
    owner = {name: r for r in runners for name in r.names}
    results = {}
    try:
        infos = {}
        for r in runners:
            infos.update(r.ready())
        for case in cases:
            results[case.name] = {"case": dataclasses.asdict(case), **infos[case.name]}
        times = {case.name: [] for case in cases}
        main = [c.name for c in cases if c.name != "naive_approx_full"]
        full = [c.name for c in cases if c.name == "naive_approx_full"]
        if opts["warmup"]:
            for name in main:
                owner[name].run(name, opts["warmup"])
        rounds = opts["repeats"]
        for i in range(rounds):
            # Rotate the order so that no case always follows the same one.
            shift = i % max(len(main), 1)
            for name in main[shift:] + main[:shift]:
                times[name].extend(owner[name].run(name, 1))
            if progress:
                progress(i + 1, rounds)
        for name in full:
            # At the full batch the naive step takes B x K backward passes:
            # one warm-up step at most, then its own repeats.
            if opts["warmup"]:
                owner[name].run(name, 1)
            times[name].extend(owner[name].run(name, opts["naive_full_repeats"]))
        profiles = {}
        if opts.get("profile_steps"):
            # After the timed rounds, so that profiling slows no timed step.
            for name in main:
                table = owner[name].profile(name, opts["profile_steps"])
                if table is not None:
                    profiles[name] = table
        for r in runners:
            for name, memory in r.stop().items():
                results[name]["memory"] = memory
        for case in cases:
            res = results[case.name]
            res.update(_stats(times[case.name], res["batch_size"]))
    finally:
        for r in runners:
            r.kill()
    return {
        "options": dict(opts, isolate=isolate),
        "machine": _machine(),
        "cases": results,
        "profiles": profiles,
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine():
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


_SAME_FRAMEWORK_XENT = {"torch": "torch_xent", "tf": "tf_xent", "naive": "torch_xent"}


def _tf_counterpart(case):
    return "tf_xent" if case["mode"] == "xent" else f"tf_{case['mode']}"


def summarize(results):
    """Adds ratios and the issue's targets to `results`, in place; returns it.

    Ratios are of times per example (equal to ratios per step at equal batch
    sizes): ``ratio_to_xent`` against the same framework's cross-entropy step
    (PyTorch's for the naive port), ``ratio_to_tf`` against the TensorFlow
    step of the same mode.
    """
    cases = results["cases"]
    for res in cases.values():
        case = res["case"]
        xent = cases.get(_SAME_FRAMEWORK_XENT[case["framework"]])
        tf_ref = cases.get(_tf_counterpart(case))
        per = res["per_example_s"]
        res["ratio_to_xent"] = per / xent["per_example_s"] if xent else None
        res["ratio_to_tf"] = per / tf_ref["per_example_s"] if tf_ref else None

    def ratio(a, b):
        if a in cases and b in cases:
            return cases[a]["per_example_s"] / cases[b]["per_example_s"]
        return None

    naive = "naive_approx_full" if "naive_approx_full" in cases else "naive_approx"
    targets = [
        ("approx_vs_own_xent", ratio("torch_approx", "torch_xent"), "<=", 1.5),
        ("torch_vs_tf_approx", ratio("torch_approx", "tf_approx"), "<=", 1.0),
        ("torch_vs_tf_exact", ratio("torch_exact", "tf_exact"), "<=", 1.0),
        (f"{naive}_vs_torch_approx", ratio(naive, "torch_approx"), ">=", 20.0),
    ]
    results["targets"] = {
        name: {
            "value": value,
            "bound": f"{op} {bound}",
            "met": None
            if value is None
            else (value <= bound if op == "<=" else value >= bound),
        }
        for name, value, op, bound in targets
    }
    return results


def format_table(results):
    """The short table: time per step, per example, and the two ratios."""
    header = (
        f"{'case':<18} {'batch':>5} {'step ms':>9} {'IQR ms':>15} "
        f"{'per ex ms':>9} {'x xent':>7} {'x TF':>6} {'peak MiB':>9}"
    )
    lines = [header, "-" * len(header)]
    for name, res in results["cases"].items():
        iqr = f"{res['q1_s'] * 1e3:.1f}-{res['q3_s'] * 1e3:.1f}"
        peak = res["memory"]["peak_delta_mib"]
        peak = "-" if peak is None else f"{peak:.0f}"
        xent, tf_ratio = (
            _fmt_ratio(res["ratio_to_xent"]),
            _fmt_ratio(res["ratio_to_tf"]),
        )
        lines.append(
            f"{name:<18} {res['batch_size']:>5} {res['median_s'] * 1e3:>9.1f} "
            f"{iqr:>15} {res['per_example_s'] * 1e3:>9.3f} "
            f"{xent:>7} {tf_ratio:>6} {peak:>9}"
        )
    lines.append("")
    for name, t in results["targets"].items():
        met = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"target {name} {value} (want {t['bound']}): {met}")
    return "\n".join(lines)


def _fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}"


def _key_value_lines(results):
    lines = []
    opts = results["options"]
    machine = results["machine"]
    lines.append(f"machine.cpu {machine['cpu']}")
    lines.append(f"machine.cores {machine['cores']}")
    lines.append(f"threads {opts['threads']}")
    lines.append(f"dtype {opts['dtype']}")
    lines.append(f"torch_layout {opts['torch_layout']}")
    for name, res in results["cases"].items():
        for key in (
            "framework_version",
            "device",
            "threads",
            "batch_size",
            "setup_s",
            "repeats",
            "median_s",
            "q1_s",
            "q3_s",
            "min_s",
            "max_s",
            "cpu_median_s",
            "per_example_s",
            "ratio_to_xent",
            "ratio_to_tf",
        ):
            value = res.get(key)
            if isinstance(value, float):
                value = f"{value:.6g}"
            lines.append(f"{name}.{key} {value}")
        mem = res["memory"]
        delta = mem["peak_delta_mib"]
        lines.append(
            f"{name}.peak_delta_mib {'-' if delta is None else f'{delta:.1f}'}"
        )
        lines.append(f"{name}.peak_rss_mib {mem['peak_mib']:.1f}")
    return lines


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m parity.bench",
        description="Time one training step of the PyTorch port, the TensorFlow "
        "reference, their cross-entropy floors and a naive per-example port, "
        "side by side.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--json", metavar="PATH", help="write every number here")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--input-size", type=int, default=28)
    p.add_argument(
        "--naive-batch", type=int, default=8, help="batch of the naive port's rounds"
    )
    p.add_argument(
        "--naive-full-repeats",
        type=int,
        default=1,
        help="steps of the naive port at --batch-size after the rounds (0: skip)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per framework (PyTorch intra/inter-op, TensorFlow "
        "intra/inter-op); default: the CPUs this process may use",
    )
    p.add_argument(
        "--cases",
        default=None,
        help=f"comma list, a subset of {','.join(c.name for c in CASES)}",
    )
    p.add_argument(
        "--isolate",
        choices=("case", "framework"),
        default="case",
        help="a process per case (default; clean memory figures) or per framework "
        "(starts faster)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the rounds, profile 2 steps of each PyTorch case with "
        "torch.profiler and write DIR/<case>.txt",
    )
    p.add_argument(
        "--torch-layout",
        choices=TORCH_LAYOUTS,
        default="nchw",
        help="memory layout of the PyTorch input batch: nchw (PyTorch's default, "
        "as a torchvision pipeline gives it) or channels_last (NHWC in memory, "
        "as TensorFlow holds it; the network then runs channels_last)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def _options(args):
    for name in ("repeats", "batch_size", "input_size", "naive_batch"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be at least 1. Received: {value}"
            )
    for name in ("warmup", "naive_full_repeats"):
        value = getattr(args, name)
        if value < 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be at least 0. Received: {value}"
            )
    if args.input_size % 4:
        raise ValueError(
            "--input-size must be a multiple of 4 (two 2x2 poolings). "
            f"Received: {args.input_size}"
        )
    threads = args.threads or _machine()["cores"]
    if threads < 1:
        raise ValueError(f"--threads must be at least 1. Received: {threads}")
    return {
        "device": args.device,
        "dtype": args.dtype,
        "threads": threads,
        "batch_size": args.batch_size,
        "input_size": args.input_size,
        "naive_batch": args.naive_batch,
        "seed": args.seed,
        "torch_layout": args.torch_layout,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "naive_full_repeats": args.naive_full_repeats,
        "profile_steps": 2 if args.profile else 0,
    }


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.json is not None:
            report.check_output_path(args.json, "--json")
        opts = _options(args)
        names = None
        if args.cases:
            names = {n.strip() for n in args.cases.split(",") if n.strip()}
            unknown = sorted(names - {c.name for c in CASES})
            if unknown:
                raise ValueError(
                    f"--cases must name cases of {[c.name for c in CASES]}. "
                    f"Received: unknown={unknown}"
                )
    except ValueError as e:
        parser.error(str(e))
    if opts["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible to PyTorch")

    cases = _selected_cases(names, opts["naive_full_repeats"])
    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=opts["repeats"], desc="rounds", file=sys.stderr, leave=False)
    except ImportError:
        pass

    def progress(done, total):
        if bar is not None:
            bar.update(1)

    started = time.perf_counter()
    results = summarize(
        run_bench(opts, cases=cases, isolate=args.isolate, progress=progress)
    )
    if bar is not None:
        bar.close()
    results["wall_s"] = time.perf_counter() - started
    results["command"] = "python -m parity.bench " + " ".join(
        sys.argv[1:] if argv is None else argv
    )

    for line in _key_value_lines(results):
        print(line)
    print(f"wall_s {results['wall_s']:.1f}")
    print()
    print(format_table(results))
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        for name, table in results["profiles"].items():
            with open(os.path.join(args.profile, f"{name}.txt"), "w") as f:
                f.write(table)
    if args.json:
        report.atomic_write(
            args.json, json.dumps(results, indent=2, default=_json_default) + "\n"
        )
    return 0


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
