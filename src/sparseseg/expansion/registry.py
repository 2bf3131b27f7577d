"""Expansion backends by name: a config's `expansion` picks SAM or superpixels, and `sam.backend` /
`superpixel.method` the backend within; `describe` names the model without loading it.

`expansion_of(config)` is what the loops read: the active section with its keep threshold, training
draw and the name recorded with every region, for any config that has `expansion`, `sam` and
`superpixel` (an experiment's or a project's).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sparseseg.config import BackboneConfig, SamExpansionConfig, SuperpixelConfig
from sparseseg.errors import SparsesegError
from sparseseg.expansion.base import Expander

if TYPE_CHECKING:
    from sparseseg.features.store import FeatureStore

SUPERPIXEL_TAU = 0.0  # superpixel proposals have score 1 and are all kept


def _transformers(config: SamExpansionConfig, device: torch.device | str) -> Expander:
    from sparseseg.expansion.sam_hf import load_transformers_sam

    return load_transformers_sam(config, device)


def _segment_anything(config: SamExpansionConfig, device: torch.device | str) -> Expander:
    from sparseseg.expansion.sam_official import load_official_sam  # segment_anything imported only here

    return load_official_sam(config, device)


BACKENDS: dict[str, Callable[[SamExpansionConfig, torch.device | str], Expander]] = {
    "transformers": _transformers,
    "segment_anything": _segment_anything,
}


def build_expander(config: SamExpansionConfig | SuperpixelConfig, device: torch.device | str = "cpu",
                   features: FeatureStore | None = None, backbone: str | None = None) -> Expander:
    """The configured backend, loaded and ready (`SparsesegError` with one line when it cannot be).

    Args:
        config: the `sam` or the `superpixel` section.
        device: where SAM runs.
        features: `superpixel.method=feature` only: the feature store over the images to expand.
        backbone: `superpixel.method=feature` only: `backbone_tag` of the features, part of the name.
    """
    if isinstance(config, SuperpixelConfig):
        from sparseseg.expansion.superpixel import SuperpixelExpander

        return SuperpixelExpander(config, features, backbone)
    if config.backend not in BACKENDS:
        raise SparsesegError(f"sam.backend={config.backend!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[config.backend](config, device)


def describe(config: SamExpansionConfig | SuperpixelConfig, backbone: str | None = None) -> str:
    """The model name recorded with regions, e.g. 'transformers:facebook/sam-vit-base' or
    'superpixel:slic(n_segments=400,...)' (nothing is loaded)."""
    if isinstance(config, SuperpixelConfig):
        from sparseseg.expansion.superpixel import describe as describe_superpixel

        return describe_superpixel(config, backbone)
    if config.backend == "transformers":
        from sparseseg.expansion.sam_hf import source_of

        return f"transformers:{source_of(config)}"
    from sparseseg.expansion.sam_official import model_type_of, source_of

    return f"segment_anything:{model_type_of(config)}:{source_of(config)}"


def backbone_tag(config: BackboneConfig) -> str:
    """A short tag of the settings that fix the backbone's features, 'NAME#HASH' (8 hex digits; the hash
    leaves out where and how fast it runs)."""
    settings = config.model_dump(mode="json", exclude={"device", "batch_size"})
    return f"{config.name}#{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Expansion:
    """The configured expansion: `method` ("sam" or "superpixel"), its config section, and for
    regions grown in feature space the `backbone_tag` of the features."""

    method: str
    section: SamExpansionConfig | SuperpixelConfig
    backbone: str | None = None

    @property
    def model(self) -> str:
        """Recorded with every region (run files, project database)."""
        return describe(self.section, self.backbone)

    @property
    def tau(self) -> float:
        """The keep threshold on a proposal's score (SAM: `sam.tau`; superpixels keep every region)."""
        return self.section.tau if isinstance(self.section, SamExpansionConfig) else SUPERPIXEL_TAU

    @property
    def max_region_pixels(self) -> int:
        return self.section.max_region_pixels

    @property
    def region_weight(self) -> float:
        return self.section.region_weight

    @property
    def needs_features(self) -> bool:
        """Whether `build` needs the feature store (regions grown in backbone-feature space)."""
        return isinstance(self.section, SuperpixelConfig) and self.section.method == "feature"

    def build(self, device: torch.device | str = "cpu", features: FeatureStore | None = None) -> Expander:
        return build_expander(self.section, device, features, self.backbone)

    def record(self) -> dict[str, Any]:
        """What meta.json says about it: method, model and every setting of the section (superpixel's own
        `method` as `superpixel_method`)."""
        settings = {("superpixel_method" if k == "method" else k): v
                    for k, v in self.section.model_dump(mode="json").items()}
        return {"method": self.method, "model": self.model, **settings}


def expansion_of(config: Any) -> Expansion | None:
    """The expansion a config asks for (`config.expansion` and its section), None for `none`."""
    if config.expansion == "none":
        return None
    section = getattr(config, config.expansion)
    feature = isinstance(section, SuperpixelConfig) and section.method == "feature"
    return Expansion(config.expansion, section, backbone_tag(config.backbone) if feature else None)
