"""ADM checkpoints: reading OpenAI's plain state dicts and `sparseseg pretrain` files, checking that
the weights fit the flags, and loading them into an `ADMUNet`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseseg.backbones.adm_flags import PRESETS, ADMFlags, preset_flags
from sparseseg.backbones.adm_unet import ADMUNet
from sparseseg.errors import SparsesegError


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


def load_adm_checkpoint(
    checkpoint: str | Path, flags: ADMFlags | None = None, preset: str | None = None
) -> tuple[ADMUNet, ADMFlags, int | None]:
    """`load_adm`, plus the input size a `sparseseg pretrain` checkpoint records (None for OpenAI's).

    Returns:
        (model in eval mode on the CPU, float32; its flags; the recorded input size or None).
    """
    path = Path(checkpoint)
    if flags is not None and preset is not None:
        raise SparsesegError("pass either flags (--config) or preset (--preset), not both")
    ckpt = _read_checkpoint(path)
    if flags is None and preset is not None:
        flags = preset_flags(preset)
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
    model, flags, _ = load_adm_checkpoint(checkpoint, flags, preset)
    return model, flags


def _looks_like_diffusers(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("model_index.json", "config.json", "unet"))


def _looks_like_transformers(folder: Path) -> bool:
    """config.json with a model_type (transformers) rather than a _class_name (diffusers)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "_class_name" not in config


def adm_checkpoint_file(path: Path | None) -> Path:
    """`path` if it can be an ADM checkpoint file; a folder (a diffusers model?) gets a clear error."""
    if path is None:
        raise SparsesegError("the adm backbone needs an ADM .pt checkpoint (backbone.checkpoint, or --checkpoint)")
    if path.is_dir():
        hint = (" (it looks like a transformers model: use backbone.name=transformers)" if _looks_like_transformers(path)
                else " (it looks like a diffusers model: use backbone.name=diffusers)" if _looks_like_diffusers(path)
                else "")
        raise SparsesegError(f"{path}: a folder, but backbone.name=adm needs an ADM .pt checkpoint file{hint}")
    return path
