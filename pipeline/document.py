"""A small document model for reports: blocks (headings, text, tables, images, collapsed sections) built once and
rendered twice: Markdown with images copied beside it (relative links), and one self-contained HTML page with every
image embedded as a ``data:image/png;base64`` URI.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_ROWS = 50
FILES_DIR = "report_files"  # beside the Markdown file: its images


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str
    note: bool = False  # rendered in italics: "not run", "skipped"


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class Image:
    path: Path
    alt: str


@dataclass(frozen=True)
class Collapsed:
    summary: str
    body: str
    lang: str = ""


Block = Heading | Text | Table | Image | Collapsed


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    return Table(tuple(str(h) for h in headers), tuple(tuple(r) for r in rows))


def frame_table(frame: Any, limit: int = MAX_ROWS) -> list[Block]:
    """A pandas DataFrame as a table (first ``limit`` rows, with a note when cut)."""
    blocks: list[Block] = [table(list(frame.columns), frame.head(limit).itertuples(index=False, name=None))]
    if len(frame) > limit:
        blocks.append(Text(f"(first {limit} of {len(frame)} rows)", note=True))
    return blocks


def fmt(value: Any) -> str:
    """Cells: floats to 4 decimals (3 significant digits when tiny), NaN/None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.1f}"
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return fmt(value.item())
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


# ------------------------------------------------------------------ rendering


def render_markdown(blocks: Sequence[Block], out_dir: Path) -> str:
    parts: list[str] = []
    files = out_dir / FILES_DIR
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            parts.append(f"_{block.text}_" if block.note else block.text)
        elif isinstance(block, Table):
            parts.append(_markdown_table(block))
        elif isinstance(block, Image):
            files.mkdir(parents=True, exist_ok=True)
            target = files / block.path.name
            if block.path.resolve() != target.resolve():
                target = _unique(files, block.path.name)
                shutil.copyfile(block.path, target)
            parts.append(f"![{block.alt}]({FILES_DIR}/{target.name})")
        elif isinstance(block, Collapsed):
            parts.append(f"<details><summary>{html.escape(block.summary)}</summary>\n\n"
                         f"```{block.lang}\n{block.body.rstrip()}\n```\n\n</details>")
    return "\n\n".join(parts) + "\n"


def _markdown_table(block: Table) -> str:
    def cell(value: Any) -> str:
        return fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in block.headers) + " |",
             "|" + "|".join("---" for _ in block.headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in block.rows]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}td{font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto}.note{color:#777;font-style:italic}
h2{border-bottom:1px solid #ddd}"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    parts = [(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
              f"<style>{_CSS}</style></head><body>")]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p class='note'>{html.escape(block.text)}</p>" if block.note
                         else f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(fmt(h))}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
                           for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(f"<p><img alt='{html.escape(block.alt)}' src='data:image/png;base64,{data}'></p>")
        elif isinstance(block, Collapsed):
            parts.append(f"<details><summary>{html.escape(block.summary)}</summary>"
                         f"<pre>{html.escape(block.body)}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _unique(folder: Path, name: str) -> Path:
    target, stem, suffix, i = folder / name, Path(name).stem, Path(name).suffix, 1
    while target.exists():
        target, i = folder / f"{stem}-{i}{suffix}", i + 1
    return target
