"""Owns: the report document model (headings, paragraphs, tables, figures) and its Markdown and
self-contained HTML renderings.

The report is assembled once as a list of blocks and rendered twice, so the .md and the .html
can never disagree.  The HTML embeds every figure as a base64 PNG data URI and its CSS inline:
one file that can be mailed or archived as a CI artifact and still shows everything.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any, Sequence, Union


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    emphasis: bool = False


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""
    align_right_from: int = 1  # numeric columns start here


@dataclass
class Figure:
    title: str
    filename: str  # PNG beside report.md
    png: bytes = field(repr=False, default=b"")


Block = Union[Heading, Para, Bullets, Table, Figure]


def cell(v: Any) -> str:
    """Display form of a table value: None as '-', floats to 3 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def _md_cell(v: Any) -> str:
    return cell(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * max(2, b.level) + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [f"*{b.text}*" if b.emphasis else b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {i}" for i in b.items] + [""]
        elif isinstance(b, Table):
            if b.caption:
                out += [b.caption, ""]
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            seps = ["---" if i < b.align_right_from else "---:" for i in range(len(b.headers))]
            out.append("|" + "|".join(seps) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Figure):
            out += [f"![{b.title}]({b.filename})", ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1.2em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{margin-top:1.8em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}
th,td{border:1px solid #ddd;padding:.3em .6em}
th{background:#f5f5f5;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0 2em}
figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
.note{color:#666;font-style:italic}
caption{caption-side:top;text-align:left;color:#555;padding-bottom:.3em}
"""


def to_html(title: str, blocks: Sequence[Block]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head><body>",
           f"<h1>{e(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            lvl = min(6, max(2, b.level))
            out.append(f"<h{lvl}>{e(b.text)}</h{lvl}>")
        elif isinstance(b, Para):
            cls = ' class="note"' if b.emphasis else ""
            out.append(f"<p{cls}>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            out.append("<table>")
            if b.caption:
                out.append(f"<caption>{e(b.caption)}</caption>")
            out.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b.headers) + "</tr>")
            for row in b.rows:
                tds = []
                for i, c in enumerate(row):
                    cls = ' class="num"' if i >= b.align_right_from else ""
                    tds.append(f"<td{cls}>{e(cell(c))}</td>")
                out.append("<tr>" + "".join(tds) + "</tr>")
            out.append("</table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<figure><img alt="{e(b.title)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b.title)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
