"""``gradparity check`` on published models: Hugging Face GPT-2 in PyTorch, Flax and TensorFlow (examples/hf_gpt2).

The models are transformers' own classes, each loaded from one PyTorch checkpoint by transformers itself (the
Flax and TF weights converted by ``from_pt=True``), called with keyword arguments (input_ids, attention_mask),
returning a ModelOutput whose ``logits`` the loss reads, trained as causal language models (the shift, -100
ignored). Nothing here is shaped for gradparity: the loss is checked against the model's own ``labels=`` loss,
and the planted bugs are the kind a port and a conversion script make.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_harness import run_cli as gradparity

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_gpt2"

pytestmark = [pytest.mark.frameworks("torch", "jax", "tf-keras"),
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="needs Hugging Face transformers: pip install 'gradparity[hf]'")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the example project with its checkpoint written (tiny GPT-2, random weights from a seed)."""
    folder = tmp_path_factory.mktemp("hf_gpt2")
    for f in EXAMPLE.iterdir():
        if f.suffix in (".py", ".toml"):
            shutil.copy(f, folder / f.name)
    env = {**os.environ, "USE_TF": "0", "USE_FLAX": "0"}
    proc = subprocess.run([sys.executable, "make_checkpoint.py"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def faithful(project):
    proc = gradparity("check", "check.toml", "--out", "out", cwd=project)
    return proc, json.loads((project / "out" / "report.json").read_text())


def test_the_three_ports_converted_by_transformers_are_exact_and_agree(faithful):
    proc, doc = faithful
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert doc["verdict"]["status"] == "agree"
    assert [b["status"] for b in doc["backends"]] == ["ok"] * 3
    assert all(r["status"] == "ok" for r in doc["results"])
    # Every tensor of each port paired with torch's by value, each once; the conversion exact.
    torch_trainable = [p["name"] for layer in doc["layers"]["torch"]["layers"] for p in layer["params"]
                       if p["trainable"]]
    for fw in ("jax", "tf_keras"):
        conv = doc["conversion"][fw]
        assert conv["exact"] and not conv["problems"], conv["problems"]
        assert sorted(t["source"] for t in conv["tensors"]) == sorted(torch_trainable)
        assert len({t["target"] for t in conv["tensors"]}) == len(conv["tensors"])
    # The tied lm_head/wte is one tensor in torch (listed once, with its alias).
    wte = [p for layer in doc["layers"]["torch"]["layers"] for p in layer["params"]
           if p["name"] == "transformer.wte.weight"]
    assert len(wte) == 1 and "lm_head.weight" in wte[0].get("aliases", [])
    assert "lm_head.weight" not in torch_trainable
    # The checkpoint's tensors all differ in value (no bias left at zero), so every pair is found by value alone;
    # each port's describe already gives its kernels (Flax's Conv1D (out, in), TF's Conv1D bias (1, n)) in the
    # canonical layout, so no layout change is left.
    for fw in ("jax", "tf_keras"):
        tensors = doc["conversion"][fw]["tensors"]
        assert {t["paired"] for t in tensors} == {"by value"}
        assert {t["layout"]["change"] for t in tensors} == {"same layout"}
    # float32: differences are rounding-sized, inside the stated tolerance.
    worst = max(c["max_rel"] for c in doc["comparisons"])
    assert worst <= doc["comparisons"][0]["tolerance"]


@pytest.mark.frameworks("torch")
def test_the_causal_lm_loss_is_the_models_own(project, faithful):
    """The loss gradparity compares (logits[:, :-1] against labels[:, 1:], -100 ignored, mean over the rest) is
    the one GPT2LMHeadModel computes itself when given ``labels``."""
    _, doc = faithful
    env = {**os.environ, "USE_TF": "0", "USE_FLAX": "0"}
    code = ("import numpy as np, torch; from transformers import GPT2LMHeadModel\n"
            "m = GPT2LMHeadModel.from_pretrained('checkpoint').eval(); z = np.load('checkpoint/batch.npz')\n"
            "t = {k: torch.from_numpy(z[k]) for k in z.files}\n"
            "print(float(m(input_ids=t['input_ids'], attention_mask=t['attention_mask'], labels=t['labels']).loss))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    own = float(proc.stdout.strip().splitlines()[-1])
    means = [r["loss"] for r in doc["results"] if r["method"] == "mean"]
    assert len(means) == 3
    for loss in means:
        assert abs(loss - own) <= 1e-5 * abs(own)  # float32 rounding of a mean of ~100 terms
    # -100 at the last 4 positions, the shift drops one more: 4 sequences x (32 - 5) valid terms.
    assert doc["loss_elements"] == 4 * 27


def test_planted_porting_and_converter_bugs_are_named(project):
    proc = gradparity("check", "check_buggy.toml", "--out", "buggy", cwd=project)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-3000:]
    doc = json.loads((project / "buggy" / "report.json").read_text())
    # The conversion script's two bugs, named at their tensors before any gradient of that port.
    conv = doc["conversion"]["jax"]
    assert not conv["exact"]
    problems = "\n".join(conv["problems"])
    assert len(conv["problems"]) == 2, problems
    assert "transformer.h.0.attn.c_proj.kernel" in problems and "transposed" in problems
    assert "transformer.ln_f.scale" in problems and "factor 2" in problems
    jax_rows = [r for r in doc["results"] if r["backend"] == "jax"]
    assert jax_rows and all(r["status"] != "ok" for r in jax_rows)
    # The TF port's unscaled attention in block 1, named where it acts, as torch names it: c_proj's input differs
    # while c_attn's output agrees (the scaling is a functional call between them).
    assert doc["conversion"]["tf_keras"]["exact"]
    assert doc["localization"]["first_layer"] == "transformer.h.1.attn.c_proj", doc["localization"]
    tf_loc = next(loc for loc in doc["localization"]["by_backend"] if loc["backend"] == "tf-keras")
    assert tf_loc["where"] == "input"
    assert doc["verdict"]["summary"].startswith("CONVERSION DIFFERS")
    text = proc.stdout
    assert "transformer.h.1.attn.c_attn's output, which agrees" in text and "factor 2" in text
