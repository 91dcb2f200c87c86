"""Wall time of a Fashion-MNIST training run: dense FC against CHTs at 99% sparsity, in one loop.

The same loop trains both (SGD with momentum 0.9, lr 0.025 decayed linearly, batch 32, the
example's data order): the dense MLP 784-1568-1568-1568-10 as built, and the same MLP sparsified
by examples/fmnist/policy.yaml (fc1-fc3 at 1% density, CHTs with an update every 250 steps,
backend auto = csr). Test accuracy after the last epoch is printed beside the time. Run from
the repository root:

    python benchmarks/fmnist_run.py --epochs 2
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import time
from pathlib import Path

import torch
from torch import nn

import sparsify

ROOT = Path(__file__).resolve().parent.parent


def example():
    spec = importlib.util.spec_from_file_location("fmnist_example", ROOT / "examples" / "fmnist" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(model, data, epochs: int, handle=None) -> tuple[float, float]:
    train_data, test = data.train_data(32), data.eval_data(1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9)
    total = epochs * len(train_data)
    if handle is not None:
        handle.attach(optimizer, total_steps=total, steps_per_epoch=len(train_data))
    step, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_data.set_epoch(epoch)
        model.train()
        for x, y in train_data:
            for group in optimizer.param_groups:
                group["lr"] = 0.025 * (1 - step / total)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    return seconds, correct / 10000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    data = example()
    print(f"# {datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · "
          f"{torch.get_num_threads()} threads · {args.epochs} epochs\n")
    torch.manual_seed(0)
    dense_seconds, dense_accuracy = train(data.build_model(), data, args.epochs)
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(data.build_model(), ROOT / "examples" / "fmnist" / "policy.yaml",
                                      data.example_inputs())
    sparse_seconds, sparse_accuracy = train(model, data, args.epochs, handle)
    backends = sorted({type(s.module).__name__ for s in handle.sites.values()})
    print("| run | seconds | test accuracy |\n|---|---|---|")
    print(f"| dense FC | {dense_seconds:.1f} | {dense_accuracy:.4f} |")
    print(f"| CHTs 99% sparse ({', '.join(backends)}; {len(handle.history)} topology updates) | {sparse_seconds:.1f} | "
          f"{sparse_accuracy:.4f} |")
    print(f"\nratio sparse / dense: {sparse_seconds / dense_seconds:.2f}")


if __name__ == "__main__":
    main()
