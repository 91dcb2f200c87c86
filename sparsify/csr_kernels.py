"""The compiled kernels of the csr backend (``csr_kernels.cpp``), built on first use and cached.

:func:`ops` returns ``torch.ops.sparsify_csr`` (``spmm``, ``sampled`` and ``transposed``, registered through
torch.library) once the C++ source is built with torch.utils.cpp_extension, or None: then the csr
backend runs on torch's own sparse kernels, with the same results within float rounding. The build
happens once per machine, torch version and source (about 30 s of one core), into
``$XDG_CACHE_HOME/sparsify/kernels`` (``~/.cache`` by default; ``SPARSIFY_KERNELS_DIR`` overrides
it); later processes load the cached library in milliseconds. It needs a C++ compiler and ninja;
without them, or with ``SPARSIFY_CSR_KERNELS=torch``, sparsify says so in one warning and uses the
pure-torch path.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

from sparsify.errors import SparsifyWarning

SOURCE = Path(__file__).with_name("csr_kernels.cpp")
ENV = "SPARSIFY_CSR_KERNELS"  # "torch": never build or load the compiled kernels

_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where builds are kept: one folder per source, torch version and CPU (the build targets this CPU)."""
    root = os.environ.get("SPARSIFY_KERNELS_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "sparsify", "kernels")
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    return Path(root) / f"{platform.machine()}-{key}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _missing_tool() -> str | None:
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++) on PATH"
    if not shutil.which("ninja"):
        try:
            import ninja  # noqa: F401  (the pip package puts the binary beside it; optional)
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    return None


def _build() -> object | None:
    reason = _missing_tool()
    if reason is None:
        try:
            from torch.utils import cpp_extension  # here: importing it costs start-up time most runs never use

            folder = cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
            cpp_extension.load(name="sparsify_csr_kernels", sources=[str(SOURCE)], extra_cflags=flags,
                               extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False,
                               verbose=False)
            return torch.ops.sparsify_csr
        except Exception as exc:  # a failed build must not stop training: the pure-torch path is exact
            lines = str(exc).strip().splitlines()
            reason = f"the build failed ({lines[-1][:160] if lines else type(exc).__name__})"
    warnings.warn(f"sparsify: the compiled csr kernels are not available: {reason}; the csr backend uses torch's "
                  f"sparse kernels (slower; set {ENV}=torch to skip the build silently)", SparsifyWarning, stacklevel=3)
    return None


def ops() -> object | None:
    """``torch.ops.sparsify_csr`` once built (None: use the pure-torch path). Built at the first call."""
    if os.environ.get(ENV, "").lower() == "torch":
        return None  # read on every call: a test or a benchmark may switch it back
    if "ops" not in _state:
        _state["ops"] = _build()
    return _state["ops"]


def supported(tensor: torch.Tensor) -> bool:
    """Whether the compiled kernels take ``tensor``'s device and dtype."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)
