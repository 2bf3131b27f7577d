"""`sparseseg compare` and `sparseseg supervised`: strategy comparisons over seeds (`sparseseg.compare`)
and the fully supervised reference (`sparseseg.loop.supervised`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparseseg.cli.app import app, console, err_console, friendly, progress_bars


@app.command("compare")
@friendly
def compare_cmd(
    config: Annotated[Path, typer.Argument(help="Experiment YAML shared by every run.")],
    strategies: Annotated[str, typer.Option(help="Comma-separated strategy names (`sparseseg list strategies`).")],
    out: Annotated[Path, typer.Option(help="Comparison folder: one run directory per strategy and seed.")],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override for every run: key=value.")] = None,
    sweep: Annotated[list[str] | None, typer.Option(
        help="key=v1,v2,...: one block of runs per value, e.g. budget_fraction=0.1,0.2,0.5,1.0; "
             "several --sweep make a grid.")] = None,
    jobs: Annotated[int, typer.Option(help="Runs at once; above 1 each is a one-thread subprocess.")] = 1,
    paper: Annotated[bool, typer.Option("--paper", help="Put the paper's published figures beside ours.")] = False,
    dataset: Annotated[str | None, typer.Option(
        help="The paper's dataset (camvid, ade_bed, cityscapes, pascal_context); implies --paper. "
             "Default: the name in the data's meta.json.")] = None,
    supervised: Annotated[Path | None, typer.Option(
        help="supervised.json (or its folder) from `sparseseg supervised`: adds % of supervised and the "
             "rounds to reach 80% / 90% of it.")] = None,
    summary_only: Annotated[bool, typer.Option("--summary-only", help="Run nothing; summarize what finished.")]
    = False,
    reference: Annotated[str | None, typer.Option(
        help="Strategy every other one is paired with, seed by seed (difference, 95% t interval, wins). "
             "Default: random when it is among --strategies.")] = None,
) -> None:
    """Run every strategy x seed (resumable; finished runs are skipped), then write summary.md,
    summary.csv and curves.png into OUT. Exit code 1 when a run failed."""
    from sparseseg.compare import compare, parse_list, parse_sweeps
    from sparseseg.errors import SparsesegError

    try:
        seed_list = [int(s) for s in parse_list(seeds, "--seeds")]
    except ValueError:
        raise SparsesegError(f"--seeds {seeds!r}: expected comma-separated integers") from None

    def show(outcome) -> None:
        if outcome.status == "failed":
            err_console.print(f"[red]failed[/red] {outcome.spec.name}: {outcome.message} (log: {outcome.spec.log})",
                              highlight=False, soft_wrap=True)
        elif outcome.status == "finished":
            err_console.print(f"finished {outcome.spec.name} ({outcome.seconds:.0f} s)", highlight=False)
        elif outcome.status == "skipped":
            err_console.print(f"skipped {outcome.spec.name} (already finished)", highlight=False)

    with progress_bars() as update:
        result = compare(config, parse_list(strategies, "--strategies"), seed_list, out, set_,
                         parse_sweeps(sweep), jobs=jobs, paper_figures=paper, dataset=dataset,
                         supervised=supervised, run=not summary_only, progress=update, on_outcome=show,
                         reference=reference)
    if result.comparison is not None:
        console.print((out / "summary.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    for path in result.files:
        console.print(f"wrote {path}", highlight=False)
    missing = [o for o in result.outcomes if o.status == "missing"]
    if missing:
        console.print(f"{len(missing)} run(s) not finished: {', '.join(o.spec.name for o in missing)}",
                      highlight=False)
    if result.failed:
        err_console.print(f"[red]{len(result.failed)} run(s) failed:[/red]", highlight=False)
        for o in result.failed:
            err_console.print(f"  {o.spec.name}: {o.message} (log: {o.spec.log})", highlight=False,
                              soft_wrap=True)
        raise typer.Exit(1)


@app.command("supervised")
@friendly
def supervised_cmd(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (data, backbone, head).")],
    out: Annotated[Path, typer.Option(help="Folder for supervised.json.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key=value (dotted keys).")] = None,
    pixels_per_image: Annotated[int | None, typer.Option(
        help="Labelled pixels drawn per training image (memory: D x P x N x 4 bytes). Default 256.")] = None,
) -> None:
    """The fully supervised reference: the same head trained on densely labelled training pixels
    (a seeded uniform subsample of P per image), evaluated like a run; writes OUT/supervised.json."""
    from sparseseg.config import load_config
    from sparseseg.loop.supervised import DEFAULT_PIXELS_PER_IMAGE, train_supervised, write_supervised

    cfg = load_config(config, set_)
    per_image = DEFAULT_PIXELS_PER_IMAGE if pixels_per_image is None else pixels_per_image
    with progress_bars() as update:
        result = train_supervised(cfg, per_image, progress=update)
    path = write_supervised(out, result)
    console.print(f"fully supervised mIoU {100 * result['miou']:.2f}% from {result['pixels']} pixels "
                  f"({result['pixels_per_image']} per image) in {result['seconds']:.0f} s", highlight=False)
    console.print(f"wrote {path}", highlight=False)
