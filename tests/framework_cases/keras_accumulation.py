"""Written in Keras directly: what optimizer.gradient_accumulation_steps does with micro-batch gradients.

SGD(learning_rate=1) with gradient_accumulation_steps=3 over three micro-batches, each a mean-reduced loss;
the change in the weights after the third step is minus the gradient Keras applied. Written for sizes
(4, 4, 4) and (4, 4, 2), next to the full-batch gradient of the same examples and the plain average of the
three micro-batch gradients (computed before each step, on the unchanged weights).
Usage: python keras_accumulation.py OUT.npz
"""
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras.config.set_floatx("float64")
rng = np.random.default_rng(0)
x_all = rng.standard_normal((12, 6))
y_all = rng.integers(0, 4, 12)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
out = {}


def build():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="dense")], name="net")


def gradient(model, x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
    return tape.gradient(loss, model.trainable_variables)


for name, sizes in (("even", (4, 4, 4)), ("uneven", (4, 4, 2))):
    n = sum(sizes)
    x, y = x_all[:n], y_all[:n]
    model = build()
    before = [v.numpy().copy() for v in model.trainable_variables]
    out.update({f"full_batch_{name}/{v.path}": g.numpy()
                for v, g in zip(model.trainable_variables, gradient(model, x, y))})
    optimizer = keras.optimizers.SGD(learning_rate=1.0, gradient_accumulation_steps=3)
    start, micro = 0, []
    for size in sizes:
        grads = gradient(model, x[start:start + size], y[start:start + size])
        micro.append([g.numpy() for g in grads])
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        start += size
    out.update({f"mean_of_means_{name}/{v.path}": sum(m[i] for m in micro) / len(micro)
                for i, v in enumerate(model.trainable_variables)})
    out.update({f"accumulated_{name}/{v.path}": b - v.numpy()
                for v, b in zip(model.trainable_variables, before)})
np.savez(sys.argv[1], **out)
