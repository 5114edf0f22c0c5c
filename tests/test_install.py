"""Installing anywhere (issue 24): the Makefile picks PyTorch's CPU wheel index when there is no NVIDIA GPU, the
package declares exactly what `irm/` imports, and `irm` is a console script with `--version`."""

import ast
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points, packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
# Declared but never imported by name: a library another one loads. Each with its reason.
LOADED_BY_OTHERS = {
    "gguf": "transformers reads the embedded model's GGUF file through it (extra `embedded`)",
}


def torch_install_line(path: str) -> str:
    """The torch line `make install` would run with this PATH (make -n: print, run nothing)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    out = subprocess.run([make, "-n", "install"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": path})
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.splitlines() if "install torch==" in line)


def test_make_install_takes_the_cpu_index_without_a_gpu_and_the_default_one_with(tmp_path):
    no_gpu = tmp_path / "no-gpu"
    no_gpu.mkdir()
    path_without = os.pathsep.join([str(no_gpu), *(p for p in os.environ["PATH"].split(os.pathsep)
                                                   if not (Path(p) / "nvidia-smi").exists())])
    assert CPU_INDEX in torch_install_line(path_without)
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "nvidia-smi").write_text("#!/bin/sh\necho GPU 0\n")
    (gpu / "nvidia-smi").chmod(0o755)
    assert "--index-url" not in torch_install_line(os.pathsep.join([str(gpu), path_without]))


def declared() -> dict[str, set[str]]:
    """{normalised distribution name: the extras it is declared in ('' for the main dependencies)}."""
    import re

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: dict[str, set[str]] = {}
    groups = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    for extra, reqs in groups.items():
        for req in reqs:
            name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
            out.setdefault(normalise(name), set()).add(extra)
    return out


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def imported_top_modules() -> set[str]:
    mods = set()
    for path in (ROOT / "irm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "irm"}


def test_every_import_in_irm_is_declared_and_every_dependency_is_imported():
    dists = packages_distributions()
    want = declared()
    imported = set()
    for module in sorted(imported_top_modules()):
        names = {normalise(d) for d in dists.get(module, [])}
        assert names, f"{module} is imported by irm/ but not installed"
        assert names & set(want), f"{module} (from {sorted(names)}) is imported by irm/ but not declared in pyproject"
        imported |= names & set(want)
    dev = {d for d, extras in want.items() if extras <= {"dev", "bench"}}  # tools, not imported by the package
    unused = set(want) - imported - dev - set(LOADED_BY_OTHERS)
    assert not unused, f"declared in pyproject but never imported by irm/: {sorted(unused)}"


def test_irm_console_script_is_the_cli_and_prints_its_version():
    (script,) = entry_points(group="console_scripts", name="irm")
    assert script.value == "irm.cli:main"
    exe = shutil.which("irm")
    if exe is None:
        pytest.skip("the package is installed without its scripts on PATH")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    from importlib.metadata import version

    assert out.returncode == 0 and out.stdout.strip() == f"irm {version('irm')}"
