"""``gradparity diagnose`` on what users' own scripts save: plain PyTorch (and Flax) code written here, run as
scripts, its gradients saved under the users' own labels; and a `gradparity check` folder of a port with a
LayerNorm-epsilon bug.

Every expectation is computed from the saved arrays with numpy or from the counts the script used (R, N, K),
not from the code under test.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gradparity.cli import main

TORCH_HEAD = """\
import sys
import numpy as np
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
saved = {}
def save(label):
    saved.update({f"{label}/{k}": p.grad.detach().clone().numpy() for k, p in model.named_parameters()})
"""


def run_script(tmp_path: Path, name: str, body: str, *args: str) -> Path:
    """Write ``body`` to tmp_path/name and run it there with this interpreter; its folder."""
    script = tmp_path / name
    script.write_text(textwrap.dedent(body))
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path


def diagnose(capsys, *argv: str) -> tuple[int, dict, str]:
    """(exit code, --json document, text) of ``gradparity diagnose ARGV``."""
    code = main(["diagnose", *argv, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert main(["diagnose", *argv]) == code
    return code, doc, capsys.readouterr().out


def flat(path: Path) -> dict[str, np.ndarray]:
    """label -> its gradients as one vector, in the file's order (keys LABEL/PARAM)."""
    out: dict[str, list] = {}
    with np.load(path) as z:
        for key in z.files:
            out.setdefault(key.split("/", 1)[0], []).append(z[key].ravel())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


# --- gradients accumulated across the methods ------------------------------------------------------------

ACROSS = TORCH_HEAD + """\
x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
zero_between = sys.argv[1] == "fixed"
model.zero_grad()
nn.functional.cross_entropy(model(x), y).backward()
save("batch_mean")
if zero_between:
    model.zero_grad()
(nn.functional.cross_entropy(model(x), y, reduction="sum") / 8).backward()
save("batch_sum")
if zero_between:
    model.zero_grad()
for i in range(8):
    (nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) / 8).backward()
save("per_sample")
np.savez(sys.argv[1] + ".npz", **saved)
"""


@pytest.mark.frameworks("torch")
def test_gradients_accumulated_across_the_methods(tmp_path, capsys):
    """zero_grad() once before three methods: the second result holds the first, the third both."""
    run_script(tmp_path, "across.py", ACROSS, "bug")
    g = flat(tmp_path / "bug.npz")
    # Independently: result k is k times the first (float32, so within float32 rounding of the sums).
    for k, label in enumerate(g, start=1):
        np.testing.assert_allclose(g[label], k * g["batch_mean"], rtol=0, atol=1e-5 * np.abs(g["per_sample"]).max())
    code, doc, text = diagnose(capsys, str(tmp_path / "bug.npz"), "--dtype", "float32")
    top = doc["causes"][0]
    assert code == 1 and top["id"] == "grad_not_zeroed_between_methods" and top["score"] >= 0.9, text
    assert "batch_sum = 2 x batch_mean" in text and "per_sample = 3 x batch_mean" in text
    assert "zero_grad" in top["fix"]
    run_script(tmp_path, "across.py", ACROSS, "fixed")
    code, doc, text = diagnose(capsys, str(tmp_path / "fixed.npz"), "--dtype", "float32", "--batch-size", "8")
    assert code == 0 and doc["causes"][0]["id"] == "clean", text


# --- data parallel: DistributedDataParallel on two gloo processes -----------------------------------------

DDP = """\
import os
import socket
import sys
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

R, N = 2, 8


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def replica(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=R)
    model = nn.parallel.DistributedDataParallel(make())
    x, y = batch()
    nn.functional.cross_entropy(model(x.chunk(R)[rank]), y.chunk(R)[rank], reduction="sum").backward()
    if rank == 0:
        np.savez("ddp.npz", **{k: p.grad.numpy() for k, p in model.module.named_parameters()})
    dist.barrier()
    os._exit(0)   # as examples/multinode/torch_ddp.py leaves: gloo's teardown can abort a finished process


if __name__ == "__main__":
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(replica, args=(port,), nprocs=R)
    model = make()
    x, y = batch()
    single = {}
    for name, reduction in (("one_gpu_sum", "sum"), ("one_gpu_mean", "mean")):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
        single[name] = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    ddp = dict(np.load("ddp.npz"))
    for name in single:
        np.savez(f"{name}_vs_ddp.npz", **{f"{name}/{k}": v for k, v in single[name].items()},
                 **{f"two_gpus/{k}": v for k, v in ddp.items()})
"""


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("ddp"), "ddp.py", DDP)


