"""Fault injection over many trials: training runs killed with SIGKILL during and after the
writes of their files and at random times, resumed, and compared bitwise with an uninterrupted run
(tests/faults.py holds the trials; the suite runs six).

    python benchmarks/faults.py [--trials 100] [--seed 0] [--dir DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from faults import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
