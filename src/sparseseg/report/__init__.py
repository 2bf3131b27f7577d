"""`sparseseg report DIR`: one self-contained HTML page a person reads in a browser.

DIR is a run directory (`sparseseg run`), a comparison folder (`sparseseg compare`) or a labelling
project (`sparseseg init`). The page needs nothing else: images are PNG data URIs, charts inline
SVG, styles inline, and it runs no script. Modules, one job each:

    page.py        the page: escaping, tables, legends, data URIs, compare's Markdown as HTML
    charts.py      inline SVG learning curves and bar charts
    previews.py    images with pick markers, class maps in the palette, preview cards
    run.py         a run directory (test-image previews under its head.pt, through the engine)
    comparison.py  a comparison folder (its tables as `sparseseg.compare` computes them)
    project.py     a labelling project

See docs/report.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write_text

Progress = Callable[[str, int, int], None]
REPORT_FILE = "report.html"


def report_kind(folder: Path) -> str:
    """'project', 'run' or 'comparison', from the files in `folder`.

    Raises:
        SparsesegError: none of the three.
    """
    from sparseseg.report.comparison import is_comparison

    folder = Path(folder)
    if not folder.is_dir():
        raise SparsesegError(f"{folder}: not a folder")
    if (folder / "project.yaml").exists() and (folder / "annotations.sqlite").exists():
        return "project"
    if (folder / "config.yaml").exists() and (folder / "rounds.jsonl").exists():
        return "run"
    if is_comparison(folder):
        return "comparison"
    raise SparsesegError(f"{folder}: not a run directory (config.yaml + rounds.jsonl), a comparison folder (run "
                         "directories inside) or a labelling project (project.yaml + annotations.sqlite)")


def build_report(folder: Path, previews: int = 4, predictions: bool = True, reference: str | None = None,
                 progress: Progress | None = None) -> str:
    """The HTML of the report of `folder` (see `report_kind`)."""
    kind = report_kind(folder)
    if kind == "project":
        from sparseseg.report.project import project_page

        page = project_page(folder, previews, predictions, progress)
    elif kind == "run":
        from sparseseg.report.run import run_page

        page = run_page(folder, previews, predictions, progress)
    else:
        from sparseseg.report.comparison import comparison_page

        page = comparison_page(folder, reference)
    return page.html()


def write_report(folder: Path, out: Path | None = None, **kwargs) -> Path:
    """Write the report (default: FOLDER/report.html, atomically); returns its path."""
    out = Path(out) if out is not None else Path(folder) / REPORT_FILE
    html = build_report(folder, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, html)
    return out
