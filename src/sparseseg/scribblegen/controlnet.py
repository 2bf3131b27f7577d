"""ScribbleGen's own generator: a ControlNet on a Stable Diffusion UNet, conditioned on scribbles.

The ControlNet is initialised from the base UNet (`ControlNetModel.from_unet`: the encoder copied,
zero convolutions on its outputs) and trained on image/scribble pairs while the VAE, the UNet and
the text encoder stay frozen, with the epsilon loss in the VAE's latent space. The prompt of an
image names the classes its scribble contains, as the paper does:
"a high-quality, detailed, and professional image of <class>, <class>, ..." (without " of ..." when
the scribble is empty).

The scribble reaches the ControlNet through the same one-hot encoding as the in-domain ADM
(`sparseseg.scribblegen.adm`: C class channels and an "unlabelled" channel; the ControlNet's
conditioning embedding is built for C + 1 input channels instead of an RGB rendering), so the
"no scribble" input of conditioning dropout and guidance is again the all-unlabelled map. Only the
scribble is dropped; the prompt stays in both branches of guidance.

Encode ratio and guidance mean what they mean for the ADM: lambda = 0 returns the real image,
lambda = 1 starts from pure latent noise, and between them the image's latent is noised to
t0 = round(lambda (T - 1)) and denoised with DDIM (`encode_and_denoise`, without clipping, since
latents are unbounded); eps = eps_uncond + w (eps_cond - eps_uncond).

The model parts come from a local Stable Diffusion folder in the diffusers layout (`vae/`,
`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`); nothing is downloaded. Training writes
`OUT/controlnet/` (diffusers `save_pretrained`), `OUT/state.pt` (optimizer, step, seed, classes,
loss history; resumed when present) and `OUT/losses.csv`.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparseseg.backbones.diffusion import NoiseSchedule
from sparseseg.backbones.pretrain import train_steps, write_losses_csv
from sparseseg.data.dataset import IGNORE_INDEX, images_to_model_input
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write
from sparseseg.scribblegen.adm import (
    draw_pairs,
    drop_condition,
    encode_and_denoise,
    encode_scribbles,
    null_condition,
)

PROMPT = "a high-quality, detailed, and professional image"
FORMAT = 1

#: prompts -> (B, L, D) text embeddings (the UNet's `encoder_hidden_states`)
PromptEncoder = Callable[[list[str]], torch.Tensor]


def scribble_prompt(scribble: np.ndarray | torch.Tensor, classes: Sequence[str]) -> str:
    """The paper's prompt for one scribble map: the base prompt + " of " + the classes it contains."""
    ids = sorted(int(i) for i in np.unique(np.asarray(scribble)) if int(i) != IGNORE_INDEX)
    return PROMPT + (" of " + ", ".join(classes[i] for i in ids) if ids else "")


def schedule_from_config(config: dict) -> NoiseSchedule:
    """The `NoiseSchedule` of a diffusers scheduler config (linear, scaled_linear or explicit betas).

    Raises:
        SparsesegError: a beta schedule other than those.
    """
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return NoiseSchedule(np.asarray(config["trained_betas"], dtype=np.float64))
    if kind == "linear":
        return NoiseSchedule(np.linspace(start, end, steps, dtype=np.float64))
    if kind == "scaled_linear":
        return NoiseSchedule(np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2)
    raise SparsesegError(f"scheduler beta_schedule {kind!r}: only linear and scaled_linear are supported")


def make_controlnet(unet, vae, num_classes: int):
    """A ControlNet initialised from `unet` whose conditioning input is the (C + 1)-channel one-hot map.

    The conditioning embedding downsamples by the VAE's factor, so scribbles enter at image size.
    """
    from diffusers import ControlNetModel

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    levels = int(math.log2(factor)) + 1
    if levels > 4:
        raise SparsesegError(f"VAE downsampling factor {factor}: at most 8 is supported")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels],
                                     conditioning_channels=num_classes + 1)


