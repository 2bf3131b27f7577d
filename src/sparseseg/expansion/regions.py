"""Regions of clicks: which masks were kept, how overlaps are settled, which pixels are trained on.

The rules (docs/expansion.md):

* **Tau.** Each answered click is one positive point prompt; SAM's best proposal (highest predicted
  IoU, clamped to [0, 1]) is kept when its score is >= tau, else the click stays a single pixel.
  A superpixel region has score 1 and tau 0: it is always kept. A void ("cannot tell") click is not
  expanded.
* **Inheritance.** A kept region takes the class the annotator (or the oracle) gave its click.
* **Overlaps.** A clicked pixel always keeps its own answer (void included) and belongs to no
  region. Any other pixel covered by regions of two or more different classes is left unlabelled;
  a pixel covered only by regions of one class takes that class and belongs to the covering region
  with the highest score (ties: earlier round, then earlier click). The rule depends only on the
  set of clicks and regions, not on the order they arrived in, so replaying rounds replays it.
* **Training.** From the pixels a click's region owns, at most R (`sam.max_region_pixels`) are drawn
  uniformly without replacement, by a generator seeded with (run seed, image, y, x) so a click's draw
  is the same every round while its region is. The clicked pixel weighs 1; its drawn region pixels
  share a total weight w (`sam.region_weight`), w / k each for k drawn.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparseseg.errors import SparsesegError
from sparseseg.expansion.base import Expander, choose
from sparseseg.io import atomic_write
from sparseseg.labels import IGNORE
from sparseseg.seeding import derived_generator


def _packed_width(size: int) -> int:
    return (size * size + 7) // 8


@dataclass
class RegionSet:
    """One record per expanded (or not expanded) click: parallel (n,) arrays and (n, S*S/8) packed masks.

    `score` is NaN for a click that was not expanded (void answer); `masks[i]` is all zero unless
    `kept[i]`.
    """

    size: int
    image: np.ndarray
    y: np.ndarray
    x: np.ndarray
    cls: np.ndarray
    round: np.ndarray
    score: np.ndarray
    kept: np.ndarray
    masks: np.ndarray

    @classmethod
    def empty(cls, size: int) -> RegionSet:
        ints = [np.zeros(0, dtype=np.int64) for _ in range(5)]
        return cls(size, *ints, np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool),
                   np.zeros((0, _packed_width(size)), dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.image)

    def mask(self, i: int) -> np.ndarray:
        """(S, S) bool mask of record i."""
        return np.unpackbits(self.masks[i], count=self.size * self.size).astype(bool).reshape(self.size, self.size)

    def pixels(self) -> np.ndarray:
        """(n,) pixels in each record's kept mask (0 when not kept)."""
        return np.unpackbits(self.masks, axis=1, count=self.size * self.size).sum(1).astype(np.int64)

    def concat(self, other: RegionSet) -> RegionSet:
        if other.size != self.size:
            raise ValueError(f"regions of size {other.size} and {self.size}")
        fields = ("image", "y", "x", "cls", "round", "score", "kept", "masks")
        return RegionSet(self.size, *(np.concatenate([getattr(self, f), getattr(other, f)]) for f in fields))

    def subset(self, keep: np.ndarray) -> RegionSet:
        """The records selected by `keep` ((n,) bool or indices), in their order."""
        return RegionSet(self.size, self.image[keep], self.y[keep], self.x[keep], self.cls[keep], self.round[keep],
                         self.score[keep], self.kept[keep], self.masks[keep])

    def upto(self, round: int) -> RegionSet:
        return self.subset(self.round <= round)

    # ------------------------------------------------------------------ files
    def save_npz(self, path: Path, model: str, tau: float) -> None:
        """Write the records (masks bit-packed) atomically, with the model and tau that produced them."""
        arrays = {k: getattr(self, k) for k in ("image", "y", "x", "cls", "round", "score", "kept", "masks")}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # np.savez(path) would append ".npz" to the temporary name
                np.savez_compressed(fh, size=np.int64(self.size), model=np.str_(model), tau=np.float64(tau), **arrays)

        atomic_write(path, write)

    @classmethod
    def load_npz(cls, path: Path) -> tuple[RegionSet, str, float]:
        """(records, model, tau) of a file written by `save_npz`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                size = int(data["size"])
                regions = cls(size, *(data[k] for k in ("image", "y", "x", "cls", "round", "score", "kept", "masks")))
                return regions, str(data["model"]), float(data["tau"])
        except FileNotFoundError:
            raise SparsesegError(f"{path}: regions of a finished round are missing; the run directory is damaged "
                                 "(restore the file, or start the run again in another out directory)") from None
        except (OSError, KeyError, ValueError) as exc:
            raise SparsesegError(f"{path}: unreadable regions file ({exc})") from None

    def write_csv(self, path: Path, names: Sequence[str], class_names: Sequence[str]) -> None:
        """A person's view of the records: image,y,x,class_id,class,round,score,kept,pixels."""
        pixels = self.pixels()

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["image", "y", "x", "class_id", "class", "round", "score", "kept", "pixels"])
                for i in range(len(self)):
                    c = int(self.cls[i])
                    score = "" if np.isnan(self.score[i]) else f"{float(self.score[i]):.4f}"
                    writer.writerow([names[int(self.image[i])], int(self.y[i]), int(self.x[i]), c,
                                     class_names[c] if c != IGNORE else "void", int(self.round[i]), score,
                                     int(self.kept[i]), int(pixels[i])])

        atomic_write(path, write)


