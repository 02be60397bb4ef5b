"""Write a small .npz dataset in the layout `source = "npz"` expects (x float (N, F), y int (N,))."""
import sys

import numpy as np

rng = np.random.default_rng(0)
x = rng.standard_normal((100, 12)).astype(np.float32)
y = (x[:, :3].argmax(axis=1)).astype(np.int64)  # 3 classes, learnable from the first features
np.savez(sys.argv[1] if len(sys.argv) > 1 else "my_data.npz", x=x, y=y)
