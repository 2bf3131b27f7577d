"""A scribble-conditioned ADM: the in-domain image generator of ScribbleGen, without Stable Diffusion.

The network is sparseseg's `ADMUNet` (the pretrain family, `pretrain_flags`) whose first
convolution takes 3 + C + 1 channels: the noisy image, then the scribble map one-hot encoded,
C class channels plus one "unlabelled" channel that is 1 wherever the scribble map is 255. The
"no scribble" input of classifier-free guidance is the encoding of an all-unlabelled map (class
channels 0, unlabelled channel 1), so it is an ordinary input the network sees during training.
One-hot (rather than a palette rendering) keeps classes equidistant and independent of colours.

Training: the epsilon DDPM loss of `NoiseSchedule.training_loss`; each sample's scribble input is
replaced by the no-scribble encoding with probability `p_uncond` (conditioning dropout, 0.1).

Generation, per image with scribble s and encode ratio lambda in [0, 1]:
- lambda = 0: the real image itself, unchanged;
- 0 < lambda < 1: x = q_sample(x0, t0, noise) with t0 = round(lambda (T - 1)), then DDIM (eta 0)
  from t0 down to 0 over max(2, ceil(lambda * steps)) evenly spaced timesteps;
- lambda = 1: x = noise (pure noise, independent of the real image), then DDIM from T - 1;
with the guided prediction eps = eps_uncond + w (eps_cond - eps_uncond) (w = 1: purely conditional).

The checkpoint is a dict:
    {"sparseseg_scribblegen": 1, "flags": ADMFlags as dict, "num_classes": C, "classes": [...],
     "palette": [[r, g, b], ...], "input_size": S, "p_uncond": p, "model": state dict,
     "ema": EMA state dict, "optimizer": AdamW state, "step": int, "seed": int,
     "losses": [(step, mean loss), ...]}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sparseseg.backbones.adm import ADMFlags, ADMUNet, TimestepEmbedSequential, load_adm
from sparseseg.backbones.diffusion import NoiseSchedule
from sparseseg.backbones.pretrain import (
    check_training_args,
    list_images,
    load_image_folder,
    pretrain_flags,
    train_steps,
    training_state,
    write_losses_csv,
)
from sparseseg.data.dataset import (
    IGNORE_INDEX,
    META_FILE,
    DatasetMeta,
    default_palette,
    images_to_model_input,
    load_meta,
    save_meta,
)
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write
from sparseseg.scribbles.io import load_scribbles, read_classes, write_scribble_map

FORMAT = 1
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ encoding
def encode_scribbles(scribbles: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot scribble input: (B, H, W) ids (255 = unlabelled) -> (B, C + 1, H, W) float32.

    Channel c is 1 where the scribble says class c; channel C is 1 where it says nothing.

    Raises:
        SparsesegError: an id that is neither a class nor 255.
    """
    ids = scribbles.long()
    bad = (ids != IGNORE_INDEX) & ((ids < 0) | (ids >= num_classes))
    if bad.any():
        raise SparsesegError(f"scribble ids {sorted(set(ids[bad].tolist()))[:5]} out of range for {num_classes} classes")
    ids = torch.where(ids == IGNORE_INDEX, num_classes, ids)
    return nn.functional.one_hot(ids, num_classes + 1).permute(0, 3, 1, 2).float()


def null_condition(like: torch.Tensor) -> torch.Tensor:
    """The "no scribble" encoding shaped like `like` (B, C + 1, H, W): the all-unlabelled map."""
    out = torch.zeros_like(like)
    out[:, -1] = 1
    return out


