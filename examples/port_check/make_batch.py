"""Write batch.npz: 32 of scikit-learn's 8x8 digits (shipped with it, no download), channels-last."""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
x = (digits.images[:32] / 16.0).astype(np.float32)[..., None]  # (32, 8, 8, 1)
y = digits.target[:32].astype(np.int64)
np.savez(Path(__file__).with_name("batch.npz"), x=x, y=y)
print(f"wrote batch.npz: x {x.shape}, y {y.shape}")
