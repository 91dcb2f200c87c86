"""The MLP of the sparse-training papers: 784-1568-1568-1568-10 on 28x28 images."""
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, sizes=(784, 1568, 1568, 1568, 10)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])
        self.fc4 = nn.Linear(sizes[3], sizes[4])

    def forward(self, x):
        x = x.flatten(1)  # (B, 784)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.fc4(x)


def build_model():
    return MLP()


def example_inputs():
    return (torch.randn(2, 1, 28, 28),)
