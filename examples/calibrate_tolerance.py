"""Calibrate the tolerance model: how much of u * sqrt(K) * L does pure rounding actually use?

Runs a grid of problems (widths, depths, batch sizes, activations) through every
backend and method, and reports, per dtype, the largest

    ratio = max_rel / (u * sqrt(K) * L)

over all pairs of results. gradparity's SAFETY factor must sit well above the
largest ratio that rounding alone produces. Figures are measurements of this run
on this machine; they go in docs/concepts.md (Tolerances) with their context.

    python examples/calibrate_tolerance.py --backends numpy,torch,jax,keras-tensorflow --out calib.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from gradparity.compare.tolerance import SAFETY
from gradparity.experiment.spec import load_experiment
from gradparity.commands.run import run_experiment

PROBLEMS = [  # (features, hidden, classes, N, activation)
    (64, [32], 10, 64, "relu"),
    (64, [32], 10, 256, "tanh"),
    (20, [50, 50], 5, 16, "tanh"),
    (20, [50, 50], 5, 1, "sigmoid"),
    (10, [200], 3, 128, "relu"),
    (100, [64, 64, 64], 20, 32, "relu"),
    (8, [], 4, 512, "identity"),
    (30, [16], 7, 7, "sigmoid"),
    (5, [7, 7], 3, 13, "tanh"),  # a first-layer bias whose per-example terms cancel 17-fold
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="numpy,torch,jax,keras-tensorflow")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", help="write the measurements as JSON here")
    args = ap.parse_args(argv)
    rows = []
    for dtype in args.dtypes.split(","):
        for features, hidden, classes, n, act in PROBLEMS:
            for seed in range(args.seeds):
                exp = load_experiment(overrides={
                    "backends": args.backends.split(","), "dtype": dtype, "device": "cpu", "seed": seed,
                    "data.source": "synthetic", "data.num_features": features, "data.num_classes": classes,
                    "data.batch_size": n, "model.hidden": hidden, "model.activation": act})
                report = run_experiment(exp)
                failed = [r.label for r in report.results if not r.ok]
                if failed:
                    print(f"failed rows {failed}: {[r.error for r in report.results if not r.ok][:1]}",
                          file=sys.stderr)
                tol = report.tolerance
                unit = tol.rtol(1.0) / tol.safety  # sqrt(K) * L
                worst = max(report.comparisons, key=lambda c: c.max_rel / c.unit_roundoff)
                ratio = worst.max_rel / (worst.unit_roundoff * unit)
                loss_ratio = max(c.loss_rel / (c.unit_roundoff * unit) for c in report.comparisons)
                row = {"dtype": dtype, "sizes": list(report.inputs.model.sizes), "N": n,
                       "activation": act, "seed": seed, "K": tol.longest_sum, "L": tol.depth,
                       "worst_pair": [worst.a, worst.b], "max_rel": worst.max_rel, "ratio": ratio,
                       "loss_ratio": loss_ratio, "verdict": report.verdict.status}
                rows.append(row)
                print(f"{dtype} {'-'.join(map(str, row['sizes'])):>14} N={n:<4} {act:8s} seed {seed}: "
                      f"max_rel {worst.max_rel:.3g} = {ratio:.3f} x u*sqrt(K)*L "
                      f"(loss {loss_ratio:.3f})  {worst.a} vs {worst.b}", flush=True)
    print()
    for dtype in args.dtypes.split(","):
        r = [x for x in rows if x["dtype"] == dtype]
        worst = max(max(x["ratio"], x["loss_ratio"]) for x in r)
        print(f"{dtype}: {len(r)} problems; largest ratio {worst:.3f}; SAFETY = {SAFETY:g} leaves a "
              f"margin of {SAFETY / worst:.1f}x" if worst > 0 else f"{dtype}: all exact")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"safety": SAFETY, "rows": rows}, f, indent=1)
    return 0 if all(math.isfinite(x["ratio"]) for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
