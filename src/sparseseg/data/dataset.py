"""The prepared-dataset format that every later stage reads.

Layout of a prepared dataset::

    ROOT/meta.json                 DatasetMeta as JSON
    ROOT/<split>/images/<stem>.png RGB uint8, size x size
    ROOT/<split>/masks/<stem>.png  8-bit label map (0..C-1, 255 = ignore); may be absent

`prepare.py` and `folder.py` write this format from raw datasets (read by `readers.py`);
`synthetic.py` writes a demo dataset in it.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparseseg.data.readers import read_image, read_mask
from sparseseg.errors import SparsesegError, one_line
from sparseseg.seeding import derived_generator

IGNORE_INDEX = 255
META_FILE = "meta.json"

CAMVID_CLASSES: list[str] = [
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign_symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
]
# The colours the SegNet tutorial uses for CamVid's 11 classes (void is black, not listed).
CAMVID_PALETTE: list[list[int]] = [
    [128, 128, 128],
    [128, 0, 0],
    [192, 192, 128],
    [128, 64, 128],
    [60, 40, 222],
    [128, 128, 0],
    [192, 128, 128],
    [64, 64, 128],
    [64, 0, 128],
    [64, 64, 0],
    [0, 128, 192],
]

ProgressFn = Callable[[int, int], None]


def default_palette(n: int) -> list[list[int]]:
    """A deterministic palette of `n` distinct, mutually well-separated RGB colours.

    Hues follow the golden-ratio sequence (so the first few colours are far apart and adding a
    class never changes earlier colours); saturation and value cycle to separate close hues.
    Black is never used because it conventionally marks void.

    Args:
        n: number of classes (0..255; id 255 is reserved for ignore).

    Returns:
        `n` lists [r, g, b] of ints in 0..255, all different.
    """
    if not 0 <= n <= 255:
        raise SparsesegError(f"palette size {n} out of range: a label map holds at most 255 classes")
    golden = 0.618033988749895
    colours: list[list[int]] = []
    seen: set[tuple[int, int, int]] = set()
    i = 0
    while len(colours) < n:
        hue = (i * golden) % 1.0
        sat = (0.85, 0.55, 0.95)[(i // 3) % 3]
        val = (0.95, 0.70, 0.50)[i % 3]
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        i += 1
        if rgb in seen:  # rounding can collide for large n; skip rather than repeat a colour
            continue
        seen.add(rgb)
        colours.append(list(rgb))
    return colours


@dataclass
class DatasetMeta:
    """What `meta.json` holds.

    Attributes:
        name: a short dataset name.
        classes: class names; list index = label id.
        palette: one [r, g, b] colour per class.
        size: side of every (square) image and mask.
        ignore_index: label id of unlabelled pixels (always 255 in this format).
        splits: number of images per split, e.g. {"train": 367, "test": 233}.
        source: where the data came from (a path, URL or generator description).
    """

    name: str
    classes: list[str]
    palette: list[list[int]]
    size: int
    ignore_index: int = IGNORE_INDEX
    splits: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes C (label ids 0..C-1)."""
        return len(self.classes)

    def to_dict(self) -> dict:
        """The JSON-ready dict, keys in the documented order."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "meta") -> DatasetMeta:
        """Validate and build a DatasetMeta from parsed JSON.

        Args:
            data: the parsed JSON value.
            where: the file name used in error messages.

        Raises:
            SparsesegError: a field is missing or has the wrong type or value.
        """
        if not isinstance(data, dict):
            raise SparsesegError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in ("name", "classes", "palette", "size") if k not in data]
        if missing:
            raise SparsesegError(f"{where}: missing field(s) {', '.join(missing)}")
        name, classes, palette, size = data["name"], data["classes"], data["palette"], data["size"]
        ignore_index = data.get("ignore_index", IGNORE_INDEX)
        splits = data.get("splits", {})
        source = data.get("source", "")
        if not isinstance(name, str):
            raise SparsesegError(f"{where}: 'name' must be a string")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise SparsesegError(f"{where}: 'classes' must be a non-empty list of strings")
        if len(classes) > 255:
            raise SparsesegError(f"{where}: {len(classes)} classes; at most 255 fit an 8-bit label map")
        if not isinstance(palette, list) or len(palette) != len(classes):
            raise SparsesegError(f"{where}: 'palette' must hold one [r, g, b] per class ({len(classes)})")
        for colour in palette:
            if (
                not isinstance(colour, list)
                or len(colour) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)
            ):
                raise SparsesegError(f"{where}: palette entry {colour!r} is not [r, g, b] with ints 0..255")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise SparsesegError(f"{where}: 'size' must be a positive integer, got {size!r}")
        if ignore_index != IGNORE_INDEX:
            raise SparsesegError(f"{where}: 'ignore_index' must be {IGNORE_INDEX}, got {ignore_index!r}")
        if not isinstance(splits, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in splits.items()
        ):
            raise SparsesegError(f"{where}: 'splits' must map split names to image counts")
        if not isinstance(source, str):
            raise SparsesegError(f"{where}: 'source' must be a string")
        return cls(
            name=name,
            classes=list(classes),
            palette=[list(c) for c in palette],
            size=size,
            ignore_index=ignore_index,
            splits=dict(splits),
            source=source,
        )


def load_meta(root: Path) -> DatasetMeta:
    """Read and validate `root/meta.json`.

    Raises:
        SparsesegError: the file is missing, not JSON, or fails validation.
    """
    path = Path(root) / META_FILE
    if not path.is_file():
        raise SparsesegError(f"{path}: not found; is {root} a prepared sparseseg dataset?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SparsesegError(f"{path}: cannot read ({one_line(exc)})") from exc
    return DatasetMeta.from_dict(data, where=str(path))


def save_meta(meta: DatasetMeta, root: Path) -> Path:
    """Write `meta` to `root/meta.json` (deterministic bytes) and return the path."""
    DatasetMeta.from_dict(meta.to_dict(), where="DatasetMeta")  # never write a file we cannot read back
    path = Path(root) / META_FILE
    path.write_text(json.dumps(meta.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def is_dataset(root: Path) -> bool:
    """True when `root` holds a readable sparseseg `meta.json`."""
    try:
        load_meta(root)
    except SparsesegError:
        return False
    return True


@dataclass
class Split:
    """One split of a prepared dataset, fully in memory.

    Attributes:
        names: image stems, sorted.
        images: (N, H, W, 3) uint8.
        masks: (N, H, W) uint8 label maps (255 = ignore), or None when the split has no masks.
    """

    names: list[str]
    images: torch.Tensor
    masks: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.names)


def carve_split(split: Split, fraction: float, seed: int, prefixes: Sequence[str] = ()) -> tuple[Split, Split]:
    """Hold out part of a split's images: (the rest, the held-out images), both in name order.

    Without `prefixes`, round(fraction x N) images, at least 1 and at most N - 1, are chosen by a
    permutation seeded by ("validation", seed) alone, so every run with the same data and seed holds
    out the same images. With `prefixes`, the held-out images are those whose name starts with one of
    them (whole video sequences, such as CamVid's "0006R0"), so that no held-out image is a near-copy
    of a neighbouring frame in the rest; `fraction` and `seed` are then unused.
    """
    n = len(split)
    if n < 2:
        raise SparsesegError(f"a split of {n} image(s) cannot be divided into a training and a validation part")
    keep = torch.ones(n, dtype=torch.bool)
    if prefixes:
        held = [i for i, name in enumerate(split.names) if name.startswith(tuple(prefixes))]
        if not held or len(held) == n:
            found = "no image" if not held else "every image"
            raise SparsesegError(f"val_prefixes {list(prefixes)}: {found} of the {n} training images starts with "
                                 f"one of them (names look like {split.names[0]!r}); nothing would be left to "
                                 f"{'evaluate on' if not held else 'train on'}")
        keep[held] = False
    else:
        count = min(max(1, round(fraction * n)), n - 1)
        keep[torch.randperm(n, generator=derived_generator("validation", seed))[:count]] = False

    def part(mask: torch.Tensor) -> Split:
        idx = mask.nonzero().squeeze(1)
        return Split([split.names[i] for i in idx.tolist()], split.images[idx],
                     split.masks[idx] if split.masks is not None else None)

    return part(keep), part(~keep)


def _image_paths(root: Path, split: str, meta: DatasetMeta) -> list[Path]:
    image_dir = root / split / "images"
    if not image_dir.is_dir():
        known = ", ".join(sorted(meta.splits)) or "none"
        raise SparsesegError(f"{image_dir}: split folder missing (splits in meta.json: {known})")
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not paths:
        raise SparsesegError(f"{image_dir}: no .png images in split folder")
    return paths


def split_names(root: Path, split: str) -> list[str]:
    """The image stems of one split, in the order `load_split` reads them (nothing is decoded)."""
    root = Path(root)
    return [p.stem for p in _image_paths(root, split, load_meta(root))]


def load_split(root: Path, split: str, progress: ProgressFn | None = None, only: range | None = None) -> Split:
    """Read every image (and mask, when the split has a masks folder) of one split.

    Args:
        root: the prepared dataset folder (holding meta.json).
        split: split name, e.g. "train".
        progress: called as progress(done, total) after each image.
        only: read just these positions of the split's sorted images (one process's shard of a
            split too large for one machine's memory); None: all.

    Returns:
        The split (or the part `only` names), images in sorted stem order.

    Raises:
        SparsesegError: missing or empty folder, unreadable file, wrong image size, a mask that is
            missing or has another size, or label ids >= the number of classes (other than 255).
    """
    root = Path(root)
    meta = load_meta(root)
    mask_dir = root / split / "masks"
    paths = _image_paths(root, split, meta)
    if only is not None:
        if only.step != 1 or only.start < 0 or only.stop > len(paths) or only.start > only.stop:
            raise SparsesegError(f"{root / split}: images {only.start}..{only.stop} asked of a split of {len(paths)}")
        paths = paths[only.start : only.stop]
    has_masks = mask_dir.is_dir()
    n, size = len(paths), meta.size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8) if has_masks else None
    # One lookup table turns "valid id?" into a single indexing operation per mask.
    valid = np.zeros(65536, dtype=bool)
    valid[: meta.num_classes] = True
    valid[IGNORE_INDEX] = True
    for i, path in enumerate(paths):
        rgb = read_image(path)
        if rgb.size != (size, size):
            raise SparsesegError(
                f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, meta.json says {size}x{size}"
            )
        images[i] = np.asarray(rgb)
        if masks is not None:
            mask_path = mask_dir / path.name
            if not mask_path.is_file():
                raise SparsesegError(f"{mask_path}: mask missing for image {path.name}")
            label = read_mask(mask_path)
            if label.shape != (size, size):
                raise SparsesegError(
                    f"{mask_path}: mask is {label.shape[1]}x{label.shape[0]}, image is {size}x{size}"
                )
            bad = ~valid[label.astype(np.int64).clip(0, 65535)]
            if bad.any():
                ids = sorted(set(np.unique(label[bad]).tolist()))[:5]
                raise SparsesegError(
                    f"{mask_path}: label id(s) {ids} out of range for {meta.num_classes} classes "
                    f"(valid: 0..{meta.num_classes - 1}, {IGNORE_INDEX} = ignore)"
                )
            masks[i] = label
        if progress is not None:
            progress(i + 1, n)
    return Split(
        names=[p.stem for p in paths],
        images=torch.from_numpy(images),
        masks=torch.from_numpy(masks) if masks is not None else None,
    )


def images_to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """Turn uint8 images into the float input diffusion backbones expect.

    Args:
        images_uint8: (N, H, W, 3) or (H, W, 3) uint8 tensor.

    Returns:
        (N, 3, H, W) float32 tensor in [-1, 1] (0 -> -1, 255 -> 1).
    """
    if images_uint8.dtype != torch.uint8:
        raise SparsesegError(f"images_to_model_input: expected uint8 images, got {images_uint8.dtype}")
    if images_uint8.ndim == 3:
        images_uint8 = images_uint8.unsqueeze(0)
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise SparsesegError(
            f"images_to_model_input: expected shape (N, H, W, 3), got {tuple(images_uint8.shape)}"
        )
    x = images_uint8.permute(0, 3, 1, 2).to(torch.float32)
    return (x / 127.5 - 1.0).contiguous()
