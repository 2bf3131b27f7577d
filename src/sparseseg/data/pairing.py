"""Which mask (and ignore mask) belongs to which image, and which split each image goes to.

Masks are found by name: `<mask pattern>.<any readable suffix>` in the mask folder. The pattern's
fields are `{stem}` (the image's stem) and the named groups of `image_regex`, which every image
stem must match whole. So DRIVE's `21_training.tif` -> `21_manual1.gif` is
`image_regex='(?P<id>\\d+)_training'`, `mask_pattern='{id}_manual1'`, and a suffix alone is
`mask_pattern='{stem}_mask'`. A pairs file (two columns, image and mask; file names or stems)
replaces the pattern. A split file (two columns, image and split) assigns given splits.
Both files are CSV, or tab-separated when a line holds a tab; `#` lines and a header row
(`image,mask` / `image,split`) are skipped.
"""

from __future__ import annotations

import csv
import io
import re
import string
from dataclasses import dataclass
from pathlib import Path

from sparseseg.data.readers import READABLE_SUFFIXES, FolderIndex
from sparseseg.errors import SparsesegError, one_line

SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_HOW = "pair other names with --mask-pattern (e.g. '{stem}_mask'), --image-regex or --pairs"


def check_split_name(name: str, where: str) -> None:
    """A split name is a plain folder name (letters, digits, '_', '-')."""
    if not SPLIT_NAME.match(name) or name in ("images", "masks"):
        raise SparsesegError(f"{where}: split name {name!r} must be letters, digits, '_' or '-' (e.g. train, test)")


