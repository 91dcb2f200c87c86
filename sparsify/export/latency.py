"""Latency of the shrunk export against the dense one, in onnxruntime."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from sparsify.export.onnx_file import OnnxModel, to_onnx
from sparsify.inputs import ExampleInputs, first_example


def fastest(runtimes: dict, inputs: ExampleInputs, repeat: int, rounds: int = 3) -> dict:
    """Each runtime's fastest run on ``inputs`` in seconds, alternating them ``rounds`` times
    (``repeat`` runs each in all)."""
    best = {name: float("inf") for name in runtimes}
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            best[name] = min(best[name], runtime.latency(inputs, max(1, repeat // rounds)))
    return best


def compare_with_dense(report: dict, shrunk: nn.Module, shrunk_file: Path, runtime: OnnxModel, dense: nn.Module,
                       dense_file: Path, inputs: ExampleInputs, on: ExampleInputs, opset: int, repeat: int,
                       one_example: bool = True) -> int:
    """Export ``dense`` to ``dense_file`` and time it against the shrunk export (``runtime``, read
    from ``shrunk_file``) on ``on``, on its first example, and on its first example with one thread
    each (unless ``one_example`` is False: a file with a fixed batch size); the times and ratios go
    into ``report``. Returns the dense file's size in bytes."""
    to_onnx(dense, inputs, dense_file, opset)
    dense_runtime = OnnxModel(dense_file, dense)

    def timed(key: str, runtimes: dict, on: ExampleInputs, repeat: int) -> None:
        seconds = fastest(runtimes, on, repeat)
        report[key + "_ms"] = {k: round(v * 1e3, 4) for k, v in seconds.items()}
        report[key + "_ratio"] = seconds["shrunk"] / seconds["dense"]

    timed("latency", {"dense": dense_runtime, "shrunk": runtime}, on, repeat)
    one = first_example(on) if one_example else None
    if one is not None:  # the latency of a single example, where small batches differ most
        timed("latency_one_example", {"dense": dense_runtime, "shrunk": runtime}, one, repeat * 5)
        # and with one onnxruntime thread each, as a server running a worker per core would:
        # a gathered product gains nothing from more threads, a dense one does
        timed("latency_one_example_one_thread", {"dense": OnnxModel(dense_file, dense, threads=1),
                                                 "shrunk": OnnxModel(shrunk_file, shrunk, threads=1)},
              one, repeat * 5)
    return dense_file.stat().st_size
