"""A byte-level language model for the CLI: examples/models/llama.py (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP) over 256 byte values, trained to predict the next byte of real text that
every machine has: the Python standard library's top-level .py files, sorted by name, every tenth
file held out for evaluation.

    sparsify examples/lm/model.py examples/lm/policy.yaml -o runs/lm

SPARSIFY_LM_BYTES limits the training text (default 2,000,000 bytes) for a short run.
"""
import importlib.util
import math
import os
import sysconfig
from pathlib import Path

import torch
from torch import nn

_spec = importlib.util.spec_from_file_location("example_llama", Path(__file__).parent.parent / "models" / "llama.py")
_llama = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_llama)

SEQ = 64  # bytes per sequence


def build_model():
    torch.manual_seed(0)
    return _llama.Llama(vocab=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden=344)


def example_inputs():
    return (torch.randint(0, 256, (2, SEQ)),)


def _corpus(held_out: bool) -> torch.Tensor:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts = [p.read_bytes() for i, p in enumerate(files, start=1) if (i % 10 == 0) == held_out]
    text = b"\0".join(parts)
    limit = int(os.environ.get("SPARSIFY_LM_BYTES", "2000000"))
    return torch.frombuffer(bytearray(text[: limit if not held_out else limit // 10]), dtype=torch.uint8).long()


class Sequences:
    """Consecutive SEQ+1-byte windows as (inputs [batch, SEQ], next bytes [batch, SEQ]), shuffled per epoch."""

    def __init__(self, data: torch.Tensor, batch_size: int, shuffle: bool):
        n = (len(data) - 1) // SEQ
        self.windows = data[: n * SEQ + 1].unfold(0, SEQ + 1, SEQ)  # [n, SEQ + 1]
        self.batch_size, self.shuffle, self.epoch = batch_size, shuffle, 1

    def __len__(self):
        return len(self.windows) // self.batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = (torch.randperm(len(self.windows), generator=torch.Generator().manual_seed(self.epoch))
                 if self.shuffle else torch.arange(len(self.windows)))
        for i in range(len(self)):
            batch = self.windows[order[i * self.batch_size:(i + 1) * self.batch_size]]
            yield batch[:, :-1], batch[:, 1:]


def train_data(batch_size):
    return Sequences(_corpus(held_out=False), batch_size, shuffle=True)


def eval_data(batch_size):
    return Sequences(_corpus(held_out=True), batch_size, shuffle=False)


def loss(outputs, targets):
    """Cross-entropy of the next byte, over every position: outputs [B, T, 256], targets [B, T]."""
    return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def metric(outputs, targets):
    """bits per byte"""
    return loss(outputs, targets).item() / math.log(2)
