"""Decoder features of any DDPM saved in the diffusers format (`UNet2DModel` + its scheduler).

Where the model comes from:
- a local folder as `save_pretrained` or the Hub write it: either a pipeline folder with `unet/`
  (config.json + weights) and `scheduler/` (scheduler_config.json) subfolders, as
  google/ddpm-bedroom-256 has, or a bare UNet folder (config.json + weights at the top,
  optionally scheduler_config.json beside them);
- a Hugging Face Hub repository id (such as google/ddpm-bedroom-256), downloaded into the Hub
  cache when online. Offline, loading fails with one line saying so.

The noise process is the checkpoint's own scheduler (its `add_noise`, i.e. its betas). A folder
without a scheduler config gets diffusers' `DDPMScheduler` defaults (linear betas 1e-4..0.02 over
`num_train_timesteps` of the UNet config, else 1000 steps), the schedule DDPMs are trained with.

Features are the outputs of `unet.up_blocks[i]`, read with forward hooks. Block i returns the
decoder state after its resnets (and attentions) and, for every block but the last, after its
`upsamplers` (a 2x nearest upsample and a 3x3 conv). With L = len(block_out_channels) levels:

    up_blocks[i]: channels = reversed(block_out_channels)[i],
                  reduction = 2 ** (L - 2 - i) for i < L - 1, and 1 for the last block.

For google/ddpm-bedroom-256 (block_out_channels 128, 128, 256, 256, 512, 512; 256x256):

| block | module        | channels | map size | reduction |
| ----- | ------------- | -------- | -------- | --------- |
| 0     | `up_blocks.0` | 512      | 16       | 16        |
| 1     | `up_blocks.1` | 512      | 32       | 8         |
| 2     | `up_blocks.2` | 256      | 64       | 4         |
| 3     | `up_blocks.3` | 256      | 128      | 2         |
| 4     | `up_blocks.4` | 128      | 256      | 1         |
| 5     | `up_blocks.5` | 128      | 256      | 1         |

Defaults: for each distinct reduction the last block that has it, then the four finest of those
(bedroom: 1, 2, 3, 5, i.e. 512@32, 256@64, 256@128, 128@256, the scales of the paper's ADM
blocks); timesteps: the paper's 50, 150, 250 scaled to the scheduler's `num_train_timesteps`.
All timesteps go through the UNet as one batch, and the forward pass stops after the deepest
requested block.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparseseg.backbones.base import check_input_size
from sparseseg.backbones.diffusion_backbone import DiffusionBackbone, check_timesteps
from sparseseg.errors import SparsesegError
from sparseseg.io import read_json_object

if TYPE_CHECKING:
    from sparseseg.config import BackboneConfig

PAPER_TIMESTEPS = (50, 150, 250)  # for a 1000-step schedule
DEFAULT_NUM_BLOCKS = 4
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LAYOUT_HELP = "expected config.json (+ weights) or unet/config.json, as written by save_pretrained"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "~"))


def _hub_snapshot(repo_id: str) -> Path:
    """The JSON files of a Hub repository (configs only: a few KB), in the Hub cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json"]))
    except Exception as err:  # offline, unknown repo, gated repo, ...: all mean "cannot fetch"
        raise SparsesegError(
            f"{repo_id}: not a local folder and cannot be fetched from the Hugging Face Hub ({_first_line(err)}); "
            f"download it while online or give a local diffusers folder as backbone.checkpoint"
        ) from None


def _unet_subfolder(folder: Path, where: str) -> str | None:
    """'unet' for a pipeline layout, None for a bare UNet folder; checks the class name."""
    if (folder / "unet" / "config.json").is_file():
        sub, config_path = "unet", folder / "unet" / "config.json"
    elif (folder / "config.json").is_file():
        sub, config_path = None, folder / "config.json"
    else:
        raise SparsesegError(f"{where}: no diffusers UNet found ({_LAYOUT_HELP})")
    cls = read_json_object(config_path).get("_class_name")
    if cls != "UNet2DModel":
        shown = where if sub is None else f"{where}/unet"
        raise SparsesegError(
            f"{shown}/config.json: the model is {cls or 'not a diffusers model'}; only UNet2DModel "
            f"(unconditional pixel-space DDPMs) is supported"
        )
    return sub


