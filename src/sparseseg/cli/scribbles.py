"""`sparseseg scribbles simulate|from-run`: scribble maps from masks or from a run's clicks (`sparseseg.scribbles`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparseseg.cli.app import app, console, friendly, progress_bars

scribbles_app = typer.Typer(help="Scribble maps: simulate them from masks, or make them from a run's clicks.",
                            no_args_is_help=True)
app.add_typer(scribbles_app, name="scribbles")


@scribbles_app.command("simulate")
@friendly
def simulate_cmd(
    data: Annotated[Path, typer.Argument(help="A prepared dataset (with masks).")],
    out: Annotated[Path, typer.Option(help="Scribble folder to write: <image>.png and classes.txt.")],
    split: Annotated[str, typer.Option(help="Split whose masks are scribbled.")] = "train",
    width: Annotated[int, typer.Option(help="Stroke width in pixels (odd; even rounds down).")] = 3,
    length: Annotated[float, typer.Option(help="Fraction of each region's skeleton kept, in (0, 1].")] = 0.5,
    min_area: Annotated[int, typer.Option(help="Regions with fewer pixels get no scribble.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Simulate one scribble per region of every mask (thinned, shortened, widened, kept inside the region)."""
    from sparseseg.scribbles.simulate import simulate_dataset

    with progress_bars() as update:
        n = simulate_dataset(data, out, split, width, length, seed, min_area,
                             progress=lambda d, t: update("scribbling", d, t))
    console.print(f"wrote {n} scribble maps and classes.txt to {out}", soft_wrap=True, highlight=False)


@scribbles_app.command("from-run")
@friendly
def from_run_cmd(
    run: Annotated[Path, typer.Argument(help="A run directory of `sparseseg run`.")],
    out: Annotated[Path, typer.Option(help="Scribble folder to write.")],
    regions: Annotated[bool, typer.Option(
        help="Also scribble the clicks' regions (expansion=sam or superpixel).")] = True,
) -> None:
    """Turn a run's labelled pixels (and their regions) into scribble maps."""
    from sparseseg.scribbles.from_labels import scribbles_from_run

    n = scribbles_from_run(run, out, regions)
    console.print(f"wrote {out}: {n} scribbled pixels", soft_wrap=True, highlight=False)
