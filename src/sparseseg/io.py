"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` for a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