def drop_condition(cond: torch.Tensor, p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning dropout: each sample's encoding becomes `null_condition` with probability p.

    Returns:
        (the new encodings, (B,) bool: which samples were dropped).
    """
    draw_device = generator.device if generator is not None else cond.device
    dropped = (torch.rand(cond.shape[0], generator=generator, device=draw_device) < p).to(cond.device)
    return torch.where(dropped[:, None, None, None], null_condition(cond), cond), dropped


# ------------------------------------------------------------------------------------ network
class ScribbleADM(nn.Module):
    """`ADMUNet` with the one-hot scribble map concatenated to its input.

    Attributes:
        unet: the ADMUNet; its `input_blocks[0]` takes 3 + num_classes + 1 channels.
        num_classes: C.
    """

    def __init__(self, flags: ADMFlags, num_classes: int) -> None:
        super().__init__()
        if not 1 <= num_classes <= 255:
            raise SparsesegError(f"num_classes {num_classes}: expected 1..255")
        self.num_classes = num_classes
        self.unet = ADMUNet(flags)
        width = self.unet.input_blocks[0][0].out_channels
        self.unet.input_blocks[0] = TimestepEmbedSequential(nn.Conv2d(3 + num_classes + 1, width, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) x_t, timesteps, (N, C + 1, H, W) encoding -> (N, 6 or 3, H, W), epsilon first."""
        return self.unet(torch.cat([x, cond.to(x.dtype)], dim=1), timesteps)

    @torch.no_grad()
    def load_unconditional(self, unet: ADMUNet) -> None:
        """Starts from an unconditional ADM of the same architecture.

        Every weight is copied; the first convolution's image channels come from `unet` and its
        scribble channels are set to zero, so the network's output is exactly `unet`'s until
        training teaches it to use the scribble (ControlNet's zero-initialisation idea).
        """
        state = unet.state_dict()
        conv = self.unet.input_blocks[0][0]
        weight = torch.zeros_like(conv.weight)
        weight[:, :3] = state.pop("input_blocks.0.0.weight")
        self.unet.load_state_dict({**state, "input_blocks.0.0.weight": weight})


def load_base(init: str | Path, channels: int | None) -> tuple[ADMUNet, ADMFlags]:
    """The unconditional ADM of `init` (a `sparseseg pretrain` checkpoint) and its flags.

    Raises:
        SparsesegError: unreadable file, or a width other than `channels` when that is given.
    """
    unet, flags = load_adm(init)
    if channels is not None and channels != flags.num_channels:
        raise SparsesegError(f"{init}: has {flags.num_channels} base channels, not --channels {channels}")
    return unet, flags


def conditional_loss(model: ScribbleADM, schedule: NoiseSchedule, x0: torch.Tensor, cond: torch.Tensor,
                     p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The epsilon DDPM loss with conditioning dropout (rate `p_uncond`)."""
    dropped_cond, _ = drop_condition(cond, p_uncond, generator)
    return schedule.training_loss(lambda xt, t: model(xt, t, dropped_cond), x0, generator=generator)


def guided_eps(model: ScribbleADM, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond), the first 3 output channels.

    w = 1 is the purely conditional prediction (computed alone, without the unconditional pass);
    w = 0 the unconditional one.
    """
    if w == 1:
        return model(x, t, cond)[:, :3].float()
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_condition(cond)]))[:, :3].float()
    eps_cond, eps_uncond = both.chunk(2)
    return eps_uncond + w * (eps_cond - eps_uncond)


def start_timestep(schedule: NoiseSchedule, encode_ratio: float) -> int:
    """t0 = round(lambda (T - 1)).

    Raises:
        SparsesegError: lambda outside [0, 1].
    """
    if not 0 <= encode_ratio <= 1:
        raise SparsesegError(f"encode ratio {encode_ratio}: must be in [0, 1]")
    return int(round(encode_ratio * (schedule.num_timesteps - 1)))


@torch.no_grad()
def encode_and_denoise(schedule: NoiseSchedule, eps_fn: EpsFn, x0: torch.Tensor, encode_ratio: float,
                       noise: torch.Tensor, steps: int = 50, clip: bool = True) -> torch.Tensor:
    """SDEdit-style generation from real images at encode ratio lambda (module docstring).

    Args:
        schedule: the model's noise schedule.
        eps_fn: (x_t, t (B,)) -> predicted noise (B, 3, H, W), e.g. a `guided_eps` closure.
        x0: (B, C, H, W) real images in [-1, 1] (or latents).
        encode_ratio: lambda in [0, 1].
        noise: (B, C, H, W) standard normal noise (the seeded randomness).
        steps: DDIM steps of a full (lambda = 1) generation; lambda scales them.
        clip: clip each step's x0 estimate to [-1, 1] (pixels); off for latents, which are unbounded.

    Returns:
        (B, C, H, W) float32 (in [-1, 1] with `clip`); `x0` itself when lambda = 0.
    """
    t0 = start_timestep(schedule, encode_ratio)
    if encode_ratio == 0:
        return x0
    if steps < 1:
        raise SparsesegError(f"steps {steps}: must be at least 1")
    x = noise.to(x0) if encode_ratio == 1 else schedule.q_sample(x0, t0, noise.to(x0))
    count = max(2, math.ceil(encode_ratio * steps))
    ts = np.unique(np.linspace(0, t0, count).round().astype(int))[::-1]
    for i, t in enumerate(ts):
        abar = float(schedule.alphas_cumprod[t])
        abar_next = float(schedule.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)).float()
        x0_hat = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        x0_hat = x0_hat.clamp(-1, 1) if clip else x0_hat
        x = math.sqrt(abar_next) * x0_hat + math.sqrt(1 - abar_next) * eps
    return x


