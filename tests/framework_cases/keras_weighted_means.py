"""Written in Keras directly: one Dense layer, class weights passed as sample weights, reduced with
'sum_over_batch_size' (divides by N) and 'mean_with_sample_weight' (divides by the sum of the weights).
Usage: python keras_weighted_means.py OUT.npz"""
import os, sys
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import numpy as np
import keras
import tensorflow as tf
keras.config.set_floatx("float64")
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 6)); y = rng.integers(0, 4, 16)
class_weight = np.array([1.0, 2.0, 0.5, 3.0])
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
out = {}
for name, reduction in (("sum_over_batch_size", "sum_over_batch_size"),
                        ("mean_with_sample_weight", "mean_with_sample_weight")):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x), sample_weight=class_weight[y])
    grads = tape.gradient(loss, model.trainable_variables)
    out.update({f"{name}/{v.path}": g.numpy() for v, g in zip(model.trainable_variables, grads)})
np.savez(sys.argv[1], **out)
