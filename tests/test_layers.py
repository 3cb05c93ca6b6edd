"""The layering docs/architecture.md states: ``app`` (CLI, server assembly, load generator)
sits on top; ``router`` may use ``cluster``; ``cluster`` never imports ``router`` or
``app``; the engine, workers and transfer import neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "engine": {"router", "app", "cluster", "prefill_worker", "decode_worker"},
    "kv_transfer": {"router", "app", "cluster", "prefill_worker", "decode_worker"},
    "prefill_worker": {"router", "app", "cluster"},
    "decode_worker": {"router", "app", "cluster"},
    "cluster": {"router", "app"},
    "router": {"app"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package):
    offenders = {str(path.relative_to(ROOT)): sorted(_imported_packages(path)
                                                     & FORBIDDEN[package])
                 for path in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}
