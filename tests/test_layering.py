"""The package's import graph follows the data path, and has no cycles.

Every ``cipa_bundle`` import of every module, at module top or inside a function, is read with ``ast`` (nothing is
imported), and mapped to its layer. A module may import its own layer or those below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cipa_bundle"

#: Bottom to top. ``synthetic`` (the phantom and the demo data set) sits above the runtime path, so that prediction
#: never depends on it; the entry points use everything.
LAYERS: list[tuple[str, ...]] = [
    ("cipa_bundle", "errors", "components", "runtime"),
    ("io",),
    ("preprocessing",),
    ("data",),
    ("networks",),
    ("metrics", "report"),
    ("workflows",),
    ("inference",),
    ("synthetic",),
    ("demo", "package", "zoo", "cli", "__main__", "apps"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: not in any layer of tests/test_layering.py; add its folder to LAYERS")


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """``(imported at module top, imported anywhere)``: the ``cipa_bundle`` modules ``path`` names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    top: set[str] = set()
    everywhere: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from cipa_bundle.x import y`` may name the submodule y: keep both candidates.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        names = [name for name in names if name == "cipa_bundle" or name.startswith("cipa_bundle.")]
        everywhere.update(names)
        if node in tree.body or any(node in getattr(stmt, "body", []) for stmt in tree.body if isinstance(stmt, ast.If)):
            top.update(names)
    return top, everywhere


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    top_edges: dict[str, set[str]] = {}
    all_edges: dict[str, set[str]] = {}
    for module, path in files.items():
        top, everywhere = _imports(path)
        top_edges[module] = {name for name in top if name in files and name != module}
        all_edges[module] = {name for name in everywhere if name in files and name != module}
    return top_edges, all_edges


def test_no_module_imports_a_layer_above_it() -> None:
    _, edges = _graph()
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in edges.items()
        for target in targets
        if _layer(target) > _layer(module)
    )
    assert upward == []


def test_module_top_imports_have_no_cycle() -> None:
    edges, _ = _graph()
    # Packages import their own submodules to re-export them; that is not a cycle of the data path.
    edges = {m: {t for t in ts if not (m == t.rpartition(".")[0] and _is_package(m))} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


def test_the_check_sees_an_upward_import() -> None:
    # The graph is real: inference imports networks (allowed), and io imports nothing above io.
    _, edges = _graph()
    assert "cipa_bundle.networks.weights" in edges["cipa_bundle.inference.predict"]
    assert all(_layer(target) <= _layer("cipa_bundle.io.dicom") for target in edges["cipa_bundle.io.dicom"])
    assert _layer("cipa_bundle.synthetic.phantom") > _layer("cipa_bundle.inference.predict")
