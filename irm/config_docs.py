"""What `--help` says about each config field: the comment written beside the field in its dataclass (irm/config/),
its one place. The comments are read from the source (the trailing comment on the field's line, or the comment lines
right above it) and given to jsonargparse as the section's "Attributes:" docstring, which it shows next to each option.
Also the closest valid key for a misspelled one.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
from typing import Iterable, Optional


def field_docs(cls: type) -> dict[str, str]:
    """{field: its comment} for the dataclass `cls`, in field order: a field it inherits from a dataclass it extends
    (irm.config.PrefixSampling) keeps the comment written there."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" in vars(klass):
            docs.update(_declared_field_docs(klass))
    return {f.name: docs[f.name] for f in dataclasses.fields(cls) if f.name in docs}


def _declared_field_docs(cls: type) -> dict[str, str]:
    """{field: its comment} for the fields the class `cls` declares, from its source: the comment at the end of the
    field's line(s), after the comment lines right above it (a blank or code line ends such a block)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    docs = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and n in comments and n not in code_lines and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        trailing = [comments[i] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1) if i in comments]
        text = " ".join(above + trailing).strip()
        if text:
            docs[node.target.id] = text
    return docs


def document(cls: type) -> type:
    """Add an "Attributes:" section built from `field_docs` to the docstring of `cls` and of every dataclass section
    it holds (once), so jsonargparse shows each field's comment in `--help`. Returns `cls`."""
    if vars(cls).get("__irm_documented__", False) or not dataclasses.is_dataclass(cls):  # its own, not a base's
        return cls
    docs = field_docs(cls)
    if docs:
        head = inspect.cleandoc(cls.__doc__ or cls.__name__)
        attrs = "\n".join(f"    {name}: {' '.join(text.split())}" for name, text in docs.items())
        cls.__doc__ = f"{head}\n\nAttributes:\n{attrs}\n"
    cls.__irm_documented__ = True
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            document(type(default))
    return cls


def option_names(cls: type, prefix: str = "") -> list[str]:
    """Every dotted option of the dataclass `cls` (`cache.max_length`, `seed`, ...)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.extend(option_names(type(default), f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}")
    return out


def closest(key: str, valid: Iterable[str]) -> Optional[str]:
    """The valid key a misspelled `key` most likely meant (same section first), or None."""
    valid = list(valid)
    section = key.rpartition(".")[0]
    same = [v for v in valid if v.rpartition(".")[0] == section] if section else []
    for pool in (same, valid):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None
