"""Reading finished run directories (`sparseseg run`): the one reader of rounds.jsonl and the
training-set size from meta.json."""

from __future__ import annotations

import json
from pathlib import Path

from sparseseg.errors import SparsesegError
from sparseseg.io import read_jsonl


def read_rounds(run_dir: Path) -> list[dict]:
    """The records of a run directory's rounds.jsonl (complete lines only; a torn last line is an
    unfinished round).

    Raises:
        SparsesegError: the folder holds no rounds.jsonl.
    """
    path = Path(run_dir) / "rounds.jsonl"
    if not path.exists():
        raise SparsesegError(f"{path}: not found; is {run_dir} a sparseseg run directory?")
    return read_jsonl(path)[0]


def training_pixels(run_dir: Path) -> int | None:
    """All training pixels of a run, N x S x S, from its meta.json; None when it does not say."""
    try:
        dataset = json.loads((Path(run_dir) / "meta.json").read_text())["dataset"]
        return int(dataset["train_images"]) * int(dataset["size"]) ** 2
    except (OSError, KeyError, TypeError, ValueError):
        return None
