"""One self-contained HTML page: inline CSS, images as PNG data URIs, charts as inline SVG, no script.

A page is a title, a subtitle and sections of HTML fragments; every piece of text from a file is
escaped. `markdown_html` turns the subset of Markdown that `sparseseg.compare` writes (headings,
paragraphs, pipe tables, `code`) into HTML, so the report shows compare's own tables as they are.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

import numpy as np
from PIL import Image

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 16px 24px 48px; color: #1d1d1d; background: #fafafa; }
h1 { font-size: 24px; margin: 8px 0 2px; } h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #ccc; }
h3 { font-size: 16px; margin: 18px 0 6px; } .sub { color: #555; margin: 0 0 12px; }
table { border-collapse: collapse; margin: 8px 0 12px; background: #fff; }
th, td { border: 1px solid #d5d5d5; padding: 3px 8px; } th { background: #f0f0f0; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #eee; padding: 0 3px; border-radius: 3px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } svg.chart { border: 1px solid #ddd; background: #fff; }
svg text { font: 12px system-ui, sans-serif; fill: #222; } svg text.tick { font-size: 11px; fill: #555; }
svg text.chart-title { font-size: 13px; font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; margin: 6px 0 10px; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #555; vertical-align: -2px;
          margin-right: 4px; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; }
.card { background: #fff; border: 1px solid #ccc; padding: 6px 8px; }
.card.test { border: 2px solid #b3261e; } .card .tag { font-weight: 600; } .card.test .tag { color: #b3261e; }
.card figure { display: inline-block; margin: 4px 4px 0 0; text-align: center; font-size: 12px; }
.card img { image-rendering: pixelated; display: block; }
.note { color: #555; font-size: 13px; }
"""


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def png_data_uri(image: Image.Image | np.ndarray) -> str:
    """A PNG data URI of a PIL image or an (H, W[, 3]) uint8 array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(image: Image.Image | np.ndarray, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{png_data_uri(image)}" alt="{esc(alt)}"{size}>'


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.2f}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    if isinstance(value, Raw):
        return f"<td>{value.html}</td>"
    return f"<td>{esc('' if value is None else value)}</td>"


@dataclass(frozen=True)
class Raw:
    """HTML that goes into a table cell as it is (already escaped)."""

    html: str


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; floats with two decimals, numbers right-aligned, text escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def swatch(rgb: Sequence[int]) -> str:
    return f'<span class="swatch" style="background: rgb({int(rgb[0])},{int(rgb[1])},{int(rgb[2])})"></span>'


def legend(classes: Sequence[str], palette: Sequence[Sequence[int]], extra: Sequence[tuple[str, str]] = ()) -> str:
    """Class colour swatches, then (html symbol, meaning) pairs such as the pick markers."""
    items = [f"<span>{swatch(c)}{esc(name)}</span>" for name, c in zip(classes, palette, strict=False)]
    items += [f"<span>{symbol} {esc(meaning)}</span>" for symbol, meaning in extra]
    return f'<div class="legend">{"".join(items)}</div>'


# ------------------------------------------------------------------------------------- markdown
_INLINE_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    parts = _INLINE_CODE.split(text)
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def markdown_html(text: str) -> str:
    """The Markdown of compare's summary.md as HTML: #-headings, paragraphs, pipe tables, `code`."""
    out, para, rows = [], [], []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if rows:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            body = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
            head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
            trs = "".join("<tr>" + "".join(
                f'<td class="num">{_inline(c)}</td>' if re.fullmatch(r"[-+]?[\d.]+( ± [\d.]+)?%?", c)
                else f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            if para:
                flush()
            rows.append(line)
        elif not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = min(len(line) - len(line.lstrip("#")) + 2, 5)  # under the page's h1 and the section's h2
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        else:
            if rows:
                flush()
            para.append(line.strip())
    flush()
    return "\n".join(out)


# ------------------------------------------------------------------------------------- the page
@dataclass
class Page:
    title: str
    subtitle: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, html)

    def add(self, heading: str, html: str) -> None:
        self.sections.append((heading, html))

    def html(self) -> str:
        body = "".join(f'<section><h2>{esc(h)}</h2>\n{content}\n</section>\n' for h, content in self.sections)
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head>\n<body>"
                f"<h1>{esc(self.title)}</h1><p class=\"sub\">{esc(self.subtitle)}</p>\n{body}</body></html>\n")
