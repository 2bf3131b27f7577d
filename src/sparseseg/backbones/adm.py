"""ADM, the UNet of guided-diffusion (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis"), reimplemented so that OpenAI's checkpoints load key for key.

The module names and their order follow `guided_diffusion/unet.py` exactly (`time_embed`,
`input_blocks`, `middle_block`, `output_blocks`, `out`), because the state-dict keys are derived
from them. The flags are guided-diffusion's own (`script_util.model_and_diffusion_defaults`), so a
command line copied from its README translates one to one into an `ADMFlags`.

Differences from the original that do not change results:
- attention has two implementations of the same maths (`AttentionBlock.impl`): "sdpa", PyTorch's
  fused `F.scaled_dot_product_attention` (the default; flash/memory-efficient kernels on CUDA),
  and "legacy", guided-diffusion's own formulation (q and k each scaled by ch^-1/4, explicit
  (T, T) weights, softmax in float32). On CPU in float32 the two agree to the last bit in our
  tests; `ADMBackbone` uses "legacy" for its exact float32 path and "sdpa" for its fast path;
- `use_fp16` is accepted but ignored: weights stay float32 and `ADMBackbone` chooses the precision
  (bf16 autocast on CUDA, exact float32 on CPU);
- `use_checkpoint` uses `torch.utils.checkpoint`, for attention blocks too only when asked
  (guided-diffusion always checkpoints attention, which only trades memory for time).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparseseg.backbones.base import FeatureInfo
from sparseseg.backbones.diffusion import NoiseSchedule
from sparseseg.errors import SparsesegError

# guided-diffusion's `channel_mult=""` means "the default for this image_size".
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
NORM_GROUPS = 32


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


def _parse_numbers(text: str, kind: type, name: str) -> tuple:
    """'32,16,8' -> (32, 16, 8); raises ValueError naming the flag on junk."""
    try:
        values = tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers such as '32,16,8', got {text!r}") from None
    if any(v <= 0 for v in values):
        raise ValueError(f"{name} must be positive, got {text!r}")
    return values


class ADMFlags(pydantic.BaseModel):
    """guided-diffusion's model and diffusion flags, with its names and defaults.

    Unknown keys are rejected (a misspelled key would otherwise silently run on a default).
    `use_fp16` is recorded but ignored (see the module docstring); `timestep_respacing`,
    `use_kl`, `predict_xstart`, `rescale_timesteps` and `rescale_learned_sigmas` concern sampling
    or the original training loss and are recorded only: sparseseg feeds raw integer timesteps
    of the full `diffusion_steps` schedule.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    # model
    image_size: int = pydantic.Field(64, gt=0)
    num_channels: int = pydantic.Field(128, gt=0)
    num_res_blocks: int = pydantic.Field(2, gt=0)
    num_heads: int = pydantic.Field(4, gt=0)
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    attention_resolutions: str = "16,8"
    channel_mult: str = ""
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    class_cond: bool = False
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    # diffusion
    learn_sigma: bool = False
    diffusion_steps: int = pydantic.Field(1000, gt=0)
    noise_schedule: Literal["linear", "cosine"] = "linear"
    timestep_respacing: str = ""
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    rescale_learned_sigmas: bool = False

    @pydantic.field_validator("attention_resolutions", "channel_mult", mode="before")
    @classmethod
    def _join_lists(cls, value: Any) -> Any:
        # YAML turns `16` into an int and `[32, 16, 8]` into a list; accept both spellings.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return value

    @pydantic.model_validator(mode="after")
    def _check_architecture(self) -> ADMFlags:
        mults = self.channel_mults()
        attention_ds = set(self.attention_downsample_rates())
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        if self.num_heads_upsample != -1 and self.num_heads_upsample <= 0:
            raise ValueError("num_heads_upsample must be -1 (same as num_heads) or positive")
        if self.num_head_channels != -1 and self.num_head_channels <= 0:
            raise ValueError("num_head_channels must be -1 (use num_heads) or positive")
        for level, mult in enumerate(mults):
            ch = int(mult * self.num_channels)
            if ch % NORM_GROUPS:
                raise ValueError(
                    f"num_channels={self.num_channels} x channel_mult {mult} = {ch} channels, "
                    f"not a multiple of {NORM_GROUPS} (GroupNorm groups)"
                )
            is_middle = level == len(mults) - 1
            if 2**level in attention_ds or is_middle:
                if self.num_head_channels != -1:
                    if ch % self.num_head_channels:
                        raise ValueError(
                            f"attention at {ch} channels is not divisible by num_head_channels={self.num_head_channels}"
                        )
                elif ch % self.num_heads or ch % heads_up:
                    raise ValueError(f"attention at {ch} channels is not divisible by num_heads")
        return self

    def channel_mults(self) -> tuple[float, ...]:
        """Per-level channel multipliers, resolving `channel_mult=""` from `image_size`."""
        if self.channel_mult == "":
            if self.image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"channel_mult is empty and image_size={self.image_size} has no default; "
                    f"set channel_mult or use image_size in {sorted(DEFAULT_CHANNEL_MULT)}"
                )
            return DEFAULT_CHANNEL_MULT[self.image_size]
        mults = _parse_numbers(self.channel_mult, float, "channel_mult")
        return tuple(int(m) if m.is_integer() else m for m in mults)

    def attention_downsample_rates(self) -> tuple[int, ...]:
        """Downsampling factors with attention, parsed as guided-diffusion does: image_size // res."""
        if self.attention_resolutions == "":
            return ()
        resolutions = _parse_numbers(self.attention_resolutions, int, "attention_resolutions")
        return tuple(self.image_size // res for res in resolutions)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> ADMFlags:
        """Validates a mapping of flags, turning any problem into a one-line `SparsesegError`.

        Args:
            data: flag name -> value.
            source: what to name in the message (a file path, "checkpoint x.pt").

        Raises:
            SparsesegError: unknown key (with the closest valid name), wrong type or value.
        """
        try:
            return cls(**data)
        except pydantic.ValidationError as err:
            raise SparsesegError(f"{source}: {_describe_validation_error(err)}") from None
        except TypeError as err:  # keys that are not strings
            raise SparsesegError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ADMFlags:
        """Reads flags from a JSON or YAML file.

        The file holds a mapping of guided-diffusion flags. The layout of the conformance fixture
        (flags nested under a `guided_diffusion_flags` key beside other entries) is also accepted.

        Raises:
            SparsesegError: missing or unparsable file, not a mapping, unknown key or bad value.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise SparsesegError(f"{path}: cannot read flags file ({err.strerror or err})") from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SparsesegError(f"{path}: not valid JSON/YAML ({first_line})") from None
        if isinstance(data, dict) and isinstance(data.get("guided_diffusion_flags"), dict):
            data = data["guided_diffusion_flags"]
        if not isinstance(data, dict):
            raise SparsesegError(
                f"{path}: expected a mapping of guided-diffusion flags, got {type(data).__name__}"
            )
        return cls.from_mapping(data, source=str(path))


def _describe_validation_error(err: pydantic.ValidationError) -> str:
    """The first few pydantic errors as one line, naming each key and suggesting close names."""
    parts = []
    for e in err.errors()[:3]:
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, ADMFlags.model_fields, n=1)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; valid keys: {', '.join(ADMFlags.model_fields)}"
            )
            parts.append(f"unknown key {key!r}{hint}")
        elif key:
            parts.append(f"key {key!r}: {e['msg']} (got {e.get('input')!r})")
        else:
            parts.append(e["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


_ADM_256 = dict(
    attention_resolutions="32,16,8",
    class_cond=False,
    diffusion_steps=1000,
    image_size=256,
    learn_sigma=True,
    noise_schedule="linear",
    num_channels=256,
    num_head_channels=64,
    num_res_blocks=2,
    resblock_updown=True,
    use_fp16=False,
    use_scale_shift_norm=True,
)

PRESETS: dict[str, ADMFlags] = {
    # 256x256_diffusion_uncond.pt: unconditional ImageNet (flags from guided-diffusion's README).
    "imagenet_256": ADMFlags(**_ADM_256),
    # lsun_bedroom.pt: the README's LSUN flags add dropout 0.1 (no effect in eval mode).
    "lsun_bedroom": ADMFlags(**{**_ADM_256, "dropout": 0.1}),
}

PRESET_URLS: dict[str, str] = {
    "imagenet_256": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
    "lsun_bedroom": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/lsun_bedroom.pt",
}


def _preset_flags(name: str) -> ADMFlags:
    if name not in PRESETS:
        raise SparsesegError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def download_preset(name: str, dest_dir: str | Path) -> Path:
    """Fetches a preset's official OpenAI checkpoint unless it is already in `dest_dir`.

    Args:
        name: a key of `PRESET_URLS`.
        dest_dir: folder for the file (created if missing); the file keeps its original name.

    Returns:
        Path of the checkpoint.

    Raises:
        SparsesegError: unknown preset, or the download failed (e.g. offline); the message says
            which URL to fetch by hand and where to put it.
    """
    if name not in PRESET_URLS:
        raise SparsesegError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_URLS)}")
    url = PRESET_URLS[name]
    dest = Path(dest_dir) / url.rsplit("/", 1)[1]
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Writes to a temporary file and renames it, so a failed download leaves nothing at dest.
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except OSError as err:  # URLError, HTTPError and socket errors are all OSErrors
        raise SparsesegError(
            f"cannot download {url} ({err}); fetch it by hand and save it as {dest}"
        ) from None
    return dest


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialises a module: residual branches start as the identity (as in guided-diffusion)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly fractional) timesteps, cosines first.

    Args:
        timesteps: (N,) timesteps.
        dim: embedding width.
        max_period: sets the lowest frequency.

    Returns:
        (N, dim) float32 embeddings.
    """
    half = dim // 2
    # Computed in the same order as guided-diffusion so that float32 rounding matches.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A module whose forward also takes the (N, emb) timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution, or by average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling by 2.

    With `use_scale_shift_norm` the embedding gives a scale and shift applied after the second
    GroupNorm (FiLM); otherwise it is added before it. With `up`/`down` both the branch and the
    skip path are resampled between the first norm+SiLU and the first convolution.

    Args:
        channels: input channels.
        emb_channels: timestep-embedding width.
        dropout: dropout rate before the second convolution.
        out_channels: output channels (default: `channels`); a 1x1 conv adapts the skip path.
        use_scale_shift_norm: FiLM conditioning.
        use_checkpoint: gradient checkpointing while training.
        up: upsample 2x (nearest).
        down: downsample 2x (average pooling).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), (N, emb) -> (N, C_out, H', W')."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample after norm+SiLU but before the conv, on both paths.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    Args:
        channels: input and output channels.
        num_heads: heads, used when `num_head_channels` is -1.
        num_head_channels: fixed width per head (then heads = channels // num_head_channels).
        use_checkpoint: gradient checkpointing while training.
        use_new_attention_order: split the qkv projection into q, k, v before splitting heads
            (`QKVAttention`); the legacy order (`QKVAttentionLegacy`, used by OpenAI's released
            checkpoints) splits heads first, so each head's q, k, v are contiguous.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.new_order = use_new_attention_order
        self.impl = "sdpa"  # or "legacy"; see ATTENTION_IMPLS and ADMUNet.set_attention
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        heads, ch, length = self.num_heads, c // self.num_heads, x.shape[-1]
        if self.new_order:
            q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        if self.impl == "legacy":
            a = legacy_attention(q, k, v)
        else:
            # SDPA scales by 1/sqrt(ch), the same as guided-diffusion's ch^-1/4 on both q and k.
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            a = a.transpose(1, 2)
        h = self.proj_out(a.reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


#: Attention implementations of `AttentionBlock` (same maths; see the module docstring).
ATTENTION_IMPLS = ("sdpa", "legacy")


def legacy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention as guided-diffusion computes it, for (N, ch, T) queries, keys and values.

    q and k are each scaled by ch^-1/4 before their product (for float16 headroom), the (N, T, T)
    weights are materialised and normalised by a softmax in float32, then cast back.

    Returns:
        (N, ch, T).
    """
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[1]))
    weights = torch.einsum("nct,ncs->nts", q * scale, k * scale)
    weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
    return torch.einsum("nts,ncs->nct", weights, v)


# --------------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------------


class ADMUNet(nn.Module):
    """guided-diffusion's `UNetModel` (2-D, RGB in), built from `ADMFlags`.

    Fully convolutional: any input whose side is a multiple of `size_divisor` works, whatever
    `image_size` (which, as in guided-diffusion, only selects the default channel_mult and turns
    attention_resolutions into downsampling rates).

    Attributes:
        flags: the flags it was built from.
        size_divisor: 2 ** (levels - 1); input sides must be multiples of it.
        output_block_channels: channels of each `output_blocks[i]` output.
        output_block_reductions: input side / output side of each `output_blocks[i]` output.
    """

    def __init__(self, flags: ADMFlags) -> None:
        super().__init__()
        self.flags = flags
        mc = flags.num_channels
        mults = flags.channel_mults()
        attention_ds = set(flags.attention_downsample_rates())
        heads_up = flags.num_heads if flags.num_heads_upsample == -1 else flags.num_heads_upsample
        emb_dim = mc * 4
        self.model_channels = mc
        self.size_divisor = 2 ** (len(mults) - 1)
        self.num_classes = 1000 if flags.class_cond else None

        def res(ch: int, out: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch, emb_dim, flags.dropout, out, flags.use_scale_shift_norm, flags.use_checkpoint, up, down
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch, heads, flags.num_head_channels, flags.use_checkpoint, flags.use_new_attention_order
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, emb_dim)

        # 1. Encoder: per level, num_res_blocks ResBlocks (+ attention), then a downsample.
        ch = input_ch = int(mults[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(mults):
            for _ in range(flags.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in attention_ds:
                    layers.append(attn(ch, flags.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(mults) - 1:
                down = res(ch, ch, down=True) if flags.resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        # 2. Bottleneck.
        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, flags.num_heads), res(ch))

        # 3. Decoder: per level (deepest first), num_res_blocks + 1 ResBlocks fed with the skips.
        self.output_blocks = nn.ModuleList()
        channels, reductions = [], []
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(flags.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in attention_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == flags.num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if flags.resblock_updown else Upsample(ch, use_conv=True)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                channels.append(ch)
                reductions.append(ds)
        self.output_block_channels = tuple(channels)
        self.output_block_reductions = tuple(reductions)

        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, 6 if flags.learn_sigma else 3, 3, padding=1))
        )

    def _embed(self, timesteps: torch.Tensor | int, batch: int, y: torch.Tensor | None) -> torch.Tensor:
        if (y is None) != (self.num_classes is None):
            raise SparsesegError("class labels y must be given if and only if the model is class_cond")
        t = torch.as_tensor(timesteps, device=self.time_embed[0].weight.device)
        t = t.expand(batch) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        return emb

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the encoder and the bottleneck; returns the bottleneck output and the skips."""
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), skips

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | int, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicts the noise (and the variance interpolation values with learn_sigma).

        Args:
            x: (N, 3, H, W) noisy images x_t; H and W multiples of `size_divisor`.
            timesteps: (N,) raw integer timesteps (or one int for the batch), not rescaled.
            y: (N,) class labels, only for class_cond models.

        Returns:
            (N, 6 or 3, H, W): epsilon in channels 0-2, then the learned variance values.
        """
        emb = self._embed(timesteps, x.shape[0], y)
        h, skips = self._encode(x, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def forward_blocks(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | int,
        blocks: Sequence[int],
        y: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Decoder activations, stopping after the deepest requested block.

        Args:
            x: (N, 3, H, W) noisy images x_t.
            timesteps: (N,) raw integer timesteps (or one int for the batch).
            blocks: indices into `output_blocks`.
            y: (N,) class labels, only for class_cond models.

        Returns:
            block -> (N, output_block_channels[block], H / r, W / r) with
            r = output_block_reductions[block]: the output of `output_blocks[block]`, after its
            upsampling layer where it has one. Later blocks and `out` are not run.
        """
        self.check_blocks(blocks)
        wanted = set(blocks)
        last = max(wanted)
        emb = self._embed(timesteps, x.shape[0], y)
        h, skips = self._encode(x, emb)
        found = {}
        for i, module in enumerate(self.output_blocks[: last + 1]):
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            if i in wanted:
                found[i] = h
        return {b: found[b] for b in blocks}

    def set_attention(self, impl: str) -> None:
        """Selects the attention implementation of every `AttentionBlock` ("sdpa" or "legacy")."""
        if impl not in ATTENTION_IMPLS:
            raise SparsesegError(f"attention {impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.impl = impl

    def check_blocks(self, blocks: Sequence[int]) -> None:
        """Raises SparsesegError unless `blocks` is a non-empty list of valid decoder indices."""
        n = len(self.output_blocks)
        bad = [b for b in blocks if not 0 <= b < n]
        if not blocks or bad:
            raise SparsesegError(
                f"blocks {list(blocks)}: expected output_blocks indices in 0..{n - 1} "
                f"(this architecture has {n} decoder blocks)"
            )


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    state: dict[str, torch.Tensor]
    flags: dict[str, Any] | None  # recorded by `pretrain`; None for OpenAI's plain state dicts
    input_size: int | None


def _read_checkpoint(path: Path) -> _Checkpoint:
    if not path.is_file():
        raise SparsesegError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (pickle, zip, EOF, runtime) on corrupt files
        first = str(err).splitlines()[0] if str(err) else ""
        raise SparsesegError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {first[:200]})"
        ) from None
    if isinstance(obj, dict) and "sparseseg_adm" in obj:
        if obj["sparseseg_adm"] != 1 or not isinstance(obj.get("flags"), dict):
            raise SparsesegError(
                f"{path}: unsupported or damaged sparseseg checkpoint (version {obj['sparseseg_adm']!r})"
            )
        state = obj["ema"] if obj.get("ema") is not None else obj["model"]
        return _Checkpoint(state, obj["flags"], obj.get("input_size"))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _Checkpoint(dict(obj), None, None)
    raise SparsesegError(f"{path}: not an ADM state dict nor a sparseseg pretrain checkpoint")


