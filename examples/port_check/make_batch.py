"""Write batch.npz: 32 of scikit-learn's 8x8 digits (shipped with it, no download), channels-last.
With --all, also digits.npz: all 1,797 of them, to train the ports on (gradparity train --model check.toml
--data digits.npz --sweep)."""
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
x = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
y = digits.target.astype(np.int64)
np.savez(Path(__file__).with_name("batch.npz"), x=x[:32], y=y[:32])
print(f"wrote batch.npz: x {x[:32].shape}, y {y[:32].shape}")
if "--all" in sys.argv[1:]:
    np.savez(Path(__file__).with_name("digits.npz"), x=x, y=y)
    print(f"wrote digits.npz: x {x.shape}, y {y.shape}")