@pytest.mark.frameworks("torch")
def test_ddp_summed_loss_is_r_times_smaller(ddp, capsys):
    g = flat(ddp / "one_gpu_sum_vs_ddp.npz")
    ratio = float(g["one_gpu_sum"] @ g["two_gpus"] / (g["two_gpus"] @ g["two_gpus"]))
    assert abs(ratio - 2) < 1e-12  # R = 2: DDP averages the replicas' summed gradients
    code, doc, text = diagnose(capsys, str(ddp / "one_gpu_sum_vs_ddp.npz"), "--replicas", "2", "--dtype", "float64")
    assert code == 1 and doc["causes"][0]["id"] == "data_parallel_average" and doc["causes"][0]["score"] >= 0.9
    assert "the R = 2 replicas" in text
    # Without R: the factor, the replica counts that give it, and the label that names data-parallel training.
    _, doc, text = diagnose(capsys, str(ddp / "one_gpu_sum_vs_ddp.npz"), "--batch-size", "8", "--dtype", "float64")
    assert doc["causes"][0]["id"] == "data_parallel_average", text
    assert "one_gpu_sum = 2 x two_gpus" in text and "R = 2 " in text and "R = N/2 = 4" in text
    assert "two_gpus names data-parallel training" in text


@pytest.mark.frameworks("torch")
def test_ddp_summed_loss_against_a_single_device_mean_is_n_over_r(ddp, capsys):
    g = flat(ddp / "one_gpu_mean_vs_ddp.npz")
    n, r = 8, 2
    np.testing.assert_allclose(g["two_gpus"], n / r * g["one_gpu_mean"], rtol=1e-12, atol=0)
    path = str(ddp / "one_gpu_mean_vs_ddp.npz")
    code, doc, text = diagnose(capsys, path, "--replicas", str(r), "--batch-size", str(n), "--dtype", "float64")
    assert code == 1 and doc["causes"][0]["id"] == "data_parallel_average" and doc["causes"][0]["score"] >= 0.9, text
    assert f"N/R = {n}/{r}" in text
    # Without R: the factor and the replica counts that would give it (R = N/R' of a sum against a mean, or R').
    _, doc, text = diagnose(capsys, path, "--batch-size", str(n), "--dtype", "float64")
    assert doc["causes"][0]["id"] == "data_parallel_average", text
    f = n // r
    assert f"two_gpus = {f} x one_gpu_mean" in text and f"R = {f} " in text and f"R = N/{f} = {n // f}" in text


# --- micro-batch accumulation, the user knowing only the number of micro-batches --------------------------

MICRO = TORCH_HEAD + """\
n, k, combine = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
model.zero_grad()
nn.functional.cross_entropy(model(x), y).backward()
save("full_batch")
model.zero_grad()
# torch.chunk as many write it, or numpy.array_split's k micro-batches of 8, 8, 7, 7 (for 30 in 4).
if combine == "chunk":
    parts = list(zip(x.chunk(k), y.chunk(k)))
else:
    parts = [(x[i], y[i]) for i in np.array_split(np.arange(n), k)]
for xs, ys in parts:
    loss = nn.functional.cross_entropy(model(xs), ys)
    (loss / k if combine == "average" else loss).backward()
save("grad_accum")
np.savez(f"micro_{n}_{k}_{combine}.npz", **saved)
"""


@pytest.mark.frameworks("torch")
def test_micro_batch_means_averaged_over_unequal_micro_batches(tmp_path, capsys):
    """30 examples in 4 micro-batches (8, 8, 7, 7), each mean loss / 4: not a factor, a re-weighting; the user
    gives only --micro-batches 4."""
    run_script(tmp_path, "micro.py", MICRO, "30", "4", "average")
    path = tmp_path / "micro_30_4_average.npz"
    g = flat(path)
    cos = float(g["full_batch"] @ g["grad_accum"]) / float(np.linalg.norm(g["full_batch"]) *
                                                          np.linalg.norm(g["grad_accum"]))
    rel = float(np.abs(g["full_batch"] - g["grad_accum"]).max() / np.abs(g["full_batch"]).max())
    assert cos > 0.9 and rel > 1e-3  # the same examples' mean, re-weighted: close, but far beyond rounding
    code, doc, text = diagnose(capsys, str(path), "--micro-batches", "4")
    assert code == 1 and doc["causes"][0]["id"] == "accumulation_normalization", text
    assert "--batch-size" in text  # what would settle it


@pytest.mark.frameworks("torch")
def test_torch_chunk_makes_fewer_micro_batches_than_asked(tmp_path, capsys):
    """x.chunk(5) of 12 examples gives 4 chunks of 3: the micro-batch means added without 1/k come out 4
    times the full batch's mean, not 5 times."""
    run_script(tmp_path, "micro.py", MICRO, "12", "5", "chunk")
    path = tmp_path / "micro_12_5_chunk.npz"
    g = flat(path)
    chunks = len(np.array_split(np.arange(12), 12 // -(-12 // 5)))  # chunks of ceil(12/5) = 3 examples
    np.testing.assert_allclose(g["grad_accum"], chunks * g["full_batch"], rtol=0,
                               atol=1e-5 * np.abs(g["grad_accum"]).max())
    code, doc, text = diagnose(capsys, str(path), "--micro-batches", "5", "--batch-size", "12")
    assert code == 1 and doc["causes"][0]["id"] == "accumulation_normalization", text
    assert f"{chunks} micro-batch means added, not your 5" in text and "torch.chunk" in text


# --- a gradparity check folder: a Flax port whose LayerNorm has another epsilon ---------------------------

LN_TORCH = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16, bias=False)
        self.norm = nn.LayerNorm(16)  # eps=1e-5
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.fc1(x))))
"""
LN_FLAX = """\
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.fc1 = nnx.Linear(6, 16, use_bias=False, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)  # Flax's default epsilon, 1e-6
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.norm(self.fc1(x))))
"""
GELU_TORCH = LN_TORCH.replace("nn.LayerNorm(16)  # eps=1e-5", "nn.GELU()").replace("torch.tanh(", "(")
GELU_FLAX = """\
import jax
from flax import nnx


