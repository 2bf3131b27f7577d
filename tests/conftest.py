"""Shared test helpers: the `shared/` folder beside the repo, and small stand-in backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sparseseg.backbones.adm import ADMFlags, ADMUNet
from sparseseg.backbones.base import FeatureInfo

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


class ToyBackbone:
    """A fixed random conv net with maps at reductions 1, 2 and 4: enough to test the feature
    plumbing independently of the ADM. The noise is added to the image, so samples differ."""

    def __init__(self, input_size: int = 16, seed: int = 0, channels: tuple[int, int, int] = (5, 3, 4)) -> None:
        torch.manual_seed(seed)
        self.input_size = input_size
        self.convs = nn.ModuleList([nn.Conv2d(3, c, 3, padding=1) for c in channels])
        self.feature_info = [FeatureInfo(num_chs=c, reduction=r, block=i, timestep=-1)
                             for i, (c, r) in enumerate(zip(channels, (1, 2, 4), strict=True))]

    @torch.no_grad()
    def extract(self, images: torch.Tensor, noise: torch.Tensor | None) -> list[torch.Tensor]:
        x = images if noise is None else images + 0.3 * noise
        return [nn.functional.avg_pool2d(conv(x), info.reduction) if info.reduction > 1 else conv(x)
                for conv, info in zip(self.convs, self.feature_info, strict=True)]


def save_tiny_adm(path: Path, input_size: int) -> Path:
    """A random 32-channel ADM (the ADM-256 architecture, seed 0) saved as a pretrain checkpoint."""
    flags = ADMFlags(image_size=256, num_channels=32, num_head_channels=16, learn_sigma=True, resblock_updown=True,
                     use_scale_shift_norm=True, attention_resolutions="32,16,8")
    torch.manual_seed(0)
    torch.save({"sparseseg_adm": 1, "flags": flags.model_dump(), "model": ADMUNet(flags).state_dict(), "ema": None,
                "input_size": input_size}, path)
    return path