# ------------------------------------------------------------------------------------ helpers
def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def render_scribble(scribble: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) scribble map -> (H, W, 3) uint8: class colours on black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[IGNORE_INDEX] = 0
    return table[np.asarray(scribble)]


def save_triplet_grid(real: np.ndarray, scribbles: np.ndarray, synthetic: np.ndarray,
                      palette: Sequence[Sequence[int]], path: Path) -> None:
    """One row per image: real | scribble | synthetic, 1-pixel white borders; atomic PNG."""
    n, s = real.shape[:2]
    grid = np.full((n * (s + 2), 3 * (s + 2), 3), 255, dtype=np.uint8)
    for i in range(n):
        for j, img in enumerate((real[i], render_scribble(scribbles[i], palette), synthetic[i])):
            grid[i * (s + 2) + 1 : i * (s + 2) + 1 + s, j * (s + 2) + 1 : j * (s + 2) + 1 + s] = img
    atomic_write(path, lambda p: Image.fromarray(grid).save(p, format="PNG"))


def _noise(seed: int, index: int, size: int) -> torch.Tensor:
    """The (3, S, S) generation noise of image `index`: its own seeded stream."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(state))


def _palette_for(images_dir: Path, classes: list[str]) -> list[list[int]]:
    """The prepared dataset's palette when `images_dir` is DATA/<split>/images with these classes."""
    root = Path(images_dir).parent.parent
    if (root / META_FILE).is_file():
        try:
            meta = load_meta(root)
        except SparsesegError:
            meta = None
        if meta is not None and meta.classes == classes:
            return [list(c) for c in meta.palette]
    return default_palette(len(classes))


