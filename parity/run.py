"""``python -m parity.run``: the PyTorch port against the TensorFlow reference.

Loads one neutral weight set and one batch of real digits into both
frameworks and compares every quantity, layer by layer, in data-flow order:
inputs, logits and endpoints, the discrete decisions, the loss internals per
layer and k, the loss, and its gradients. With ``--steps N`` it then trains
both sides with the reference recipe and compares the curves and final state.

Exit codes: 0 every row passes, 1 a row fails, 2 a usage error.
"""

import argparse
import itertools
import math
import os
import sys
import time
import zipfile

import numpy as np

from parity import config as config_lib
from parity import data as data_lib
from parity import plugins, report
from parity import weights as weights_lib

__all__ = ["main", "run_static", "sweep_configs"]


def _parse_layers(text, arch):
    allowed = weights_lib.layer_names(arch)
    if text == "all":
        return tuple(allowed)
    layers = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in layers if t not in allowed]
    if unknown or not layers:
        raise ValueError(
            f"--layers must be 'all' or a comma list of {','.join(allowed)}. "
            f"Received: --layers={text!r}"
        )
    return layers


def _parse_norm(text):
    if text == "inf":
        return math.inf
    return int(text)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m parity.run",
        description="Check the PyTorch port of the large-margin loss against "
        "the TensorFlow reference, quantity by quantity and layer by layer.",
    )
    p.add_argument(
        "--layers",
        default=",".join(config_lib.REFERENCE_LAYERS),
        help="'all' or a comma list of input,conv_layer0,conv_layer1,"
        "fc_layer0 (default: the reference's training choice)",
    )
    p.add_argument(
        "--arch",
        choices=["mnist", "toy"],
        default="mnist",
        help="the reference network or the toy network (12x12 input)",
    )
    p.add_argument(
        "--dist-norm",
        choices=["1", "2", "inf"],
        default="inf",
        help="norm of the distance; its dual is taken of the gradient (default inf)",
    )
    p.add_argument(
        "--top-k", type=int, default=1, help="K competing classes, 1..10 (default 1)"
    )
    p.add_argument(
        "--no-worst-case",
        action="store_true",
        help="sum over k instead of taking the worst case",
    )
    p.add_argument(
        "--exact", action="store_true", help="use_approximation off: second-order terms"
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=10000.0,
        help="margin and upper clip (default 1e4)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=4.0,
        help="alpha_factor: lower clip gamma * (1 - alpha) (default 4)",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=1e-6,
        help="added to the gradient norm before dividing (default 1e-6)",
    )
    p.add_argument(
        "--layer-weights",
        choices=["auto", "none", "size"],
        default="auto",
        help="size = elements per example (the reference's choice for "
        "inf); auto = size for inf, none otherwise",
    )
    p.add_argument(
        "--batch-norm",
        choices=["train", "eval"],
        default="train",
        help="batch statistics (train, the reference) or moving statistics",
    )
    p.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default="float64",
        help="both sides' dtype; selects the tolerance table",
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="examples per batch (default 256)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the weights and the batch sampler"
    )
    p.add_argument(
        "--data",
        choices=["digits", "mnist"],
        default="digits",
        help="scikit-learn's bundled digits (default) or MNIST from --data-dir",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with MNIST IDX files (plain or .gz) or mnist.npz",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="an .npz of neutral weights (see parity/weights.py); "
        "seeded Glorot weights if omitted",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="run the whole option grid: dist_norm x top_k in {1,2,5} x "
        "worst-case x exact x batch-norm mode",
    )
    p.add_argument(
        "--torch-loss",
        default=None,
        metavar="SPEC",
        help="module:function or file.py:function replacing the port's loss",
    )
    p.add_argument(
        "--tf-loss",
        default=None,
        metavar="SPEC",
        help="module:function or file.py:function replacing the reference's loss",
    )
    p.add_argument(
        "--no-catalogue",
        action="store_true",
        help="with --torch-loss, check the one config only, not also the mutant "
        "catalogue's settings (ties, exact mode, K=3, training)",
    )
    recipe = p.add_argument_group(
        "training recipe", "defaults are the reference's (REFERENCE.md section 3)"
    )
    recipe.add_argument("--margin-weight", type=float, default=1.0)
    recipe.add_argument("--xent-weight", type=float, default=0.0)
    recipe.add_argument("--l2-weight", type=float, default=5e-4)
    recipe.add_argument("--learning-rate", type=float, default=0.1)
    recipe.add_argument(
        "--decay-steps",
        type=int,
        default=2000,
        help="steps per learning-rate staircase decay (rate 0.96)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="training steps of both sides after the static check (0 skips training)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="cpu",
        help="PyTorch's device; TF32 is off on a GPU unless --allow-tf32",
    )
    p.add_argument(
        "--allow-tf32",
        action="store_true",
        help="leave TF32 matrix maths on when running on a GPU",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="PNG of both training curves and their difference",
    )
    p.add_argument(
        "--csv",
        default=None,
        metavar="PATH",
        help="CSV of the per-step training records",
    )
    p.add_argument(
        "--json", default=None, metavar="PATH", help="the rows as versioned JSON"
    )
    p.add_argument(
        "--junit", default=None, metavar="PATH", help="JUnit XML, a test case per row"
    )
    p.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    return p