def expand_clicks(
    expander: Expander,
    images: torch.Tensor | np.ndarray,
    image: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    cls: torch.Tensor,
    round: int,
    tau: float,
    progress: Callable[[int, int], None] | None = None,
) -> RegionSet:
    """Expand one round's answered clicks into regions (void clicks are recorded, not expanded).

    Args:
        expander: the backend (SAM or superpixels).
        images: (N, S, S, 3) uint8, the images at the working resolution; masks come back at it.
            An image's index here is the `image_id` the backend is given.
        image, y, x, cls: (n,) the clicks and their answers, in click order.
        round: recorded with every record.
        tau: the keep threshold on the clamped predicted IoU.

    Each image is encoded once for all of its clicks.
    """
    size = int(images.shape[1])
    n = len(image)
    image, y, x, cls = (torch.as_tensor(t).long().numpy() for t in (image, y, x, cls))
    score = np.full(n, np.nan, dtype=np.float32)
    kept = np.zeros(n, dtype=bool)
    masks = np.zeros((n, _packed_width(size)), dtype=np.uint8)
    todo = sorted({int(i) for i, c in zip(image, cls, strict=True) if c != IGNORE})
    for done, img in enumerate(todo, start=1):
        idx = np.nonzero((image == img) & (cls != IGNORE))[0]
        picture = np.asarray(images[img].numpy() if isinstance(images, torch.Tensor) else images[img])
        proposals = expander.propose(picture, y[idx], x[idx], image_id=img)
        for j, i in enumerate(idx):
            choice = choose(proposals.masks[j], proposals.scores[j], tau)
            score[i] = choice.score
            kept[i] = choice.kept
            if choice.kept:
                masks[i] = np.packbits(choice.mask.reshape(-1))
        if progress:
            progress(done, len(todo))
    return RegionSet(size, image, y, x, cls, np.full(n, round, dtype=np.int64), score, kept, masks)


@dataclass
class Resolved:
    """Region pixels after the overlap rule: parallel (m,) arrays; `owner` indexes the RegionSet."""

    image: np.ndarray
    y: np.ndarray
    x: np.ndarray
    cls: np.ndarray
    owner: np.ndarray

    def __len__(self) -> int:
        return len(self.image)


