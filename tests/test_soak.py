"""The short soak of the topology evolution (tests/soak.py): every method on both backends in
lockstep, every invariant checked after each update, masks equal across backends. The long soak
(10,000 updates per method and backend) is `python benchmarks/soak.py`, its result in
benchmarks/RESULTS.md."""
import pytest

from sparsify.policy import METHODS

from soak import soak

UPDATES = 120


@pytest.mark.filterwarnings("ignore::sparsify.SparsifyWarning")
@pytest.mark.parametrize("method", [m for m in METHODS if m != "static"])
def test_every_invariant_holds_after_every_update_on_both_backends(method):
    result = soak(method, UPDATES, seed=1)
    assert result["updates"] == UPDATES  # on each backend, each update checked (a failed check raises)
    assert result["steps"] == UPDATES  # one update per step: no schedule ended early, no layer froze
