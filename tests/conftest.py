"""Settings for every test: backend auto decides by a fixed density limit, not by a timing that could
differ between runs (tests/test_csr_linear.py tests the measurement itself)."""
import os

os.environ.setdefault("SPARSIFY_AUTO_CSR_DENSITY", "0.05")
