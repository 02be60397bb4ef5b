"""Choosing Keras reduction settings: what each one divides by, and what that does to the learning rate.

A token-level loss with padding (ignore_class) and per-example sample
weights, under each Keras 3 reduction. For every setting gradparity runs the
Keras loss on batches of different sizes and padding, checks its value and
gradient against a float64 reference, and shows the divisor D it really used.

Every setting computes the same weighted sum S = sum_e s_e m_e L_e and divides
it by its own D; relative to S / (valid tokens) its gradient is scaled by
(valid tokens / D), so an SGD learning rate tuned for one setting must be
scaled by the ratio of the two scales for another. When the ratio changes from batch to batch, no
constant learning rate makes two settings equivalent.

    python examples/choosing_keras_reduction.py
"""
import sys

import numpy as np

from gradparity.commands.translate import translate

BASE = "keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100, reduction={!r})"
SETTINGS = ("sum_over_batch_size", "sum", "mean_with_sample_weight")

if __name__ == "__main__":
    code = 0
    rows = []
    for reduction in SETTINGS:
        text = BASE.format(reduction) + "(targets, logits, sample_weight=sample_weight)"
        report = translate(text, to=("torch", "jax"), progress=lambda m: print(m, file=sys.stderr))
        code = max(code, report.exit_code)
        keras = report.translations[0]
        for batch, measured in zip(report.batches, keras.batches):
            valid = int(np.sum(batch.targets != -100))
            rows.append((reduction, batch.describe(), measured.measured_divisor, valid,
                         valid / measured.measured_divisor, keras.status))
        print(f"{reduction}: {report.semantics.describe()}")
        for t in report.translations[1:]:
            print(f"  {t.rendering.framework}: {'native' if t.rendering.native else 'explicit'}, {t.status}")
    print()
    print(f"{'reduction':24s} {'batch':22s} {'D measured':>10s} {'valid':>6s} {'grad scale':>10s}  check")
    for reduction, batch, d, valid, scale, status in rows:
        print(f"{reduction:24s} {batch:22s} {d:10.4g} {valid:6d} {scale:10.4g}  {status}")
    print("\ngrad scale = valid tokens / D: this setting's gradient relative to the weighted sum divided by the "
          "valid tokens.\nA scale that differs between batches cannot be absorbed into a constant learning rate.")
    sys.exit(code)
