"""Where things are in a project folder (the layout `sparseseg init` creates; docs/annotation.md).

    project.yaml            ProjectConfig (backbone, features, strategy, head, seed, budget)
    annotations.sqlite      every query and every answer (store.py)
    data/                   the images, prepared: a sparseseg dataset without masks
      meta.json             classes, palette, size
      train/images/<stem>.png
    rounds/<RRR>/           what `query` exported for round RRR (tasks.json, label_config.xml,
                            cvat.xml, queries.csv, review/<stem>.png)
    head.pt                 the head trained on all answers (retrained when they change)
    strategy_cache.json     what the strategy keeps between rounds (the local picks of each image),
                            with the settings and images it holds for; deleting it only costs time
"""

from __future__ import annotations

from pathlib import Path

from sparseseg.config import ProjectConfig, load_config
from sparseseg.errors import SparsesegError

CONFIG_FILE = "project.yaml"
DATA_DIR = "data"
SPLIT = "train"
ROUNDS_DIR = "rounds"
HEAD_FILE = "head.pt"
STRATEGY_CACHE_FILE = "strategy_cache.json"


def round_dir(root: Path, round: int) -> Path:
    """The folder of round `round`'s exported files."""
    return Path(root) / ROUNDS_DIR / f"{round:03d}"


def load_project_config(root: Path) -> ProjectConfig:
    """Read and validate `root/project.yaml` (relative backbone paths are relative to `root`)."""
    path = Path(root) / CONFIG_FILE
    if not path.is_file():
        raise SparsesegError(f"{path}: not found; is {root} a sparseseg project (made by `sparseseg init`)?")
    return load_config(path, schema=ProjectConfig)
