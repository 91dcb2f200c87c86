"""Tracing footguns: what each common pattern in forward() does to capture (the table in docs/capture.md).

torch.fx.symbolic_trace runs forward() on proxies, so Python that needs a real value (a branch, an
assert, len(), iteration) stops it; torch.export(strict=False) runs on fake tensors with concrete
shapes, so it takes those, but not Python that needs tensor *values*. Each case below is checked
for the capture it gets and the reason and line it reports.
"""
import math

import pytest
import torch
from torch import nn

from sparsify.errors import CaptureError
from sparsify.passes.capture import EXPORT, SYMBOLIC, capture


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)


class ShapeAssert(Base):
    def forward(self, x):
        assert x.shape[-1] == 8, "wrong width"
        return self.fc(x)


class RankBranch(Base):
    def forward(self, x):
        if x.dim() == 3:
            x = x.mean(1)
        return self.fc(x)


class LenOfInput(Base):
    def forward(self, x):
        return self.fc(x) * len(x)


class LoopOverRows(Base):
    def forward(self, x):
        return torch.stack([self.fc(row) for row in x])


class MathOnShape(Base):
    def forward(self, x):
        return self.fc(x) / math.sqrt(x.size(-1))


class BooleanMask(Base):
    def forward(self, x):
        return self.fc(x[x.sum(1) > 0])


class ValueBranch(Base):
    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class ItemAsShape(Base):
    def forward(self, x):
        return self.fc(x).repeat(int(x.sum().item()), 1)


class ThroughNumpy(Base):
    def forward(self, x):
        return self.fc(torch.from_numpy(x.numpy() * 2))


class ToList(Base):
    def forward(self, x):
        return self.fc(x) * max(x[0].tolist())


def line_of(cls) -> str:
    """'test_tracing.py:N: code' of the first line of cls.forward's body."""
    import inspect

    source, start = inspect.getsourcelines(cls.forward)
    return f"test_tracing.py:{start + 1}: {source[1].strip()}"


@pytest.mark.parametrize("cls, reason", [
    (ShapeAssert, "TraceError: symbolically traced variables cannot be used as inputs to control flow"),
    (RankBranch, "TraceError: symbolically traced variables cannot be used as inputs to control flow"),
    (LenOfInput, "RuntimeError: 'len' is not supported in symbolic tracing by default"),
    (LoopOverRows, "TraceError: Proxy object cannot be iterated"),
])
def test_python_that_needs_a_shape_falls_back_to_torch_export(cls, reason):
    model, x = cls(), torch.randn(2, 8)
    cap = capture(model, (x,))
    assert cap.kind == EXPORT
    assert cap.fallback_reason.startswith(reason) and cap.fallback_reason.endswith(line_of(cls))
    torch.testing.assert_close(cap.graph_module(x), model(x))  # the graph computes what the model does


@pytest.mark.parametrize("cls", [MathOnShape, BooleanMask])
def test_what_symbolic_trace_takes(cls):
    model, x = cls(), torch.randn(3, 8)
    cap = capture(model, (x,))
    assert cap.kind == SYMBOLIC and cap.fallback_reason is None
    torch.testing.assert_close(cap.graph_module(x), model(x))


@pytest.mark.parametrize("cls, symbolic, export, advice", [
    (ValueBranch, "TraceError: symbolically traced variables cannot be used as inputs to control flow",
     "GuardOnDataDependentSymNode: Could not guard on data-dependent expression",
     "replace Python control flow on tensor values (if tensor: ...) with torch operations"),
    (ItemAsShape, "TypeError: int() argument must be a string, a bytes-like object or a real number, not 'Proxy'",
     "GuardOnDataDependentSymNode: Could not extract specialized integer from data-dependent expression",
     "do not turn tensor values into Python numbers (.item(), .tolist(), int(tensor))"),
    (ThroughNumpy, "TypeError: expected np.ndarray (got Proxy)",
     "RuntimeError: .numpy() is not supported for tensor subclasses.",
     "keep forward() in torch operations: .numpy() and torch.from_numpy leave the graph."),
    (ToList, "TraceError: Proxy object cannot be iterated.", "tolist",
     "do not turn tensor values into Python numbers"),
])
def test_python_that_needs_tensor_values_fails_both_ways(cls, symbolic, export, advice):
    with pytest.raises(CaptureError) as info:
        capture(cls(), (torch.ones(2, 8),))
    lines = str(info.value).splitlines()
    assert lines[0] == "could not capture the model as a graph."
    assert lines[1].startswith(f"  torch.fx.symbolic_trace: {symbolic}") and lines[1].endswith(line_of(cls))
    assert lines[2].startswith("  torch.export.export(strict=False): ") and export in lines[2]
    assert lines[2].endswith(line_of(cls))
    assert lines[3].startswith(f"What to do: {advice}")
