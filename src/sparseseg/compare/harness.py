"""`compare`: plan, run what is not finished, then write summary.md, summary.csv and curves.png."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparseseg.compare import paper
from sparseseg.compare.plan import plan_comparison, resolve_reference
from sparseseg.compare.plots import plot_curves
from sparseseg.compare.render import render_csv, render_markdown
from sparseseg.compare.results import Comparison, check_supervised, paper_dataset, summarize_comparison
from sparseseg.compare.runner import (
    Progress,
    RunOutcome,
    outcomes_without_running,
    run_comparison,
    run_status,
)
from sparseseg.io import atomic_write_text


def write_summary(cmp: Comparison, out: Path) -> list[Path]:
    """Write summary.md, summary.csv and curves.png into `out` (each atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.md", out / "summary.csv", out / "curves.png"]
    atomic_write_text(paths[0], render_markdown(cmp))
    atomic_write_text(paths[1], render_csv(cmp))
    plot_curves(cmp, paths[2])
    return paths


@dataclass
class CompareResult:
    outcomes: list[RunOutcome]
    comparison: Comparison | None  # None when no run has finished
    files: list[Path]

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def compare(
    config_path: Path,
    strategies: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    overrides: Sequence[str] | None = None,
    sweeps: dict[str, list[str]] | None = None,
    jobs: int = 1,
    paper_figures: bool = False,
    dataset: str | None = None,
    supervised: Path | None = None,
    run: bool = True,
    progress: Progress | None = None,
    on_outcome: Callable[[RunOutcome], None] | None = None,
    reference: str | None = None,
) -> CompareResult:
    """Plan, run what is not finished (unless `run` is False), then write the summary files.

    Args:
        paper_figures: put the paper's published figures beside ours; the dataset is `dataset`
            when given (which implies it), else the name in the data's meta.json.
        supervised: a supervised.json (or its folder) for the rounds-to-reach table and the
            "% of supervised" column.
        run: False only summarizes what has finished; unfinished runs are 'missing'.
        reference: the strategy every other one is paired with, seed by seed; None: `random`
            when it is among `strategies`, else no paired table.

    Failed runs do not stop the others; they are in the result and the summary lists them.
    """
    reference = resolve_reference(strategies, reference)
    specs = plan_comparison(config_path, strategies, seeds, out, overrides, sweeps)
    if dataset is not None:
        dataset = paper.resolve_dataset(dataset)
    elif paper_figures:
        dataset = paper_dataset(specs[0].config)
    if supervised is not None:  # a bad path should fail before hours of runs, not after
        from sparseseg.loop.supervised import read_supervised

        check_supervised(read_supervised(supervised), specs[0].config, supervised)
    if run:
        outcomes = run_comparison(specs, config_path, jobs, progress, on_outcome)
    else:
        outcomes = outcomes_without_running(specs)
    if not any(run_status(s)[0] == "complete" for s in specs):
        return CompareResult(outcomes, None, [])
    cmp = summarize_comparison(specs, dataset, supervised, reference)
    return CompareResult(outcomes, cmp, write_summary(cmp, Path(out)))
