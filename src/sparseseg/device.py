"""Where tensors go, and how much memory a phase took there."""

from __future__ import annotations

import resource

import torch

__all__ = ["resolve_device", "peak_memory_gb"]


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' means CUDA when present, else CPU; anything else is passed to torch.device."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak on a GPU, else the process's resident high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
