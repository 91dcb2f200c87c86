"""``python -m sparsify``: the same as the ``sparsify`` command."""
import sys

from sparsify.cli import main

sys.exit(main())
