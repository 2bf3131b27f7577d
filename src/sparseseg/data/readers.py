"""Reading raw image and mask files: every format Pillow opens, every mode, one-line errors.

One set of readers for everything a user hands in: `prepare folder` (images, masks, ignore masks),
`init` (images to label) and scribble folders. The prepared format itself (8-bit RGB and label
PNGs) is read with the same functions.

    read_image   any Pillow-readable file -> 8-bit RGB. 16-bit files are scaled to 8 bits (v / 257),
                 alpha is dropped, a float or 32-bit file must hold finite values in 0..1 (scaled
                 by 255), 0..255 or 0..65535 (scaled by 1/257).
    read_mask    any Pillow-readable file -> (H, W) integer values: the grey level (`L`; `1` gives
                 0/255), the palette index (`P`, as PASCAL VOC's label PNGs; the grey level when the
                 whole palette is grey, as GIF writes grey masks), the 16-bit value, or an
                 integral float. An RGB file is read only by colour (`colours=True`: packed
                 r << 16 | g << 8 | b), never guessed to be grey.
    list_images  the readable files of a folder by stem (hidden files skipped, duplicate stems refused).
    FolderIndex  finds `<stem>.<any readable suffix>` in a folder, and says what was skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from sparseseg.errors import SparsesegError, one_line

Image.init()  # load every plugin so that the suffix table below is complete


def _decodes(fmt: str) -> bool:
    """Whether Pillow decodes `fmt` by itself: stubs (HDF5, GRIB, WMF...) need handlers it lacks,
    EPS needs Ghostscript and MPEG has no decoder."""
    if fmt not in Image.OPEN or fmt in ("EPS", "MPEG"):
        return False
    factory = Image.OPEN[fmt][0]
    return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))


# Suffixes of the formats Pillow opens and decodes, e.g. .png .jpg .tif .gif .bmp .webp .ppm .tga.
READABLE_SUFFIXES: frozenset[str] = frozenset(
    ext for ext, fmt in Image.registered_extensions().items() if _decodes(fmt)
)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_GREY_LIKE = ("1", "L", "LA", "P", "PA", "I", "F", *_SIXTEEN_BIT)


def is_readable_name(path: Path) -> bool:
    """True for a visible file whose suffix Pillow opens (`.DS_Store`, `._x.png` are hidden)."""
    return not path.name.startswith(".") and path.suffix.lower() in READABLE_SUFFIXES


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode one single-frame file (the file is closed on return)."""
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise SparsesegError(
                    f"{path}: {what} holds {frames} frames (a stack or an animation); save one image per file"
                )
            im.load()
            # A copy owns its pixels, so closing the file cannot invalidate it.
            return im.copy()
    except SparsesegError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise SparsesegError(f"{path}: unreadable {what} ({one_line(exc)})") from exc


def _numeric(im: Image.Image) -> np.ndarray:
    """The pixels of a single-band image as a native-endian numpy array."""
    arr = np.asarray(im)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _wide_to_uint8(arr: np.ndarray, path: Path, mode: str) -> np.ndarray:
    """A 16-bit, 32-bit or float grey image -> uint8 by the documented fixed rules (no per-image stretch)."""
    if mode in _SIXTEEN_BIT:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise SparsesegError(f"{path}: image holds NaN or infinite values; save finite intensities")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0:
        raise SparsesegError(f"{path}: image ({mode}) holds negative values (min {lo:g}); save 0..255 or 0..65535")
    if mode == "F" and hi <= 1.0:
        scaled = values * 255.0
    elif hi <= 255:
        scaled = values
    elif hi <= 65535:
        scaled = values / 257.0
    else:
        raise SparsesegError(f"{path}: image ({mode}) values reach {hi:g}; save 8- or 16-bit intensities")
    return np.rint(scaled).clip(0, 255).astype(np.uint8)


def read_image(path: str | Path) -> Image.Image:
    """Read any Pillow-readable image as 8-bit RGB.

    Args:
        path: the file (PNG, JPEG, TIFF, GIF, BMP, WebP, ...; one frame).

    Returns:
        An RGB PIL image, decoded (the file is closed).

    Raises:
        SparsesegError: unreadable, truncated or multi-frame file, or values that have no 8-bit reading.
    """
    path = Path(path)
    im = _open(path, "image")
    if im.mode in ("I", "F", *_SIXTEEN_BIT):
        grey = _wide_to_uint8(_numeric(im), path, im.mode)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    try:
        return im.convert("RGB")
    except Exception as exc:  # an exotic mode Pillow cannot convert
        raise SparsesegError(f"{path}: image mode {im.mode} cannot be read as RGB ({one_line(exc)})") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise SparsesegError(f"{path}: unreadable image ({one_line(exc)})") from exc


