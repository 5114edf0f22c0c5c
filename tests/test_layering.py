"""The layering of irm/ (issue 26; DEVELOPING.md "Layers"): stages stand side by side above the libraries. A stage
module never imports another stage's module, a library never imports a stage module, and the import graph has no
cycle. Every import counts: module-level, inside functions, under TYPE_CHECKING; `from a.b import c` depends on the
module a.b.c when there is one, else on a.b (a package's __init__ re-exporting its submodules is no cycle). A stage
module is the one its `irm.stages.Stage` names (irm/stages/<stage>.py); irm.stages itself (the declarations) is a
library."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from irm.stages import STAGES

IRM = Path(__file__).resolve().parent.parent / "irm"


def module_files(root: Path = IRM) -> dict[str, Path]:
    """{dotted module name: its file} for every module under `root` (irm/)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The irm modules `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names += [f"{base}.{alias.name}" for alias in node.names]  # a submodule, else an attribute of `base`
    out = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out - {module}


def stage_of(modules: dict[str, Path]) -> dict[str, str]:
    """{module: the stage it belongs to} for every stage module (`Stage.module`, under irm/stages/)."""
    return {s.module: s.name for s in STAGES if s.module in modules}


def graph() -> nx.DiGraph:
    modules = module_files()
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for module, path in modules.items():
        g.add_edges_from((module, target) for target in imported(module, path, modules))
    return g


def violations(g: nx.DiGraph, stages: dict[str, str]) -> list[str]:
    """Every import that breaks the layers, as 'importer -> imported (why)'."""
    out = []
    for a, b in sorted(g.edges):
        if b not in stages or stages.get(a) == stages[b]:
            continue
        kind = f"stage {stages[a]} imports stage {stages[b]}" if a in stages else f"library imports stage {stages[b]}"
        out.append(f"{a} -> {b} ({kind})")
    return out


def test_no_stage_imports_another_stage_and_no_library_imports_a_stage():
    bad = violations(graph(), stage_of(module_files()))
    assert not bad, "imports across the layers (a stage reads upstream results through a library below it):\n" + \
        "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph()) if len(c) > 1]
    assert not cycles, "import cycles (each: the modules that import each other in a ring):\n" + \
        "\n".join(", ".join(c) for c in cycles)


def test_the_layering_checks_catch_a_planted_violation_and_cycle():
    stages = stage_of(module_files())
    assert stages["irm.stages.lexicon"] == "lexicon" and stages["irm.stages.report"] == "report"
    assert "irm.stages" not in stages and "irm.report" not in stages and "irm.sae" not in stages
    g = nx.DiGraph([("irm.stages.control", "irm.stages.lexicon"), ("irm.readout", "irm.stages.deltas"),
                    ("irm.report.features", "irm.report.doc"), ("irm.words", "irm.readout"), ("irm.readout", "irm.words")])
    assert violations(g, stages) == ["irm.readout -> irm.stages.deltas (library imports stage deltas)",
                                     "irm.stages.control -> irm.stages.lexicon (stage control imports stage lexicon)"]
    assert [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1] == [["irm.readout", "irm.words"]]


def test_the_stages_folder_holds_the_stages_one_module_each_named_as_the_stage_and_its_section():
    """irm/stages/ shows the pipeline: one module per declared stage, named as its CLI command (`-` as `_`) and as
    its config section where it has one; nothing else there but the declarations (__init__)."""
    import dataclasses

    from irm.config import RunConfig

    folder = {p.stem for p in (IRM / "stages").glob("*.py")} | {p.name for p in (IRM / "stages").iterdir()
                                                                  if p.is_dir() and p.name != "__pycache__"}
    assert folder == {s.section for s in STAGES} | {"__init__"}
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    without = {s.name for s in STAGES if s.section not in sections}
    assert without == {"deltas", "report"}  # no settings of their own
    for s in STAGES:
        assert s.section in sections | {"deltas", "report"} and (s.section in s.sections) == (s.name not in without)
    # every section named like a stage is that stage's (no near-miss such as a section `evaluate` for evaluate-reward)
    stems = {s.section.split("_")[0] for s in STAGES}
    assert {sec for sec in sections if sec.split("_")[0] in stems} <= {s.section for s in STAGES}


def test_imports_are_read_at_every_level_and_resolved_to_modules(tmp_path):
    pkg = tmp_path / "irm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("X = 1\n")
    (pkg / "top.py").write_text("def f():\n    from irm.sub.leaf import X\n    from .sub import leaf\n"
                                "    import irm.sub\n")
    modules = module_files(pkg)
    assert imported("irm.top", pkg / "top.py", modules) == {"irm.sub", "irm.sub.leaf"}
