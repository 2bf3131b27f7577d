"""A project's click regions in its database: expanded after import, read back for training and review.

Regions are stored per query with the model and tau that produced them (store.py, `regions`
table), masks as 1-bit PNGs; a change of model or tau expands the clicks again, the old rows stay.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from sparseseg.annotate.store import AnnotationStore, RegionRow, Snapshot
from sparseseg.errors import SparsesegError
from sparseseg.expansion.base import Expander
from sparseseg.expansion.regions import RegionSet, expand_clicks


def mask_png(mask: np.ndarray) -> bytes:
    """A bool (S, S) mask as 1-bit PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def mask_from_png(data: bytes, size: int) -> np.ndarray:
    """The bool (S, S) mask of `mask_png` bytes."""
    mask = np.asarray(Image.open(io.BytesIO(data)).convert("1"), dtype=bool)
    if mask.shape != (size, size):
        raise SparsesegError(f"a stored region mask is {mask.shape}, not the project's {size}x{size}")
    return mask


def answered_clicks(snap: Snapshot) -> list:
    """The queries answered with a class (not skipped, not pending), in query order."""
    return [q for q in snap.queries if q.id in snap.answers and snap.answers[q.id].class_id is not None]


def expand_new_clicks(store: AnnotationStore, expander: Callable[[], Expander], images: Callable[[], np.ndarray],
                      model: str, tau: float, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Expand every answered click that has no region under (model, tau) yet; returns how many were added.

    Args:
        store: the project's database.
        expander, images: give the expander and the (N, S, S, 3) uint8 working images, loaded only
            when there is something to expand.
        model, tau: what the stored rows are recorded with (`expansion.registry.describe`, the keep
            threshold).
    """
    snap = store.snapshot()
    done = store.regions(model, tau)
    todo = [q for q in answered_clicks(snap) if q.id not in done]
    if not todo:
        return 0
    ids = [torch.tensor([getattr(q, k) for q in todo], dtype=torch.long) for k in ("image_id", "y", "x")]
    cls = torch.tensor([snap.answers[q.id].class_id for q in todo], dtype=torch.long)
    tick = (lambda d, t: progress("expanding", d, t)) if progress else None
    found = expand_clicks(expander(), images(), *ids, cls, 0, tau, tick)
    pixels = found.pixels()
    rows = [RegionRow(q.id, model, tau, float(found.score[i]), bool(found.kept[i]), int(pixels[i]),
                      mask_png(found.mask(i)) if found.kept[i] else None)
            for i, q in enumerate(todo)]
    with store.write():
        return store.add_regions(rows)


def stored_regions(store: AnnotationStore, snap: Snapshot, size: int, model: str, tau: float) -> RegionSet:
    """The stored regions of the current answers under (model, tau), each with its click's current
    class, in query order."""
    stored = store.regions(model, tau)
    rows = [(q, stored[q.id]) for q in answered_clicks(snap) if q.id in stored]
    regions = RegionSet.empty(size)
    if not rows:
        return regions
    masks = np.zeros((len(rows), regions.masks.shape[1]), dtype=np.uint8)
    for i, (_, r) in enumerate(rows):
        if r.kept and r.mask is not None:
            masks[i] = np.packbits(mask_from_png(r.mask, size).reshape(-1))
    ints = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return RegionSet(size, ints([q.image_id for q, _ in rows]), ints([q.y for q, _ in rows]),
                     ints([q.x for q, _ in rows]), ints([snap.answers[q.id].class_id for q, _ in rows]),
                     ints([q.round for q, _ in rows]), np.asarray([r.score for _, r in rows], dtype=np.float32),
                     np.asarray([r.kept for _, r in rows], dtype=bool), masks)
