"""The layers of docs/architecture.md, enforced: no module imports a module of a higher layer, the
modules' imports form no cycle, and no sparsify import hides inside a function (where it would
dodge a cycle). Read from the source with ``ast``, so a planted import fails here before it runs."""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top; a module may import modules of its own layer or below. Patterns match module names.
LAYERS = [
    ("core: errors, files and inputs", ["sparsify.errors", "sparsify.files", "sparsify.inputs", "sparsify.schema"]),
    ("core: policy, checkpoint, model file", ["sparsify.policy", "sparsify.checkpoint", "sparsify.model_file"]),
    ("core: topology algorithms", ["sparsify.topology", "sparsify.topology.*"]),
    ("core: layer modules", ["sparsify.sparse_linear", "sparsify.csr_kernels", "sparsify.csr_linear",
                                   "sparsify.onnx_layers"]),
    ("core: the evolution module", ["sparsify.evolution"]),
    ("passes: infrastructure", ["sparsify.passes", "sparsify.passes.graph_pass"]),
    ("passes", ["sparsify.passes.*"]),
    ("passes: pipelines", ["sparsify.passes.pipeline"]),
    ("runtime: export steps", ["sparsify.export", "sparsify.export.onnx_file", "sparsify.export.huggingface",
                               "sparsify.export.latency", "sparsify.export.options", "sparsify.export.report",
                               "sparsify.export.shapes"]),
    ("runtime: export", ["sparsify.export.pipeline"]),
    ("runtime: the transform's handle", ["sparsify.sparse_model"]),
    ("runtime: training, inspection, plots", ["sparsify.train", "sparsify.inspection", "sparsify.plots"]),
    ("runtime: loading a run", ["sparsify.export.run"]),
    ("top: CLI and public API", ["sparsify", "sparsify.cli", "sparsify.__main__"]),
    ("top: framework integrations", ["sparsify.integrations", "sparsify.integrations.*"]),
]


def module_name(path: Path) -> str:
    """The installed name of a source file (passes/ installs as sparsify.passes, schema/ as sparsify.schema)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("passes", "schema"):
        parts.insert(0, "sparsify")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    files = [*ROOT.glob("sparsify/**/*.py"), *ROOT.glob("passes/*.py"), *ROOT.glob("schema/*.py")]
    return {module_name(f): f for f in sorted(files)}


def layer_of(module: str) -> int:
    """The index of the layer whose most specific pattern matches ``module`` (an exact name over a glob)."""
    exact = [i for i, (_, patterns) in enumerate(LAYERS) if module in patterns]
    if exact:
        return exact[0]
    globbed = [i for i, (_, patterns) in enumerate(LAYERS) if any(fnmatch.fnmatch(module, p) for p in patterns)]
    assert globbed, f"{module} is in no layer of tests/test_architecture.py (and docs/architecture.md): place it"
    return globbed[0]


def imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported sparsify module, line, inside a function) for each import in ``path``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "sparsify")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "sparsify":
                for alias in child.names:  # `from sparsify.topology import bits` imports a module
                    full = f"{child.module}.{alias.name}"
                    found.append((full if full in modules else child.module, child.lineno, in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    files = sources()
    return {name: imports(path, set(files)) for name, path in files.items()}


def test_every_module_is_in_a_layer():
    for name in sources():
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    upward = [f"{src} (layer {LAYERS[layer_of(src)][0]!r}) line {line} imports {dst} (layer {LAYERS[layer_of(dst)][0]!r})"
              for src, found in graph().items() for dst, line, _ in found if layer_of(dst) > layer_of(src)]
    assert not upward, "imports going up the layers of docs/architecture.md:\n" + "\n".join(upward)


def test_no_sparsify_import_inside_a_function():
    hidden = [f"{src} line {line} imports {dst} inside a function" for src, found in graph().items()
              for dst, line, inside in found if inside]
    assert not hidden, "\n".join(hidden)


def test_imports_form_no_cycle():
    edges = {src: sorted({dst for dst, _, _ in found if dst != src}) for src, found in graph().items()}
    state: dict[str, str] = {}

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for dst in edges.get(node, []):
            if state.get(dst) == "open":
                return path[path.index(dst):] + [dst] if dst in path else [node, dst]
            if dst not in state and (found := cycle_from(dst, path + [dst])):
                return found
        state[node] = "done"
        return None

    for start in edges:
        if start not in state and (found := cycle_from(start, [start])):
            raise AssertionError("import cycle: " + " -> ".join(found))


def test_the_layer_test_sees_an_upward_import():
    """The check itself: a core module importing the CLI is reported."""
    assert layer_of("sparsify.cli") > layer_of("sparsify.policy")
    assert layer_of("sparsify.passes.shrink") > layer_of("sparsify.evolution") > layer_of("sparsify.csr_linear")
