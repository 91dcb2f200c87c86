"""Loading the example model files (examples/models/*.py, tests/models/*.py) in tests."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
TEST_MODELS = Path(__file__).resolve().parent / "models"


def load_example(name: str):
    """Import examples/models/<name>.py (or tests/models/<name>.py) as a fresh module."""
    path = MODELS / f"{name}.py"
    if not path.exists():
        path = TEST_MODELS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
