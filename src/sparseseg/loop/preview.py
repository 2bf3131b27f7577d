"""A PNG per round that a person can look at: where the picks landed, and what the head predicts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sparseseg.expansion.regions import Resolved, tint_regions
from sparseseg.io import atomic_write
from sparseseg.labels import IGNORE, PixelLabels

PANEL = 256  # pixels per panel side: small working resolutions are upscaled to stay visible


def colourise(mask: torch.Tensor, palette: list[list[int]]) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 with the dataset palette, void in black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[mask.numpy().astype(np.uint8)]


def save_preview(path: Path, round: int, labels: PixelLabels, images: torch.Tensor, masks: torch.Tensor,
                 palette: list[list[int]], count: int, predict: Callable[[int], torch.Tensor] | None = None,
                 resolved: Resolved | None = None) -> None:
    """One row per preview image: image with all picks (this round's ringed in white), the
    prediction of the current head, and the ground truth. With expansion, the region pixels
    (after the overlap rule) are tinted with their class colour under the picks.

    Args:
        round: the round whose picks are ringed in white; images with new picks come first.
        labels: every label so far.
        images, masks: (N, S, S, 3) uint8 training images and their (N, S, S) ground truth.
        count: how many images to show.
        predict: image index -> (S, S) predicted class ids; None before the first head.
        resolved: region pixels after the overlap rule (expansion only).
    """
    new = labels.image[labels.round == round].unique().tolist()
    shown = (new + [i for i in range(len(images)) if i not in new])[:count]
    size = images.shape[1]
    scale = max(1, PANEL // size)
    side = size * scale
    header = 18
    sheet = Image.new("RGB", (3 * side + 20, header + len(shown) * (side + 10)), "white")
    titles = ImageDraw.Draw(sheet)
    first = f"picks (round {round}: white rings)" + (", regions tinted" if resolved is not None else "")
    for col, title in enumerate((first, "prediction", "ground truth")):
        titles.text((col * (side + 10) + 2, 3), title, fill="black")
    palette = [list(c) for c in palette]
    for row, img in enumerate(shown):
        top = header + row * (side + 10)
        pixels = images[img].numpy()
        if resolved is not None:
            pixels = tint_regions(pixels, resolved, img, palette)
        picture = Image.fromarray(pixels).resize((side, side), Image.NEAREST)
        draw = ImageDraw.Draw(picture)
        mine = (labels.image == img).nonzero().flatten().tolist()
        for j in mine:
            cy, cx = (labels.y[j].item() + 0.5) * scale, (labels.x[j].item() + 0.5) * scale
            cls = labels.cls[j].item()
            fill = tuple(palette[cls]) if cls != IGNORE else (0, 0, 0)
            ring = "white" if labels.round[j].item() == round else "grey"
            r = max(3, scale * 1.5)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=ring, width=2)
        sheet.paste(picture, (0, top))
        if predict is not None:
            pred = colourise(predict(img), palette)
            sheet.paste(Image.fromarray(pred).resize((side, side), Image.NEAREST), (side + 10, top))
        truth = colourise(masks[img], palette)
        sheet.paste(Image.fromarray(truth).resize((side, side), Image.NEAREST), (2 * side + 20, top))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
