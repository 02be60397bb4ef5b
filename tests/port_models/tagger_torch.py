"""A token tagger as a user writes it in PyTorch: two inputs (token ids and a padding mask), a dict output.

The head's weight is the embedding's (tied, as language models do), so the embedding's gradient is the sum over
its two uses.
"""
import torch
from torch import nn

VOCAB, DIM = 13, 8


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.head.weight = self.embed.weight  # tied

    def forward(self, token_ids, mask):
        h = self.embed(token_ids) * mask.unsqueeze(-1).to(self.mix.weight.dtype)
        h = self.norm(torch.tanh(self.mix(h)))
        return {"logits": self.head(h), "hidden": h}
