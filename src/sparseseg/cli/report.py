"""`sparseseg report DIR`: one self-contained HTML page for a run, a comparison or a labelling project."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparseseg.cli.app import app, console, friendly, progress_bars


@app.command("report")
@friendly
def report_cmd(
    folder: Annotated[Path, typer.Argument(help="A run directory, a comparison folder or a labelling project.")],
    out: Annotated[Path | None, typer.Option(help="The HTML file to write (default: FOLDER/report.html).")] = None,
    previews: Annotated[int, typer.Option(help="Images previewed (training images, and as many test images).")] = 4,
    predictions: Annotated[bool, typer.Option(
        help="Predict the previewed images with the head (loads the backbone).")] = True,
    reference: Annotated[str | None, typer.Option(
        help="Comparisons: the strategy the others are paired with (default: random when compared).")] = None,
) -> None:
    """Write an HTML report (curves, tables, per-class IoU, previews with picks, class mix, times)
    that opens in any browser with nothing else beside it."""
    from sparseseg.report import write_report

    with progress_bars() as update:
        path = write_report(folder, out, previews=previews, predictions=predictions, reference=reference,
                            progress=update)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)
