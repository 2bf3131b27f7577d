"""`sparseseg pretrain`, `fetch-backbone` and `features`: diffusion backbones and their pixel features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparseseg.backbones.registry import BACKBONES
from sparseseg.cli.app import app, console, friendly, int_list, progress_bars

# What --checkpoint is, per backbone, from the registry (shipped weights need none).
_CHECKPOINT_HELP = "; ".join(
    [f"{spec.name}: {spec.checkpoint_help}" + (" or a Hub id" if "hub_id" in spec.requires else "")
     for spec in BACKBONES.values() if spec.requires]
    + [f"{', '.join(s.name for s in BACKBONES.values() if s.weights == 'shipped')}: none (weights shipped)"])


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

    arrays = image_features(checkpoint, image, size, int_list(timesteps) if timesteps else None,
                            int_list(blocks) if blocks else None, preset=preset, config_file=config,
                            noise_file=noise_file, seed=seed, backbone=backbone)
    out.parent.mkdir(parents=True, exist_ok=True)
    import numpy as np

    np.savez(out, **arrays)
    for key in sorted(arrays):
        console.print(f"{key:>16}  {tuple(arrays[key].shape)}")
    console.print(f"wrote {out}")
