"""The docs stay true of the code where a machine can tell: DEVELOPING.md's run-directory listing holds every artifact
a stage declares, and every file path and `irm.` name the README and DEVELOPING.md cite exists."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from irm.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "DEVELOPING.md")


def _listing() -> str:
    """DEVELOPING.md's run-directory listing: the code block that starts with `run_dir/`."""
    text = (ROOT / "DEVELOPING.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    listing = [b for b in blocks if b.lstrip().startswith("<run_dir>/") or b.lstrip().startswith("run_dir/")]
    assert listing, "DEVELOPING.md has no run-directory listing (a code block starting with <run_dir>/)"
    return listing[0]


def test_every_declared_artifact_is_in_the_run_directory_listing():
    listing = _listing()
    missing = [f"{st.name}: {path}" for st in STAGES for _, path in st.outputs if path not in listing]
    assert not missing, f"DEVELOPING.md's run-directory listing lacks {missing}"
    for extra in ("run.json", "pipeline.json"):  # written by the run directory and the pipeline, not by a stage
        assert extra in listing


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_file_exists(doc):
    text = (ROOT / doc).read_text()
    cited = set(re.findall(r"(?<![\w/.])((?:irm|tests|benchmarks|configs|examples)/[A-Za-z0-9_/.-]*[A-Za-z0-9_])",
                           text))
    missing = sorted(p for p in cited if not (ROOT / p).exists())
    assert not missing, f"{doc} cites files that are not in the repository: {missing}"


def _resolves(name: str) -> bool:
    """`irm.a.b.c`: a module, or an attribute of the longest module prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            obj = importlib.import_module(module)
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_irm_name_exists(doc):
    names = set(re.findall(r"`(irm(?:\.[A-Za-z_]\w*)+)", (ROOT / doc).read_text()))
    assert names, doc
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{doc} names modules or objects that do not exist: {missing}"
