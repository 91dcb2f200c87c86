"""A classifier on PyTorch's own nn.TransformerEncoder (batch_first, pre-norm off, GELU MLP).
nn.MultiheadAttention keeps q, k and v in one packed weight and, in eval mode, runs each layer in
one fused kernel; sparsify splits it into four linear layers first (the linearize pass)."""
import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, dim=64, heads=4, hidden=128, layers=2, classes=10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def build_model():
    torch.manual_seed(0)
    return Classifier().eval()


def example_inputs():
    return (torch.randn(2, 8, 64),)
