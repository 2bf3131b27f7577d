"""guided-diffusion's flags for ADM (Dhariwal & Nichol 2021), its two released presets, and the
download of their official checkpoints.

The flags are guided-diffusion's own (`script_util.model_and_diffusion_defaults`), so a command
line copied from its README translates one to one into an `ADMFlags`. `use_fp16` is accepted but
ignored: weights stay float32 and `ADMBackbone` chooses the precision.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
import yaml

from sparseseg.errors import SparsesegError

# guided-diffusion's `channel_mult=""` means "the default for this image_size".
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
NORM_GROUPS = 32


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


def preset_flags(name: str) -> ADMFlags:
    """The flags of a preset by name.

    Raises:
        SparsesegError: unknown name (the message lists the presets).
    """
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
