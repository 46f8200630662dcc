"""The package's import graph: layers import downwards only, and no module imports itself
back through others (a cycle). Imports inside functions count: they are imports all the same.

Layers, lowest first (docs/ARCHITECTURE.md, "Layers"): a module may import its own unit
(top-level module or package) and any unit of a strictly lower layer; never a unit of its own
layer or a higher one. Stage modules do not import one another (a stage's helper that another
stage needs lives below the stages); composing stages is the workflows' job.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdpipe"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "version"),
    ("storage",),
    ("views", "recipes"),
    ("data",),
    ("models",),
    ("artifacts",),
    ("targets",),
    ("methods",),
    ("engine",),
    ("runs",),
    ("config",),
    ("distributed",),
    ("stages",),
    ("workflows", "api"),
    ("cli_method_options",),
    ("cli",),
    ("__init__",),
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known kdpipe module ``name`` starts with (``kdpipe.x.y.func`` -> ``kdpipe.x.y``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every kdpipe module ``module`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from kdpipe.x import y``: the submodule kdpipe.x.y where y is one, else kdpipe.x
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            if name == "kdpipe" or name.startswith("kdpipe."):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    found.add(target)
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYER_OF), f"units without a layer: {sorted(units - set(LAYER_OF))}"


def test_layers_import_downwards_only():
    upward = []
    for module, targets in _graph().items():
        unit = _unit(module)
        for target in targets:
            other = _unit(target)
            if other != unit and LAYER_OF[other] >= LAYER_OF[unit]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that are not downwards:\n" + "\n".join(sorted(upward))


def test_stages_do_not_import_each_other():
    sibling = [
        f"{m} -> {t}"
        for m, targets in _graph().items()
        if m.startswith("kdpipe.stages.")
        for t in targets
        if t.startswith("kdpipe.stages.")
    ]
    assert not sibling, "stage modules importing other stages:\n" + "\n".join(sorted(sibling))


def test_no_import_cycle():
    graph = _graph()
    color: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "kdpipe":  # the package's public re-exports, imported by no module
                continue
            if color.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif color.get(nxt) is None:
                visit(nxt)
        stack.pop()
        color[node] = 2

    for node in sorted(graph):
        if color.get(node) is None:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from kdpipe import storage", {"kdpipe.storage"}),
        ("def f():\n    from kdpipe.engine.loop import fit", {"kdpipe.engine.loop"}),
        ("import kdpipe.methods.kd", {"kdpipe.methods.kd"}),
    ],
)
def test_the_walker_sees_function_level_and_from_imports(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert _imports("kdpipe.probe", path, _modules()) == expected
