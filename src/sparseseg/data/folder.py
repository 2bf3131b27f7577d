"""`prepare folder`: any dataset of images plus masks -> the prepared format.

Masks may be any Pillow-readable file (see `readers.read_mask`), paired with their images by name
(`pairing.Pairing`), their values mapped to classes by a classes file or `--map`
(`values.build_value_map`). Splits are drawn (seeded) or kept: one image folder per split, or a
split file. An optional ignore mask per image (a field of view) voids the pixels where it is 0.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sparseseg.data.dataset import IGNORE_INDEX, DatasetMeta, ProgressFn, default_palette, save_meta
from sparseseg.data.pairing import Pairing, check_split_name, read_split_file
from sparseseg.data.prepare import _Job, _run_jobs, check_output, check_size, staged_output
from sparseseg.data.readers import list_images
from sparseseg.data.values import ValueMap, build_value_map, show_values
from sparseseg.errors import SparsesegError, SparsesegWarning

# Void covering more of the labelled pixels than this is most likely a class given as void.
VOID_WARN_FRACTION = 0.5
Folders = Path | str | Mapping[str, Path | str]


def _split_names(stems: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/test split: sorted names, a seeded permutation, the first part is test."""
    n = len(stems)
    if not 0.0 < test_fraction < 1.0:
        raise SparsesegError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if n < 2:
        raise SparsesegError(f"need at least 2 images to make a train and a test split, found {n}")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    order = sorted(stems)
    perm = np.random.default_rng(seed).permutation(n)
    test = sorted(order[i] for i in perm[:n_test])
    train = sorted(order[i] for i in perm[n_test:])
    return train, test


def _per_split(folders: Folders | None, splits: list[str], what: str) -> dict[str, Path]:
    """One folder for every split (a single folder serves them all); a mapping must name known splits."""
    if folders is None:
        return {}
    if not isinstance(folders, Mapping):
        return {s: Path(folders) for s in splits}
    unknown = sorted(set(folders) - set(splits))
    if unknown:
        raise SparsesegError(f"{what} folder given for split {unknown[0]!r}, which has no images")
    return {s: Path(f) for s, f in folders.items()}


def _assign_splits(images: Folders, split_file: Path | None, test_fraction: float,
                   seed: int) -> dict[str, dict[str, Path]]:
    """split -> {stem: image path}: given folders, a split file, or a seeded train/test draw."""
    if isinstance(images, Mapping):
        if split_file is not None:
            raise SparsesegError("give either one images folder per split or a split file, not both")
        if "train" not in images:
            raise SparsesegError(f"no train split among the image folders ({', '.join(images)}); give --train-images")
        for name in images:
            check_split_name(name, "image folders")
        return {name: list_images(Path(folder)) for name, folder in images.items()}
    by_stem = list_images(Path(images))
    if split_file is not None:
        split = read_split_file(Path(split_file), by_stem)
        names = list(dict.fromkeys(sorted(split.values(), key=lambda s: (s != "train", s != "val", s))))
        if "train" not in names:
            raise SparsesegError(f"{split_file}: no image is in the train split (found {', '.join(names)})")
        return {n: {s: p for s, p in by_stem.items() if split[s] == n} for n in names}
    train, test = _split_names(list(by_stem), test_fraction, seed)
    return {"train": {s: by_stem[s] for s in train}, "test": {s: by_stem[s] for s in test}}


def _default_name(images: Folders) -> str:
    """The images folder's parent (one folder), or the folders' common ancestor (one per split)."""
    if isinstance(images, Mapping):
        folders = [str(Path(f).resolve()) for f in images.values()]
        common = Path(os.path.commonpath(folders))
        return common.name if len(folders) > 1 else common.parent.name
    return Path(images).resolve().parent.name


def _warn(values: ValueMap, labelled: int, void: int, per_class: np.ndarray | None) -> None:
    """Warnings (not errors) for a map that is probably wrong: void dominates, or a class never occurs."""
    if labelled and void > VOID_WARN_FRACTION * labelled:
        warnings.warn(
            f"void (mask value(s) {show_values(values.void_values(), values.colours)}) covers "
            f"{100 * void / labelled:.0f}% of the labelled pixels; if that value is a class (e.g. the larger "
            "class of a binary mask), map it to that class (--map VALUE=NAME) instead of to void",
            SparsesegWarning, stacklevel=3)
    if per_class is not None:
        absent = [c for c, n in zip(values.classes, per_class.tolist(), strict=True) if n == 0]
        if absent:
            warnings.warn(f"class(es) {', '.join(absent)} occur in no mask; check the value map "
                          f"({values.source})", SparsesegWarning, stacklevel=3)


