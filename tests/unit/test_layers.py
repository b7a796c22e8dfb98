"""The package is layered: each subpackage imports only from the layers below it, never upwards, never in a cycle.

Every import counts, at module level or inside a function. The layers, lowest first, are
:data:`LAYERS`; a module that is not listed fails the test until it is placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sage_dist"
LAYERS = ("files", "config", "tracking", "losses", "models", "presets", "prompts", "world", "retention", "attack", "eval",
          "train", "tune", "cli")
"""Lowest first: ``files`` and ``config`` import nothing of sage_dist, ``cli`` may import everything."""


def unit_of(module: str) -> str:
    """``sage_dist.eval.world`` -> ``eval``; ``sage_dist.presets`` -> ``presets``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_edges(package: Path = PACKAGE) -> set[tuple[str, str, str]]:
    """``(importing unit, imported unit, file)`` for every import of another sage_dist unit."""
    edges = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        src = unit_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "sage_dist" \
                    else [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: use absolute imports (from sage_dist.x import y)")
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "sage_dist":
                    continue
                dst = unit_of(target)
                if dst and dst != src:
                    edges.add((src, dst, str(path.relative_to(package.parent))))
    return edges


def test_every_unit_has_a_layer():
    units = {unit_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"))
             for p in PACKAGE.rglob("*.py")}
    assert units - {""} <= set(LAYERS), sorted(units - {""} - set(LAYERS))


def test_imports_point_downwards_only():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{file}: {src} -> {dst}" for src, dst, file in import_edges() if rank[dst] >= rank[src])
    assert upward == []


def test_layer_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "sage_dist"
    (fake / "losses").mkdir(parents=True)
    (fake / "losses" / "erase.py").write_text("def f():\n    from sage_dist.train.step import Eraser\n")
    assert ("losses", "train", "sage_dist/losses/erase.py") in import_edges(fake)
