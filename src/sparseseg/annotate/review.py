"""Review images: where a round's queried pixels are, as crosshairs on the (enlarged) image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

REVIEW_SIDE = 512  # small images are enlarged (nearest) to about this side so the pixel is visible


def crosshair_image(image: np.ndarray, points: Sequence[tuple[int, int, int]]) -> Image.Image:
    """The image with a crosshair centred on each queried pixel.

    Args:
        image: (S, S, 3) uint8.
        points: (query id, y, x) of the queried pixels.

    Returns:
        An RGB image enlarged by an integer factor; each crosshair has a gap over the pixel itself
        (left visible), black-outlined white arms, and the query id beside it.
    """
    size = image.shape[0]
    scale = max(1, math.ceil(REVIEW_SIDE / size))
    out = Image.fromarray(image).resize((size * scale, size * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(out)
    gap, arm = max(2, scale), max(8, 4 * scale)
    for query_id, y, x in points:
        cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
        # the queried pixel's outline, then four arms (outline first, white on top)
        box = (x * scale - 1, y * scale - 1, (x + 1) * scale, (y + 1) * scale)
        draw.rectangle(box, outline=(255, 255, 255))
        arms = [(cx - arm, cy, cx - gap, cy), (cx + gap, cy, cx + arm, cy),
                (cx, cy - arm, cx, cy - gap), (cx, cy + gap, cx, cy + arm)]
        for line in arms:
            draw.line(line, fill=(0, 0, 0), width=3)
        for line in arms:
            draw.line(line, fill=(255, 255, 255), width=1)
        draw.text((cx + gap + 1, cy - arm), str(query_id), fill=(255, 255, 0), stroke_width=1, stroke_fill=(0, 0, 0))
    return out
