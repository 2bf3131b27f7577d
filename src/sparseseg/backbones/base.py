"""The feature-backbone interface: images (and a noise sample) in, native-resolution maps out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from sparseseg.errors import SparsesegError


@dataclass(frozen=True)
class FeatureInfo:
    """Describes one feature map a backbone returns.

    Attributes:
        num_chs: channels of the map.
        reduction: input size divided by the map's spatial size (1 = full resolution).
        block: the decoder block index the map comes from (ADM `output_blocks[block]`).
        timestep: the diffusion timestep the image was noised to (-1 for non-diffusion backbones).
    """

    num_chs: int
    reduction: int
    block: int
    timestep: int


@runtime_checkable
class FeatureBackbone(Protocol):
    """Anything that turns a batch of images into multi-scale feature maps.

    `input_size` is the square side the backbone expects; `feature_info` lists the maps that
    `extract` returns, in order.
    """

    input_size: int
    feature_info: list[FeatureInfo]

    def extract(self, images: torch.Tensor, noise: torch.Tensor | None) -> list[torch.Tensor]:
        """Feature maps for a batch.

        Args:
            images: (B, 3, S, S) float tensor scaled to [-1, 1], S = `input_size`.
            noise: (B, 3, S, S) standard normal noise used by a diffusion backbone at every
                timestep (q_sample), or None for backbones that ignore it.

        Returns:
            One (B, num_chs, S / reduction, S / reduction) float32 tensor per `feature_info` entry.
        """
        ...


def check_images(images: torch.Tensor, size: int) -> None:
    """Raises SparsesegError unless `images` is a (B, 3, size, size) batch.

    Args:
        images: what a backbone's `extract` was given.
        size: the backbone's `input_size`.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise SparsesegError(f"images of shape {tuple(images.shape)}: expected (B, 3, {size}, {size})")


def check_input_size(size: int | None, divisor: int, reason: str, owner: str = "") -> int:
    """`size` if it is a positive multiple of `divisor`, else one SparsesegError.

    Args:
        size: the input side asked for (None when nothing gave one).
        divisor: the network's stride that the side must be a multiple of.
        reason: why, in words, ending the message (e.g. "for this UNet (3 levels)").
        owner: the backbone's name, leading the message when given.

    Returns:
        `size` as an int.
    """
    if not size or size <= 0 or size % divisor:
        lead = f"{owner} " if owner else ""
        raise SparsesegError(f"{lead}input_size {size}: must be a positive multiple of {divisor} {reason}")
    return int(size)


def fast_path(device: torch.device, fast: bool | None) -> bool:
    """Whether a backbone runs bf16 autocast + channels_last: as asked, else on CUDA only (CPU stays float32)."""
    return device.type == "cuda" if fast is None else fast