def _check_fits(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path, flags: ADMFlags) -> None:
    """One-line report of the first missing/unexpected keys and shape mismatches, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f", ... {len(items) - 5} more" if len(items) > 5 else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:5])}{more})")
    # The first and last layers reveal the width and learn_sigma: worth saying, as they are the
    # flags most often wrong.
    seen = []
    if "time_embed.0.weight" in state and state["time_embed.0.weight"].ndim == 2:
        seen.append(f"num_channels={state['time_embed.0.weight'].shape[1]}")
    if "out.2.weight" in state:
        seen.append(f"learn_sigma={state['out.2.weight'].shape[0] == 6}")
    hint = f" (the checkpoint looks like {', '.join(seen)})" if seen else ""
    raise SparsesegError(
        f"{path} does not fit the flags (num_channels={flags.num_channels}, channel_mult={flags.channel_mults()}, "
        f"num_res_blocks={flags.num_res_blocks}, learn_sigma={flags.learn_sigma}): {'; '.join(parts)}. "
        f"Check --preset/--config{hint}."
    )


def _load(
    checkpoint: str | Path, flags: ADMFlags | None, preset: str | None
) -> tuple[ADMUNet, ADMFlags, int | None]:
    path = Path(checkpoint)
    if flags is not None and preset is not None:
        raise SparsesegError("pass either flags (--config) or preset (--preset), not both")
    ckpt = _read_checkpoint(path)
    if flags is None and preset is not None:
        flags = _preset_flags(preset)
    if flags is None:
        if ckpt.flags is None:
            raise SparsesegError(
                f"{path} is a plain state dict that does not record its architecture; "
                f"pass --preset ({', '.join(PRESETS)}) or --config FLAGS.yaml"
            )
        flags = ADMFlags.from_mapping(ckpt.flags, source=f"{path} (recorded flags)")
    # Build without allocating, then adopt the checkpoint's tensors (saves memory and init time
    # for the 550M-parameter ADM-256).
    with torch.device("meta"):
        model = ADMUNet(flags)
    _check_fits(ckpt.state, model, path, flags)
    state = {k: v.to(torch.float32) for k, v in ckpt.state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval(), flags, ckpt.input_size


def load_adm(
    checkpoint: str | Path, flags: ADMFlags | None = None, preset: str | None = None
) -> tuple[ADMUNet, ADMFlags]:
    """Loads an OpenAI guided-diffusion checkpoint or one written by `pretrain_adm`.

    Args:
        checkpoint: a plain state dict (OpenAI's `.pt`), or a sparseseg pretrain checkpoint
            (its EMA weights are preferred when present).
        flags: architecture, overriding any flags recorded in the checkpoint.
        preset: name in `PRESETS`, an alternative to `flags`.

    Returns:
        (model in eval mode on the CPU, float32; the flags it was built from).

    Raises:
        SparsesegError: missing/corrupt file, no flags for a plain state dict, or weights that do
            not fit the flags (the message lists the first mismatching keys).
    """
    model, flags, _ = _load(checkpoint, flags, preset)
    return model, flags


# --------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------


class ADMBackbone:
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
        if not timesteps or any(not 0 <= t < flags.diffusion_steps for t in timesteps):
            raise SparsesegError(
                f"timesteps {list(timesteps)}: expected values in 0..{flags.diffusion_steps - 1}"
            )
        model.check_blocks(blocks)
        if input_size <= 0 or input_size % model.size_divisor:
            raise SparsesegError(
                f"input_size {input_size}: must be a positive multiple of {model.size_divisor} "
                f"for this architecture ({len(flags.channel_mults())} levels)"
            )
        self.device = torch.device(device)
        self.fast = self.device.type == "cuda" if fast is None else fast
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
        self.timesteps = [int(t) for t in timesteps]
        self.blocks = [int(b) for b in blocks]
        self.input_size = input_size
        self.noise_seed = noise_seed
        self.feature_info = [
            FeatureInfo(
                num_chs=model.output_block_channels[b],
                reduction=model.output_block_reductions[b],
                block=b,
                timestep=t,
            )
            for t in self.timesteps
            for b in self.blocks
        ]

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
        model, flags, recorded_size = _load(checkpoint, flags, preset)
        size = input_size or recorded_size or flags.image_size
        return cls(model, flags, timesteps, blocks, size, device=device, fast=fast, compile=compile)

    def _default_noise(self) -> torch.Tensor:
        """(1, 3, S, S) fixed noise shared by all images, as the reference code does."""
        gen = torch.Generator().manual_seed(self.noise_seed)
        return torch.randn((1, 3, self.input_size, self.input_size), generator=gen)

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
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise SparsesegError(f"images of shape {tuple(images.shape)}: expected (B, 3, {s}, {s})")
        noise = self._default_noise() if noise is None else noise
        if (
            noise.ndim != 4
            or tuple(noise.shape[1:]) != (3, s, s)
            or noise.shape[0] not in (1, images.shape[0])
        ):
            raise SparsesegError(f"noise of shape {tuple(noise.shape)}: expected (B or 1, 3, {s}, {s})")
        b = images.shape[0]
        images = images.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        # One forward for all timesteps: (T*B, 3, S, S), timestep-major.
        x_t = torch.cat([self.schedule.q_sample(images, t, noise) for t in self.timesteps])
        t = torch.tensor(self.timesteps, device=self.device).repeat_interleave(b)
        if self.fast:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        self.model.set_attention(self.attention)  # the model may be shared with another backbone
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast):
            maps = self._forward_blocks(x_t, t, self.blocks)
        return [
            maps[blk][i * b : (i + 1) * b].float() for i in range(len(self.timesteps)) for blk in self.blocks
        ]


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