def load_pairs(images_dir: str | Path, scribbles_dir: str | Path, size: int, ignore_id: int = IGNORE_INDEX,
               num_classes: int | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Images (resized bilinearly) and their scribble maps (nearest), matched by file stem.

    Returns:
        (stems, (N, 3, S, S) uint8 images, (N, S, S) uint8 scribbles).
    """
    names = [p.stem for p in list_images(images_dir)]
    images = load_image_folder(images_dir, size)
    scribbles = load_scribbles(scribbles_dir, names, size, ignore_id, num_classes)
    return names, images, scribbles


# ------------------------------------------------------------------------------------ training
def draw_pairs(images: torch.Tensor, scribbles: torch.Tensor, num_classes: int, batch_size: int,
               generator: torch.Generator, device: str | torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch of image/scribble pairs, drawn with replacement, each flipped left-right
    with probability 1/2 (image and scribble together).

    Args:
        images: (N, 3, S, S) uint8; scribbles: (N, S, S) maps, 255 unlabelled.

    Returns:
        (indices, x0 in [-1, 1] (B, 3, S, S), one-hot encodings (B, C + 1, S, S)), on `device`
        but the indices.
    """
    idx = torch.randint(len(images), (batch_size,), generator=generator)
    x0 = images_to_model_input(images[idx].permute(0, 2, 3, 1))
    cond = encode_scribbles(scribbles[idx], num_classes)
    flip = (torch.rand(batch_size, generator=generator) < 0.5)[:, None, None, None]
    return (idx, torch.where(flip, x0.flip(3), x0).to(device), torch.where(flip, cond.flip(3), cond).to(device))


def _read_run(out: Path, flags: ADMFlags, size: int, classes: list[str]) -> dict:
    try:
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on corrupt files
        raise SparsesegError(f"{out}: cannot read checkpoint to resume ({type(err).__name__}); "
                             "pass resume=False (--no-resume) to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("sparseseg_scribblegen") != FORMAT:
        raise SparsesegError(f"{out}: not a sparseseg scribblegen checkpoint; choose another output path")
    if ckpt.get("flags") != flags.model_dump() or ckpt.get("input_size") != size or ckpt.get("classes") != classes:
        raise SparsesegError(f"{out}: holds a run with another size, width or class list; pass resume=False "
                             "(--no-resume) to start over or choose another output path")
    return ckpt


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[ScribbleADM, dict]:
    """The EMA network of a scribblegen checkpoint (eval mode) and the checkpoint's other fields.

    Raises:
        SparsesegError: unreadable file or not a scribblegen checkpoint.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SparsesegError(f"{path}: checkpoint not found") from None
    except Exception as err:
        raise SparsesegError(f"{path}: cannot read checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("sparseseg_scribblegen") != FORMAT:
        raise SparsesegError(f"{path}: not a sparseseg scribblegen checkpoint (`sparseseg scribblegen train` writes them)")
    flags = ADMFlags.from_mapping(ckpt["flags"], source=str(path))
    model = ScribbleADM(flags, int(ckpt["num_classes"]))
    model.load_state_dict(ckpt["ema"])
    info = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer")}
    return model.to(device).eval(), info


def train_scribblegen(
    images_dir: str | Path,
    scribbles_dir: str | Path,
    out: str | Path,
    size: int = 64,
    channels: int | None = None,
    steps: int = 2000,
    batch_size: int | None = None,
    lr: float = 1e-4,
    p_uncond: float = 0.1,
    seed: int = 0,
    ema_decay: float = 0.999,
    checkpoint_every: int = 500,
    resume: bool = True,
    ignore_id: int = IGNORE_INDEX,
    progress: Callable[[int, int, float], None] | None = None,
    device: str | torch.device | None = None,
    samples: int = 4,
    sample_steps: int = 50,
    guidance: float = 2.0,
    init: str | Path | None = None,
) -> Path:
    """Trains a scribble-conditioned ADM on image/scribble pairs.

    Everything but the conditioning is `pretrain_adm`'s recipe: linear schedule of 1000 steps,
    AdamW without weight decay, random horizontal flips (image and scribble together), batches
    drawn with replacement, bf16 autocast on CUDA, warmed-up EMA, atomic checkpoints that resume,
    `<out>.losses.csv`; and at every checkpoint `<out>.samples.png`, rows of real | scribble |
    generated (lambda = 1, guidance `guidance`, EMA weights) for the first `samples` images.

    Args:
        images_dir: folder of training images.
        scribbles_dir: scribble folder (`<image stem>.png` per image and classes.txt).
        out: checkpoint path.
        size: training side (a multiple of 32); channels, batch_size: None = by size, as pretrain.
        p_uncond: conditioning dropout rate in [0, 1).
        ignore_id: the scribble files' unlabelled id.
        init: a `sparseseg pretrain` checkpoint to start from (its EMA weights, scribble inputs
            zero-initialised; `ScribbleADM.load_unconditional`); it fixes the architecture.
            Ignored when `out` is resumed.
        Others: as `pretrain_adm`.

    Returns:
        `out`.

    Raises:
        SparsesegError: bad arguments, missing or unreadable files, an incompatible `out` to resume.
    """
    out = Path(out)
    if not 0 <= p_uncond < 1:
        raise SparsesegError(f"p_uncond {p_uncond}: must be in [0, 1)")
    base, base_flags = load_base(init, channels) if init is not None else (None, None)
    channels, batch_size = check_training_args(size, channels, steps, batch_size, checkpoint_every, sample_steps)
    flags = base_flags or pretrain_flags(channels)
    classes = read_classes(scribbles_dir)
    palette = _palette_for(Path(images_dir), classes)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _, images, scribbles = load_pairs(images_dir, scribbles_dir, size, ignore_id, len(classes))
    schedule = NoiseSchedule.named(flags.noise_schedule, flags.diffusion_steps)

    # 1. Model, EMA and optimizer (seeded without touching the global RNG), resumed when asked.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ScribbleADM(flags, len(classes))
    if base is not None:
        model.load_unconditional(base)
    model = model.to(device)
    ema, opt, step, losses, gen = training_state(
        model, lr, seed, _read_run(out, flags, size, classes) if resume and out.exists() else None)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> None:
        state = {"sparseseg_scribblegen": FORMAT, "flags": flags.model_dump(), "num_classes": len(classes),
                 "classes": classes, "palette": palette, "input_size": size, "p_uncond": p_uncond,
                 "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                 "step": step, "seed": seed, "losses": losses}
        atomic_write(out, lambda p: torch.save(state, p))
        write_losses_csv(out.with_name(out.name + ".losses.csv"), losses)
        if samples > 0:
            k = min(samples, len(images))
            x0 = images_to_model_input(images[:k].permute(0, 2, 3, 1)).to(device)
            cond = encode_scribbles(scribbles[:k], len(classes)).to(device)
            noise = torch.stack([_noise(seed, i, size) for i in range(k)])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                fake = encode_and_denoise(schedule, lambda x, t: guided_eps(ema, x, t, cond, guidance), x0, 1.0,
                                          noise, sample_steps)
            save_triplet_grid(images[:k].permute(0, 2, 3, 1).numpy(), scribbles[:k].numpy(), _to_uint8(fake),
                              palette, out.with_name(out.name + ".samples.png"))

    # 2. Train.
    def batch_loss() -> torch.Tensor:
        _, x0, cond = draw_pairs(images, scribbles, len(classes), batch_size, gen, device)
        return conditional_loss(model, schedule, x0, cond, p_uncond, gen)

    train_steps(model, ema, opt, step, steps, batch_loss, save, losses, ema_decay, checkpoint_every, device, progress)
    return out


# ------------------------------------------------------------------------------------ generation
def lambda_folder(out: Path, encode_ratio: float) -> Path:
    """OUT/lambda_0.60: where the dataset of one encode ratio goes."""
    return Path(out) / f"lambda_{encode_ratio:.2f}"


def generate_datasets(
    checkpoint: str | Path,
    images_dir: str | Path,
    scribbles_dir: str | Path,
    out: str | Path,
    lambdas: Sequence[float] = (0.3, 0.6, 1.0),
    guidance: float = 2.0,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 8,
    ignore_id: int = IGNORE_INDEX,
    grid_images: int = 8,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """One synthetic prepared dataset per encode ratio, from real images and their scribbles.

    For each lambda, `OUT/lambda_X.XX/` holds meta.json, `train/images/<stem>.png` (synthetic, at
    the checkpoint's size), `train/masks/<stem>.png` (the scribble it was generated from, 255 =
    unlabelled) and `samples.png` (real | scribble | synthetic for the first `grid_images`).
    Image i's noise is seeded by (seed, i), the same for every lambda.

    Returns:
        The dataset folders, in the order of `lambdas`.

    Raises:
        SparsesegError: a lambda outside [0, 1], a bad checkpoint, missing or unreadable files.
    """
    for lam in lambdas:
        if not 0 <= lam <= 1:
            raise SparsesegError(f"--lambdas: {lam} is outside [0, 1]")
    if not lambdas:
        raise SparsesegError("--lambdas: give at least one encode ratio")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, info = load_generator(checkpoint, device)
    size, classes, palette = int(info["input_size"]), list(info["classes"]), info["palette"]
    schedule = NoiseSchedule.named(model.unet.flags.noise_schedule, model.unet.flags.diffusion_steps)
    names, images, scribbles = load_pairs(images_dir, scribbles_dir, size, ignore_id, len(classes))
    n, done, total = len(names), 0, len(names) * len(lambdas)
    folders = []
    for lam in lambdas:
        folder = lambda_folder(Path(out), lam)
        synthetic = np.empty((n, size, size, 3), dtype=np.uint8)
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            if lam == 0:  # the real images, untouched (no float round trip)
                synthetic[idx] = images[idx].permute(0, 2, 3, 1).numpy()
            else:
                x0 = images_to_model_input(images[idx].permute(0, 2, 3, 1)).to(device)
                cond = encode_scribbles(scribbles[idx], len(classes)).to(device)
                noise = torch.stack([_noise(seed, i, size) for i in idx])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    fake = encode_and_denoise(schedule, lambda x, t, c=cond: guided_eps(model, x, t, c, guidance),
                                              x0, lam, noise, steps)
                synthetic[idx] = _to_uint8(fake)
            done += len(idx)
            if progress is not None:
                progress(done, total)
        write_synthetic_dataset(folder, names, images.permute(0, 2, 3, 1).numpy(), synthetic, scribbles.numpy(),
                                classes, palette, f"scribblegen {Path(checkpoint).name}: lambda={lam}, "
                                f"guidance={guidance}, steps={steps}, seed={seed}", grid_images)
        folders.append(folder)
    return folders


def write_synthetic_dataset(folder: Path, names: Sequence[str], real: np.ndarray, synthetic: np.ndarray,
                            scribbles: np.ndarray, classes: list[str], palette: list[list[int]], source: str,
                            grid_images: int = 8) -> None:
    """Writes one lambda's prepared dataset: meta.json, train/images, train/masks (the scribbles), samples.png.

    Args:
        real, synthetic: (N, S, S, 3) uint8; scribbles: (N, S, S) uint8, 255 = unlabelled.
    """
    (folder / "train" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "train" / "masks").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        atomic_write(folder / "train" / "images" / f"{name}.png",
                     lambda p, a=synthetic[i]: Image.fromarray(a).save(p, format="PNG"))
        write_scribble_map(folder / "train" / "masks" / f"{name}.png", scribbles[i], palette)
    k = min(grid_images, len(names))
    save_triplet_grid(real[:k], scribbles[:k], synthetic[:k], palette, folder / "samples.png")
    save_meta(DatasetMeta(name=f"scribblegen_{folder.name}", classes=classes, palette=palette,
                          size=int(synthetic.shape[1]), splits={"train": len(names)}, source=source), folder)
