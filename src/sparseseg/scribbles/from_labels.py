"""Scribble maps from sparseseg's own labels: a run's clicks, optionally grown into their regions.

A click answered with a class becomes one scribbled pixel of that class; a click answered void
stays unlabelled. With regions (`expansion: sam` or `superpixel`), every region pixel that the
overlap rule of `sparseseg.expansion.regions.resolve` gives a class is scribbled too, so the map
holds exactly the pixels the active-learning loop could train on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparseseg.config import load_config
from sparseseg.data.dataset import IGNORE_INDEX, load_meta
from sparseseg.errors import SparsesegError
from sparseseg.expansion.regions import RegionSet, clicked_pixels, resolve
from sparseseg.io import read_jsonl
from sparseseg.labels import IGNORE, PixelLabels
from sparseseg.scribbles.io import write_classes, write_scribble_map


def scribbles_from_labels(labels: PixelLabels, num_images: int, size: int,
                          regions: RegionSet | None = None) -> np.ndarray:
    """Paints clicks (and resolved region pixels) into scribble maps.

    Args:
        labels: the labelled pixels (image index, y, x, class; 255 = void answer).
        num_images: N, the number of images of the split.
        size: S, the side of the split's images.
        regions: the clicks' SAM regions, or None.

    Returns:
        (N, S, S) uint8, 255 = unlabelled.
    """
    out = np.full((num_images, size, size), IGNORE_INDEX, dtype=np.uint8)
    if regions is not None and len(regions):
        res = resolve(regions, clicked_pixels(labels.image, labels.y, labels.x, size))
        out[res.image, res.y, res.x] = res.cls
    keep = (labels.cls != IGNORE).numpy()
    out[labels.image.numpy()[keep], labels.y.numpy()[keep], labels.x.numpy()[keep]] = labels.cls.numpy()[keep]
    return out


def scribbles_from_run(run: str | Path, out: str | Path, regions: bool = True) -> int:
    """Writes a scribble folder from a run directory's finished rounds: labels.csv, and regions/ when
    asked and present.

    One PNG per training image (images without labels get an all-unlabelled map) and classes.txt.

    Returns:
        The number of labelled (scribbled) pixels written.

    Raises:
        SparsesegError: not a run directory (config.yaml or labels.csv missing) or unreadable files.
    """
    run = Path(run)
    for name in ("config.yaml", "labels.csv"):
        if not (run / name).is_file():
            raise SparsesegError(f"{run / name}: not found; is {run} a sparseseg run directory?")
    config = load_config(run / "config.yaml")
    meta = load_meta(Path(config.data))
    image_dir = Path(config.data) / config.train_split / "images"
    names = [p.stem for p in sorted(p for p in image_dir.glob("*") if p.suffix.lower() == ".png" and p.is_file())]
    if not names:
        raise SparsesegError(f"{image_dir}: no .png images")
    # only finished rounds (a line in rounds.jsonl) count, as when the run resumes
    completed = len(read_jsonl(run / "rounds.jsonl")[0])
    labels = PixelLabels.read_csv(run / "labels.csv", names).upto(completed)
    region_set = None
    if regions:
        region_set = RegionSet.empty(meta.size)
        for r in range(1, completed + 1):
            path = run / "regions" / f"round_{r:02d}.npz"
            if path.is_file():
                region_set = region_set.concat(RegionSet.load_npz(path)[0])
    maps = scribbles_from_labels(labels, len(names), meta.size, region_set)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, scribble in zip(names, maps, strict=True):
        write_scribble_map(out / f"{name}.png", scribble, meta.palette)
    write_classes(out, meta.classes)
    return int((maps != IGNORE_INDEX).sum())