@dataclass
class ControlNetParts:
    """The frozen VAE and UNet, the trainable ControlNet and the noise schedule."""

    vae: nn.Module
    unet: nn.Module
    controlnet: nn.Module
    schedule: NoiseSchedule

    @property
    def scaling(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents: a draw from the posterior, or its mean without generator."""
        dist = self.vae.encode(images).latent_dist
        return (dist.sample(generator) if generator is not None else dist.mean) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) images in [-1, 1]."""
        return self.vae.decode(latents / self.scaling).sample.clamp(-1, 1)

    def eps(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction with the ControlNet's residuals added."""
        down, mid = self.controlnet(latents, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        return self.unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def guided_eps(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cond: torch.Tensor,
                   w: float) -> torch.Tensor:
        """eps_uncond + w (eps_cond - eps_uncond); w = 1 is the conditional prediction alone."""
        if w == 1:
            return self.eps(latents, t, text, cond).float()
        both = self.eps(torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([text, text]),
                        torch.cat([cond, null_condition(cond)])).float()
        eps_cond, eps_uncond = both.chunk(2)
        return eps_uncond + w * (eps_cond - eps_uncond)

    def loss(self, images: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, p_uncond: float,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent epsilon loss with conditioning dropout (rate `p_uncond`) on the scribble."""
        latents = self.encode(images, generator)
        dropped, _ = drop_condition(cond, p_uncond, generator)
        return self.schedule.training_loss(lambda x, t: self.eps(x, t, text, dropped), latents, generator)


def load_stable_diffusion(base: str | Path, num_classes: int, controlnet: str | Path | None = None,
                          device: str | torch.device = "cpu") -> tuple[ControlNetParts, PromptEncoder]:
    """The parts of a local Stable Diffusion folder (diffusers layout) and its CLIP prompt encoder.

    Args:
        base: folder with vae/, unet/, text_encoder/, tokenizer/, scheduler/.
        num_classes: C; with `controlnet` None a fresh ControlNet is initialised from the UNet.
        controlnet: a folder written by `train_controlnet` (OUT/controlnet), or None.

    Raises:
        SparsesegError: a missing subfolder or a model that cannot be loaded (named).
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(base)
    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        if not (base / sub).is_dir():
            raise SparsesegError(f"{base / sub}: not found; --base must be a Stable Diffusion folder in the "
                                 "diffusers layout (vae, unet, text_encoder, tokenizer, scheduler)")
    try:
        vae = AutoencoderKL.from_pretrained(base / "vae").to(device).eval().requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(base / "unet").to(device).eval().requires_grad_(False)
        text_model = CLIPTextModel.from_pretrained(base / "text_encoder").to(device).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        net = (ControlNetModel.from_pretrained(controlnet) if controlnet is not None
               else make_controlnet(unet, vae, num_classes)).to(device)
        sched = DDPMScheduler.load_config(base / "scheduler")
    except (OSError, ValueError) as exc:
        raise SparsesegError(f"{base}: cannot load the Stable Diffusion parts ({' '.join(str(exc).split())})") from None
    if net.config.conditioning_channels != num_classes + 1:
        raise SparsesegError(f"{controlnet}: a ControlNet for {net.config.conditioning_channels - 1} classes, "
                             f"not {num_classes}")

    @torch.no_grad()
    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        return text_model(tokens.input_ids.to(device))[0]

    return ControlNetParts(vae, unet, net, schedule_from_config(dict(sched))), encode_prompts


def _save_controlnet(controlnet: nn.Module, out: Path) -> None:
    """save_pretrained into OUT/controlnet.tmp, then swap it in (a reader never sees half a folder)."""
    tmp, final, old = out / "controlnet.tmp", out / "controlnet", out / "controlnet.old"
    shutil.rmtree(tmp, ignore_errors=True)
    controlnet.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def train_controlnet(
    parts: ControlNetParts,
    images: torch.Tensor,
    scribbles: torch.Tensor,
    classes: Sequence[str],
    encode_prompts: PromptEncoder,
    out: str | Path,
    steps: int = 1000,
    batch_size: int = 4,
    lr: float = 1e-5,
    p_uncond: float = 0.1,
    seed: int = 0,
    checkpoint_every: int = 500,
    resume: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Trains the ControlNet of `parts` on image/scribble pairs (VAE, UNet and text encoder frozen).

    AdamW on the ControlNet's parameters, batches drawn with replacement, random horizontal flips
    of image and scribble together, the latent drawn from the VAE posterior, conditioning dropout
    on the scribble. Resuming (OUT/state.pt present) restores the ControlNet, optimizer, step and
    loss history; the data stream restarts from a seed derived from (seed, step).

    Args:
        images: (N, 3, S, S) uint8, S a multiple of the VAE factor x 8.
        scribbles: (N, S, S) uint8 ids, 255 = unlabelled.
        classes: class names (prompts and the one-hot width).
        encode_prompts: prompts -> text embeddings (frozen).

    Returns:
        OUT.
    """
    from diffusers import ControlNetModel

    out = Path(out)
    if not 0 <= p_uncond < 1:
        raise SparsesegError(f"p_uncond {p_uncond}: must be in [0, 1)")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if value <= 0:
            raise SparsesegError(f"{name} {value}: must be positive")
    device = next(parts.unet.parameters()).device
    classes = list(classes)
    opt_params = lambda: [p for p in parts.controlnet.parameters() if p.requires_grad]  # noqa: E731
    step, losses = 0, []
    state_path = out / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("sparseseg_controlnet") != FORMAT or state.get("classes") != classes:
            raise SparsesegError(f"{state_path}: another run (classes differ); pass resume=False or another OUT")
        parts.controlnet = ControlNetModel.from_pretrained(out / "controlnet").to(device)
        opt = torch.optim.AdamW(opt_params(), lr=lr)
        opt.load_state_dict(state["optimizer"])
        step, losses = int(state["step"]), [tuple(x) for x in state["losses"]]
    else:
        opt = torch.optim.AdamW(opt_params(), lr=lr)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    prompts = [scribble_prompt(s, classes) for s in scribbles.numpy()]

    def save(step: int) -> None:
        _save_controlnet(parts.controlnet, out)
        state = {"sparseseg_controlnet": FORMAT, "classes": classes, "size": int(images.shape[-1]),
                 "p_uncond": p_uncond, "optimizer": opt.state_dict(), "step": step, "seed": seed, "losses": losses}
        atomic_write(state_path, lambda p: torch.save(state, p))
        write_losses_csv(out / "losses.csv", losses)

    def batch_loss() -> torch.Tensor:
        idx, x0, cond = draw_pairs(images, scribbles, len(classes), batch_size, gen, device)
        text = encode_prompts([prompts[i] for i in idx.tolist()]).to(device)
        return parts.loss(x0, cond, text, p_uncond, gen)

    train_steps(parts.controlnet, None, opt, step, steps, batch_loss, save, losses, 0.0, checkpoint_every, device,
                progress)
    parts.controlnet.eval()
    return out


@torch.no_grad()
def generate_controlnet(
    parts: ControlNetParts,
    images: torch.Tensor,
    scribbles: torch.Tensor,
    classes: Sequence[str],
    encode_prompts: PromptEncoder,
    encode_ratio: float,
    guidance: float = 2.0,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 4,
) -> np.ndarray:
    """Synthetic twins of `images` at encode ratio lambda with guidance w (module docstring).

    Args:
        images: (N, 3, S, S) uint8; scribbles: (N, S, S) uint8, 255 = unlabelled.

    Returns:
        (N, S, S, 3) uint8; the input images themselves (transposed) when lambda = 0.
    """
    real = images.permute(0, 2, 3, 1).numpy()
    if encode_ratio == 0:
        return real.copy()
    device = next(parts.unet.parameters()).device
    side = images.shape[-1] // parts.factor
    channels = parts.vae.config.latent_channels
    out = np.empty_like(real)
    for start in range(0, len(images), batch_size):
        idx = list(range(start, min(start + batch_size, len(images))))
        x0 = images_to_model_input(images[idx].permute(0, 2, 3, 1)).to(device)
        cond = encode_scribbles(scribbles[idx], len(classes)).to(device)
        text = encode_prompts([scribble_prompt(scribbles[i].numpy(), classes) for i in idx]).to(device)
        noise = torch.stack([
            torch.randn(channels, side, side, generator=torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, i]).generate_state(1)[0])))
            for i in idx])
        latents = parts.encode(x0)
        z = encode_and_denoise(parts.schedule, lambda x, t, e=text, c=cond: parts.guided_eps(x, t, e, c, guidance), latents,
                               encode_ratio, noise, steps, clip=False)
        out[idx] = ((parts.decode(z) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out


# ------------------------------------------------------------------------------------ folders
def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _check_size(parts: ControlNetParts, size: int) -> None:
    if size <= 0 or size % (8 * parts.factor):
        raise SparsesegError(f"size {size}: must be a positive multiple of {8 * parts.factor} "
                             f"(the VAE's factor {parts.factor} x the UNet's 8)")


def train_controlnet_folder(base: str | Path, images_dir: str | Path, scribbles_dir: str | Path, out: str | Path,
                            size: int = 512, steps: int = 1000, batch_size: int = 4, lr: float = 1e-5,
                            p_uncond: float = 0.1, seed: int = 0, checkpoint_every: int = 500,
                            ignore_id: int = IGNORE_INDEX, resume: bool = True,
                            device: str | torch.device | None = None,
                            progress: Callable[[int, int, float], None] | None = None) -> Path:
    """`train_controlnet` on a folder of images and their scribble folder, with a local Stable Diffusion.

    Images are resized bilinearly, scribbles with nearest neighbour, to size x size.
    """
    from sparseseg.scribblegen.adm import load_pairs
    from sparseseg.scribbles.io import read_classes

    classes = read_classes(scribbles_dir)
    parts, encode_prompts = load_stable_diffusion(base, len(classes), device=_device(device))
    _check_size(parts, size)
    _, images, scribbles = load_pairs(images_dir, scribbles_dir, size, ignore_id, len(classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return train_controlnet(parts, images, scribbles, classes, encode_prompts, out, steps, batch_size, lr,
                                p_uncond, seed, checkpoint_every, resume, progress)


def generate_controlnet_datasets(base: str | Path, trained: str | Path, images_dir: str | Path,
                                 scribbles_dir: str | Path, out: str | Path,
                                 lambdas: Sequence[float] = (0.3, 0.6, 1.0), guidance: float = 2.0, steps: int = 50,
                                 seed: int = 0, batch_size: int = 4, ignore_id: int = IGNORE_INDEX,
                                 device: str | torch.device | None = None,
                                 progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """One synthetic prepared dataset per lambda (the layout of `adm.generate_datasets`) from a trained ControlNet.

    Args:
        trained: the OUT folder of `train_controlnet` (controlnet/ and state.pt).
    """
    from sparseseg.scribblegen.adm import _palette_for, lambda_folder, load_pairs, write_synthetic_dataset

    trained = Path(trained)
    if not (trained / "state.pt").is_file() or not (trained / "controlnet").is_dir():
        raise SparsesegError(f"{trained}: not a ControlNet training folder (state.pt and controlnet/ missing)")
    if not lambdas or any(not 0 <= lam <= 1 for lam in lambdas):
        raise SparsesegError(f"--lambdas {list(lambdas)}: give encode ratios in [0, 1]")
    state = torch.load(trained / "state.pt", map_location="cpu", weights_only=True)
    classes, size = list(state["classes"]), int(state["size"])
    parts, encode_prompts = load_stable_diffusion(base, len(classes), trained / "controlnet", _device(device))
    parts.controlnet.eval()
    names, images, scribbles = load_pairs(images_dir, scribbles_dir, size, ignore_id, len(classes))
    palette = _palette_for(Path(images_dir), classes)
    folders = []
    for k, lam in enumerate(lambdas):
        synthetic = generate_controlnet(parts, images, scribbles, classes, encode_prompts, lam, guidance, steps, seed,
                                        batch_size)
        folder = lambda_folder(Path(out), lam)
        write_synthetic_dataset(folder, names, images.permute(0, 2, 3, 1).numpy(), synthetic, scribbles.numpy(),
                                classes, palette, f"scribblegen controlnet {trained.name}: lambda={lam}, "
                                f"guidance={guidance}, steps={steps}, seed={seed}")
        folders.append(folder)
        if progress is not None:
            progress(k + 1, len(lambdas))
    return folders
