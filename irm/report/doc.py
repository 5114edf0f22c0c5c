"""The report as a list of blocks (headings, paragraphs, tables, figures, ready-made HTML) that the sections add, and
the Jinja2 templates (irm/templates/report*) that render them as the Markdown and the HTML page."""

from __future__ import annotations

import base64
import html
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from jinja2 import Environment, FileSystemLoader, Template, select_autoescape
from markupsafe import Markup

from irm.report.text import SHORT, cell

ROW_MARKS = ("row", "end_row")  # blocks that lay the HTML out in a row and add nothing to the Markdown


@lru_cache(maxsize=1)
def templates() -> Environment:
    """The report's templates: the pages, their blocks and the feature dashboards; HTML templates autoescape."""
    env = Environment(loader=FileSystemLoader(Path(__file__).parent.parent / "templates"),
                      autoescape=select_autoescape(["html.j2"]), trim_blocks=True, lstrip_blocks=True)
    # html.escape's entities (&quot;, &#x27;), as the report has always written them; Markup, so not escaped again.
    env.filters["esc"] = lambda text: Markup(html.escape(str(text)))
    env.filters["cell"] = cell
    env.globals["short"] = SHORT
    return env


def _block_macro(kind: str) -> Any:
    return templates().get_template(f"report_blocks.{kind}.j2").module.block


class Doc:
    """The blocks of the report, in order; a section adds them with one call each, the templates render them."""

    def __init__(self) -> None:
        self.blocks: list[dict] = []

    def section(self, title: str, found: Any) -> Any:
        """A section's heading, with "Not run." under it when what it shows (`found`: its artifact) is missing or
        empty; returns `found`."""
        self.heading(title)
        if not found:
            self.para("Not run.")
        return found

    def heading(self, text: str, level: int = 2) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
        self.blocks.append({"kind": "heading", "text": text, "level": level, "anchor": anchor})

    def para(self, text: str) -> None:
        self.blocks.append({"kind": "para", "text": text})

    def table(self, header: list[str], rows: list[list[Any]], caption: str = "") -> None:
        """Cells are formatted by the templates (irm.report.text.cell)."""
        self.blocks.append({"kind": "table", "header": header, "rows": rows, "caption": caption})

    def add(self, table: Any) -> None:
        """A table object (irm.report.tables.Table): its shown columns, cells and caption."""
        self.table(table.header(), table.cells(), table.caption)

    def image(self, png: Path, caption: str) -> None:
        """A PNG, linked from the Markdown and inlined in the HTML."""
        self.blocks.append({"kind": "image", "stem": png.stem, "link": f"{png.parent.name}/{png.name}",
                            "data": base64.b64encode(png.read_bytes()).decode(), "caption": caption})

    def raw(self, html_text: str, md_text: str) -> None:
        """Ready-made HTML (a rendered template) and what the Markdown shows in its place."""
        self.blocks.append({"kind": "raw", "html": Markup(html_text), "md": md_text})

    def code(self, text: str, summary: str) -> None:
        """A block of YAML; in the HTML folded under `summary` so it does not bury the results."""
        self.blocks.append({"kind": "code", "text": text, "summary": summary})

    @contextmanager
    def side_by_side(self) -> Iterator[None]:
        """In the HTML, lay what is added inside the block out in a row (a long table beside its plot)."""
        self.blocks.append({"kind": "row"})
        try:
            yield
        finally:
            self.blocks.append({"kind": "end_row"})

    @property
    def md(self) -> list[str]:
        """The Markdown of each block that has some."""
        block = _block_macro("md")
        return [block(b) for b in self.blocks if b["kind"] not in ROW_MARKS]

    @property
    def html(self) -> list[str]:
        """The HTML of each block."""
        block = _block_macro("html")
        return [str(block(b)) for b in self.blocks]

    def markdown(self) -> str:
        return self._page("md").render(blocks=[b for b in self.blocks if b["kind"] not in ROW_MARKS])

    def page(self, title: str) -> str:
        """The HTML document: a contents list of the sections after the title and the run line."""
        sections = [b for b in self.blocks if b["kind"] == "heading" and b["level"] == 2]
        return self._page("html").render(title=title, blocks=self.blocks, sections=sections)

    @staticmethod
    def _page(kind: str) -> Template:
        return templates().get_template(f"report.{kind}.j2")
