"""Scribble maps on disk.

A scribble folder holds one label map per image, named after the image's stem (`<stem>.png`, or
any other format Pillow reads: `data.readers`), plus `classes.txt` (one class name per line,
line i = id i). Each map holds label ids (grey, 16-bit, or palette indices as ScribbleSup's
PASCAL VOC scribbles do; a grey-only palette is read by grey level) whose unlabelled pixels carry
an ignore id (255 unless told otherwise). In memory the ignore id is always `IGNORE_INDEX` (255),
whatever the file used. Scribbles are written as palette PNGs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparseseg.data.dataset import IGNORE_INDEX, default_palette
from sparseseg.data.readers import FolderIndex, read_mask
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write, atomic_write_text

CLASSES_FILE = "classes.txt"


def read_scribble_map(path: str | Path, ignore_id: int = IGNORE_INDEX, num_classes: int | None = None) -> np.ndarray:
    """Reads one scribble map as an (H, W) uint8 array with 255 on unlabelled pixels.

    Args:
        path: a grey, 16-bit or palette file of label ids (any format `data.readers.read_mask` reads).
        ignore_id: the id that marks unlabelled pixels in this file (ScribbleSup: 255).
        num_classes: when given, every other id must be below it.

    Raises:
        SparsesegError: unreadable file, colour (RGB) image, or an id out of range.
    """
    path = Path(path)
    raw = read_mask(path).astype(np.int64)
    unlabelled = raw == ignore_id
    ids = raw[~unlabelled]
    limit = num_classes if num_classes is not None else IGNORE_INDEX
    if ids.size and (ids.min() < 0 or ids.max() >= limit):
        bad = sorted(set(np.unique(ids[(ids < 0) | (ids >= limit)]).tolist()))[:5]
        raise SparsesegError(
            f"{path}: scribble id(s) {bad} out of range (valid: 0..{limit - 1}, {ignore_id} = unlabelled)"
        )
    out = raw.astype(np.uint8)
    out[unlabelled] = IGNORE_INDEX
    return out


def write_scribble_map(path: str | Path, scribble: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> None:
    """Writes an (H, W) scribble map (255 = unlabelled) as a palette PNG, atomically.

    The palette colours the class ids (default: `default_palette`); 255 is drawn black. Readers
    get the ids back, not the colours.
    """
    scribble = np.asarray(scribble)
    if scribble.ndim != 2:
        raise SparsesegError(f"{path}: a scribble map must be 2-D, got shape {scribble.shape}")
    ids = scribble[scribble != IGNORE_INDEX]
    n = int(ids.max()) + 1 if ids.size else 0
    colours = [list(c) for c in palette] if palette is not None else default_palette(max(n, 1))
    if n > len(colours):
        raise SparsesegError(f"{path}: scribble id {n - 1} has no palette colour ({len(colours)} given)")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(colours)] = np.asarray(colours, dtype=np.uint8)
    im = Image.fromarray(scribble.astype(np.uint8), mode="P")
    im.putpalette(flat.reshape(-1).tolist())
    atomic_write(Path(path), lambda p: im.save(p, format="PNG"))


def write_classes(folder: str | Path, classes: Sequence[str]) -> Path:
    """Writes `folder/classes.txt` (one name per line) and returns its path."""
    path = Path(folder) / CLASSES_FILE
    atomic_write_text(path, "".join(f"{c}\n" for c in classes))
    return path


def read_classes(folder: str | Path) -> list[str]:
    """The class names of a scribble folder (its classes.txt).

    Raises:
        SparsesegError: classes.txt missing or empty.
    """
    path = Path(folder) / CLASSES_FILE
    if not path.is_file():
        raise SparsesegError(f"{path}: not found; a scribble folder needs classes.txt (one class name per line)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise SparsesegError(f"{path}: no class names")
    return names


def load_scribbles(
    folder: str | Path,
    names: Sequence[str],
    size: int,
    ignore_id: int = IGNORE_INDEX,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Scribble maps for the images `names`, resized to size x size (nearest).

    Nearest-neighbour resizing keeps ids intact but can break thin strokes when shrinking a lot.

    Args:
        folder: a scribble folder (`<stem>.<readable suffix>` per image).
        names: image stems, in the order wanted.
        size: output side.
        ignore_id: the files' unlabelled id.
        num_classes: when given, ids are checked against it.

    Returns:
        (N, size, size) uint8, 255 = unlabelled.

    Raises:
        SparsesegError: missing folder or file, or a bad file (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SparsesegError(f"{folder}: scribble folder not found")
    index = FolderIndex.of(folder, "scribble map")
    for name in names:
        if name not in index.readable:
            skipped = ", ".join(p.name for p in index.other.get(name, []))
            note = f"; skipped {skipped} (not a format Pillow opens)" if skipped else ""
            raise SparsesegError(f"{folder / name}.png: scribble map missing for image {name} (no {name}.* that "
                                 f"Pillow reads{note})")
    paths = index.find_all({name: (name, None) for name in names})
    out = np.empty((len(names), size, size), dtype=np.uint8)
    for i, name in enumerate(names):
        arr = read_scribble_map(paths[name], ignore_id, num_classes)
        if arr.shape != (size, size):
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.NEAREST))
        out[i] = arr
    return torch.from_numpy(out)
