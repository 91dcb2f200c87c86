"""The command line: ``sparsify model.py policy.yaml [-o OUT]`` and ``sparsify inspect model.py [policy.yaml]``.

User errors print one clean message and exit with code 2; internal errors keep their traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Sequence

from sparsify import __version__
from sparsify.errors import SparsifyError, SparsifyWarning
from sparsify.export.run import export_run
from sparsify.inspection import inspect_model
from sparsify.train import launch, run_and_leave

USAGE = """sparsify model.py policy.yaml [-o OUT] [--resume] [--nproc N]   train with topology evolution, write OUT
       sparsify inspect model.py [policy.yaml] [--json]   linear sites, coupling groups, matched rules
       sparsify export RUN [-o model.onnx]              shrink a trained run and export it to ONNX, checked"""


def _inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsify inspect",
                                description="Show a model's linear sites, coupling groups and the policy's decisions.")
    p.add_argument("model", help="model.py defining build_model() and example_inputs()")
    p.add_argument("policy", nargs="?", help="policy YAML (optional)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsify export",
                                description="Shrink a trained sparse model and export it to ONNX (+ .pt2), "
                                            "checked against the trained model with onnxruntime.")
    p.add_argument("run", help="a run folder, or its model.pt or checkpoint.pt")
    p.add_argument("-o", "--out", help="the .onnx file to write (default: model.onnx in the run folder)")
    p.add_argument("--no-shrink", dest="shrink", action="store_false", default=None,
                   help="keep every neuron (export the sparse weights as they are)")
    p.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                   help="skip the onnxruntime comparison (not recommended)")
    p.add_argument("--tolerance", type=float,
                   help="largest allowed max abs difference of onnxruntime's outputs (default 1e-4; for outputs "
                        "beyond 1 in magnitude, this fraction of the largest)")
    p.add_argument("--opset", type=int, help="ONNX opset, 17 or newer (default 18)")
    p.add_argument("--compact", action="store_true", default=None,
                   help="store layers at most half dense as values + indices inside the ONNX file")
    p.add_argument("--sparse-matmul", action="store_true", default=None,
                   help="layers at most 2%% dense multiply only their non-zero weights (the report gives "
                        "the latencies against the dense export)")
    p.add_argument("--static-shapes", action="store_true", default=None,
                   help="fix every input dimension at the example inputs' size (by default each dimension the "
                        "model allows is dynamic, checked at a second size, and fixed where it fails there)")
    return p


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsify", usage=USAGE,
                                description="Make a model's linear layers sparse as a policy says, and train it.")
    p.add_argument("model", help="model.py defining build_model(), example_inputs(), train_data(), eval_data()")
    p.add_argument("policy", help="policy YAML")
    p.add_argument("-o", "--out", help="output folder (default: runs/<model file name>)")
    p.add_argument("--epochs", type=int, help="override training.epochs of the policy")
    p.add_argument("--force", action="store_true", help="write into an output folder that already has a run")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    p.add_argument("--nproc", type=int, default=1,
                   help="train in N local processes (distributed data parallel); or launch with torchrun")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    return p


def inspect_command(args: argparse.Namespace) -> int:
    report = inspect_model(args.model, args.policy)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        report.print()
    return 0


def export_command(args: argparse.Namespace) -> int:
    export_run(args.run, args.out, shrink=args.shrink, verify=args.verify, tolerance=args.tolerance,
               opset=args.opset, compact=args.compact, sparse_matmul=args.sparse_matmul,
               static_shapes=args.static_shapes)
    return 0


def run_command(args: argparse.Namespace) -> int:
    kwargs = dict(model_path=args.model, policy_path=args.policy, out=args.out, epochs=args.epochs,
                  force=args.force, resume=args.resume, plots=not args.no_plots)
    if args.nproc != 1:
        launch(args.nproc, **kwargs)
    else:
        run_and_leave(**kwargs)  # alone, or one rank of a torchrun launch
    return 0


_show_python_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """sparsify's own warnings as one line, like its errors; others as Python shows them."""
    if issubclass(category, SparsifyWarning):
        print(f"sparsify: warning: {message}", file=sys.stderr)
    else:
        _show_python_warning(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"sparsify {__version__}")
        return 0
    if argv and argv[0] == "inspect":
        args, command = _inspect_parser().parse_args(argv[1:]), inspect_command
    elif argv and argv[0] == "export":
        args, command = _export_parser().parse_args(argv[1:]), export_command
    else:
        args, command = _run_parser().parse_args(argv), run_command
    warnings.showwarning = _show_warning
    try:
        return command(args)
    except SparsifyError as exc:
        print(f"sparsify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
