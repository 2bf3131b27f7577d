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
    checkpoint: Path | None,
    image: Path,
    size: int,
    timesteps: tuple[int, ...] | None,
    blocks: tuple[int, ...] | None,
    preset: str | None = None,
    config_file: Path | None = None,
    noise_file: Path | None = None,
    seed: int = 0,
    backbone: str = "adm",
) -> dict[str, np.ndarray]:
    """`x_t{t}` and native-resolution `block{b}_t{t}` arrays of one image (the fixture's naming).

    The image is resized bilinearly to size x size and scaled to [-1, 1]; the same noise is used at
    every timestep. `backbone` is a registry name (docs/backbones.md); timesteps and blocks left
    None take the backbone's defaults. EfficientNet maps are named `stage{s}` and have no `x_t`.
    """
    if backbone != "adm":
        return _registry_features(backbone, checkpoint, image, size, timesteps, blocks, noise_file, seed,
                                  preset=preset, config_file=config_file)
    from sparseseg.backbones.adm import ADMFlags, block_outputs, load_adm
    from sparseseg.backbones.diffusion import NoiseSchedule
    from sparseseg.backbones.registry import ADM_BLOCKS, ADM_TIMESTEPS, adm_checkpoint_file

    checkpoint = adm_checkpoint_file(checkpoint)
    timesteps, blocks = timesteps or ADM_TIMESTEPS, blocks or ADM_BLOCKS
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


def _registry_features(
    name: str,
    checkpoint: Path | None,
    image: Path,
    size: int,
    timesteps: tuple[int, ...] | None,
    blocks: tuple[int, ...] | None,
    noise_file: Path | None,
    seed: int,
    preset: str | None = None,
    config_file: Path | None = None,
) -> dict[str, np.ndarray]:
    """The same arrays for a diffusers or EfficientNet backbone, built as a run config would
    (so settings the backbone does not use, such as --preset, are rejected)."""
    import pydantic

    from sparseseg.backbones.registry import BACKBONES, build_backbone
    from sparseseg.config import BackboneConfig

    if name not in BACKBONES:
        raise SparsesegError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    fields: dict = {"name": name, "timesteps": timesteps or None, "blocks": blocks or None, "input_size": size,
                    "preset": preset, "config_file": config_file}
    if checkpoint is not None:
        # For Hub-backed backbones a name that is no local path is taken as a Hugging Face Hub id.
        local = name not in ("diffusers", "transformers") or Path(checkpoint).expanduser().exists()
        fields["checkpoint" if local else "hub_id"] = checkpoint if local else str(checkpoint)
    try:
        config = BackboneConfig(**fields)
    except pydantic.ValidationError as err:
        raise SparsesegError(f"--backbone {name}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    backbone = build_backbone(config, "cpu", default_size=size)
    pil = read_rgb(image).resize((size, size), resample=Image.BILINEAR)
    x0 = images_to_model_input(torch.from_numpy(np.array(pil)))
    if noise_file is not None:
        noise = load_noise(noise_file, size)
    else:
        noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    arrays: dict[str, np.ndarray] = {}
    if hasattr(backbone, "noisy_inputs"):
        x_t, _ = backbone.noisy_inputs(x0, noise)
        for i, t in enumerate(backbone.timesteps):
            arrays[f"x_t{t}"] = x_t[i : i + 1].numpy()
    for info, fmap in zip(backbone.feature_info, backbone.extract(x0, noise), strict=True):
        key = f"block{info.block}_t{info.timestep}" if info.timestep >= 0 else f"stage{info.block}"
        arrays[key] = fmap.cpu().numpy()
    return arrays
