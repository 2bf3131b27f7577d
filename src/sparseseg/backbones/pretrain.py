"""In-domain pre-training of a small ADM with the DDPM epsilon loss.

When no OpenAI checkpoint suits the images (or none can be downloaded), a compact ADM of the same
family as `256x256_diffusion_uncond.pt` (channel_mult 1,1,2,2,4,4, attention at 32,16,8,
resblock_updown, scale-shift norm, learn_sigma) is trained on the unlabelled images themselves.
The network is fully convolutional, so it trains and runs at `size` rather than 256.

The checkpoint is a dict that `load_adm` reads:
    {"sparseseg_adm": 1, "flags": ADMFlags as dict, "input_size": size, "model": state dict,
     "ema": EMA state dict, "optimizer": AdamW state, "step": int, "seed": int,
     "losses": [(step, mean loss over the steps since the previous entry), ...]}
"""

from __future__ import annotations

import copy
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparseseg.backbones.adm_flags import ADMFlags
from sparseseg.backbones.adm_unet import ADMUNet
from sparseseg.backbones.diffusion import NoiseSchedule
from sparseseg.data.dataset import images_to_model_input
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write
from sparseseg.seeding import derived_seed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LOSS_EVERY = 10

#: Defaults by training size: (base channels, batch size). Wider nets at larger sizes keep the
#: receptive field's share of the image similar; smaller batches keep memory in check.
SIZE_DEFAULTS = {32: (32, 16), 64: (64, 8), 128: (128, 8), 256: (128, 4)}


def default_settings(size: int) -> tuple[int, int]:
    """(channels, batch_size) for a training size: the table's entry at or above `size`."""
    for side in sorted(SIZE_DEFAULTS):
        if size <= side:
            return SIZE_DEFAULTS[side]
    return SIZE_DEFAULTS[max(SIZE_DEFAULTS)]


