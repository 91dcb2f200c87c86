"""The long soak of the topology evolution: 10,000 topology updates in all (625 per method on each
backend), every invariant checked after each (tests/soak.py holds the checks; the suite runs 120
updates per method and backend).

    python benchmarks/soak.py [--updates 625] [--seed 0]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
