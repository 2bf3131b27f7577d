"""Seeded scribbles simulated from dense masks.

For every connected region (8-connected pixels of one class) of a mask:
1. the region is thinned to a one-pixel-wide skeleton (Zhang & Suen 1984, vectorised in NumPy);
   a region that thins away entirely (a 2x2 block does) keeps its innermost pixel instead;
2. a stroke is walked along the skeleton depth first from a random end point (a random pixel
   when the skeleton has no end), and its first `length` fraction of the skeleton's pixels is kept:
   the prefix of a depth-first walk is always connected, so the kept part is one stroke;
3. the stroke is dilated by a disk of diameter `width` (rounded down to an odd number) and cut
   back to the region, so a scribble never crosses into another class, another region or void.

Regions smaller than `min_area` pixels get no scribble (annotators skip specks). Each image draws
from its own generator seeded by (seed, image index), so images do not shift one another.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from sparseseg.data.dataset import IGNORE_INDEX, load_meta, load_split
from sparseseg.errors import SparsesegError
from sparseseg.scribbles.io import write_classes, write_scribble_map

EIGHT = np.ones((3, 3), dtype=bool)


def _neighbours(img: np.ndarray) -> list[np.ndarray]:
    """P2..P9 of Zhang-Suen (N, NE, E, SE, S, SW, W, NW) of every pixel, as uint8 arrays."""
    p = np.pad(img, 1)
    h, w = img.shape
    at = lambda dy, dx: p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # noqa: E731
    return [at(-1, 0), at(-1, 1), at(0, 1), at(1, 1), at(1, 0), at(1, -1), at(0, -1), at(-1, -1)]


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a binary image: a skeleton one pixel wide, as connected as the input.

    Args:
        mask: (H, W) bool.

    Returns:
        (H, W) bool skeleton, a subset of `mask`.
    """
    img = np.asarray(mask, dtype=np.uint8).copy()
    while True:
        changed = False
        for first in (True, False):
            n = _neighbours(img)
            b = sum(x.astype(np.int16) for x in n)
            ring = n + [n[0]]
            a = sum(((ring[i] == 0) & (ring[i + 1] == 1)).astype(np.int16) for i in range(8))
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if first:
                c = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                c = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            delete = (img == 1) & (b >= 2) & (b <= 6) & (a == 1) & c
            if delete.any():
                img[delete] = 0
                changed = True
        if not changed:
            return img.astype(bool)


def _disk(width: int) -> np.ndarray:
    """A disk of diameter 2r + 1, r = (width - 1) // 2."""
    r = (width - 1) // 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= r * r + r


def _stroke(skeleton: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    """The first `keep` fraction of a depth-first walk over the skeleton's pixels (bool mask)."""
    ys, xs = np.nonzero(skeleton)
    n = len(ys)
    index = {(int(y), int(x)): i for i, (y, x) in enumerate(zip(ys, xs, strict=True))}
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    adjacency = [[index[(y + dy, x + dx)] for dy, dx in offsets if (y + dy, x + dx) in index]
                 for y, x in zip(ys.tolist(), xs.tolist(), strict=True)]
    ends = [i for i, nb in enumerate(adjacency) if len(nb) <= 1]
    start = int(rng.choice(ends)) if ends else int(rng.integers(n))
    want = max(1, int(round(keep * n)))
    seen = np.zeros(n, dtype=bool)
    order: list[int] = []
    stack = [start]
    while stack and len(order) < want:
        i = stack.pop()
        if seen[i]:
            continue
        seen[i] = True
        order.append(i)
        stack.extend(j for j in adjacency[i] if not seen[j])
    out = np.zeros_like(skeleton)
    out[ys[order], xs[order]] = True
    return out


def simulate_scribble(
    mask: np.ndarray,
    width: int = 3,
    length: float = 0.5,
    seed: int | np.random.Generator = 0,
    min_area: int = 16,
) -> np.ndarray:
    """Scribbles for one dense label map.

    Args:
        mask: (H, W) integer label map, `IGNORE_INDEX` (255) = void.
        width: stroke width in pixels (diameter of the dilating disk; even values round down).
        length: fraction of each region's skeleton kept as its stroke, in (0, 1].
        seed: an int or a NumPy generator (where the stroke starts).
        min_area: regions with fewer pixels get no scribble.

    Returns:
        (H, W) uint8 scribble map: the region's class on scribbled pixels, 255 elsewhere.

    Raises:
        SparsesegError: width below 1 or length outside (0, 1].
    """
    if width < 1:
        raise SparsesegError(f"scribble width {width}: must be at least 1 pixel")
    if not 0 < length <= 1:
        raise SparsesegError(f"scribble length {length}: must be a fraction in (0, 1]")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mask = np.asarray(mask)
    out = np.full(mask.shape, IGNORE_INDEX, dtype=np.uint8)
    disk = _disk(width)
    r = disk.shape[0] // 2
    for cls in np.unique(mask):
        if cls == IGNORE_INDEX:
            continue
        regions, count = ndimage.label(mask == cls, structure=EIGHT)
        skeleton = thin(mask == cls)
        for k, box in enumerate(ndimage.find_objects(regions), start=1):
            # the region's bounding box grown by the disk radius, so the dilation is not clipped
            ys = slice(max(box[0].start - r, 0), min(box[0].stop + r, mask.shape[0]))
            xs = slice(max(box[1].start - r, 0), min(box[1].stop + r, mask.shape[1]))
            region = regions[ys, xs] == k
            if region.sum() < min_area:
                continue
            skel = skeleton[ys, xs] & region
            if not skel.any():  # thinned away: keep the innermost pixel
                dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
                skel = np.zeros_like(region)
                skel[np.unravel_index(int(np.argmax(dist)), dist.shape)] = True
            stroke = _stroke(skel, length, rng)
            if r:
                stroke = ndimage.binary_dilation(stroke, structure=disk)
            out[ys, xs][stroke & region] = cls
    return out


def simulate_dataset(
    data: str | Path,
    out: str | Path,
    split: str = "train",
    width: int = 3,
    length: float = 0.5,
    seed: int = 0,
    min_area: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Simulates scribbles for every mask of a prepared dataset's split.

    Writes `out/<stem>.png` (palette PNG, 255 = unlabelled) for each image and `out/classes.txt`.

    Returns:
        The number of scribble maps written.

    Raises:
        SparsesegError: not a prepared dataset, or the split has no masks.
    """
    meta = load_meta(Path(data))
    split_data = load_split(Path(data), split)
    if split_data.masks is None:
        raise SparsesegError(f"{Path(data) / split}: no masks folder; scribbles are simulated from dense masks")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(split_data)
    for i, name in enumerate(split_data.names):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        scribble = simulate_scribble(split_data.masks[i].numpy(), width, length, rng, min_area)
        write_scribble_map(out / f"{name}.png", scribble, meta.palette)
        if progress is not None:
            progress(i + 1, n)
    write_classes(out, meta.classes)
    return n
