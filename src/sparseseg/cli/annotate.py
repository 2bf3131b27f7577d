"""`sparseseg init|query|import|export|train|predict|status`: label real images with an annotation tool.

Each command is a thin layer over `sparseseg.annotate.project`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sparseseg.cli.app import app, console, err_console, friendly, progress_bars

ProjectArg = Annotated[Path, typer.Argument(help="The project folder.")]


def _say(text: str) -> None:
    """One message, one line (never wrapped to the terminal width), no markup from file names."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)


@app.command("init")
@friendly
def init(
    project: Annotated[Path, typer.Argument(help="The project folder to create (new or empty).")],
    images: Annotated[Path, typer.Option(help="Folder of the images to label.")],
    classes: Annotated[Path, typer.Option(help="Class names, one per line (`name` or `name r g b`).")],
    backbone: Annotated[Path | None, typer.Option(
        help="ADM checkpoint (.pt, e.g. from `sparseseg pretrain`); without it, the ImageNet EfficientNet-Lite0 "
             "shipped with the package (no download).")] = None,
    preset: Annotated[str | None, typer.Option(help="Flags of an OpenAI checkpoint: imagenet_256, lsun_bedroom.")] = None,
    size: Annotated[int, typer.Option(help="Working resolution: images are resized to size x size.")] = 256,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Project setting key=value (dotted keys).")] = None,
) -> None:
    """Create a labelling project: prepared images, project.yaml and the annotation database."""
    from sparseseg.annotate.init import init_project

    given = {k: v for k, v in (("checkpoint", backbone), ("preset", preset)) if v is not None}
    with progress_bars() as update:
        proj = init_project(project, images, classes, size=size, overrides=set_, backbone=given or None,
                            progress=lambda d, t: update("preparing", d, t))
    _say(f"created {project}: {len(proj.image_rows)} images at {size}x{size}, {len(proj.classes)} classes, "
         f"project id {proj.project_id}")
    _say(f"next: sparseseg query {project}")


@app.command("query")
@friendly
def query(
    project: ProjectArg,
    budget: Annotated[int | None, typer.Option(help="Pixels to query (default: the project's budget).")] = None,
    force: Annotated[bool, typer.Option(help="Query even though earlier queries are still unanswered.")] = False,
) -> None:
    """Select the next pixels to label and export them (Label Studio, CVAT, CSV, review PNGs)."""
    from sparseseg.annotate.project import Project

    proj = Project(project)
    with progress_bars() as update:
        result = proj.query(budget=budget, force=force, progress=update)
    how = "coverage only (no answers to train on yet)" if result.coverage_only else proj.config.strategy.name
    _say(f"round {result.round}: {result.queries} pixels queried by {how}")
    _print_files(result.files)


def _print_files(files: list[Path]) -> None:
    reviews = [f for f in files if f.parent.name == "review"]
    for f in files:
        if f not in reviews:
            _say(f"  {f}")
    if reviews:
        _say(f"  {reviews[0].parent}/ ({len(reviews)} review PNGs)")


@app.command("import")
@friendly
def import_(
    project: ProjectArg,
    file: Annotated[Path, typer.Argument(help="Label Studio JSON export, CVAT for images 1.1 XML, or CSV.")],
    format: Annotated[str | None, typer.Option(help="label-studio, cvat or csv (default: from the file).")] = None,
    replace: Annotated[bool, typer.Option(help="Let this file's answers replace different stored ones.")] = False,
    annotator: Annotated[str, typer.Option(help="Annotator recorded where the file names none.")] = "",
) -> None:
    """Store the answers of an exported file: all of them or, on any problem, none."""
    from sparseseg.annotate.importers import SKIP_LABEL
    from sparseseg.annotate.project import Project

    result = Project(project).import_file(file, format=format, replace=replace, annotator=annotator)
    if result.already is not None:
        import_id, path, when = result.already
        _say(f"{file}: already imported (import {import_id} of {path}, {when}); nothing changed")
        return
    _say(f"{file} ({result.format}): {result.new} new answers ({result.skips} of them '{SKIP_LABEL}'), "
         f"{result.replaced} replaced, {result.unchanged} unchanged, {result.unanswered} points still unanswered")
    if result.regions:
        _say(f"expanded {result.regions} answered clicks into regions (sparseseg status shows them)")
    if result.expansion_error:
        err_console.print(f"warning: answers imported, but expansion failed: {result.expansion_error}; "
                                 "`sparseseg train` tries again", markup=False, highlight=False, soft_wrap=True)


