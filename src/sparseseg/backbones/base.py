"""The feature-backbone interface: images (and a noise sample) in, native-resolution maps out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


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
