"""A small classifier with a BatchNorm1d and a LayerNorm, as a user writes it in PyTorch (their default epsilons:
1e-5 both)."""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, features=6, width=8, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(features, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        with torch.no_grad():  # running statistics as after some training, not the initial 0 and 1
            self.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, width))
            self.bn.running_var.copy_(torch.linspace(0.5, 2.0, width))

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc1(x)))
        return self.head(torch.tanh(self.norm(self.fc2(h))))