def _scheduler(folder: Path, num_train_timesteps: int | None, where: str):
    """The checkpoint's own scheduler, or DDPM defaults when the folder has none."""
    import diffusers

    if (folder / "scheduler" / "scheduler_config.json").is_file():
        sub, config_path = "scheduler", folder / "scheduler" / "scheduler_config.json"
    elif (folder / "scheduler_config.json").is_file():
        sub, config_path = None, folder / "scheduler_config.json"
    else:
        return diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps or 1000)
    name = read_json_object(config_path).get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "add_noise"):
        raise SparsesegError(f"{config_path}: scheduler {name!r} has no add_noise; expected a DDPM-style scheduler")
    try:
        # The JSON is already local (a folder, or the Hub snapshot of the configs).
        return cls.from_pretrained(str(folder), subfolder=sub)
    except Exception as err:
        raise SparsesegError(f"{where}: cannot load the scheduler ({_first_line(err)})") from None


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silences diffusers' logging while loading: every problem becomes our own one-line error,
    and a successful load of a .bin-only folder would otherwise log an ERROR about safetensors."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def load_diffusers_unet(source: str | Path) -> tuple[nn.Module, Any]:
    """Loads a diffusers `UNet2DModel` and its noise scheduler.

    Args:
        source: a local folder (a `Path` is always taken as local), or a Hub repository id
            "owner/name" when no such folder exists.

    Returns:
        (UNet2DModel in eval mode on the CPU, float32, frozen; its scheduler).

    Raises:
        SparsesegError: missing folder, a file instead of a folder, another model class, weights
            that do not load, or a Hub id that cannot be fetched (offline).
    """
    from diffusers import UNet2DModel

    text = str(source)
    path = Path(text).expanduser()
    hub = not path.exists() and not isinstance(source, Path) and _looks_like_hub_id(text)
    if hub:
        folder, where, load_from = _hub_snapshot(text), text, text
    else:
        if not path.exists():
            raise SparsesegError(f"{path}: diffusers model folder not found")
        if path.is_file():
            raise SparsesegError(
                f"{path}: a file, not a diffusers folder ({_LAYOUT_HELP}); "
                f"an ADM .pt checkpoint needs backbone.name=adm"
            )
        folder, where, load_from = path, str(path), str(path)
    sub = _unet_subfolder(folder, where)
    try:
        with _quiet_diffusers():
            unet, loading = UNet2DModel.from_pretrained(load_from, subfolder=sub, low_cpu_mem_usage=False,
                                                        output_loading_info=True)
    except Exception as err:  # missing or corrupt weights, shape mismatches, download failure
        raise SparsesegError(f"{where}: cannot load the UNet2DModel ({_first_line(err)})") from None
    # diffusers only warns about these and leaves the missing layers random: refuse instead.
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(loading.get(kind) or [])
        if keys:
            more = f", ... {len(keys) - 3} more" if len(keys) > 3 else ""
            raise SparsesegError(
                f"{where}: the weights do not fit the UNet config: {len(keys)} {kind.replace('_', ' ')} "
                f"({', '.join(keys[:3])}{more})"
            )
    unet = unet.float().eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    scheduler = _scheduler(folder, unet.config.num_train_timesteps, where)
    return unet, scheduler


def size_divisor(unet: nn.Module) -> int:
    """2 ** (number of downsampling blocks): input sides must be multiples of it."""
    return 2 ** sum(getattr(block, "downsamplers", None) is not None for block in unet.down_blocks)


