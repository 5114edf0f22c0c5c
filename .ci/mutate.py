"""A small mutation check of the core maths (issue 16.4), standing in for mutmut: each mutant changes one operator,
comparison, boolean, constant or min/max in one module, in a copy of the tree; the module's fast test files run
against it (`-x`, `-m "not slow"`); a mutant survives when they still pass.

    heavy python .ci/mutate.py --budget-min 18 --json /tmp/mutation.json
    heavy python .ci/mutate.py --modules irm/stages/lexicon.py --budget-min 5 --offset 20   # the next mutants of one module
    heavy python .ci/mutate.py --modules irm/stages/lexicon.py --lines 204 254             # rerun survivors after a fix

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
    "irm/stages/dictionaries.py": ["tests/test_dictionaries.py"],
    "irm/sae/comparison.py": ["tests/test_dictionaries.py"],  # the dictionaries stage's MMCS and chance levels
    "irm/stages/divergence.py": ["tests/test_divergence.py"],
    "irm/stages/lexicon.py": ["tests/test_lexicon.py"],
    "irm/readout.py": ["tests/test_lexicon.py"],  # the lexicon stage's readout: per-word means, rescaling, Kendall tau
    # the SAE maths' unit tests, the fast file first (the Lightning fits in test_sae.py take minutes per mutant)
    "irm/sae/model.py": ["tests/test_sae_model.py", "tests/test_sae.py", "-k",
                         "not fit and not stage and not cli and not ddp and not pipeline and not resampling "
                         "and not tensorboard and not bf16 and not grouped and not checkpoint"],
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


def _message_ids(tree: ast.AST) -> set[int]:
    """Nodes that only build text for a person: f-strings, the argument of a `raise`, print/log/warning calls. A
    mutant there changes a message, never a number, so it is not drawn (the check's time goes to the maths)."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            roots.append(node)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            roots.append(node.exc)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("print", "debug", "info", "warning", "warn", "error", "exception"):
                roots.append(node)
    return {id(n) for root in roots for n in ast.walk(root)}


def mutation_points(source: str, messages: bool = False) -> list[tuple[int, str, int]]:
    """(index of the node in ast.walk order, description, line) of every mutation (inside messages too when
    `messages`)."""
    tree = ast.parse(source)
    docs = _docstring_ids(tree)
    skip = set() if messages else _message_ids(tree)
    points = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
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
    ap.add_argument("--modules", "--only", nargs="*", default=None, dest="modules",
                    help="modules to mutate, e.g. irm/stages/lexicon.py (default: all of them)")
    ap.add_argument("--lines", nargs="*", type=int, default=None,
                    help="only the mutants on these lines (rerun a survivor against new tests)")
    ap.add_argument("--messages", action="store_true",
                    help="also mutate f-strings, raise arguments and print/log calls (text only; skipped by default)")
    ap.add_argument("--offset", type=int, default=0,
                    help="skip the first N mutants of the seeded order (continue an earlier run of the same seed)")
    args = ap.parse_args()
    unknown = set(args.modules or ()) - set(TARGETS)
    if unknown:
        sys.exit(f"not a mutation target: {sorted(unknown)}; choose from {sorted(TARGETS)}")
    targets = {k: v for k, v in TARGETS.items() if not args.modules or k in args.modules}
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
        points = mutation_points(source, args.messages)
        random.Random(args.seed).shuffle(points)
        points_total = len(points)
        points = points[args.offset:]
        if args.lines:
            points = [p for p in points if p[2] in args.lines]
        results = []
        module_start = time.time()
        for index, what, line in points:
            if time.time() - module_start + baseline > share:
                break
            (work / module).write_text(mutate(source, index))
            outcome = run_tests(work, tests, max(60.0, 3 * baseline))
            results.append({"line": line, "mutation": what, "node": index, "outcome": outcome})
            print(f"{module}:{line} {what} (node {index}): {outcome}", flush=True)
        (work / module).write_text(source)
        killed = sum(r["outcome"].startswith("killed") for r in results)
        report[module] = {"points": points_total, "offset": args.offset, "run": len(results), "killed": killed,
                          "baseline_s": round(baseline, 1),
                          "survivors": [r for r in results if r["outcome"] == "survived"]}
        print(f"== {module}: {killed}/{len(results)} killed of {points_total} mutation points "
              f"(tests {baseline:.0f} s each)", flush=True)
    total_run = sum(r["run"] for r in report.values())
    total_killed = sum(r["killed"] for r in report.values())
    print(f"== score {total_killed}/{total_run} killed in {(time.time() - start) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