def sweep_configs(base):
    """The option grid around `base`, as a list of `Config`."""
    out = []
    grid = itertools.product(
        (1, 2, math.inf), (1, 2, 5), (True, False), (False, True), ("train", "eval")
    )
    for norm, k, worst, exact, bn in grid:
        out.append(
            config_lib.Config(
                **{
                    **base.__dict__,
                    "dist_norm": norm,
                    "top_k": k,
                    "worst_case": worst,
                    "exact": exact,
                    "batch_norm": bn,
                }
            )
        )
    return out


def run_static(cfg, weights, x, y, *, torch_port=None, tf_loss=None, device="cpu"):
    """Both sides on one batch; returns the compared rows.

    A loss that raises on either side becomes a failed row with its message,
    after the forward rows that could still be compared.
    """
    from parity import compare, tf_side, torch_side

    expected = tf_side.quantities(cfg, weights, x, y, loss_fn=tf_loss)
    actual = torch_side.quantities(cfg, weights, x, y, port=torch_port, device=device)
    loss_only_ok = torch_port is not None and torch_port.name != "torch_impl"
    return compare.compare_sides(
        actual, expected, config=cfg, loss_only_ok=loss_only_ok
    )


def _input_for(dataset, arch):
    if arch == "toy":
        # The toy network reads 12x12: the 8x8 digits padded by 2 zero pixels.
        pad = ((0, 0), (2, 2), (2, 2), (0, 0))
        if dataset.input_size == 8:
            return np.pad(dataset.x_train, pad), np.pad(dataset.x_test, pad)
    return dataset.x_train, dataset.x_test


def _load_weights(args, arch, input_size):
    expected = weights_lib.init_weights(arch, input_size=input_size, seed=args.seed)
    if args.weights is None:
        return expected
    where = f"--weights={args.weights!r}"
    try:
        with np.load(args.weights, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError) as e:
        # TypeError: a .npy file loads as one array, not an archive.
        reason = "it needs pickle, which is refused" if "pickle" in str(e) else e
        raise ValueError(
            f"--weights must be an .npz archive of plain arrays ({reason}). "
            f"Received: {where}"
        ) from e
    if set(raw) != set(expected):
        raise ValueError(
            f"--weights must hold exactly {sorted(expected)}. Received: "
            f"missing={sorted(set(expected) - set(raw))}, "
            f"unknown={sorted(set(raw) - set(expected))}"
        )
    loaded = {}
    for name, array in raw.items():
        if array.dtype.kind not in "fiu" or array.shape != expected[name].shape:
            raise ValueError(
                f"--weights {name} must be real numbers of shape "
                f"{expected[name].shape} for the {arch} network on "
                f"{input_size}x{input_size} inputs. Received: shape={array.shape}, "
                f"dtype={array.dtype}"
            )
        loaded[name] = array.astype(np.float64)
    return loaded