def read_table(path: Path, header: tuple[str, str], min_cols: int = 2) -> list[tuple[int, list[str]]]:
    """The rows of a two-column CSV/TSV file as (line number, cells), comments and header skipped.

    Raises:
        SparsesegError: unreadable file, or a row with fewer than `min_cols` cells.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SparsesegError(f"{path}: cannot read ({one_line(exc)})") from exc
    delimiter = "\t" if "\t" in text else ","
    rows = []
    for lineno, cells in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        cells = [c.strip() for c in cells]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not rows and [c.lower() for c in cells[: len(header)]] == list(header):
            continue
        if len(cells) < min_cols or not all(cells[:min_cols]):
            raise SparsesegError(f"{path}:{lineno}: expected {min_cols} columns ({', '.join(header)}), got {cells}")
        rows.append((lineno, cells))
    if not rows:
        raise SparsesegError(f"{path}: no rows (expected lines '{','.join(header)}')")
    return rows


def resolve_image(entry: str, by_stem: dict[str, Path], where: str) -> str:
    """The stem of the image an entry names (its file name or its stem)."""
    if entry in by_stem:
        return entry
    stem = Path(entry).stem
    if stem in by_stem and by_stem[stem].name == entry:
        return stem
    raise SparsesegError(f"{where}: image {entry!r} is not in the images folder")


@dataclass(frozen=True)
class Pairing:
    """How an image's mask and ignore mask are named.

    Attributes:
        mask_pattern: the mask's stem, a `str.format` template over `{stem}` and the named groups
            of `image_regex`.
        ignore_pattern: the same for the ignore mask.
        image_regex: a regex every image stem must match whole; its named groups are fields.
        pairs_file: image -> mask name table; replaces `mask_pattern` when given.
    """

    mask_pattern: str = "{stem}"
    ignore_pattern: str = "{stem}"
    image_regex: str | None = None
    pairs_file: Path | None = None

    def check(self) -> None:
        """Refuse a bad regex or a pattern with unknown fields, before any file is read."""
        groups: set[str] = set()
        if self.image_regex is not None:
            try:
                groups = set(re.compile(self.image_regex).groupindex)
            except re.error as exc:
                raise SparsesegError(f"--image-regex {self.image_regex!r}: not a regular expression ({exc})") from None
        for option, pattern in (("--mask-pattern", self.mask_pattern), ("--ignore-pattern", self.ignore_pattern)):
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
            except ValueError as exc:
                raise SparsesegError(f"{option} {pattern!r}: {exc}") from None
            unknown = sorted(fields - groups - {"stem"})
            if unknown:
                raise SparsesegError(f"{option} {pattern!r}: unknown field {{{unknown[0]}}}; use {{stem}} or a named "
                                     "group (?P<name>...) of --image-regex")
            if not fields:
                raise SparsesegError(f"{option} {pattern!r} names every image's file the same; use {{stem}} in it")

    def fields(self, image: Path) -> dict[str, str]:
        """{stem} and the regex groups of one image."""
        values = {"stem": image.stem}
        if self.image_regex is not None:
            match = re.fullmatch(self.image_regex, image.stem)
            if match is None:
                raise SparsesegError(f"{image}: name does not match --image-regex {self.image_regex!r}")
            values.update({k: v or "" for k, v in match.groupdict().items()})
        return values

    def find_masks(self, images: dict[str, Path], folder: Path) -> dict[str, Path]:
        """The mask of every image (stem -> mask path).

        Raises:
            SparsesegError: a missing or ambiguous mask (named, with what was skipped), a pairs
                file naming an unknown image or leaving one out, or one mask paired with two images.
        """
        index = FolderIndex.of(folder, "mask", _HOW)
        if self.pairs_file is not None:
            found = self._from_pairs(images, index)
        else:
            found = index.find_all({s: (self.mask_pattern.format(**self.fields(p)), p) for s, p in images.items()})
        owner: dict[Path, str] = {}
        for stem, mask in found.items():
            if mask in owner:
                raise SparsesegError(f"{mask}: paired with images {owner[mask]!r} and {stem!r}; check the mask pattern "
                                     "or pairs file")
            owner[mask] = stem
        return found

    def find_ignore(self, images: dict[str, Path], folder: Path) -> dict[str, Path]:
        """The ignore mask of every image (stem -> path), named by `ignore_pattern`."""
        index = FolderIndex.of(folder, "ignore mask", "name ignore masks with --ignore-pattern (e.g. '{stem}_mask')")
        return index.find_all({s: (self.ignore_pattern.format(**self.fields(p)), p) for s, p in images.items()})

    def _from_pairs(self, images: dict[str, Path], index: FolderIndex) -> dict[str, Path]:
        assert self.pairs_file is not None
        by_name = {p.name: p for ps in index.readable.values() for p in ps}
        found: dict[str, Path] = {}
        for lineno, (image, mask, *_) in read_table(self.pairs_file, ("image", "mask")):
            where = f"{self.pairs_file}:{lineno}"
            try:
                stem = resolve_image(image, images, where)
            except SparsesegError:
                continue  # an image of another split (one pairs file may cover every split)
            if stem in found:
                raise SparsesegError(f"{where}: image {image!r} is paired twice")
            named = Path(mask).stem if Path(mask).suffix.lower() in READABLE_SUFFIXES else mask
            found[stem] = by_name[mask] if mask in by_name else index.find(named, images[stem])
        missing = sorted(images[s].name for s in images if s not in found)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise SparsesegError(f"{self.pairs_file}: no row for image(s) {', '.join(missing[:5])}{more}")
        return found


def read_split_file(path: Path, images: dict[str, Path]) -> dict[str, str]:
    """stem -> split name for every image, from a split file (image, split per line).

    Raises:
        SparsesegError: an unknown image, an image listed twice, a bad split name, or images left out.
    """
    split: dict[str, str] = {}
    for lineno, (image, name, *_) in read_table(path, ("image", "split")):
        where = f"{path}:{lineno}"
        stem = resolve_image(image, images, where)
        check_split_name(name, where)
        if stem in split:
            raise SparsesegError(f"{where}: image {image!r} is listed twice")
        split[stem] = name
    missing = sorted(images[s].name for s in images if s not in split)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SparsesegError(f"{path}: no split for image(s) {', '.join(missing[:5])}{more}")
    return split
