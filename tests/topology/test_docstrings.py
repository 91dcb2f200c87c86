"""The hand-computed examples in the topology docstrings hold."""
import doctest
import importlib

import pytest

MODULES = ["initial", "selection", "removal", "regrowth", "schedules", "percolation", "metrics"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"sparsify.topology.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"sparsify.topology.{name} has no docstring example"
    assert result.failed == 0
