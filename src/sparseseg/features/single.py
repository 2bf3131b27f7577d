"""Features of one image file, as the `sparseseg features` command writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparseseg.data.dataset import images_to_model_input, read_rgb
from sparseseg.errors import SparsesegError


def load_noise(path: Path, size: int) -> torch.Tensor:
    """A (1, 3, S, S) float32 noise tensor from a .npy file, checked against the image size."""
    try:
        noise = torch.from_numpy(np.load(path)).float()
    except (OSError, ValueError) as exc:
        raise SparsesegError(f"{path}: cannot read noise array ({exc})") from None
    if noise.dim() == 3:
        noise = noise[None]
    if tuple(noise.shape) != (1, 3, size, size):
        raise SparsesegError(f"{path}: noise has shape {tuple(noise.shape)}, expected (1, 3, {size}, {size})")
    return noise


def image_features(
    checkpoint: Path,
    image: Path,
    size: int,
    timesteps: tuple[int, ...],
    blocks: tuple[int, ...],
    preset: str | None = None,
    config_file: Path | None = None,
    noise_file: Path | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """`x_t{t}` and native-resolution `block{b}_t{t}` arrays of one image (the fixture's naming).

    The image is resized bilinearly to size x size and scaled to [-1, 1]; the same noise is used at
    every timestep.
    """
    from sparseseg.backbones.adm import ADMFlags, block_outputs, load_adm
    from sparseseg.backbones.diffusion import NoiseSchedule

    flags = ADMFlags.from_file(config_file) if config_file is not None else None
    model, flags = load_adm(checkpoint, flags=flags, preset=preset)
    pil = read_rgb(image).resize((size, size), resample=Image.BILINEAR)
    x0 = images_to_model_input(torch.from_numpy(np.array(pil)))
    if noise_file is not None:
        noise = load_noise(noise_file, size)
    else:
        noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    schedule = NoiseSchedule.named(flags.noise_schedule, flags.diffusion_steps)
    return block_outputs(model, schedule, x0, timesteps, blocks, noise)
