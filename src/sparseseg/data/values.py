"""Class lists and the map from mask values to class ids.

A classes file holds one class per line::

    NAME [R G B] [= VALUE[,VALUE...]]      # comment

`R G B` is the display colour. Without `= VALUE`, line i is mask value i (every line or none
carries values). A VALUE is an integer (a grey level, palette index or 16-bit value) or a colour
`#rrggbb` (for RGB masks). A line named `void` with values lists the values of unlabelled pixels.

The same map can be given inline, `--map 0=background,255=vessel` (`VALUE=void` for unlabelled
values); with a classes file the names must be its classes (which then keep their order and
colours), without one the classes are the map's names in order of first appearance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparseseg.data.dataset import IGNORE_INDEX
from sparseseg.data.readers import format_colour, palette_colours
from sparseseg.errors import SparsesegError, one_line

VOID = "void"  # the map target for values that mark unlabelled pixels
_COLOUR = re.compile(r"^#([0-9a-fA-F]{6})$")
# '#' starts a comment unless it begins a colour '#rrggbb' (followed by a space, ',' or the end).
_COMMENT = re.compile(r"(^|\s)#(?![0-9a-fA-F]{6}(?:[\s,]|$)).*$")


@dataclass(frozen=True)
class ClassLine:
    """One class line: its name, display colour and the mask values it owns (None: not given)."""

    name: str
    colour: list[int] | None
    values: list[tuple[bool, int]] | None  # (is a colour, value or packed colour)
    where: str  # "classes.txt:3"


def parse_value(text: str, where: str) -> tuple[bool, int]:
    """'#rrggbb' -> (True, packed colour); a non-negative integer -> (False, value).

    Raises:
        SparsesegError: neither.
    """
    text = text.strip()
    match = _COLOUR.match(text)
    if match:
        return True, int(match.group(1), 16)
    if text.isdigit():
        return False, int(text)
    raise SparsesegError(f"{where}: mask value {text!r} is neither an integer >= 0 nor a colour #rrggbb")


def read_class_lines(path: Path) -> list[ClassLine]:
    """Parse a classes file (the grammar is in the module docstring).

    Raises:
        SparsesegError: unreadable or empty file, bad colour or value, duplicate name, colours or
            values on some lines only.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SparsesegError(f"{path}: cannot read classes file ({one_line(exc)})") from exc
    lines: list[ClassLine] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        where = f"{path}:{lineno}"
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        values = None
        if "=" in line:
            line, spec = (part.strip() for part in line.split("=", 1))
            values = [parse_value(v, where) for v in spec.split(",") if v.strip()]
            if not values:
                raise SparsesegError(f"{where}: '=' must be followed by mask values, e.g. 'road = 7' or 'road = #804080'")
        tokens = line.split()
        colour: list[int] | None = None
        if len(tokens) >= 4 and all(t.lstrip("-").isdigit() for t in tokens[-3:]):
            colour = [int(t) for t in tokens[-3:]]
            if not all(0 <= v <= 255 for v in colour):
                raise SparsesegError(f"{where}: colour {colour} must be three ints in 0..255")
            tokens = tokens[:-3]
        name = " ".join(tokens)
        if not name:
            raise SparsesegError(f"{where}: a class line needs a name")
        if any(c.name == name for c in lines):
            raise SparsesegError(f"{where}: class name {name!r} appears twice")
        lines.append(ClassLine(name, colour, values, where))
    if not lines:
        raise SparsesegError(f"{path}: classes file lists no classes")
    valued = [c.values is not None for c in lines]
    if any(valued) and not all(valued):
        raise SparsesegError(f"{path}: give mask values ('NAME = VALUE') on every class line or on none")
    classes = [c for c in lines if not _is_void(c)]
    given = [c.colour is not None for c in classes]
    if any(given) and not all(given):
        raise SparsesegError(f"{path}: give a colour 'name r g b' on every class line or on none")
    return lines


def _is_void(line: ClassLine) -> bool:
    return line.name == VOID and line.values is not None


def read_classes_file(path: Path) -> tuple[list[str], list[list[int]] | None]:
    """The classes of a classes file (a `void = ...` line is not a class).

    Returns:
        (class names, palette or None when the file gives no colours).

    Raises:
        SparsesegError: as `read_class_lines`.
    """
    classes = [c for c in read_class_lines(path) if not _is_void(c)]
    if not classes:
        raise SparsesegError(f"{path}: classes file lists no classes besides {VOID}")
    palette = [c.colour for c in classes] if all(c.colour is not None for c in classes) else None
    return [c.name for c in classes], palette