@app.command("export")
@friendly
def export(
    project: ProjectArg,
    round: Annotated[int | None, typer.Option(help="Round to export (default: the latest).")] = None,
) -> None:
    """Write a round's files again from the database (after a crash, or to refresh deleted files)."""
    from sparseseg.annotate.project import Project

    proj = Project(project)
    if round is None:
        rounds = proj.status()["rounds"]
        if not rounds:
            from sparseseg.errors import SparsesegError

            raise SparsesegError(f"{project}: no round yet; run `sparseseg query {project}` first")
        round = rounds[-1]["round"]
    _print_files(proj.export_round(round))


@app.command("train")
@friendly
def train(project: ProjectArg) -> None:
    """Train the head on every answer (skips excluded) and save PROJECT/head.pt."""
    from sparseseg.annotate.project import Project

    with progress_bars() as update:
        result = Project(project).train(progress=update)
    what = "trained" if result.retrained else "up to date"
    regions = (f" + {result.region_pixels} region pixels ({result.training_region_pixels} drawn for training)"
               if result.region_pixels else "")
    _say(f"head {what}: {result.pixels} labelled pixels{regions}, classes {', '.join(result.classes_seen)}; "
         f"training accuracy {100 * result.accuracy:.1f}% on the clicks; {result.path}")


@app.command("predict")
@friendly
def predict(
    project: ProjectArg,
    out: Annotated[Path, typer.Option(help="Folder for the masks.")],
    confidence: Annotated[bool, typer.Option(help="Also write <image>_confidence.png (0-255) and .npy.")] = False,
    original_size: Annotated[bool, typer.Option(help="Resize the PNGs to each image's original size.")] = False,
) -> None:
    """Write a palette PNG mask per image with the head trained on all answers."""
    from sparseseg.annotate.project import Project

    with progress_bars() as update:
        files = Project(project).predict(out, confidence=confidence, original_size=original_size, progress=update)
    masks = sum(1 for f in files if not f.stem.endswith("_confidence"))
    _say(f"wrote {masks} masks to {out}")


@app.command("status")
@friendly
def status(
    project: ProjectArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Rounds, answered / skipped / pending counts and the class histogram."""
    from sparseseg.annotate.project import Project

    info = Project(project).status()
    if as_json:
        console.print_json(json.dumps(info))
        return
    _say(f"{info['project']}: {info['images']} images at {info['size']}x{info['size']}, "
         f"project id {info['project_id']}")
    table = Table(title="rounds")
    for col in ("round", "created", "queried", "answered", "skipped", "pending", "selection"):
        table.add_column(col, justify="right" if col not in ("created", "selection") else "left")
    for r in info["rounds"]:
        how = "coverage" if r["coverage_only"] else r["strategy"]
        table.add_row(str(r["round"]), r["created_at"][:16].replace("T", " "), *(str(r[k]) for k in ("queried", "answered", "skipped", "pending")),
                      how + (" (forced)" if r["forced"] else ""))
    t = info["totals"]
    table.add_row("all", "", str(t["queried"]), str(t["answered"]), str(t["skipped"]), str(t["pending"]), "")
    console.print(table)
    hist = Table(title="answers per class")
    hist.add_column("class")
    hist.add_column("pixels", justify="right")
    for name, n in info["class_histogram"].items():
        hist.add_row(name, str(n))
    hist.add_row("(unsure)", str(info["skipped"]))
    console.print(hist)
    if info["regions"]:
        regions = Table(title=f"regions (expansion: {info['expansion']})")
        for col in ("model", "tau", "expanded", "kept", "pixels"):
            regions.add_column(col, justify="left" if col == "model" else "right")
        for r in info["regions"]:
            regions.add_row(r["model"], f"{r['tau']:g}", str(r["expanded"]), str(r["kept"]), str(r["pixels"]))
        console.print(regions)
