"""The original model: a small PyTorch CNN for scikit-learn's 8x8 digits (plain user code)."""
import torch
from torch import nn


class TorchCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),             # features.0: 8x8 -> 8x8
            nn.GELU(),                                 # features.1: exact GELU (torch's default)
            nn.MaxPool2d(2),                           # features.2: -> 4x4
            nn.Conv2d(8, 16, 3, stride=2, padding=1),  # features.3: -> 2x2, one row/column of zeros on every side
            nn.GELU(),                                 # features.4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                              # classifier.0: (C, H, W) order
            nn.Linear(16 * 2 * 2, 32),                 # classifier.1
            nn.LayerNorm(32),                          # classifier.2: eps 1e-5
            nn.GELU(),                                 # classifier.3
            nn.Linear(32, 10),                         # classifier.4
        )

    def forward(self, x):
        return self.classifier(self.features(x))