def resolve(regions: RegionSet, clicked: dict[int, np.ndarray]) -> Resolved:
    """Apply the overlap rule (module docstring) to every kept region.

    Args:
        regions: every record so far.
        clicked: image -> flat pixel ids (y * S + x) of every clicked pixel of that image, whatever
            its answer: they keep their own answer and are never region pixels.
    """
    size = regions.size
    parts: list[tuple[np.ndarray, ...]] = []
    kept = np.nonzero(regions.kept)[0]
    for img in np.unique(regions.image[kept]).tolist():
        mine = kept[regions.image[kept] == img]
        # the owner of a pixel is its highest-scoring covering region (ties: earlier round, earlier click)
        order = mine[np.lexsort((mine, regions.round[mine], -regions.score[mine]))]
        claim = np.full(size * size, -1, dtype=np.int64)
        claim_cls = np.full(size * size, -1, dtype=np.int64)
        contested = np.zeros(size * size, dtype=bool)
        for r in order.tolist():
            covered = regions.mask(r).reshape(-1)
            c = int(regions.cls[r])
            taken = claim >= 0
            contested |= covered & taken & (claim_cls != c)
            new = covered & ~taken
            claim[new] = r
            claim_cls[new] = c
        claim[contested] = -1
        claim[np.asarray(clicked.get(img, []), dtype=np.int64)] = -1
        flat = np.nonzero(claim >= 0)[0]
        parts.append((np.full(len(flat), img, dtype=np.int64), flat // size, flat % size, claim_cls[flat], claim[flat]))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return Resolved(empty, empty, empty, empty, empty)
    return Resolved(*(np.concatenate(column) for column in zip(*parts, strict=True)))


@dataclass
class TrainingPixels:
    """Region pixels drawn for training, with their loss weights: parallel (k,) tensors."""

    image: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    cls: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return len(self.image)


def training_pixels(resolved: Resolved, regions: RegionSet, max_per_click: int, total_weight: float,
                    seed: int) -> TrainingPixels:
    """At most `max_per_click` pixels of each click's region, sharing `total_weight` (module docstring).

    Pixels are returned grouped by owner in record order, each group in raster order.
    """

    out: list[tuple[np.ndarray, ...]] = []
    if max_per_click > 0 and len(resolved):
        order = np.argsort(resolved.owner, kind="stable")
        owners, starts = np.unique(resolved.owner[order], return_index=True)
        for owner, idx in zip(owners.tolist(), np.split(order, starts[1:]), strict=True):
            if len(idx) > max_per_click:
                key = (int(regions.image[owner]), int(regions.y[owner]), int(regions.x[owner]))
                draw = torch.randperm(len(idx), generator=derived_generator(seed, "region", *key))[:max_per_click]
                idx = idx[np.sort(draw.numpy())]
            weight = np.full(len(idx), total_weight / len(idx), dtype=np.float32)
            out.append((resolved.image[idx], resolved.y[idx], resolved.x[idx], resolved.cls[idx], weight))
    if not out:
        ints = torch.zeros(0, dtype=torch.long)
        return TrainingPixels(ints, ints, ints, ints, torch.zeros(0))
    cols = [np.concatenate(c) for c in zip(*out, strict=True)]
    return TrainingPixels(*(torch.from_numpy(c).long() for c in cols[:4]), torch.from_numpy(cols[4]))


def clicked_pixels(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor, size: int) -> dict[int, np.ndarray]:
    """image -> flat ids of its clicked pixels (the `clicked` argument of `resolve`)."""
    out: dict[int, list[int]] = {}
    for img, flat in zip(image.tolist(), (y * size + x).tolist(), strict=True):
        out.setdefault(img, []).append(flat)
    return {img: np.asarray(v, dtype=np.int64) for img, v in out.items()}


def tint_regions(pixels: np.ndarray, resolved: Resolved, image: int, palette: list[list[int]], alpha: float = 0.55) -> np.ndarray:
    """(S, S, 3) uint8 with the region pixels of `image` (a `Resolved`) blended with their class colour."""
    mine = resolved.image == image
    if not mine.any():
        return pixels
    out = pixels.astype(np.float32)
    colours = np.asarray(palette, dtype=np.float32)[resolved.cls[mine]]
    ys, xs = resolved.y[mine], resolved.x[mine]
    out[ys, xs] = (1 - alpha) * out[ys, xs] + alpha * colours
    return np.round(out).astype(np.uint8)
