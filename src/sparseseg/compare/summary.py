"""`sparseseg summarize`: mIoU per round, mean and std over seeds, per strategy, from any run directories."""

from __future__ import annotations

import statistics
from pathlib import Path

from sparseseg.compare.rundir import read_rounds
from sparseseg.compare.stats import mean_std
from sparseseg.errors import SparsesegError


def _cell(values: list[float]) -> str:
    """'mean ± std' in percent of fractions; ± 0.00 with one seed; '' with none."""
    if not values:
        return ""
    mean, std = mean_std(values)
    return f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}"


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
        cells = [_cell([r[i]["miou"] for r in runs[n] if len(r) > i]) for n in names]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["", "| strategy | " + " | ".join(["select s/round", "train s/round", "evaluate s/round"]) + " |",
              "|---|---:|---:|---:|"]
    for n in names:
        phases = [rec["phases"] for r in runs[n] for rec in r]
        cells = [f"{statistics.fmean(p[k]['seconds'] for p in phases):.1f}" for k in ("select", "train", "evaluate")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
