"""Crash-safe file writes (a reader sees the old file or the new one, never half of one), and the
readers that go with them: JSON lines up to a torn tail, a JSON object with a one-line error."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparseseg.errors import SparsesegError, one_line


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` for a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """The records of a JSON-lines file, up to the first line that does not parse.

    Appending one line per finished step makes a torn last line (a crash mid-write) the only
    possible damage; it marks an unfinished step. A missing file has no records.

    Returns:
        (records, torn): torn is True when lines after the records were dropped.
    """
    path = Path(path)
    if not path.exists():
        return [], False
    lines = path.read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records, len(records) < len(lines)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; unreadable, malformed or another type is one SparsesegError line."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SparsesegError(f"{path}: cannot read ({one_line(err)[:200]})") from None
    if not isinstance(data, dict):
        raise SparsesegError(f"{path}: expected a JSON object")
    return data