def save_sample_grid(samples: torch.Tensor, path: Path) -> None:
    """(B, 3, S, S) samples in [-1, 1] as one PNG grid, rows of ceil(sqrt(B)) images."""
    b, _, s, _ = samples.shape
    cols = int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    pixels = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    grid = np.full((rows * (s + 2), cols * (s + 2), 3), 255, dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        grid[r * (s + 2) + 1 : r * (s + 2) + 1 + s, c * (s + 2) + 1 : c * (s + 2) + 1 + s] = img
    atomic_write(path, lambda p: Image.fromarray(grid).save(p, format="PNG"))


def _interned(obj):
    """`obj` with every string interned, so that pickle's memo (keyed by object identity) and hence the
    checkpoint's bytes depend on the values alone: a resumed run's state holds strings read back from
    its checkpoint where an uninterrupted one holds the originals."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_interned(k): _interned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_interned(v) for v in obj)
    return obj


def pretrain_flags(channels: int) -> ADMFlags:
    """The ADM-256 family at `channels` base width (heads of min(64, channels // 2) channels).

    Raises:
        SparsesegError: channels not a positive multiple of 32 (GroupNorm uses 32 groups).
    """
    if channels <= 0 or channels % 32:
        raise SparsesegError(f"channels {channels}: must be a positive multiple of 32 (GroupNorm groups)")
    return ADMFlags.from_mapping(
        dict(
            image_size=256,
            channel_mult="1,1,2,2,4,4",
            num_channels=channels,
            num_res_blocks=2,
            attention_resolutions="32,16,8",
            num_head_channels=min(64, channels // 2),
            resblock_updown=True,
            use_scale_shift_norm=True,
            learn_sigma=True,
            diffusion_steps=1000,
            noise_schedule="linear",
        ),
        source=f"pretrain flags for channels={channels}",
    )


def list_images(images_dir: str | Path) -> list[Path]:
    """The image files directly inside a folder, in sorted name order.

    Raises:
        SparsesegError: missing folder or no images.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise SparsesegError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SparsesegError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, ema_decay: float) -> None:
    """One EMA step with the warmed-up decay min(ema_decay, (1 + step) / (10 + step))."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def write_losses_csv(path: Path, losses: list[tuple[int, float]]) -> None:
    """The loss curve as `path` (step,loss), atomically."""
    csv = "step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in losses)
    atomic_write(path, lambda p: p.write_text(csv))


def check_training_args(size: int, channels: int | None, steps: int, batch_size: int | None,
                        checkpoint_every: int, sample_steps: int) -> tuple[int, int]:
    """(channels, batch size), the size defaults filled in; raises SparsesegError on a bad argument."""
    if size <= 0 or size % 32:
        raise SparsesegError(f"size {size}: must be a positive multiple of 32 (five 2x downsamplings)")
    default_channels, default_batch = default_settings(size)
    channels = default_channels if channels is None else channels
    batch_size = default_batch if batch_size is None else batch_size
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("sample_steps", sample_steps)):
        if value <= 0:
            raise SparsesegError(f"{name} {value}: must be positive")
    return channels, batch_size


def training_state(model: torch.nn.Module, lr: float, seed: int, resumed: dict | None
                   ) -> tuple[torch.nn.Module, torch.optim.Optimizer, int, list, torch.Generator]:
    """EMA copy, AdamW (no weight decay), step, losses and batch generator of a run.

    `resumed` (a checkpoint dict with model, ema, optimizer, step, losses) restores all of them;
    the batch generator is seeded by (seed, step), so a resumed run draws what a run that never
    stopped would have drawn from then on.
    """
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    step, losses = 0, []
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        opt.load_state_dict(resumed["optimizer"])
        step, losses = int(resumed["step"]), [tuple(x) for x in resumed["losses"]]
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return ema, opt, step, losses, gen


def train_steps(
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    opt: torch.optim.Optimizer,
    step: int,
    steps: int,
    batch_loss: Callable[[], torch.Tensor],
    save: Callable[[int], None],
    losses: list[tuple[int, float]],
    ema_decay: float,
    checkpoint_every: int,
    device: torch.device,
    progress: Callable[[int, int, float], None] | None = None,
    window: list[float] | None = None,
) -> None:
    """The optimisation loop shared by the diffusion trainers: from `step` to `steps`.

    Each step computes `batch_loss()` (under bf16 autocast on CUDA), takes an optimiser step and
    an EMA step (none when `ema` is None), appends the mean loss of every LOSS_EVERY steps to `losses`, and calls
    `save(step)` every `checkpoint_every` steps and at the end. `window` holds the losses since the last
    LOSS_EVERY step; a caller that saves it with its checkpoint resumes the same loss curve.
    """
    model.train()
    window = [] if window is None else window
    while step < steps:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if ema is not None:
            ema_update(ema, model, step, ema_decay)
        value = loss.item()
        window.append(value)
        if step % LOSS_EVERY == 0 or step == steps:
            losses.append((step, sum(window) / len(window)))
            window.clear()
        if progress is not None:
            progress(step, steps, value)
        if step % checkpoint_every == 0 or step == steps:
            save(step)


def load_image_folder(images_dir: str | Path, size: int) -> torch.Tensor:
    """Reads every image directly inside a folder, as RGB, bilinearly resized to size x size.

    Args:
        images_dir: folder with .png/.jpg/.jpeg/.bmp files (subfolders are not searched).
        size: output side.

    Returns:
        (N, 3, size, size) uint8 tensor, files in sorted name order.

    Raises:
        SparsesegError: missing folder, no images, or an unreadable image (named).
    """
    arrays = []
    for f in list_images(images_dir):
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise SparsesegError(f"{f}: cannot read image ({err})") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _read_run(out: Path, flags: ADMFlags, size: int) -> dict:
    """Loads an earlier run's checkpoint for resuming, checking that it is the same setup."""
    try:
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on corrupt files
        raise SparsesegError(
            f"{out}: cannot read checkpoint to resume ({type(err).__name__}); "
            "pass resume=False (--no-resume) to start over"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("sparseseg_adm") != 1:
        raise SparsesegError(f"{out}: not a sparseseg pretrain checkpoint; choose another output path")
    if ckpt.get("flags") != flags.model_dump() or ckpt.get("input_size") != size:
        old = ckpt.get("flags") or {}
        raise SparsesegError(
            f"{out}: holds a run with channels={old.get('num_channels')}, size={ckpt.get('input_size')}, "
            f"not channels={flags.num_channels}, size={size}; pass resume=False (--no-resume) to start "
            "over or choose another output path"
        )
    return ckpt


def pretrain_adm(
    images_dir: str | Path,
    out: str | Path,
    size: int = 64,
    channels: int | None = None,
    steps: int = 2000,
    batch_size: int | None = None,
    lr: float = 1e-4,
    seed: int = 0,
    ema_decay: float = 0.999,
    checkpoint_every: int = 500,
    resume: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    device: str | torch.device | None = None,
    samples: int = 16,
    sample_steps: int = 50,
) -> Path:
    """Trains an ADM on a folder of images with the epsilon-prediction DDPM loss.

    Linear schedule of 1000 steps, timesteps drawn uniformly, AdamW (no weight decay, as in
    guided-diffusion), random horizontal flips, batches drawn with replacement, bf16 autocast on
    CUDA. The EMA decay is warmed up as min(ema_decay, (1 + step) / (10 + step)) so that a short
    run's EMA is not dominated by the random initial weights.

    Resuming restores the weights, EMA, optimizer, step and loss history; every step's batch, flips,
    timesteps and noise are drawn from a generator seeded by (seed, step), so a resumed run ends with
    the same checkpoint, byte for byte, as one that was never interrupted.

    Args:
        images_dir: folder of training images (see `load_image_folder`); held in memory as uint8.
        out: checkpoint path; `<out>.losses.csv` is written beside it.
        size: training side (a multiple of 32).
        channels: base width (a multiple of 32); None: by size (`SIZE_DEFAULTS`).
        steps: total optimisation steps (including those of a resumed run).
        batch_size: images per step; None: by size (`SIZE_DEFAULTS`).
        lr: AdamW learning rate.
        seed: seeds the initial weights and the data/noise stream.
        ema_decay: final EMA decay.
        checkpoint_every: also write the checkpoint every this many steps.
        resume: continue from `out` if it exists (it must hold the same channels and size);
            nothing is trained if it already holds `steps` steps.
        progress: called as progress(step, steps, loss) after every step.
        device: default CUDA when available, else CPU.
        samples: images in the sample grid written at every checkpoint as
            `<out>.samples.png` (DDIM with the EMA weights, `sample_steps` steps, the same
            seeded x_T each time so grids are comparable); 0 disables it.
        sample_steps: DDIM steps of the sample grid.

    Returns:
        `out`.

    Raises:
        SparsesegError: bad arguments, no/unreadable images, or an incompatible `out` to resume.
    """
    out = Path(out)
    channels, batch_size = check_training_args(size, channels, steps, batch_size, checkpoint_every, sample_steps)
    flags = pretrain_flags(channels)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_image_folder(images_dir, size)
    schedule = NoiseSchedule.named(flags.noise_schedule, flags.diffusion_steps)

    # 1. Model, EMA copy and optimizer; the seed fixes the initial weights without touching
    #    the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ADMUNet(flags).to(device)
    resumed = _read_run(out, flags, size) if resume and out.exists() else None
    ema, opt, step, losses, gen = training_state(model, lr, seed, resumed)
    window = [float(v) for v in resumed.get("loss_window", [])] if resumed is not None else []
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> None:
        state = {
            "sparseseg_adm": 1,
            "flags": flags.model_dump(),
            "input_size": size,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "seed": seed,
            "losses": losses,
            "loss_window": list(window),  # losses since the last LOSS_EVERY step, for an exact resume
        }
        atomic_write(out, lambda p: torch.save(_interned(state), p))
        write_losses_csv(out.with_name(out.name + ".losses.csv"), losses)
        if samples > 0:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                grid = schedule.ddim_sample(ema, (samples, 3, size, size), steps=sample_steps,
                                            generator=torch.Generator().manual_seed(seed), device=device)
            save_sample_grid(grid, out.with_name(out.name + ".samples.png"))

    # 2. Train. batch_loss runs once per step, so counting its calls gives the step it draws for.
    drawing = itertools.count(step)

    def batch_loss() -> torch.Tensor:
        gen.manual_seed(derived_seed(seed, "pretrain", next(drawing)))
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        x0 = images_to_model_input(data[idx].permute(0, 2, 3, 1))
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0).to(device)
        return schedule.training_loss(model, x0, generator=gen)

    train_steps(model, ema, opt, step, steps, batch_loss, save, losses, ema_decay, checkpoint_every, device, progress,
                window)
    if step >= steps:  # already finished: a run killed after its last checkpoint may lack the files beside it
        save(step)
    return out
