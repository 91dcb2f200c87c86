"""The sparse-training papers' MLP (784-1568-1568-1568-10) on real Fashion-MNIST.

Data: the standard IDX files (Debian package dataset-fashion-mnist installs them under
/usr/share/datasets/fashion-mnist/); set SPARSIFY_FASHION_MNIST to read them from elsewhere.
SPARSIFY_FMNIST_TRAIN_LIMIT caps the number of training images (quick runs and tests).
"""
import gzip
import os
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from mlp import MLP  # noqa: E402

DATA = Path(os.environ.get("SPARSIFY_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
MEAN, STD = 0.2860, 0.3530  # of the training images


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped): magic (2 zero bytes, dtype code, rank), sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype, rank = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(f">{rank}I", f.read(4 * rank))
        data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


def _find(stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (DATA / name).exists():
            return DATA / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {DATA}. Install the Debian package "
        "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set SPARSIFY_FASHION_MNIST "
        "to the folder holding the IDX files.")


def _split(prefix: str):
    images = read_idx(_find(f"{prefix}-images-idx3-ubyte")).float().div_(255).sub_(MEAN).div_(STD)
    labels = read_idx(_find(f"{prefix}-labels-idx1-ubyte")).long()
    return images.reshape(len(images), 784), labels


def _batches(images, labels, batch_size, shuffle, seed):
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(images))
    for i in range(0, len(images), batch_size):
        idx = order[i:i + batch_size]
        yield images[idx], labels[idx]


class Loader:
    """Batches of a tensor dataset, shuffled by a seed per epoch (set_epoch), so a resumed run sees
    the same order as an uninterrupted one."""

    def __init__(self, images, labels, batch_size, shuffle):
        self.images, self.labels, self.batch_size, self.shuffle, self.epoch = images, labels, batch_size, shuffle, 1

    def __len__(self):
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return _batches(self.images, self.labels, self.batch_size, self.shuffle, self.epoch)


def build_model():
    return MLP((784, 1568, 1568, 1568, 10))


def example_inputs():
    return (torch.zeros(2, 784),)


def train_data(batch_size):
    images, labels = _split("train")
    limit = int(os.environ.get("SPARSIFY_FMNIST_TRAIN_LIMIT", len(images)))
    return Loader(images[:limit], labels[:limit], batch_size, shuffle=True)


def eval_data(batch_size):
    images, labels = _split("t10k")
    return Loader(images, labels, 1000, shuffle=False)