def _log(args, **fields):
    if args.quiet:
        return
    for key, value in fields.items():
        print(f"{key} {value}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()

    try:
        layers = _parse_layers(args.layers, args.arch)
        if args.steps < 0:
            raise ValueError(
                f"--steps must be 0 or more. Received: --steps={args.steps}"
            )
        base = config_lib.Config(
            arch=args.arch,
            layers=layers,
            dist_norm=_parse_norm(args.dist_norm),
            top_k=args.top_k,
            worst_case=not args.no_worst_case,
            exact=args.exact,
            gamma=args.gamma,
            alpha=args.alpha,
            epsilon=args.epsilon,
            layer_weights=args.layer_weights,
            batch_norm=args.batch_norm,
            dtype=args.dtype,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        if not 1 <= args.top_k <= 10:
            raise ValueError(
                "--top-k must be between 1 and the 10 classes. "
                f"Received: --top-k={args.top_k}"
            )
        recipe = _recipe(args) if args.steps else None
        for argument in ("json", "junit", "plot", "csv"):
            if getattr(args, argument) is not None:
                report.check_output_path(getattr(args, argument), f"--{argument}")
        dataset = data_lib.load(args.data, args.data_dir)
        torch_loss = plugins.load_spec(args.torch_loss) if args.torch_loss else None
        tf_loss = (
            plugins.load_spec(args.tf_loss, argument="--tf-loss")
            if args.tf_loss
            else None
        )
        x_train, x_test = _input_for(dataset, args.arch)
        weights = _load_weights(args, args.arch, x_train.shape[1])
        index = next(data_lib.batches(len(x_train), args.batch_size, seed=args.seed))
    except (ValueError, TypeError) as e:
        parser.exit(2, f"error: {e}\n")

    from parity import torch_side

    _set_determinism()
    device = _device(args.device, args.allow_tf32)
    if device is None:
        parser.exit(2, "error: --device cuda, but PyTorch sees no GPU\n")
    port = torch_side.Port()
    if torch_loss is not None:
        port = torch_side.Port(name=args.torch_loss, loss=torch_loss)
    x, y = x_train[index], dataset.y_train[index]

    configs = sweep_configs(base) if args.sweep else [base]
    all_rows, per_config = [], []
    bar = _progress(configs, args)
    for cfg in bar:
        rows = run_static(
            cfg, weights, x, y, torch_port=port, tf_loss=tf_loss, device=device
        )
        for r in rows:
            r.key = f"{cfg.label()}::{r.key}" if args.sweep else r.key
        all_rows += rows
        failed = sum(r.failed for r in rows)
        per_config.append(
            {
                "config": cfg.to_dict(),
                "label": cfg.label(),
                "rows": len(rows),
                "failed": failed,
            }
        )
        if args.sweep and not args.quiet:
            bar.write(f"config {cfg.label()} rows {len(rows)} failed {failed}")
    if not args.sweep and not args.quiet:
        print(report.format_table(all_rows, title=f"static check {base.label()}"))

    extra = {"sweep": per_config} if args.sweep else {}
    if torch_loss is not None and not args.sweep and not args.no_catalogue:
        all_rows += _catalogue_rows(args, port, device)
    if args.steps and not args.sweep:
        all_rows, extra = _train(
            args,
            recipe,
            base,
            weights,
            dataset,
            x_train,
            x_test,
            port,
            device,
            all_rows,
            extra,
        )

    _log(args, seconds=f"{time.perf_counter() - started:.1f}")
    print(report.summary(all_rows))
    config_doc = [c["config"] for c in per_config] if args.sweep else base.to_dict()
    if args.json:
        report.write_json(args.json, rows=all_rows, config=config_doc, extra=extra)
    if args.junit:
        report.write_junit(args.junit, all_rows, name="parity.run")
    return report.exit_code(all_rows)


def _catalogue_rows(args, port, device):
    """The plug-in checked exactly as a mutant is, under every mutant setting.

    Training settings run only when training was asked for (``--steps``).
    """
    from parity import mutants

    names = [s.name for s in mutants.SETTINGS.values() if args.steps or not s.training]
    checks = mutants.check_port(port, names, device=device, progress=not args.quiet)
    rows = mutants.rows_of(checks)
    if not args.quiet:
        print(report.format_table(rows, title="plug-in under the mutant settings"))
    return rows


def _recipe(args):
    from parity import training

    return training.Recipe(
        margin_weight=args.margin_weight,
        xent_weight=args.xent_weight,
        l2_weight=args.l2_weight,
        learning_rate=args.learning_rate,
        decay_steps=args.decay_steps,
        batch_size=args.batch_size,
    )


def _train(
    args, recipe, cfg, weights, dataset, x_train, x_test, port, device, rows, extra
):
    from parity import training

    if cfg.batch_norm != "train":
        cfg = config_lib.Config(**{**cfg.__dict__, "batch_norm": "train"})
    train_set = data_lib.Dataset(
        dataset.name, x_train, dataset.y_train, x_test, dataset.y_test
    )
    result = training.compare_training(
        cfg,
        recipe,
        weights,
        train_set,
        steps=args.steps,
        port=port,
        device=device,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(report.format_table(result.rows, title=f"training {args.steps} steps"))
    first = result.first_divergence
    _log(
        args,
        heldout_accuracy_expected=f"{result.heldout['expected']:.4f}",
        heldout_accuracy_actual=f"{result.heldout['actual']:.4f}",
        first_divergence="none" if first is None else f"step {first[0]} {first[1]}",
    )
    if args.csv:
        training.write_csv(result, args.csv)
    if args.plot:
        training.plot(result, args.plot)
    extra = {**extra, "training": training.to_document(result)}
    return rows + result.rows, extra


def _progress(configs, args):
    from tqdm import tqdm

    return tqdm(
        configs,
        desc="configs",
        # None: no bar where stderr is not a terminal (CI logs).
        disable=True if args.quiet or len(configs) == 1 else None,
        file=sys.stderr,
    )


def _set_determinism():
    try:
        from parity import determinism
    except ImportError:  # written alongside; absent in partial checkouts
        return
    determinism.set_determinism()


def _device(choice, allow_tf32):
    import torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        return None
    if choice == "cuda":
        # TF32 rounds float32 products to about 1e-3; off unless asked for.
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    return choice


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
