"""`sparseseg scribblegen train|generate|controlnet-train|controlnet-generate|compare|evaluate`: synthetic
training images from scribbles (`sparseseg.scribblegen`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sparseseg.cli.app import app, console, float_list, friendly, int_list, progress_bars

gen_app = typer.Typer(help="Synthetic training images from scribbles (ScribbleGen, in-domain ADM).",
                      no_args_is_help=True)
app.add_typer(gen_app, name="scribblegen")


@gen_app.command("train")
@friendly
def train_cmd(
    images: Annotated[Path, typer.Option(help="Folder of training images (e.g. DATA/train/images).")],
    scribbles: Annotated[Path, typer.Option(help="Scribble folder: <image>.png and classes.txt.")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write (resumed when it exists).")],
    size: Annotated[int, typer.Option(help="Training resolution (a multiple of 32).")] = 64,
    channels: Annotated[int | None, typer.Option(help="Base channels; default by size, as pretrain.")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps in total.")] = 2000,
    batch_size: Annotated[int | None, typer.Option(help="Images per step; default by size.")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 1e-4,
    p_uncond: Annotated[float, typer.Option(help="Conditioning dropout: share of no-scribble inputs.")] = 0.1,
    ignore_id: Annotated[int, typer.Option(help="Id of unlabelled pixels in the scribble PNGs.")] = 255,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    samples: Annotated[int, typer.Option(help="Rows in OUT.samples.png at each checkpoint; 0: none.")] = 4,
    init: Annotated[Path | None, typer.Option(help="Start from this `sparseseg pretrain` checkpoint "
                                                   "(scribble inputs zero-initialised).")] = None,
) -> None:
    """Train a scribble-conditioned ADM (epsilon DDPM loss, conditioning dropout, EMA, resumable)."""
    from sparseseg.scribblegen.adm import train_scribblegen

    with progress_bars() as update:
        path = train_scribblegen(images, scribbles, out, size=size, channels=channels, steps=steps,
                                 batch_size=batch_size, lr=lr, p_uncond=p_uncond, seed=seed,
                                 checkpoint_every=checkpoint_every, ignore_id=ignore_id, samples=samples, init=init,
                                 progress=lambda s, n, loss: update("training", s, n))
    console.print(f"wrote {path} and {path.name}.losses.csv", soft_wrap=True, highlight=False)


@gen_app.command("generate")
@friendly
def generate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint of `scribblegen train`.")],
    images: Annotated[Path, typer.Option(help="Folder of real images.")],
    scribbles: Annotated[Path, typer.Option(help="Their scribble folder.")],
    out: Annotated[Path, typer.Option(help="Folder for one dataset per lambda (OUT/lambda_X.XX).")],
    lambdas: Annotated[str, typer.Option(help="Encode ratios in [0, 1]: 0 = the real image, 1 = from noise.")]
    = "0.3,0.6,1.0",
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale w (1 = conditional only).")]
    = 2.0,
    steps: Annotated[int, typer.Option(help="DDIM steps of a lambda = 1 generation (scaled by lambda).")] = 50,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 8,
    ignore_id: Annotated[int, typer.Option(help="Id of unlabelled pixels in the scribble PNGs.")] = 255,
    seed: Annotated[int, typer.Option(help="Seed of the generation noise.")] = 0,
) -> None:
    """Generate a synthetic prepared dataset (images + the scribbles they came from) per lambda."""
    from sparseseg.scribblegen.adm import generate_datasets

    with progress_bars() as update:
        folders = generate_datasets(checkpoint, images, scribbles, out, float_list(lambdas, "--lambdas"), guidance,
                                    steps, seed, batch_size, ignore_id,
                                    progress=lambda d, t: update("generating", d, t))
    for folder in folders:
        console.print(f"wrote {folder} (samples.png: real | scribble | synthetic)", soft_wrap=True,
                      highlight=False)


@gen_app.command("controlnet-train")
@friendly
def controlnet_train_cmd(
    base: Annotated[Path, typer.Option(help="Local Stable Diffusion folder (diffusers layout).")],
    images: Annotated[Path, typer.Option(help="Folder of training images.")],
    scribbles: Annotated[Path, typer.Option(help="Scribble folder: <image>.png and classes.txt.")],
    out: Annotated[Path, typer.Option(help="Folder to write controlnet/, state.pt, losses.csv (resumed).")],
    size: Annotated[int, typer.Option(help="Training resolution.")] = 512,
    steps: Annotated[int, typer.Option(help="Optimiser steps in total.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 1e-5,
    p_uncond: Annotated[float, typer.Option(help="Conditioning dropout on the scribble.")] = 0.1,
    ignore_id: Annotated[int, typer.Option(help="Id of unlabelled pixels in the scribble PNGs.")] = 255,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
) -> None:
    """Train a scribble ControlNet on a local Stable Diffusion (the paper's generator)."""
    from sparseseg.scribblegen.controlnet import train_controlnet_folder

    with progress_bars() as update:
        path = train_controlnet_folder(base, images, scribbles, out, size, steps, batch_size, lr, p_uncond, seed,
                                       checkpoint_every, ignore_id,
                                       progress=lambda s, n, loss: update("training", s, n))
    console.print(f"wrote {path}/controlnet, state.pt and losses.csv", soft_wrap=True, highlight=False)


@gen_app.command("controlnet-generate")
@friendly
def controlnet_generate_cmd(
    base: Annotated[Path, typer.Option(help="The Stable Diffusion folder it was trained on.")],
    controlnet: Annotated[Path, typer.Option(help="OUT folder of `scribblegen controlnet-train`.")],
    images: Annotated[Path, typer.Option(help="Folder of real images.")],
    scribbles: Annotated[Path, typer.Option(help="Their scribble folder.")],
    out: Annotated[Path, typer.Option(help="Folder for one dataset per lambda (OUT/lambda_X.XX).")],
    lambdas: Annotated[str, typer.Option(help="Encode ratios in [0, 1].")] = "0.3,0.6,1.0",
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale w.")] = 2.0,
    steps: Annotated[int, typer.Option(help="DDIM steps of a lambda = 1 generation.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 4,
    ignore_id: Annotated[int, typer.Option(help="Id of unlabelled pixels in the scribble PNGs.")] = 255,
    seed: Annotated[int, typer.Option(help="Seed of the generation noise.")] = 0,
) -> None:
    """Generate a synthetic prepared dataset per lambda with a trained scribble ControlNet."""
    from sparseseg.scribblegen.controlnet import generate_controlnet_datasets

    with progress_bars() as update:
        folders = generate_controlnet_datasets(base, controlnet, images, scribbles, out,
                                               float_list(lambdas, "--lambdas"), guidance, steps, seed, batch_size,
                                               ignore_id, progress=lambda d, t: update("generating", d, t))
    for folder in folders:
        console.print(f"wrote {folder}", soft_wrap=True, highlight=False)


@gen_app.command("compare")
@friendly
def compare_cmd(
    config: Annotated[Path, typer.Argument(help="Experiment YAML: data, backbone, head.")],
    scribbles: Annotated[Path, typer.Option(help="Scribble folder of the training split.")],
    synthetic: Annotated[str, typer.Option(help="Comma-separated synthetic datasets, low to high lambda.")],
    out: Annotated[Path, typer.Option(help="Folder for config.yaml, results.jsonl, summary.md (resumed).")],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    p: Annotated[float, typer.Option(help="Chance a real image is swapped for its twin (sample, curriculum).")]
    = 0.5,
    pixels_per_image: Annotated[int, typer.Option(help="Scribbled pixels drawn per image.")] = 64,
    ignore_id: Annotated[int, typer.Option(help="Id of unlabelled pixels in the scribble PNGs.")] = 255,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override key=value.")] = None,
) -> None:
    """Real scribbles only vs fixed, uniform and adaptive lambda and append, over seeds: one table."""
    from sparseseg.config import load_config
    from sparseseg.scribblegen.compare import compare_schemes

    cfg = load_config(config, set_)
    folders = [Path(f) for f in synthetic.split(",") if f.strip()]
    with progress_bars() as update:
        summary = compare_schemes(cfg, scribbles, folders, list(int_list(seeds)), out, p, pixels_per_image,
                                  ignore_id, progress=update,
                                  log=lambda m: console.print(m, soft_wrap=True, highlight=False))
    console.print(summary.read_text(), soft_wrap=True, highlight=False)
    console.print(f"wrote {summary}", soft_wrap=True, highlight=False)


@gen_app.command("evaluate")
@friendly
def evaluate_cmd(
    config: Annotated[Path, typer.Argument(help="Experiment YAML: data, backbone, head, seed.")],
    scribbles: Annotated[Path, typer.Option(help="Scribble folder of the training split.")],
    scheme: Annotated[str, typer.Option(help="none, append, sample, synthetic or curriculum.")] = "none",
    synthetic: Annotated[str, typer.Option(help="Comma-separated synthetic datasets (OUT/lambda_X.XX).")] = "",
    p: Annotated[float, typer.Option(help="sample / curriculum: chance a real image is swapped for its twin.")]
    = 0.5,
    starts: Annotated[str | None, typer.Option(help="curriculum: start epoch of each synthetic dataset.")] = None,
    pixels_per_image: Annotated[int, typer.Option(help="Scribbled pixels drawn per image.")] = 64,
    ignore_id: Annotated[int, typer.Option(help="Id of unlabelled pixels in the scribble PNGs.")] = 255,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override key=value.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
) -> None:
    """Train the head on scribbled pixels (partial cross-entropy) with a scheme; print test mIoU."""
    from sparseseg.config import load_config
    from sparseseg.io import atomic_write_text
    from sparseseg.scribblegen.augment import evaluate_scheme

    cfg = load_config(config, set_)
    folders = [Path(f) for f in synthetic.split(",") if f.strip()]
    with progress_bars() as update:
        result = evaluate_scheme(cfg, scribbles, folders, scheme, p,
                                 list(int_list(starts)) if starts is not None else None, pixels_per_image,
                                 ignore_id, progress=update)
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    console.print(f"{scheme}: mIoU {result['miou']:.4f} on {cfg.eval_split} ({result['pixels']} scribbled "
                  f"pixels trained on)", soft_wrap=True, highlight=False)
