"""Features of one image file, as the `sparseseg features` command writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import torch
from PIL import Image

from sparseseg.backbones.registry import build_backbone, get_spec
from sparseseg.config import BackboneConfig
from sparseseg.data.dataset import images_to_model_input
from sparseseg.data.readers import read_image
from sparseseg.errors import SparsesegError


def load_noise(path: Path, size: int) -> torch.Tensor:
    """A (1, 3, S, S) float32 noise tensor from a .npy file, checked against the image size."""
    try:
        array = np.load(path)
    except (OSError, ValueError, EOFError) as exc:
        raise SparsesegError(f"{path}: cannot read noise array ({' '.join(str(exc).split())})") from None
    if array.dtype.kind not in "fiu":  # bool, complex, strings, objects: not a noise sample
        raise SparsesegError(f"{path}: noise array has dtype {array.dtype}; expected real numbers (float32)")
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf, refused below
        noise = torch.from_numpy(array.astype(np.float32))
    if not torch.isfinite(noise).all():
        raise SparsesegError(f"{path}: noise array holds NaN or infinite values (or values beyond float32)")
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

    The backbone is built from the registry exactly as a run config would build it (so settings it
    does not use, such as --preset for diffusers, are rejected) and gives the maps a run uses. The
    image is resized bilinearly to size x size and scaled to [-1, 1]; the same noise is used at
    every timestep. Timesteps and blocks left None take the backbone's defaults. Maps without a
    timestep (CNNs, transformers) are named `stage{s}` and have no `x_t`.

    Args:
        checkpoint: the weights; for a backbone that also takes a Hub id, a name that is no local
            path is taken as one.
        backbone: a registry name (`sparseseg list backbones`).

    Raises:
        SparsesegError: unknown backbone, settings it does not use, missing or unfit weights,
            unreadable image or noise.
    """
    spec = get_spec(backbone)
    fields: dict = {"name": backbone, "timesteps": timesteps or None, "blocks": blocks or None, "input_size": size,
                    "preset": preset, "config_file": config_file}
    if checkpoint is not None:
        local = "hub_id" not in spec.fields or Path(checkpoint).expanduser().exists()
        fields["checkpoint" if local else "hub_id"] = checkpoint if local else str(checkpoint)
    try:
        config = BackboneConfig(**fields)
    except pydantic.ValidationError as err:
        raise SparsesegError(f"--backbone {backbone}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    missing = config.missing_problem()
    if missing:
        raise SparsesegError(f"--backbone {backbone}: {missing}; pass it as --checkpoint")
    model = build_backbone(config, "cpu", default_size=size)
    pil = read_image(image).resize((size, size), resample=Image.BILINEAR)
    x0 = images_to_model_input(torch.from_numpy(np.array(pil)))
    if noise_file is not None:
        noise = load_noise(noise_file, size)
    else:
        noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    arrays: dict[str, np.ndarray] = {}
    if spec.diffusion:
        x_t, _ = model.noisy_inputs(x0, noise)
        for i, t in enumerate(model.timesteps):
            arrays[f"x_t{t}"] = x_t[i : i + 1].numpy()
    for info, fmap in zip(model.feature_info, model.extract(x0, noise), strict=True):
        key = f"block{info.block}_t{info.timestep}" if info.timestep >= 0 else f"stage{info.block}"
        arrays[key] = fmap.cpu().numpy()
    for key, array in arrays.items():
        if not np.isfinite(array).all():  # damaged weights give NaN features that would train on silently
            raise SparsesegError(f"{checkpoint or backbone}: features {key} of {image} hold NaN or infinite values; "
                                 "is the checkpoint damaged?")
    return arrays