def pack_colours(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours -> (...) int32 r << 16 | g << 8 | b."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def format_colour(packed: int) -> str:
    """A packed colour as '#rrggbb'."""
    return f"#{int(packed):06x}"


def read_mask(path: str | Path, colours: bool = False) -> np.ndarray:
    """Read a label mask as an (H, W) integer array of its values (see the module docstring).

    A palette file is read by index (PASCAL VOC's class palettes), except when its whole palette
    is grey: then by grey level (a GIF stores a grey mask that way, in any index order).

    Args:
        path: the file (any Pillow-readable format, one frame).
        colours: read the pixels' RGB colours, packed as r << 16 | g << 8 | b (int32), instead of
            their grey level or palette index.

    Returns:
        (H, W) uint8 (8-bit and palette files), uint16 (16-bit files), int64 (32-bit and
        integral float files) or int32 (colours).

    Raises:
        SparsesegError: unreadable file, an RGB mask read without `colours`, non-integral or
            non-finite float values, or an exotic mode.
    """
    path = Path(path)
    im = _open(path, "mask")
    mode = im.mode
    if colours:
        if mode in ("I", "F", *_SIXTEEN_BIT):
            raise SparsesegError(f"{path}: a {mode} mask has no colours; map its values, not #rrggbb colours")
        return pack_colours(np.asarray(im.convert("RGB")))
    if mode == "1":
        return np.asarray(im).astype(np.uint8) * 255  # Pillow's own reading of a set bit (getpixel: 255)
    if mode in ("L", "LA"):
        return np.asarray(im) if mode == "L" else np.asarray(im)[..., 0].copy()  # alpha says nothing
    if mode in ("P", "PA"):
        index = np.asarray(im) if mode == "P" else np.asarray(im)[..., 0].copy()
        greys = _grey_palette(im)
        # A palette of greys only encodes a grey image (GIF has no other way, and writers reorder
        # its entries), so its grey level is the value; any other palette is a class palette.
        return greys[index] if greys is not None else index
    if mode in _SIXTEEN_BIT:
        return _numeric(im).astype(np.uint16)
    if mode in ("I", "F"):
        arr = _numeric(im)
        if mode == "F":
            if not np.isfinite(arr).all():
                raise SparsesegError(f"{path}: mask holds NaN or infinite values; label values must be integers")
            if not (arr == np.round(arr)).all():
                raise SparsesegError(f"{path}: mask holds fractional values (e.g. {_first_fraction(arr):g}); "
                                     "label values must be integers")
        return arr.astype(np.int64)
    if mode in ("RGB", "RGBA", "RGBX"):
        found = np.unique(pack_colours(np.asarray(im)[..., :3]))
        shown = ", ".join(format_colour(c) for c in found[:4])
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        raise SparsesegError(
            f"{path}: mask has mode {mode} ({len(found)} colours: {shown}{more}); map each colour to a class "
            "with --map '#rrggbb=NAME,...' (or a classes file 'NAME = #rrggbb'), or save grey or palette label values"
        )
    raise SparsesegError(f"{path}: mask mode {mode} is not a label map; save grey, palette or RGB label values")


def read_ignore_mask(path: str | Path) -> np.ndarray:
    """Read an ignore mask (a field of view): (H, W) bool, True where the pixel is kept.

    A pixel is dropped where the file is 0 (black in any mode), kept elsewhere.

    Raises:
        SparsesegError: unreadable file, NaN values.
    """
    path = Path(path)
    im = _open(path, "ignore mask")
    if im.mode in ("I", "F", *_SIXTEEN_BIT):
        arr = _numeric(im)
        if im.mode == "F" and not np.isfinite(arr).all():
            raise SparsesegError(f"{path}: ignore mask holds NaN or infinite values")
        return arr != 0
    return np.asarray(im.convert("RGB")).any(axis=-1)


def _grey_palette(im: Image.Image) -> np.ndarray | None:
    """The 256 grey levels of a palette whose every entry is grey (r = g = b), else None."""
    flat = im.getpalette() or []
    entries = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(flat[: 768], dtype=np.uint8).reshape(-1, 3)
    entries[: len(colours)] = colours
    if not ((entries[:, 0] == entries[:, 1]) & (entries[:, 1] == entries[:, 2])).all():
        return None
    return entries[:, 0].copy()


def _first_fraction(arr: np.ndarray) -> float:
    return float(arr[arr != np.round(arr)].flat[0])


def palette_colours(path: str | Path, indices: list[int]) -> list[str] | None:
    """The '#rrggbb' colours of palette indices in a palette file (None when it has no palette)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "PA"):
                return None
            flat = im.getpalette() or []
    except Exception:
        return None
    out = []
    for i in indices:
        rgb = flat[3 * i : 3 * i + 3] if 3 * i + 3 <= len(flat) else [0, 0, 0]
        out.append(f"#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}")
    return out


def list_images(folder: str | Path) -> dict[str, Path]:
    """The readable image files directly inside `folder`, keyed by stem (the name labels refer to).

    Raises:
        SparsesegError: no folder, no readable images, or two images with the same stem (named).
    """
    index = FolderIndex.of(Path(folder), "image")
    if not index.readable:
        skipped = index.skipped_names()
        note = f"; skipped {skipped}" if skipped else ""
        raise SparsesegError(f"{folder}: no images found (readable: {suffix_list()}){note}")
    by_stem: dict[str, Path] = {}
    for stem in sorted(index.readable):
        paths = index.readable[stem]
        if len(paths) > 1:
            raise SparsesegError(f"{paths[1]}: two images share the stem {stem!r} ({paths[0].name}); keep one")
        by_stem[stem] = paths[0]
    return by_stem


def suffix_list() -> str:
    """The common readable suffixes, for messages."""
    common = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".webp"]
    return " ".join(s for s in common if s in READABLE_SUFFIXES) + " ..."


@dataclass
class FolderIndex:
    """The files of one folder by stem: those Pillow reads, and the others (skipped, but named in errors).

    Attributes:
        folder: the folder.
        what: what its files are, for messages ("mask", "ignore mask", "scribble map").
        hint: how to pair other names, appended to a "not found" message.
        readable: stem -> readable files (sorted by name).
        other: stem -> visible files whose suffix Pillow does not open.
    """

    folder: Path
    what: str
    hint: str = ""
    readable: dict[str, list[Path]] = field(default_factory=dict)
    other: dict[str, list[Path]] = field(default_factory=dict)

    @classmethod
    def of(cls, folder: Path, what: str, hint: str = "") -> FolderIndex:
        """Index `folder` (not recursive).

        Raises:
            SparsesegError: `folder` is not a folder.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise SparsesegError(f"{folder}: {what} folder not found")
        index = cls(folder, what, hint)
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            target = index.readable if p.suffix.lower() in READABLE_SUFFIXES else index.other
            target.setdefault(p.stem, []).append(p)
        return index

    def skipped_names(self, limit: int = 5) -> str:
        """Some skipped (unreadable-suffix) file names, for messages."""
        names = sorted(p.name for ps in self.other.values() for p in ps)
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    def find(self, stem: str, for_image: Path | None = None) -> Path:
        """The one readable file named `<stem>.<suffix>` (see `find_all`)."""
        return self.find_all({stem: (stem, for_image)})[stem]

    def find_all(self, wanted: dict[str, tuple[str, Path | None]]) -> dict[str, Path]:
        """The readable file of each wanted stem.

        Args:
            wanted: key -> (stem to find, the image it is for, or None).

        Returns:
            key -> path.

        Raises:
            SparsesegError: several files with one stem; or stems with no readable file, all listed in
                one line with the files of those stems that were skipped and how to pair other names.
        """
        found: dict[str, Path] = {}
        missing: list[tuple[str, Path | None]] = []
        for key, (stem, image) in wanted.items():
            paths = self.readable.get(stem, [])
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                why = f" for image {image.name}" if image is not None else ""
                raise SparsesegError(f"{self.folder}: {len(paths)} {self.what}s named {stem}.*{why} ({names}); keep one")
            if paths:
                found[key] = paths[0]
            else:
                missing.append((stem, image))
        if missing:
            raise SparsesegError(self._missing_message(missing))
        return found

    def _missing_message(self, missing: list[tuple[str, Path | None]], limit: int = 5) -> str:
        shown = [f"{stem}.*" + (f" (image {image.name})" if image is not None else "") for stem, image in missing[:limit]]
        more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
        text = f"{self.folder}: no {self.what} {', '.join(shown)}{more}"
        skipped = [p.name for stem, _ in missing for p in self.other.get(stem, [])]
        if skipped:
            text += f"; skipped {', '.join(skipped[:limit])} (not a format Pillow opens: {suffix_list()})"
        else:
            stem = missing[0][0]
            near = sorted(p.name for ps in self.readable.values() for p in ps if p.stem.startswith(stem))[:3]
            if near:
                text += f"; files starting with {stem!r}: {', '.join(near)}"
            else:
                some = sorted(p.name for ps in self.readable.values() for p in ps)[:2]
                text += f"; the folder holds e.g. {', '.join(some)}" if some else "; the folder holds no readable file"
        return text + (f"; {self.hint}" if self.hint else "")
