"""What the diffusion backbones (ADM, diffusers UNet2DModel) share: the checks of timesteps,
images and noise, the fixed default noise, and running every timestep in one batch.

A subclass loads its network, checks its blocks and input size, calls `_set_features`, and
implements two methods:

- `noisy_inputs(images, noise)`: x_t for every timestep, timestep-major, by its own noise process
  (ADM: guided-diffusion's `q_sample`; diffusers: the checkpoint scheduler's `add_noise`);
- `_decoder_maps(x_t, t)`: the requested blocks' activations for that batch.

`extract` does the rest the same way for both: the noise (the given one, or a fixed one from
`noise_seed` shared by every image, as the reference code does) is used at every timestep, the
batch of T x B noisy images goes through the network once, and the maps come back split per
timestep in `feature_info` order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparseseg.backbones.base import FeatureInfo, check_images, fast_path
from sparseseg.errors import SparsesegError


def check_timesteps(timesteps: Sequence[int], steps: int, where: str = "") -> tuple[int, ...]:
    """`timesteps` as ints if it is non-empty and each lies in 0..steps-1, else one SparsesegError.

    Args:
        timesteps: the diffusion timesteps asked for.
        steps: the length of the model's training schedule.
        where: said after the range (e.g. " (this scheduler)").
    """
    timesteps = tuple(int(t) for t in timesteps)
    if not timesteps or any(not 0 <= t < steps for t in timesteps):
        raise SparsesegError(f"timesteps {list(timesteps)}: expected values in 0..{steps - 1}{where}")
    return timesteps


class DiffusionBackbone:
    """Base of the `FeatureBackbone`s whose maps are a denoiser's activations at several timesteps.

    Attributes:
        device: where the network runs.
        fast: bf16 autocast and channels_last (default: on CUDA only; CPU stays exact float32).
        timesteps: the diffusion timesteps, in order.
        blocks: the decoder block indices, in order.
        input_size: side of the square images `extract` takes.
        noise_seed: seeds the fixed noise used when `extract` gets `noise=None`.
        feature_info: one entry per (timestep, block), timestep-major.
    """

    device: torch.device
    fast: bool
    timesteps: list[int]
    blocks: list[int]
    input_size: int
    noise_seed: int
    feature_info: list[FeatureInfo]

    def _set_features(
        self,
        timesteps: Sequence[int],
        blocks: Sequence[int],
        block_info: Sequence[tuple[int, int]],
        input_size: int,
        device: str | torch.device,
        fast: bool | None,
        noise_seed: int,
    ) -> None:
        """Records the checked settings and derives `feature_info`.

        Args:
            block_info: (channels, reduction) of every decoder block, indexed by block.
        """
        self.device = torch.device(device)
        self.fast = fast_path(self.device, fast)
        self.timesteps = [int(t) for t in timesteps]
        self.blocks = [int(b) for b in blocks]
        self.input_size = int(input_size)
        self.noise_seed = noise_seed
        self.feature_info = [
            FeatureInfo(num_chs=block_info[b][0], reduction=block_info[b][1], block=b, timestep=t)
            for t in self.timesteps
            for b in self.blocks
        ]

    def default_noise(self) -> torch.Tensor:
        """(1, 3, S, S) fixed noise shared by all images, as the reference code does."""
        gen = torch.Generator().manual_seed(self.noise_seed)
        return torch.randn((1, 3, self.input_size, self.input_size), generator=gen)

    def noisy_inputs(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t for every timestep, timestep-major: ((T*B, 3, S, S), (T*B,) timesteps).

        Args:
            images: (B, 3, S, S) clean images in [-1, 1] on `device`.
            noise: (B or 1, 3, S, S) standard normal noise on `device`, used at every timestep.
        """
        raise NotImplementedError

    def _decoder_maps(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[int, torch.Tensor]:
        """block -> (T*B, C, S / r, S / r) activations; called under no_grad (and autocast on the fast path)."""
        raise NotImplementedError

    def extract(self, images: torch.Tensor, noise: torch.Tensor | None) -> list[torch.Tensor]:
        """Feature maps for a batch.

        Args:
            images: (B, 3, S, S) in [-1, 1], S = `input_size`.
            noise: (B, 3, S, S) standard normal noise (or (1, 3, S, S), shared), used at every
                timestep; None draws a fixed noise from `noise_seed`.

        Returns:
            One float32 (B, num_chs, S / reduction, S / reduction) tensor per `feature_info`
            entry, on `device`, in timestep-major order.
        """
        s = self.input_size
        check_images(images, s)
        noise = self.default_noise() if noise is None else noise
        if noise.ndim != 4 or tuple(noise.shape[1:]) != (3, s, s) or noise.shape[0] not in (1, images.shape[0]):
            raise SparsesegError(f"noise of shape {tuple(noise.shape)}: expected (B or 1, 3, {s}, {s})")
        b = images.shape[0]
        # 1. every timestep's noisy images in one (T*B, 3, S, S) batch
        x_t, t = self.noisy_inputs(images.to(self.device, torch.float32), noise.to(self.device, torch.float32))
        if self.fast:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        # 2. one pass through the network, stopping after the deepest requested block
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast):
            maps = self._decoder_maps(x_t, t)
        # 3. back to one (B, C, h, w) map per (timestep, block)
        return [maps[blk][i * b : (i + 1) * b].float() for i in range(len(self.timesteps)) for blk in self.blocks]
