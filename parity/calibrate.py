"""``python -m parity.calibrate``: measures the noise floor behind the tolerances.

Runs both frameworks over the option grid and prints, per dtype and tolerance
class, the greatest difference observed in the two units of the table:

- ``atol_floor``: max |actual - expected| / scale (scale = the tensor's largest
  magnitude), the bound ``atol`` alone would need;
- ``rtol_floor``: max |actual - expected| / |expected| over elements at least
  1e-3 of the scale, the bound ``rtol`` alone would need there.

`parity/tolerances.py` holds these floors times a margin. Rows where a side is
non-finite are left out (they fail by rule, whatever the tolerance).
"""

import argparse
import collections
import math
import os
import sys

import numpy as np

from parity import config as config_lib
from parity import data as data_lib
from parity import tolerances
from parity import weights as weights_lib


def _floors(actual, expected):
    out = collections.defaultdict(lambda: [0.0, 0.0])
    for key, e in expected.items():
        a = actual.get(key)
        if a is None or not np.issubdtype(np.asarray(e).dtype, np.floating):
            continue
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if a.shape != e.shape or not (np.isfinite(a).all() and np.isfinite(e).all()):
            continue
        if e.size == 0:
            continue
        diff = np.abs(a - e)
        scale = max(np.abs(e).max(), np.abs(a).max())
        if scale == 0:
            continue
        cls = tolerances.tolerance_class(key)
        big = np.abs(e) >= 1e-3 * scale
        out[cls][0] = max(out[cls][0], float(diff.max() / scale))
        if big.any():
            out[cls][1] = max(out[cls][1], float((diff[big] / np.abs(e[big])).max()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m parity.calibrate", description=__doc__)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1")
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--archs", default="mnist,toy")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)

    from tqdm import tqdm

    from parity import run, tf_side, torch_side

    dataset = data_lib.load("digits")
    floors = collections.defaultdict(lambda: [0.0, 0.0])
    jobs = []
    for arch in args.archs.split(","):
        for dtype in args.dtypes.split(","):
            for seed in range(args.seeds):
                layers = weights_lib.layer_names(arch)
                batch = args.batch_size if arch == "mnist" else 32
                base = config_lib.Config(
                    arch=arch, layers=layers, dtype=dtype, seed=seed, batch_size=batch
                )
                jobs += run.sweep_configs(base)
    for cfg in tqdm(jobs, file=sys.stderr, desc="configs", disable=None):
        x_train, _ = run._input_for(dataset, cfg.arch)
        w = weights_lib.init_weights(
            cfg.arch, input_size=x_train.shape[1], seed=cfg.seed
        )
        index = next(data_lib.batches(len(x_train), cfg.batch_size, seed=cfg.seed))
        x, y = x_train[index], dataset.y_train[index]
        expected = tf_side.quantities(cfg, w, x, y)
        actual = torch_side.quantities(cfg, w, x, y)
        for cls, (at, rt) in _floors(actual, expected).items():
            f = floors[(cfg.dtype, cls)]
            f[0], f[1] = max(f[0], at), max(f[1], rt)
    print(f"configs {len(jobs)}")
    for (dtype, cls), (at, rt) in sorted(floors.items()):
        tol = tolerances.TOLERANCES[dtype][cls]
        print(
            f"dtype {dtype} class {cls} atol_floor {at:.2e} rtol_floor {rt:.2e} "
            f"table_atol {tol.atol:.0e} table_rtol {tol.rtol:.0e} "
            f"margin {tol.atol / at if at else math.inf:.0f}x"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
