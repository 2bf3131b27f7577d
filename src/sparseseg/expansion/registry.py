"""SAM backends by name: `sam.backend` in a config picks one; `describe` names the model without loading it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparseseg.config import SamExpansionConfig
from sparseseg.errors import SparsesegError
from sparseseg.expansion.base import Expander


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


def build_expander(config: SamExpansionConfig, device: torch.device | str = "cpu") -> Expander:
    """The configured SAM, loaded and ready (`SparsesegError` with one line when it cannot be)."""
    if config.backend not in BACKENDS:
        raise SparsesegError(f"sam.backend={config.backend!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[config.backend](config, device)


def describe(config: SamExpansionConfig) -> str:
    """The model name recorded with regions, e.g. 'transformers:facebook/sam-vit-base' (nothing is loaded)."""
    if config.backend == "transformers":
        from sparseseg.expansion.sam_hf import source_of

        return f"transformers:{source_of(config)}"
    from sparseseg.expansion.sam_official import model_type_of, source_of

    return f"segment_anything:{model_type_of(config)}:{source_of(config)}"
