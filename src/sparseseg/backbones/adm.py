"""ADM decoder features at several timesteps (`ADMBackbone`), and the registry's builder for
`backbone.name=adm`.

The ADM is split by job: `adm_flags` (guided-diffusion's flags, presets and the official
download), `adm_unet` (the network), `adm_checkpoint` (reading, checking and loading weights) and
this module (the feature wrapper). The public names of all four are importable from here, where
they have always been.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sparseseg.backbones.adm_checkpoint import adm_checkpoint_file, load_adm, load_adm_checkpoint
from sparseseg.backbones.adm_flags import PRESET_URLS, PRESETS, ADMFlags, download_preset, preset_flags
from sparseseg.backbones.adm_unet import (
    ATTENTION_IMPLS,
    ADMUNet,
    AttentionBlock,
    ResBlock,
    TimestepEmbedSequential,
    timestep_embedding,
)
from sparseseg.backbones.base import check_input_size
from sparseseg.backbones.diffusion import NoiseSchedule
from sparseseg.backbones.diffusion_backbone import DiffusionBackbone, check_timesteps
from sparseseg.errors import SparsesegError

if TYPE_CHECKING:
    from sparseseg.config import BackboneConfig

__all__ = [
    "ATTENTION_IMPLS", "PRESETS", "PRESET_URLS", "ADMBackbone", "ADMFlags", "ADMUNet", "AttentionBlock",
    "ResBlock", "TimestepEmbedSequential", "adm_checkpoint_file", "block_outputs", "build", "download_preset",
    "load_adm", "load_adm_checkpoint", "preset_flags", "timestep_embedding",
]


class ADMBackbone(DiffusionBackbone):
    """Decoder features of ADM at several timesteps: a `FeatureBackbone`.

    Each image is noised with `q_sample` at every timestep using the same noise tensor, all
    images x timesteps go through the UNet as one batch, the UNet stops after the deepest
    requested block, and the outputs of the chosen `output_blocks` are returned at native
    resolution.

    Two paths (see docs/performance.md):
        exact (fast=False, the default on CPU): float32, guided-diffusion's "legacy" attention;
            matches the guided-diffusion conformance fixture (relative error ~1e-6).
        fast (fast=True, the default on CUDA): bf16 autocast, channels_last activations and
            weights, attention through the fused `F.scaled_dot_product_attention`; optionally
            `torch.compile`. Matches the exact path to bf16 accuracy (about 1.5e-2 relative L2
            error per map on the fixture's random weights, tested below 3e-2).

    Args:
        model: the UNet (moved to `device`, set to eval mode; channels_last on the fast path).
        flags: its flags (for the noise schedule).
        timesteps: diffusion timesteps, each in 0..diffusion_steps-1.
        blocks: indices into `output_blocks`.
        input_size: side of the square images `extract` takes (multiple of `model.size_divisor`).
        device: where to run.
        fast: the fast path; default: on CUDA only.
        noise_seed: seeds the fixed noise used when `extract` gets `noise=None`.
        compile: wrap the UNet's forward in `torch.compile` (fast path only, off by default). It
            pays on CUDA when many batches of one shape follow (a whole dataset): the first call
            compiles for a minute or two, and each new batch shape compiles again.

    Raises:
        SparsesegError: bad timesteps, blocks, input size or a class-conditional model.
    """

    def __init__(
        self,
        model: ADMUNet,
        flags: ADMFlags,
        timesteps: Sequence[int],
        blocks: Sequence[int],
        input_size: int,
        device: str | torch.device = "cpu",
        fast: bool | None = None,
        noise_seed: int = 0,
        compile: bool = False,
    ) -> None:
        if flags.class_cond:
            raise SparsesegError("class_cond ADM models need class labels; use an unconditional checkpoint")
        timesteps = check_timesteps(timesteps, flags.diffusion_steps)
        model.check_blocks(blocks)
        input_size = check_input_size(
            input_size, model.size_divisor, f"for this architecture ({len(flags.channel_mults())} levels)"
        )
        self._set_features(
            timesteps,
            blocks,
            list(zip(model.output_block_channels, model.output_block_reductions, strict=True)),
            input_size,
            device,
            fast,
            noise_seed,
        )
        if compile and not self.fast:
            raise SparsesegError("compile=True needs the fast path (fast=True): the exact path stays eager")
        self.model = model.to(self.device).eval()
        if self.fast:
            self.model.to(memory_format=torch.channels_last)
        self.attention = "sdpa" if self.fast else "legacy"
        self.compiled = compile
        self._forward_blocks = torch.compile(self.model.forward_blocks) if compile else self.model.forward_blocks
        self.flags = flags
        self.schedule = NoiseSchedule.named(flags.noise_schedule, flags.diffusion_steps)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        timesteps: Sequence[int],
        blocks: Sequence[int],
        input_size: int | None = None,
        preset: str | None = None,
        config_file: str | Path | None = None,
        device: str | torch.device = "cpu",
        fast: bool | None = None,
        compile: bool = False,
    ) -> ADMBackbone:
        """Loads a checkpoint (see `load_adm`) and wraps it.

        Args:
            input_size: default: the size recorded by `pretrain_adm`, else the flags' image_size.
            preset: name in `PRESETS` (for OpenAI checkpoints).
            config_file: JSON/YAML flags file (for OpenAI checkpoints or to override).
            Others: as in the constructor.
        """
        flags = ADMFlags.from_file(config_file) if config_file is not None else None
        model, flags, recorded_size = load_adm_checkpoint(checkpoint, flags, preset)
        size = input_size or recorded_size or flags.image_size
        return cls(model, flags, timesteps, blocks, size, device=device, fast=fast, compile=compile)

    def noisy_inputs(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = q_sample(images, t, noise) for every timestep, timestep-major: ((T*B, 3, S, S), (T*B,))."""
        x_t = torch.cat([self.schedule.q_sample(images, t, noise) for t in self.timesteps])
        t = torch.tensor(self.timesteps, device=self.device).repeat_interleave(images.shape[0])
        return x_t, t

    def _decoder_maps(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[int, torch.Tensor]:
        self.model.set_attention(self.attention)  # the model may be shared with another backbone
        return self._forward_blocks(x_t, t, self.blocks)


def build(config: BackboneConfig, device: str | torch.device, default_size: int) -> ADMBackbone:
    """`backbone.name=adm`: the checkpoint file with its flags (recorded, `preset` or `config_file`).

    The input size is `config.input_size`, else the one a pretrain checkpoint records, else the
    flags' image_size; `default_size` (the data's) is not used.
    """
    return ADMBackbone.from_checkpoint(
        adm_checkpoint_file(config.checkpoint),
        timesteps=config.timesteps,
        blocks=config.blocks,
        input_size=config.input_size,
        preset=config.preset,
        config_file=config.config_file,
        device=device,
    )


def block_outputs(
    model: ADMUNet,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    blocks: Sequence[int],
    noise: torch.Tensor,
) -> dict[str, np.ndarray]:
    """Noisy inputs and decoder activations, laid out like the conformance fixture's expected.npz.

    Runs one timestep at a time, in float32 on the model's device.

    Args:
        model: the UNet.
        schedule: the forward process.
        x0: (B, 3, S, S) clean images in [-1, 1].
        timesteps: raw integer timesteps.
        blocks: indices into `output_blocks`.
        noise: (B, 3, S, S) noise used at every timestep.

    Returns:
        `x_t{t}` -> (B, 3, S, S) and `block{b}_t{t}` -> (B, C_b, S / r_b, S / r_b) float32 arrays.
    """
    device = next(model.parameters()).device
    x0, noise = x0.to(device, torch.float32), noise.to(device, torch.float32)
    arrays: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for t in timesteps:
            x_t = schedule.q_sample(x0, t, noise)
            arrays[f"x_t{t}"] = x_t.cpu().numpy()
            for b, h in model.forward_blocks(x_t, t, blocks).items():
                arrays[f"block{b}_t{t}"] = h.float().cpu().numpy()
    return arrays
