"""A small classification task for CLI training tests: an MLP on synthetic, seeded data.

SPARSIFY_TEST_DIE_AT_EPOCH=N makes the process exit abruptly when epoch N starts (after the
checkpoint of epoch N-1 was written): a real interruption for the resume test.
"""
import os

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)

    def forward(self, x):
        x = nn.functional.dropout(torch.relu(self.fc1(x)), 0.1, self.training)  # global RNG: must resume too
        return self.fc3(torch.relu(self.fc2(x)))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return x, (x[:, :4] + 0.3 * x[:, 4:8]).argmax(1)


class Batches:
    def __init__(self, n, seed, batch_size, shuffle):
        self.x, self.y = _data(n, seed)
        self.batch_size, self.shuffle, self.epoch = batch_size, shuffle, 1

    def __len__(self):
        return len(self.x) // self.batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch
        if str(epoch) == os.environ.get("SPARSIFY_TEST_DIE_AT_EPOCH"):
            os._exit(3)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch)) if self.shuffle \
            else torch.arange(len(self.x))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def build_model():
    return Net()


def example_inputs():
    return (torch.randn(2, 20),)


def train_data(batch_size):
    return Batches(960, 0, batch_size, shuffle=True)


def eval_data(batch_size):
    return Batches(256, 1, 64, shuffle=False)