class Net(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.fc1 = nnx.Linear(6, 16, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.gelu(self.fc1(x)))  # approximate=True by default
"""


def run_check(folder: Path, torch_code: str, flax_code: str, scale: float) -> Path:
    """A user's check: the two models, a batch (inputs of size ``scale``), a TOML; ``gradparity check`` writes the
    report into out/."""
    folder.mkdir()
    (folder / "net_torch.py").write_text(torch_code)
    (folder / "net_flax.py").write_text(flax_code)
    rng = np.random.default_rng(0)
    np.savez(folder / "batch.npz", x=(scale * rng.normal(size=(8, 6))).astype(np.float32), y=rng.integers(0, 3, 8))
    (folder / "check.toml").write_text('[models]\ntorch = "net_torch:Net"\njax = "net_flax:Net"\n'
                                       '[check]\ndata = "batch.npz"\ndtype = "float32"\n')
    proc = subprocess.run([sys.executable, "-m", "gradparity", "check", "check.toml", "--out", "out"], cwd=folder,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder / "out"


@pytest.fixture(scope="module")
def epsilon_port(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("check") / "epsilon", LN_TORCH, LN_FLAX, 0.1)


@pytest.mark.frameworks("torch", "jax")
def test_a_check_folder_is_explained_by_the_layer_check_named(epsilon_port, capsys):
    report = json.loads((epsilon_port / "report.json").read_text())
    assert report["localization"]["first_layer"] == "norm"  # check named the LayerNorm
    code, doc, text = diagnose(capsys, str(epsilon_port))
    top = doc["causes"][0]
    assert code == 1 and top["id"] == "port_difference", text
    assert any("a port difference at layer norm" in e for e in top["evidence"])


@pytest.mark.frameworks("torch", "jax")
def test_a_check_folder_with_tf32_off_is_not_told_to_turn_it_off(epsilon_port, capsys):
    report = json.loads((epsilon_port / "report.json").read_text())
    assert not any(b["environment"]["tf32"] or b["environment"]["autocast"] for b in report["backends"])
    _, doc, text = diagnose(capsys, str(epsilon_port))
    precision = next(c for c in doc["causes"] if c["id"] == "reduced_precision")
    assert precision["score"] == 0.0 and "TF32 off" in precision["evidence"][0]
    assert "turn" not in precision["fix"] and "allow_tf32 = False" not in precision["fix"]
    assert "reduced_precision: ruled out by the run's recorded settings" in text


@pytest.mark.frameworks("torch", "jax")
def test_a_check_folder_counts_the_pairs_that_differ(epsilon_port, capsys):
    """Within a framework the four methods agree; across frameworks every pair differs (the epsilon): the text
    says exactly how many of each, not "every pair differs"."""
    g = flat_report(epsilon_port / "gradients.npz")
    labels = list(g)
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    cross = [(a, b) for a, b in pairs if a.split("/")[0] != b.split("/")[0]]

    def rel(a, b):
        return np.abs(g[a] - g[b]).max() / max(np.abs(g[a]).max(), np.abs(g[b]).max())

    assert min(rel(a, b) for a, b in cross) > 1e-4  # the epsilon, far beyond float32 rounding
    assert max(rel(a, b) for a, b in pairs if (a, b) not in cross) < 1e-5
    _, _, text = diagnose(capsys, str(epsilon_port))
    assert f"{len(cross)} of {len(pairs)} pairs differ beyond rounding; {len(pairs) - len(cross)} agree" in text
    assert "every pair differs" not in text


def flat_report(path: Path) -> dict[str, np.ndarray]:
    """BACKEND/METHOD -> its gradients as one vector (a gradparity report's keys BACKEND/METHOD/PARAM)."""
    out: dict[str, list] = {}
    with np.load(path) as z:
        for key in z.files:
            out.setdefault("/".join(key.split("/", 2)[:2]), []).append(z[key].ravel())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


@pytest.mark.frameworks("torch", "jax")
def test_check_suggestion_is_the_fix(tmp_path, capsys):
    """jax.nn.gelu approximates by default: check names the GELU and what to change; diagnose gives that as the
    fix."""
    out = run_check(tmp_path / "gelu", GELU_TORCH, GELU_FLAX, 2.0)
    _, doc, text = diagnose(capsys, str(out))
    top = doc["causes"][0]
    assert top["id"] == "port_difference", text
    assert "approximate=False" in top["fix"] and any(e.startswith("check's suggestion") for e in top["evidence"])