def parse_map(spec: str) -> list[tuple[tuple[bool, int], str]]:
    """'0=background,255=vessel,#ff0000=car,11=void' -> [((is colour, value), name), ...].

    Raises:
        SparsesegError: an item without '=', an empty name or a bad value.
    """
    items = []
    for item in spec.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise SparsesegError(f"--map: {item.strip()!r} is not VALUE=NAME (e.g. --map 0=background,255=vessel)")
        key, name = (part.strip() for part in item.split("=", 1))
        if not name:
            raise SparsesegError(f"--map: {item.strip()!r} names no class")
        items.append((parse_value(key, "--map"), name))
    if not items:
        raise SparsesegError("--map is empty; give VALUE=NAME pairs, e.g. --map 0=background,255=vessel")
    return items


def _show(value: int, colours: bool) -> str:
    return format_colour(value) if colours else str(value)


def show_values(values, colours: bool, limit: int = 12) -> str:
    """'[0, 255]' or '[#000000, #ffffff]' (at most `limit`, then 'and N more')."""
    values = list(values)
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return "[" + ", ".join(_show(v, colours) for v in values[:limit]) + "]" + more


@dataclass
class ValueMap:
    """Mask value -> stored class id (or IGNORE_INDEX), with the classes it defines.

    Attributes:
        classes: class names, list index = stored id.
        palette: one colour per class, or None (a default palette is used).
        table: mask value (packed r << 16 | g << 8 | b when `colours`) -> class id or IGNORE_INDEX.
        colours: the keys are RGB colours (masks are read by colour).
        source: where the map came from, for messages.
        identity: no values were given: value i is line i of the classes file.
        advice: what to say instead of how to map values, when a value is not in the map.
    """

    classes: list[str]
    palette: list[list[int]] | None
    table: dict[int, int]
    colours: bool = False
    source: str = "--map"
    identity: bool = False
    advice: str | None = None
    _lut: np.ndarray | None = field(default=None, repr=False)

    def void_values(self) -> list[int]:
        return sorted(k for k, v in self.table.items() if v == IGNORE_INDEX)

    def lut(self) -> np.ndarray:
        """A 65536-entry lookup (int16, -1 = not in the map) for 8- and 16-bit masks."""
        if self._lut is None:
            lut = np.full(65536, -1, dtype=np.int16)
            for k, v in self.table.items():
                if 0 <= k < 65536:
                    lut[k] = v
            self._lut = lut
        return self._lut

    def apply(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map one mask's values to stored ids.

        Args:
            raw: (H, W) values as `readers.read_mask` returns them (colours packed when `colours`).
            path: the mask file, for messages.

        Returns:
            (H, W) uint8 class ids, IGNORE_INDEX where the value is void.

        Raises:
            SparsesegError: a value not in the map (the message lists the values found and how to map them).
        """
        if raw.dtype in (np.uint8, np.uint16) and not self.colours:
            mapped = self.lut()[raw]
        else:
            found, inverse = np.unique(raw, return_inverse=True)
            ids = np.array([self.table.get(int(v), -1) for v in found], dtype=np.int16)
            mapped = ids[inverse].reshape(raw.shape)
        if (mapped < 0).any():
            self._refuse(raw, path)
        return mapped.astype(np.uint8)

    def _refuse(self, raw: np.ndarray, path: Path) -> None:
        found = np.unique(raw).tolist()
        bad = [v for v in found if v not in self.table]
        expected = f"in {self.source}"
        note = ""
        if not self.colours:
            colours = palette_colours(path, [v for v in found if v < 256])
            if colours is not None:
                note = f" (palette indices; their colours: {', '.join(colours)}; colour keys '#rrggbb=NAME' map by colour)"
        names = self.classes
        if self.identity and len(found) == len(names):
            hint = "map them, e.g. --map " + ",".join(f"{_show(v, self.colours)}={c}" for v, c in zip(found, names, strict=True))
        else:
            hint = "map each value with --map VALUE=NAME (VALUE=void for unlabelled pixels)"
        if self.identity:
            hint += " (--void-id / void_id: only for one value that marks unlabelled pixels)"
        if self.advice is not None:
            hint = self.advice
        raise SparsesegError(
            f"{path}: mask value(s) {show_values(bad, self.colours)} not {expected}{note}; values in this mask: "
            f"{show_values(found, self.colours)}; {hint}"
        )


def build_value_map(classes_file: Path | None, map_spec: str | None, void_id: int | None) -> ValueMap:
    """The value map from a classes file and/or `--map`, plus an optional void value.

    Args:
        classes_file: a classes file, or None when `map_spec` names the classes.
        map_spec: `VALUE=NAME,...`, or None.
        void_id: a mask value meaning "unlabelled" (stored as 255). Without any values given, a
            void id inside the class range drops that class and shifts the ids above it down.

    Raises:
        SparsesegError: neither source, values given twice, a map name that is not a class, a value
            mapped two ways, colour and integer keys mixed, no classes left, more than 255 classes.
    """
    if void_id is not None and not 0 <= void_id < 2**31:
        raise SparsesegError(f"void_id must be a mask value >= 0, got {void_id}")
    lines = read_class_lines(classes_file) if classes_file is not None else None
    file_values = lines is not None and lines[0].values is not None
    if map_spec is not None and file_values:
        raise SparsesegError(f"{classes_file}: lists mask values and --map gives them too; keep one")
    if lines is not None and not file_values and map_spec is None:
        vmap = _identity_map(classes_file, lines, void_id)
    else:
        if map_spec is not None:
            pairs = parse_map(map_spec)
            source = "--map"
            if lines is not None:
                classes = [c.name for c in lines]
                palette = [c.colour for c in lines] if all(c.colour for c in lines) else None
                unknown = [n for _, n in pairs if n != VOID and n not in classes]
                if unknown:
                    raise SparsesegError(f"--map: class {unknown[0]!r} is not in {classes_file} "
                                         f"({', '.join(classes)}; '{VOID}' = unlabelled)")
            else:
                classes = list(dict.fromkeys(n for _, n in pairs if n != VOID))
                palette = None
        elif lines is not None:
            source = str(classes_file)
            pairs = [(v, c.name) for c in lines for v in c.values or []]
            kept = [c for c in lines if not _is_void(c)]
            classes = [c.name for c in kept]
            palette = [c.colour for c in kept] if all(c.colour for c in kept) else None
        else:
            raise SparsesegError("no classes: give a classes file (--classes) or a value map (--map 0=background,255=vessel)")
        vmap = _explicit_map(pairs, classes, palette, source)
        if void_id is not None:
            if vmap.colours:
                raise SparsesegError(f"--void-id {void_id} is a value but {source} maps colours; map the colour to void "
                                     "('#rrggbb=void')")
            if vmap.table.get(void_id, IGNORE_INDEX) != IGNORE_INDEX:
                raise SparsesegError(f"--void-id {void_id}: {source} maps value {void_id} to class "
                                     f"{vmap.classes[vmap.table[void_id]]!r}; drop one of the two")
            vmap.table[void_id] = IGNORE_INDEX
    if not vmap.classes:
        raise SparsesegError(f"{vmap.source}: no classes left besides void")
    if len(vmap.classes) > 255:
        raise SparsesegError(f"{vmap.source}: {len(vmap.classes)} classes; at most 255 fit an 8-bit label map")
    return vmap


def _explicit_map(pairs, classes: list[str], palette, source: str) -> ValueMap:
    kinds = {is_colour for (is_colour, _), _ in pairs}
    if len(kinds) > 1:
        raise SparsesegError(f"{source}: mixes colour (#rrggbb) and integer mask values; masks are read one way")
    colours = kinds == {True}
    table: dict[int, int] = {}
    for (_, value), name in pairs:
        target = IGNORE_INDEX if name == VOID else classes.index(name)
        if table.get(value, target) != target:
            was = VOID if table[value] == IGNORE_INDEX else classes[table[value]]
            raise SparsesegError(f"{source}: value {_show(value, colours)} is mapped to both {was!r} and {name!r}")
        table[value] = target
    return ValueMap(classes, palette, table, colours=colours, source=source)


def _identity_map(classes_file: Path, lines: list[ClassLine], void_id: int | None) -> ValueMap:
    """Line i = value i; a void id inside the range drops its class and shifts the ids above it."""
    names = [c.name for c in lines]
    palette = [c.colour for c in lines] if all(c.colour for c in lines) else None
    keep = [i for i in range(len(names)) if i != void_id]
    table = {raw: new for new, raw in enumerate(keep)}
    if void_id is not None:
        table[void_id] = IGNORE_INDEX
    void = f", void {void_id}" if void_id is not None else ""
    return ValueMap([names[i] for i in keep], [palette[i] for i in keep] if palette else None, table,
                    source=f"{Path(classes_file).name} (line i = value i: 0..{len(names) - 1}{void})", identity=True)
