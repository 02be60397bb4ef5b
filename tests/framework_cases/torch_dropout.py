"""Written in PyTorch directly, the seed question's four methods on a model with nn.Dropout left in training
mode (no model.eval()). Usage: python torch_dropout.py OUT.npz [reseed]

With "reseed" the author sets torch.manual_seed(0) before each method, so the methods that run one forward
pass of the batch draw the same mask; without it every forward pass draws a fresh one."""
import sys

import numpy as np
import torch
from torch import nn

torch.manual_seed(1)
x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 4)).double()
reseed = sys.argv[2:] == ["reseed"]


def grads():
    return {name: p.grad.detach().clone().numpy() for name, p in model.named_parameters()}


results = {}
for method in ("none", "sum", "mean", "one_by_one"):
    if reseed:
        torch.manual_seed(0)
    model.zero_grad()
    if method == "none":
        losses = nn.CrossEntropyLoss(reduction="none")(model(x), y)
        for i in range(len(y)):
            losses[i].backward(retain_graph=True)
    elif method == "one_by_one":
        for i in range(len(y)):
            nn.CrossEntropyLoss()(model(x[i:i + 1]), y[i:i + 1]).backward()
    else:
        nn.CrossEntropyLoss(reduction=method)(model(x), y).backward()
    results[method] = grads()
for method in ("none", "sum", "one_by_one"):  # the seed's normalization: summed gradients / N
    results[method] = {k: v / len(y) for k, v in results[method].items()}
np.savez(sys.argv[1], **{f"{m}/{k}": v for m, g in results.items() for k, v in g.items()})