def up_block_info(unet: nn.Module) -> list[tuple[int, int]]:
    """(channels, reduction) of the output of every `unet.up_blocks[i]`, read from the modules."""
    divisor, info, ups = size_divisor(unet), [], 0
    for block in unet.up_blocks:
        ups += getattr(block, "upsamplers", None) is not None
        info.append((int(block.resnets[-1].out_channels), divisor // 2**ups))
    return info


def default_blocks(info: Sequence[tuple[int, int]], count: int = DEFAULT_NUM_BLOCKS) -> tuple[int, ...]:
    """The last block at each distinct reduction, the `count` finest of them, in order."""
    last = {reduction: i for i, (_, reduction) in enumerate(info)}
    return tuple(sorted(sorted(last.values(), key=lambda i: info[i][1])[:count]))


def default_timesteps(num_train_timesteps: int) -> tuple[int, ...]:
    """The paper's 50, 150, 250 of 1000 steps, scaled to this schedule's length."""
    scaled = (round(t * num_train_timesteps / 1000) for t in PAPER_TIMESTEPS)
    return tuple(dict.fromkeys(min(max(t, 0), num_train_timesteps - 1) for t in scaled))


class _Stop(Exception):
    """Raised by the hook of the deepest wanted block: the rest of the decoder is not needed."""


class DiffusersUNetBackbone(DiffusionBackbone):
    """`up_blocks` activations of a diffusers UNet2DModel at several timesteps: a `FeatureBackbone`.

    Each image is noised with the scheduler's `add_noise` at every timestep using the same noise
    tensor; all timesteps go through the UNet as one batch.

    Args:
        unet: a `UNet2DModel` (moved to `device`, eval mode).
        scheduler: a diffusers scheduler with `add_noise` and `alphas_cumprod`.
        timesteps: training timesteps, each in 0..num_train_timesteps-1; None: `default_timesteps`.
        blocks: indices into `unet.up_blocks`; None: `default_blocks`.
        input_size: side of the square input, a multiple of 2 ** (number of downsamplers);
            None: the UNet config's `sample_size`.
        device: where to run.
        fast: bf16 autocast and channels_last; default on CUDA only (CPU stays exact float32).
        noise_seed: seeds the fixed noise used when `extract` gets `noise=None`.

    Raises:
        SparsesegError: bad timesteps, blocks or input size, or a class-conditional UNet.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        timesteps: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        input_size: int | None = None,
        device: str | torch.device = "cpu",
        fast: bool | None = None,
        noise_seed: int = 0,
    ) -> None:
        if getattr(unet, "class_embedding", None) is not None:
            raise SparsesegError("class-conditional UNet2DModel: use an unconditional DDPM")
        if unet.config.in_channels != 3:
            raise SparsesegError(
                f"UNet2DModel with in_channels={unet.config.in_channels}: expected an RGB pixel-space model (3)"
            )
        steps = int(scheduler.config.num_train_timesteps)
        timesteps = check_timesteps(default_timesteps(steps) if timesteps is None else timesteps, steps,
                                    " (this scheduler)")
        self.block_info = up_block_info(unet)
        n = len(self.block_info)
        blocks = default_blocks(self.block_info) if blocks is None else tuple(int(b) for b in blocks)
        if not blocks or any(not 0 <= b < n for b in blocks) or len(set(blocks)) != len(blocks):
            raise SparsesegError(
                f"blocks {list(blocks)}: expected distinct up_blocks indices in 0..{n - 1} "
                f"({', '.join(f'{i}: {c}@1/{r}' for i, (c, r) in enumerate(self.block_info))})"
            )
        sample = unet.config.sample_size
        native = sample if isinstance(sample, int) else (sample[0] if sample else None)
        size = check_input_size(input_size or native, size_divisor(unet),
                                f"for this UNet ({len(unet.down_blocks)} levels); set backbone.input_size")
        self._set_features(timesteps, blocks, self.block_info, size, device, fast, noise_seed)
        self.unet = unet.to(self.device).eval()
        if self.fast:
            self.unet.to(memory_format=torch.channels_last)
        self.scheduler = scheduler

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        timesteps: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        input_size: int | None = None,
        device: str | torch.device = "cpu",
        fast: bool | None = None,
    ) -> DiffusersUNetBackbone:
        """Loads a folder or Hub id (see `load_diffusers_unet`) and wraps it."""
        unet, scheduler = load_diffusers_unet(source)
        return cls(unet, scheduler, timesteps, blocks, input_size, device=device, fast=fast)

    def noisy_inputs(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = the scheduler's add_noise for every timestep, timestep-major: ((T*B, 3, S, S), (T*B,))."""
        b = images.shape[0]
        noise = noise.expand_as(images)
        t = torch.tensor(self.timesteps, device=self.device, dtype=torch.long).repeat_interleave(b)
        x_t = self.scheduler.add_noise(images.repeat(len(self.timesteps), 1, 1, 1),
                                       noise.repeat(len(self.timesteps), 1, 1, 1), t)
        return x_t, t

    def _decoder_maps(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[int, torch.Tensor]:
        """The `up_blocks` outputs, read by forward hooks; the hook of the deepest one stops the pass."""
        found: dict[int, torch.Tensor] = {}
        last = max(self.blocks)

        def hook(index: int):
            def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
                # Skip-style blocks (score-SDE UNets) return (sample, skip_sample).
                found[index] = output[0] if isinstance(output, tuple) else output
                if index == last:
                    raise _Stop

            return keep

        handles = [self.unet.up_blocks[i].register_forward_hook(hook(i)) for i in self.blocks]
        try:
            self.unet(x_t, t, return_dict=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return found


def build(config: BackboneConfig, device: str | torch.device, default_size: int) -> DiffusersUNetBackbone:
    """`backbone.name=diffusers`: a local folder (`checkpoint`) or a Hub id (`hub_id`).

    The input size is `config.input_size`, else the UNet's `sample_size`, else `default_size`.
    """
    # A Path is always read as a local folder; a hub id may also name a folder in the Hub cache.
    unet, scheduler = load_diffusers_unet(config.checkpoint if config.checkpoint is not None else config.hub_id)
    size = config.input_size or (None if unet.config.sample_size else default_size)
    return DiffusersUNetBackbone(unet, scheduler, config.timesteps, config.blocks, size, device=device)
