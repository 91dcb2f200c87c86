"""A plain (non-editable) install gives sparsify, sparsify.passes and the schema, and no bare `passes`."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_maps_passes_into_sparsify(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    wheel, = tmp_path.glob("sparsify_fx-*.whl")  # distribution sparsify-fx, import name sparsify
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparsify/passes/couple.py" in names and "sparsify/passes/capture.py" in names
    assert "sparsify/export/pipeline.py" in names and "sparsify/topology/initial.py" in names
    assert "sparsify/integrations/hf.py" in names and "sparsify/integrations/lightning.py" in names
    assert "sparsify/schema/policy.schema.json" in names
    assert not [n for n in names if n.startswith("passes/") or n.startswith("schema/")]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sparsify = sparsify.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_copy_imports_from_elsewhere(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "--target", str(target)], check=True, capture_output=True)
    code = ("import sparsify, sparsify.passes.couple, sparsify.policy as p; "
            "print(sparsify.__file__); print(len(p.schema()['$defs']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(target))
