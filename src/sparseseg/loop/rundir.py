"""A simulated run's directory: everything about a run, written so that nothing already there is lost.

    config.yaml        the resolved config (a resumed run must match it)
    meta.json          versions, hardware, dataset and backbone summary
    rounds.jsonl       one JSON line per finished round: labels, mIoU, per-class IoU, pixel
                       accuracy, seconds and peak memory of each phase
    picks/round_XX.csv the pixels chosen in round XX (image, y, x, class, round)
    labels.csv         every labelled pixel so far
    previews/round_XX.png  picks and predictions on a few training images
    head.pt            the latest head (state dict + what it was trained on)
    regions/round_XX.npz, .csv  with expansion: each click's region (masks bit-packed),
                       score and whether it was kept, with the model and tau (docs/expansion.md)

A round's line in rounds.jsonl is written last, after its other files: a round without a line is
incomplete and is replayed on resume. Every other file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from sparseseg import __version__
from sparseseg.config import ExperimentConfig, dump_config, load_config
from sparseseg.errors import SparsesegError
from sparseseg.expansion.regions import RegionSet
from sparseseg.io import atomic_write, atomic_write_text, read_jsonl
from sparseseg.labels import PixelLabels

ROUNDS_FILE = "rounds.jsonl"


def round_file(folder: str, round: int, suffix: str) -> str:
    """`folder/round_XX.suffix`, the name of a per-round file."""
    return f"{folder}/round_{round:02d}.{suffix}"


class RunDirectory:
    """The files of one run (module docstring); knows nothing of how rounds are computed."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.path = Path(config.out)

    def check(self) -> None:
        """Refuse a directory that holds other files, or finished rounds of another config."""
        path = self.path / "config.yaml"
        if path.exists():
            if self.finished_rounds() and load_config(path) != self.config:
                raise SparsesegError(
                    f"{path}: this run directory holds a run with a different config; "
                    "resume it with the same config or choose another out directory"
                )
        elif self.path.exists() and any(self.path.iterdir()):
            raise SparsesegError(f"{self.path}: directory is not empty and holds no sparseseg run; choose another out")

    def finished_rounds(self) -> int:
        """How many rounds are committed on disk (a torn last line is an unfinished round)."""
        return len(read_jsonl(self.path / ROUNDS_FILE)[0])

    def create(self, expands: bool) -> None:
        """Written only once data and backbone have loaded, so a typo leaves no stale config behind."""
        (self.path / "picks").mkdir(parents=True, exist_ok=True)
        (self.path / "previews").mkdir(exist_ok=True)
        if expands:
            (self.path / "regions").mkdir(exist_ok=True)
        atomic_write_text(self.path / "config.yaml", dump_config(self.config))

    # ------------------------------------------------------------------ reading
    def read_records(self) -> list[dict]:
        """The committed rounds' records; a torn last line is dropped so the next append starts clean."""
        path = self.path / ROUNDS_FILE
        records, torn = read_jsonl(path)
        if torn:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def read_labels(self, names: Sequence[str], completed: int) -> PixelLabels:
        """The labels of the committed rounds."""
        path = self.path / "labels.csv"
        if not path.exists():
            return PixelLabels()
        return PixelLabels.read_csv(path, names).upto(completed)

    def read_regions(self, size: int, completed: int) -> RegionSet:
        """The regions of every committed round."""
        regions = RegionSet.empty(size)
        for r in range(1, completed + 1):
            regions = regions.concat(RegionSet.load_npz(self.path / round_file("regions", r, "npz"))[0])
        return regions

    # ------------------------------------------------------------------ writing
    def write_meta(self, info: dict) -> None:
        """meta.json: versions and hardware (added here) plus what the caller describes."""
        device = info.pop("device")
        meta = {
            "sparseseg_version": __version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "hardware": {
                "platform": platform.platform(),
                "cpu": platform.processor() or platform.machine(),
                "cpu_threads": torch.get_num_threads(),
                "device": str(device),
                "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            },
            **info,
        }
        atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2))

    def write_regions(self, round: int, regions: RegionSet, model: str, tau: float, names: Sequence[str],
                      class_names: Sequence[str]) -> None:
        path = self.path / round_file("regions", round, "npz")
        regions.save_npz(path, model, tau)
        regions.write_csv(path.with_suffix(".csv"), names, class_names)

    def write_labels(self, round: int, labels: PixelLabels, names: Sequence[str], class_names: Sequence[str]) -> None:
        """This round's picks and every label so far."""
        labels.subset(labels.round == round).write_csv(self.path / round_file("picks", round, "csv"), names,
                                                       class_names)
        labels.write_csv(self.path / "labels.csv", names, class_names)

    def write_head(self, state: dict) -> None:
        atomic_write(self.path / "head.pt", lambda tmp: torch.save(state, tmp))

    def preview_path(self, round: int) -> Path:
        return self.path / round_file("previews", round, "png")

    def commit(self, record: dict) -> None:
        """Append the round's line: the commit point of the round (its other files are written)."""
        with (self.path / ROUNDS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")
