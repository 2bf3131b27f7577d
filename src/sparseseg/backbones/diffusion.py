"""The Gaussian forward process of guided-diffusion (Ho et al. 2020; Nichol & Dhariwal 2021).

Only what feature extraction and in-domain pre-training need: the beta schedules, `q_sample`,
the epsilon-prediction training loss, and a deterministic DDIM sampler that pre-training uses to
draw a sample grid at checkpoints (so a person can see the model learn).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sparseseg.errors import SparsesegError

SCHEDULES = ("linear", "cosine")


def linear_betas(steps: int) -> np.ndarray:
    """guided-diffusion's linear schedule, stretched so that any step count spans the same range.

    Args:
        steps: number of diffusion steps T.

    Returns:
        (T,) float64 betas from `1e-4 * 1000 / T` to `0.02 * 1000 / T`.
    """
    scale = 1000 / steps
    return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of improved DDPM (alpha_bar(t) = cos²((t + s) / (1 + s) · π / 2), s = 0.008).

    Args:
        steps: number of diffusion steps T.
        max_beta: clip, which keeps the last betas away from 1.

    Returns:
        (T,) float64 betas.
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
        dtype=np.float64,
    )


class NoiseSchedule:
    """The forward process q(x_t | x_0) for a fixed beta schedule.

    All coefficients are kept in float64 NumPy arrays, as guided-diffusion does, and cast to the
    data's dtype only when applied, so `q_sample` reproduces its output bit for bit in float32.

    Attributes:
        betas: (T,) float64.
        alphas_cumprod: (T,) float64, the product of (1 - beta) up to and including each step.
        sqrt_alphas_cumprod: (T,) float64.
        sqrt_one_minus_alphas_cumprod: (T,) float64.
        num_timesteps: T.
    """

    def __init__(self, betas: np.ndarray) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array of values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)

    @classmethod
    def named(cls, name: str, steps: int) -> NoiseSchedule:
        """A schedule by guided-diffusion's `noise_schedule` flag name.

        Raises:
            SparsesegError: the name is not one of `SCHEDULES`.
        """
        if name == "linear":
            return cls(linear_betas(steps))
        if name == "cosine":
            return cls(cosine_betas(steps))
        raise SparsesegError(f"noise_schedule {name!r} is not known; choose one of {', '.join(SCHEDULES)}")

    def _coef(self, table: np.ndarray, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Picks `table[t]` and shapes it to broadcast over `like` (B, C, H, W)."""
        t = torch.as_tensor(t, dtype=torch.long)
        if t.min() < 0 or t.max() >= self.num_timesteps:
            raise SparsesegError(f"timestep out of range: expected 0..{self.num_timesteps - 1}")
        # Index the float64 table first, then cast: the same rounding as guided-diffusion.
        values = torch.from_numpy(table)[t.cpu()].to(device=like.device, dtype=like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noises clean images to step t: sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise.

        Args:
            x0: (B, C, H, W) clean images in [-1, 1].
            t: one timestep for the whole batch, or a (B,) LongTensor of timesteps.
            noise: (B, C, H, W) standard normal noise (broadcastable to x0).

        Returns:
            (B, C, H, W) x_t in x0's dtype.
        """
        return (
            self._coef(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def training_loss(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The simple DDPM loss: MSE between the true noise and the predicted one.

        The hybrid loss of improved DDPM adds a variational-bound term that trains the variance
        channels of a `learn_sigma` model; it is omitted here because only the decoder features
        matter to sparseseg, and the epsilon MSE alone trains them. The variance channels are
        simply ignored (and receive no gradient).

        Args:
            model: maps (x_t (B, C, H, W), t (B,)) to (B, C or 2C, H, W); the first C channels
                are the predicted epsilon.
            x0: (B, C, H, W) clean images in [-1, 1].
            generator: source of the timesteps (uniform over 0..T-1) and the noise; may live on
                another device than x0.

        Returns:
            Scalar float32 loss.
        """
        b, c = x0.shape[:2]
        draw_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=draw_device)
        noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype)
        t, noise = t.to(x0.device), noise.to(x0.device)
        eps = model(self.q_sample(x0, t, noise), t)[:, :c]
        return F.mse_loss(eps.float(), noise.float())

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        steps: int = 50,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Deterministic DDIM sampling (Song et al. 2021, eta = 0) over `steps` evenly spaced timesteps.

        x_T ~ N(0, I); at each t -> t' (t' < t, the last t' is "before step 0"):
        x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to [-1, 1];
        x_t' = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps, with abar before step 0 equal to 1.

        Args:
            model: maps (x_t, t (B,)) to (B, C or 2C, H, W), the first C channels the predicted noise.
            shape: (B, C, H, W) of the samples.
            steps: number of model evaluations (1 .. num_timesteps).
            generator: seeds x_T (a CPU generator).

        Returns:
            (B, C, H, W) float32 samples in [-1, 1].
        """
        if not 1 <= steps <= self.num_timesteps:
            raise SparsesegError(f"steps {steps}: expected 1..{self.num_timesteps}")
        ts = np.linspace(0, self.num_timesteps - 1, steps).round().astype(int)[::-1]
        x = torch.randn(shape, generator=generator).to(device)
        c = shape[1]
        for i, t in enumerate(ts):
            abar = float(self.alphas_cumprod[t])
            abar_next = float(self.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            eps = model(x, torch.full((shape[0],), int(t), device=x.device, dtype=torch.long))[:, :c].float()
            x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
            x = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps
        return x
