"""Recheck a gradparity report with nothing but numpy (no gradparity import).

0. The files belong together: their SHA-256 match the ones report.json lists.
1. Every comparison's max_rel is recomputed from gradients.npz.
2. The mean-loss gradient is recomputed from inputs.npz by an independent
   10-line MLP + cross-entropy, and compared with every result in the report.

    python examples/recheck_report.py gradparity-out
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ACT = {"relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
       "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
       "sigmoid": (lambda z: 1 / (1 + np.exp(-z)), lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
       "identity": (lambda z: z, lambda z: np.ones_like(z))}


def mean_gradient(params, x, y, activation):
    """Gradient of the mean softmax cross-entropy of an MLP, by backpropagation in float64."""
    f, df = ACT[activation]
    n_layers = len(params) // 2
    a, zs, acts = x.astype(np.float64), [], []
    for i in range(n_layers):
        acts.append(a)
        z = a @ params[f"layers.{i}.kernel"] + params[f"layers.{i}.bias"]
        zs.append(z)
        a = f(z) if i < n_layers - 1 else z
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(a.shape[1])[y]) / len(y)
    grads = {}
    for i in reversed(range(n_layers)):
        grads[f"layers.{i}.kernel"] = acts[i].T @ delta
        grads[f"layers.{i}.bias"] = delta.sum(0)
        if i:
            delta = (delta @ params[f"layers.{i}.kernel"].T) * df(zs[i - 1])
    return grads


def max_rel(a, b, term_scale=None):
    """Per tensor max|a-b| over max(|a|, |b|, T_p), T_p from report.json (the per-example terms' size)."""
    term_scale = term_scale or {}
    return max(np.max(np.abs(a[k] - b[k]))
               / max(np.max(np.abs(a[k])), np.max(np.abs(b[k])), term_scale.get(k, 0.0)) for k in a)


def main(out_dir):
    out = Path(out_dir)
    report = json.loads((out / "report.json").read_text())
    for name, entry in report.get("files", {}).items():
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            print(f"{name} is not the file written with report.json (run {report.get('run_id')}): "
                  "SHA-256 differs; rerun gradparity")
            return 1
    print(f"run {report.get('run_id')}: {len(report.get('files', {}))} files match report.json's SHA-256")
    with np.load(out / "gradients.npz") as z:
        flat = {k: z[k] for k in z.files}
    grads = {}
    for key, g in flat.items():
        backend, method, param = key.split("/", 2)
        grads.setdefault(f"{backend}/{method}", {})[param] = g
    t = report["tolerance"]["term_scale"]
    worst = max(abs(max_rel(grads[c["a"]], grads[c["b"]], t) - c["max_rel"]) for c in report["comparisons"])
    print(f"{len(report['comparisons'])} comparisons recomputed; largest deviation from the report's "
          f"max_rel: {worst:.2g}")

    with np.load(out / "inputs.npz") as z:
        params = {k.split("/", 1)[1]: z[k].astype(np.float64) for k in z.files if k.startswith("params/")}
        x, y = z["batch/x"], z["batch/y"]
    mine = mean_gradient(params, x, y, report["experiment"]["model"]["activation"])
    for label, g in grads.items():
        print(f"  {label:32s} max|diff| / max|g| vs my own gradient: {max_rel(g, mine):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gradparity-out"))
