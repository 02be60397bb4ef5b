"""The floor a check is measured against: one framework's own forward and backward pass of the mean causal-LM
loss on the batch, import and model loading included, with its wall time and peak resident memory.

    python floor.py torch|jax|tf_keras [--checkpoint FOLDER]

Each framework's idiom, nothing of gradparity's: torch ``loss.backward()``, ``jax.value_and_grad`` (jitted), a
``tf.GradientTape``; the loss is the model's own causal-LM loss form (logits[:, :-1] against labels[:, 1:], -100
ignored, mean over the rest).
"""
import argparse
import os
import resource
import time

start = time.perf_counter()
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("framework", choices=("torch", "jax", "tf_keras"))
parser.add_argument("--checkpoint", default=None, help="default: HF_GPT2_CHECKPOINT, else ./checkpoint")
args = parser.parse_args()
if args.checkpoint:
    os.environ["HF_GPT2_CHECKPOINT"] = os.path.abspath(args.checkpoint)

import numpy as np  # noqa: E402

import hf_gpt2  # noqa: E402

batch = np.load(os.path.join(hf_gpt2.checkpoint(), "batch.npz"))
ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
shifted = np.concatenate([labels[:, 1:], np.full((len(labels), 1), -100)], axis=1)
valid = shifted != -100

if args.framework == "torch":
    import torch
    import torch.nn.functional as F

    model = hf_gpt2.torch_model().eval()
    loaded = time.perf_counter()
    logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(shifted).reshape(-1))
    loss.backward()
    value = float(loss)
elif args.framework == "jax":
    import jax
    import optax

    model = hf_gpt2.flax_model()
    loaded = time.perf_counter()

    def mean_loss(params):
        logits = model(input_ids=ids, attention_mask=mask, params=params, train=False).logits
        terms = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(valid, shifted, 0))
        return (terms * valid).sum() / valid.sum()

    value, grads = jax.jit(jax.value_and_grad(mean_loss))(model.params)
    jax.block_until_ready(grads)
    value = float(value)
else:
    import tensorflow as tf
    import tf_keras

    model = hf_gpt2.tf_model()
    loaded = time.perf_counter()
    ce = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)
    with tf.GradientTape() as tape:
        logits = model(input_ids=ids, attention_mask=mask, training=False).logits
        loss = ce(shifted, logits)
    grads = tape.gradient(loss, model.trainable_weights)
    value = float(loss)
end = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{args.framework}: loss {value:.6f}; wall {end - start:.1f} s (import and load {loaded - start:.1f} s, "
      f"forward+backward {end - loaded:.1f} s); peak resident memory {peak:,.0f} MiB")
