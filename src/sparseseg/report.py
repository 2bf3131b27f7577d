"""Tables from run directories: mIoU per round, mean and std over seeds, per strategy."""

from __future__ import annotations

import statistics
from pathlib import Path

from sparseseg.errors import SparsesegError
from sparseseg.io import read_jsonl


def read_rounds(run_dir: Path) -> list[dict]:
    """The records of a run directory's rounds.jsonl (complete lines only)."""
    path = Path(run_dir) / "rounds.jsonl"
    if not path.exists():
        raise SparsesegError(f"{path}: not found; is {run_dir} a sparseseg run directory?")
    return read_jsonl(path)[0]


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def summarize(run_dirs: list[Path]) -> str:
    """Markdown: one row per round, one column per strategy (mean ± std of mIoU over seeds, in %),
    then the seconds per round of each phase, averaged over rounds and seeds."""
    runs: dict[str, list[list[dict]]] = {}
    for run_dir in run_dirs:
        records = read_rounds(run_dir)
        if records:
            runs.setdefault(records[0]["strategy"], []).append(records)
    if not runs:
        raise SparsesegError("no finished rounds in the given run directories")
    names = list(runs)
    rounds = max(len(r) for seeds in runs.values() for r in seeds)
    lines = ["| round | " + " | ".join(f"{n} (n={len(runs[n])})" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for i in range(rounds):
        cells = [_mean_std([r[i]["miou"] for r in runs[n] if len(r) > i]) for n in names]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["", "| strategy | " + " | ".join(["select s/round", "train s/round", "evaluate s/round"]) + " |",
              "|---|---:|---:|---:|"]
    for n in names:
        phases = [rec["phases"] for r in runs[n] for rec in r]
        cells = [f"{statistics.fmean(p[k]['seconds'] for p in phases):.1f}" for k in ("select", "train", "evaluate")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
