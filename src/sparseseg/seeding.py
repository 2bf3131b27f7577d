"""Derived seeds: every random draw is seeded by what it is for, never by the order things happen in.

A seed is a hash of its parts, for example (run seed, "candidates", image) or (run seed, split,
image, noise sample), so replaying a round, resuming a run or visiting images in another order
draws exactly the same numbers. This is the one place such seeds are made.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derived_seed", "derived_generator"]


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from `parts` (their str() joined by '/', hashed with SHA-256)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def derived_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by `derived_seed(*parts)`."""
    return torch.Generator().manual_seed(derived_seed(*parts))
