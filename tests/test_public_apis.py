"""irm/ uses only the public API of the libraries it builds on (Lightning, TRL, transformers, torch, ...): no
attribute `x._name` that irm/ does not define itself, no `from <library> import _name`. A private attribute is an
implementation detail its library may rename in any release; where a library has no public way, the override lives
in one adapter module with its own test (irm.rlhf.trl_internals: TRL's PPO prompt loader, rollout sampler and the
policy's name under DDP)."""

from __future__ import annotations

import ast
from pathlib import Path

IRM = Path(__file__).resolve().parents[1] / "irm"

# Underscore names that are public API. Each entry: the name and why it may be used.
ALLOWED = {
    "_asdict": "namedtuple's documented method (the underscore only keeps it apart from field names)",
    "_replace": "namedtuple's documented method (as _asdict)",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def own_names(trees: dict[str, ast.Module]) -> set[str]:
    """Every private name irm/ defines: functions, classes, assigned names and attributes it sets (`self._x = ...`)."""
    names = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if _private(n)}


def private_accesses(sources: dict[str, str], package: str = "irm") -> list[str]:
    """`path:line: what` for every read of a private attribute that `sources` do not define (on any object: `self`
    included, since `self._trainer` of a LightningModule is Lightning's) and every private name imported from
    outside `package`, unless ALLOWED."""
    trees = {path: ast.parse(text) for path, text in sources.items()}
    ours = own_names(trees) | set(ALLOWED)
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in ours:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] != package:
                found += [f"{path}:{node.lineno}: from {node.module} import {alias.name}" for alias in node.names
                          if _private(alias.name) and alias.name not in ALLOWED]
    return found


def test_irm_reads_no_private_attribute_of_a_library_object():
    sources = {str(p.relative_to(IRM.parent)): p.read_text() for p in sorted(IRM.rglob("*.py"))}
    assert private_accesses(sources) == []
    used = {node.attr for text in sources.values() for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Attribute)}
    assert set(ALLOWED) <= used, f"stale ALLOWED entries: {sorted(set(ALLOWED) - used)}"


def test_the_scan_finds_a_library_private_on_self_on_another_object_and_in_an_import():
    source = '''
from lightning.pytorch.utilities import _private_helper
from irm.sae.module import _ReluSAEStep


class Module:
    def __init__(self):
        self._own = 1

    def step(self, trainer, row):
        self._own += 1
        if self._trainer is None:
            trainer._results.clear()
        return row._asdict(), _ReluSAEStep
'''
    assert private_accesses({"m.py": source}) == [
        "m.py:2: from lightning.pytorch.utilities import _private_helper",
        "m.py:12: self._trainer",
        "m.py:13: trainer._results",
    ]