def prepare_folder(
    images: Folders,
    masks: Folders,
    classes_file: Path | None,
    out: Path,
    size: int = 256,
    void_id: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
    progress: ProgressFn | None = None,
    value_map: str | None = None,
    pairing: Pairing | None = None,
    ignore_masks: Folders | None = None,
    split_file: Path | None = None,
) -> DatasetMeta:
    """Prepare any dataset given as image files plus masks.

    Args:
        images: a folder of images (split by `split_file`, else a seeded train/test draw), or
            {split: folder} to keep a dataset's own splits (needs "train").
        masks: the mask folder, or {split: folder}.
        classes_file: class names (see `values`); line i is mask value i unless the file or
            `value_map` gives values. None when `value_map` names the classes.
        out: the prepared dataset folder to write.
        size: output side in pixels (bilinear images, nearest labels, aspect not kept).
        void_id: a mask value meaning "unlabelled" (stored as 255). With no values given, a void
            id inside the class range drops that class and shifts the ids above it down by one.
        test_fraction: share of images in the test split of a seeded draw (at least one each way).
        seed: seed of that draw.
        name: dataset name; default: the images folder's parent (the split folders' common ancestor).
        progress: called as progress(done, total) after each image.
        value_map: `VALUE=NAME,...` (VALUE an integer or `#rrggbb`, NAME a class or `void`).
        pairing: how masks and ignore masks are named (default: the image's stem).
        ignore_masks: a folder (or {split: folder}) of ignore masks: where one is 0, the pixel is void.
        split_file: image -> split table for a single `images` folder.

    Returns:
        The written DatasetMeta.

    Warns:
        SparsesegWarning: void covers more than half of the labelled pixels, or a class occurs in no mask.

    Raises:
        SparsesegError: a bad option, an empty or missing folder, an image without a mask (saying
            which files with that name were skipped), an unreadable file, a mask or ignore mask of
            another size than its image, or a mask value not in the map (listing the values found).
    """
    check_size(size)
    out = Path(out)
    check_output(out)
    values = build_value_map(Path(classes_file) if classes_file is not None else None, value_map, void_id)
    pairing = pairing or Pairing()
    pairing.check()
    if isinstance(masks, Mapping) and not masks:
        raise SparsesegError("no mask folder given")
    members = _assign_splits(images, split_file, test_fraction, seed)
    mask_dirs = _per_split(masks, list(members), "mask")
    ignore_dirs = _per_split(ignore_masks, list(members), "ignore mask")
    plan: list[tuple[str, str, Path, Path, Path | None]] = []
    for split, by_stem in members.items():
        if split not in mask_dirs:
            raise SparsesegError(f"no mask folder for the {split} split; give --{split}-masks or --masks")
        found = pairing.find_masks(by_stem, mask_dirs[split])
        ignored = pairing.find_ignore(by_stem, ignore_dirs[split]) if split in ignore_dirs else {}
        plan += [(split, s, by_stem[s], found[s], ignored.get(s)) for s in sorted(by_stem)]
    with staged_output(out) as tmp:
        jobs = [_Job(image=img, mask=mask, split_dir=tmp / split, stem=stem, ignore=ignore)
                for split, stem, img, mask, ignore in plan]
        stats = _run_jobs(jobs, size, values, progress)
        meta = DatasetMeta(
            name=name or _default_name(images) or "dataset",
            classes=values.classes,
            palette=values.palette or default_palette(len(values.classes)),
            size=size,
            ignore_index=IGNORE_INDEX,
            splits={split: len(by_stem) for split, by_stem in members.items()},
            source=_describe(images, masks, ignore_masks, value_map),
        )
        save_meta(meta, tmp)
    _warn(values, stats.labelled, stats.void, stats.per_class)
    return meta


def _describe(images: Folders, masks: Folders, ignore: Folders | None, value_map: str | None) -> str:
    """meta.json's `source`: the folders (resolved) and the value map."""

    def where(folders: Folders) -> str:
        if isinstance(folders, Mapping):
            return ",".join(f"{s}:{Path(f).resolve()}" for s, f in folders.items())
        return str(Path(folders).resolve())

    parts = [f"images={where(images)}", f"masks={where(masks)}"]
    if ignore is not None:
        parts.append(f"ignore={where(ignore)}")
    if value_map is not None:
        parts.append(f"map={value_map}")
    return " ".join(parts)
