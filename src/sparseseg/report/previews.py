"""Preview pictures for the report: images with their pick markers, and class maps in the palette.

Markers (drawn on the image upscaled to PANEL pixels, so a pixel-sized pick stays visible):

    filled disc, class colour   an answered pick (white ring: the latest round; dark ring: earlier)
    cross                       a void pick (simulated runs) or an 'unsure' answer (projects)
    hollow ring                 a pending query (projects): asked, not answered yet
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from sparseseg.labels import IGNORE
from sparseseg.loop.preview import colourise
from sparseseg.report.page import esc, img

PANEL = 160  # side of each preview panel in pixels

ANSWERED, VOID, PENDING = "answered", "void", "pending"


@dataclass(frozen=True)
class Marker:
    y: int
    x: int
    kind: str  # ANSWERED, VOID or PENDING
    cls: int = IGNORE  # class id of an answered pick
    latest: bool = False  # picked in the latest round


def _scale(size: int) -> int:
    return max(1, PANEL // size)


def upscale(rgb: np.ndarray) -> Image.Image:
    """An (S, S, 3) uint8 picture enlarged to about PANEL pixels, nearest neighbour (pixels stay crisp)."""
    side = rgb.shape[0] * _scale(rgb.shape[0])
    return Image.fromarray(rgb).resize((side, side), Image.Resampling.NEAREST)


def with_markers(rgb: np.ndarray, markers: Sequence[Marker], palette: Sequence[Sequence[int]]) -> Image.Image:
    """The image, enlarged, with one marker per pick (module docstring)."""
    scale = _scale(rgb.shape[0])
    picture = upscale(rgb)
    draw = ImageDraw.Draw(picture)
    r = max(5.0, 1.6 * scale)
    for m in markers:
        cx, cy = (m.x + 0.5) * scale, (m.y + 0.5) * scale
        box = [cx - r, cy - r, cx + r, cy + r]
        if m.kind == ANSWERED:
            ring = (255, 255, 255) if m.latest else (40, 40, 40)
            draw.ellipse(box, fill=tuple(int(v) for v in palette[m.cls]), outline=ring, width=2)
        elif m.kind == VOID:
            for width, colour in ((5, (255, 255, 255)), (3, (0, 0, 0))):
                draw.line([cx - r, cy - r, cx + r, cy + r], fill=colour, width=width)
                draw.line([cx - r, cy + r, cx + r, cy - r], fill=colour, width=width)
        else:
            draw.ellipse(box, outline=(0, 0, 0), width=4)
            draw.ellipse(box, outline=(255, 255, 255), width=2)
    return picture


def class_map(mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """(S, S) class ids as an enlarged palette picture (void in black)."""
    mask = torch.as_tensor(np.asarray(mask))
    return upscale(colourise(mask, [list(c) for c in palette]))


def marker_legend() -> list[tuple[str, str]]:
    """(inline SVG symbol, meaning) for `page.legend`."""
    def svg(body: str) -> str:
        return f'<svg width="16" height="16" viewBox="0 0 16 16" style="vertical-align: -3px">{body}</svg>'
    return [
        (svg('<circle cx="8" cy="8" r="6" fill="#4a90d9" stroke="#ffffff" stroke-width="2"/>'
             '<circle cx="8" cy="8" r="7.5" fill="none" stroke="#999999" stroke-width="0.5"/>'),
         "pick, its class's colour (white ring: latest round)"),
        (svg('<circle cx="8" cy="8" r="6" fill="#4a90d9" stroke="#282828" stroke-width="2"/>'), "earlier pick"),
        (svg('<path d="M3 3 L13 13 M3 13 L13 3" stroke="#000000" stroke-width="3"/>'), "void / unsure pick"),
        (svg('<circle cx="8" cy="8" r="6" fill="none" stroke="#000000" stroke-width="3"/>'), "pending query"),
    ]


def card(tag: str, name: str, panels: Sequence[tuple[str, Image.Image | None]], test: bool = False) -> str:
    """One image's previews side by side under a tag such as 'TRAINING image' or 'TEST image'."""
    figures = "".join(
        f'<figure>{img(p, f"{name}: {caption}")}<figcaption>{esc(caption)}</figcaption></figure>'
        for caption, p in panels if p is not None)
    css = "card test" if test else "card"
    return f'<div class="{css}"><div><span class="tag">{esc(tag)}</span> {esc(name)}</div>{figures}</div>'
