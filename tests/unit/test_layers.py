"""The README's layer table, checked: each folder of ``worker/`` is a layer, and a module imports
only from its own layer or the ones the table allows (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

WORKER = REPO / "worker"
#: layer -> the layers it may import from (besides itself); "top" is every module directly in worker/
ALLOWED = {
    "core": set(),
    "compute": {"core"},
    "backends": {"core", "compute"},
    "transport": {"core"},
    "pipeline": {"core", "compute", "backends", "transport"},
    "top": {"core", "compute", "backends", "transport", "pipeline"},
}


def _layer_of_path(path: Path) -> str:
    parts = path.relative_to(WORKER).parts
    return parts[0] if len(parts) > 1 else "top"


def _layer_of_module(name: str) -> str | None:
    """The layer of ``worker.x.y``; None for the package itself (``from worker import __version__``)."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    if (WORKER / parts[1]).is_dir():
        return parts[1]
    return "top"


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name == "worker" or name.startswith("worker.")]


def test_every_module_imports_only_from_its_layer_or_below() -> None:
    violations = []
    modules = sorted(WORKER.rglob("*.py"))
    for path in modules:
        layer = _layer_of_path(path)
        for line, name in _imports(path):
            target = _layer_of_module(name)
            if target is not None and target != layer and target not in ALLOWED[layer]:
                violations.append(f"{path.relative_to(REPO)}:{line} ({layer}) imports {name} ({target})")
    assert len(modules) > 40 and not violations, "\n".join(violations)


def test_the_pipeline_reaches_backends_only_through_their_lane_interface() -> None:
    """The stages run lanes; which backend serves them is the top layer's choice."""
    wider = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((WORKER / "pipeline").glob("*.py"))
        for _, name in _imports(path)
        if name.startswith("worker.backends") and name != "worker.backends.base"
    ]
    assert not wider, wider
