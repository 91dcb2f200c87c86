"""Settings for every test: backend auto decides by a fixed density limit, not by a timing that could
differ between runs (tests/test_csr_linear.py tests the measurement itself); the ``device`` fixture
runs a masked-backend test on the CPU and, where there is one, on a CUDA device."""
import os

os.environ.setdefault("SPARSIFY_AUTO_CSR_DENSITY", "0.05")

import pytest  # noqa: E402  (the environment above is set before anything imports sparsify)
import torch  # noqa: E402

NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))])
def device(request) -> torch.device:
    """The device a masked-backend test moves its model and data to: the CPU always, and a GPU where
    there is one (skipped, with the reason, where there is none)."""
    return torch.device(request.param)
