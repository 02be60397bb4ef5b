"""Save a random GPT-2 (fixed seed, no download) as a PyTorch checkpoint, and batch.npz to check it on.

    python make_checkpoint.py                 # tiny: 2 blocks, width 64 (about 0.1M parameters)
    python make_checkpoint.py --size small    # GPT-2 small's configuration: 12 blocks, width 768 (124M)

Hugging Face initializes every bias at zero and every layer-norm scale at one; a trained checkpoint has none
of that, so (and so that a port's bug at a bias shows) those tensors get a little noise here, as if trained.

batch.npz holds ``input_ids`` and ``attention_mask`` (the model's call arguments) and ``labels``: the
input ids, with -100 (ignored, Hugging Face's convention) at the last 4 positions of every sequence.
"""
import argparse
from pathlib import Path

import os

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow and Flax too, for nothing
os.environ.setdefault("USE_FLAX", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

SIZES = {
    # initializer_range 0.3 (GPT-2's is 0.02): O(1) logits, so that a port's bug is not hidden below rounding.
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, initializer_range=0.3),
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}
BATCH = {"tiny": (4, 32), "small": (4, 128)}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
parser.add_argument("--out", default=None, help="checkpoint folder (default: checkpoint, or checkpoint-small)")
args = parser.parse_args()
here = Path(__file__).resolve().parent
out = Path(args.out) if args.out else here / ("checkpoint" if args.size == "tiny" else f"checkpoint-{args.size}")

torch.manual_seed(0)
config = GPT2Config(**SIZES[args.size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = GPT2LMHeadModel(config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln_" in name or name.startswith("transformer.ln_f"):
            p.add_(0.02 * torch.randn_like(p))
model.save_pretrained(out)

n, t = BATCH[args.size]
rng = np.random.default_rng(0)
input_ids = rng.integers(0, config.vocab_size, size=(n, t)).astype(np.int64)
attention_mask = np.ones((n, t), dtype=np.int64)
labels = input_ids.copy()
labels[:, -4:] = -100
np.savez(out / "batch.npz", input_ids=input_ids, attention_mask=attention_mask, labels=labels)
print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters; batch.npz {n} x {t} tokens")
