"""A small mutation check of the core maths (issue 16.4), standing in for mutmut: each mutant changes one operator,
comparison, boolean, constant or min/max in one module, in a copy of the tree; the module's fast test files run
against it (`-x`, `-m "not slow"`); a mutant survives when they still pass.

    heavy python .ci/mutate.py --budget-min 18 --json /tmp/mutation.json

Mutants are drawn in a seeded random order, an equal time share per module, and the run stops at the budget;
the score is killed / run. Survivors are listed with their line, to be read: a surviving mutant that changes a
number the package reports needs a test."""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "irm/reward.py": ["tests/test_reward.py", "tests/test_classifier_reward.py"],
    "irm/dictionaries.py": ["tests/test_dictionaries.py"],
    "irm/divergence.py": ["tests/test_divergence.py"],
    "irm/lexicon.py": ["tests/test_lexicon.py"],
    # the SAE maths' unit tests (the Lightning fits in the same file take minutes per mutant)
    "irm/sae/model.py": ["tests/test_sae.py", "-k", "not fit and not stage and not cli and not ddp and not pipeline "
                         "and not resampling and not tensorboard and not bf16 and not grouped and not checkpoint"],
}
SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
        ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv, ast.MatMult: ast.Mult,
        ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
        ast.And: ast.Or, ast.Or: ast.And}


def _docstring_ids(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def mutation_points(source: str) -> list[tuple[int, str, int]]:
    """(index of the node in ast.walk order, description, line) of every mutation."""
    tree = ast.parse(source)
    docs = _docstring_ids(tree)
    points = []
    for i, node in enumerate(ast.walk(tree)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP:
            points.append((i, f"{type(node.op).__name__} -> {SWAP[type(node.op)].__name__}", line))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in SWAP:
            points.append((i, f"{type(node.ops[0]).__name__} -> {SWAP[type(node.ops[0])].__name__}", line))
        elif isinstance(node, ast.BoolOp):
            points.append((i, f"{type(node.op).__name__} -> {SWAP[type(node.op)].__name__}", line))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            points.append((i, f"drop {type(node.op).__name__}", line))
        elif (isinstance(node, ast.Constant) and type(node.value) in (int, float) and id(node) not in docs
              and not isinstance(node.value, bool)):
            points.append((i, f"{node.value!r} -> {node.value + 1!r}", line))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            points.append((i, f"{node.func.id} -> {'max' if node.func.id == 'min' else 'min'}", line))
    return points


def mutate(source: str, index: int) -> str:
    tree = ast.parse(source)
    node = list(ast.walk(tree))[index]
    if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)):
        node.op = SWAP[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[0] = SWAP[type(node.ops[0])]()
    elif isinstance(node, ast.UnaryOp):
        # replace the UnaryOp by its operand in its parent
        for parent in ast.walk(tree):
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, node.operand)
                elif isinstance(value, list):
                    for j, item in enumerate(value):
                        if item is node:
                            value[j] = node.operand
    elif isinstance(node, ast.Constant):
        node.value = node.value + 1
    elif isinstance(node, ast.Call):
        node.func.id = "max" if node.func.id == "min" else "min"
    return ast.unparse(tree)


def run_tests(tree: Path, tests: list[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                              *tests], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    return "survived" if out.returncode == 0 else "killed"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-min", type=float, default=18.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="modules to mutate (default: all five)")
    args = ap.parse_args()
    targets = {k: v for k, v in TARGETS.items() if not args.only or k in args.only}
    work = Path(tempfile.mkdtemp(prefix="irm-mutate-"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith("runs/"):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    start = time.time()
    share = args.budget_min * 60 / len(targets)
    report = {}
    for module, tests in targets.items():
        source = (work / module).read_text()
        t0 = time.time()
        assert run_tests(work, tests, 600) == "survived", f"{tests} fail on the unmutated tree"
        baseline = time.time() - t0
        points = mutation_points(source)
        random.Random(args.seed).shuffle(points)
        results = []
        module_start = time.time()
        for index, what, line in points:
            if time.time() - module_start + baseline > share:
                break
            (work / module).write_text(mutate(source, index))
            outcome = run_tests(work, tests, max(60.0, 3 * baseline))
            results.append({"line": line, "mutation": what, "outcome": outcome})
            print(f"{module}:{line} {what}: {outcome}", flush=True)
        (work / module).write_text(source)
        killed = sum(r["outcome"].startswith("killed") for r in results)
        report[module] = {"points": len(points), "run": len(results), "killed": killed,
                          "baseline_s": round(baseline, 1),
                          "survivors": [r for r in results if r["outcome"] == "survived"]}
        print(f"== {module}: {killed}/{len(results)} killed of {len(points)} mutation points "
              f"(tests {baseline:.0f} s each)", flush=True)
    total_run = sum(r["run"] for r in report.values())
    total_killed = sum(r["killed"] for r in report.values())
    print(f"== score {total_killed}/{total_run} killed in {(time.time() - start) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
