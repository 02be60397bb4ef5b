"""A tiny transformer block producing (N, T, C) logits, as a user would write it in PyTorch."""
import math

import torch
from torch import nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, dim=8, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.act = nn.GELU()
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        a = self.norm1(h)
        q, k, v = self.query(a), self.key(a), self.value(a)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        h = h + self.out(weights @ v)
        h = h + self.down(self.act(self.up(self.norm2(h))))
        return self.head(h)
