"""The labelled pixels of a run: where, which class, and in which round they were answered."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write

IGNORE = 255  # an answer of "void / cannot tell": recorded, spends budget, never trained on


def _long(values: Sequence[int] | torch.Tensor = ()) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


@dataclass
class PixelLabels:
    """Parallel (n,) tensors: image index, row, column, answered class, round (1-based)."""

    image: torch.Tensor = field(default_factory=_long)
    y: torch.Tensor = field(default_factory=_long)
    x: torch.Tensor = field(default_factory=_long)
    cls: torch.Tensor = field(default_factory=_long)
    round: torch.Tensor = field(default_factory=_long)

    def __len__(self) -> int:
        return len(self.image)

    def add(self, image: torch.Tensor, y: torch.Tensor, x: torch.Tensor, cls: torch.Tensor, round: int) -> None:
        """Append one round's answers (a pixel already labelled is a caller bug)."""
        self.image = torch.cat([self.image, _long(image)])
        self.y = torch.cat([self.y, _long(y)])
        self.x = torch.cat([self.x, _long(x)])
        self.cls = torch.cat([self.cls, _long(cls)])
        self.round = torch.cat([self.round, torch.full((len(image),), round, dtype=torch.long)])

    def flat_index(self, size: int) -> torch.Tensor:
        """Global pixel ids image * size^2 + y * size + x."""
        return self.image * size * size + self.y * size + self.x

    def pixels_of(self, size: int) -> dict[int, torch.Tensor]:
        """For each image with labels, its labelled pixels as flat in-image ids y * size + x."""
        out: dict[int, list[int]] = {}
        for img, flat in zip(self.image.tolist(), (self.y * size + self.x).tolist(), strict=True):
            out.setdefault(img, []).append(flat)
        return {img: torch.tensor(v) for img, v in out.items()}

    def trainable(self) -> torch.Tensor:
        """Boolean mask of answers usable for training (not void)."""
        return self.cls != IGNORE

    def subset(self, keep: torch.Tensor) -> PixelLabels:
        """The labels where the boolean mask `keep` is true."""
        return PixelLabels(self.image[keep], self.y[keep], self.x[keep], self.cls[keep], self.round[keep])

    def upto(self, round: int) -> PixelLabels:
        """The labels answered in rounds <= `round`."""
        return self.subset(self.round <= round)

    # ------------------------------------------------------------------ files
    def write_csv(self, path: Path, names: Sequence[str], class_names: Sequence[str]) -> None:
        """Write image,y,x,class_id,class,round rows atomically (temp file, then rename)."""
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["image", "y", "x", "class_id", "class", "round"])
                rows = zip(*(t.tolist() for t in (self.image, self.y, self.x, self.cls, self.round)), strict=True)
                for i, y, x, c, r in rows:
                    writer.writerow([names[i], y, x, c, class_names[c] if c != IGNORE else "void", r])

        atomic_write(path, write)

    @classmethod
    def read_csv(cls, path: Path, names: Sequence[str]) -> PixelLabels:
        """Read a file written by `write_csv`; image names must be in `names`."""
        index = {n: i for i, n in enumerate(names)}
        rows: list[list[int]] = []
        try:
            with path.open(newline="") as fh:
                for line, row in enumerate(csv.DictReader(fh), start=2):
                    if row["image"] not in index:
                        raise SparsesegError(f"{path}:{line}: image {row['image']!r} is not in the dataset")
                    rows.append([index[row["image"]], int(row["y"]), int(row["x"]), int(row["class_id"]), int(row["round"])])
        except (KeyError, ValueError) as exc:
            raise SparsesegError(f"{path}: malformed labels file ({exc})") from None
        if not rows:
            return cls()
        t = torch.tensor(rows, dtype=torch.long)
        return cls(t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4])
