"""A trained head as selection sees it: class probabilities of pixel features, and samples of them.

Selection never runs a network itself; it receives a `Predictor` (see `selection.scores`), so the
head, its MC-dropout passes, or later other sample sources stay on this side of the boundary.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseseg.head.mlp import HeadEnsemble, has_dropout, mc_dropout_proba, member_proba, predict_proba


class HeadPredictor:
    """Probabilities from a trained head. Its samples are the members of an ensemble (their first S),
    else MC-dropout passes.

    Args:
        head: a trained head (`head.mlp.train_head`), in eval mode.
    """

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    @property
    def can_sample(self) -> bool:
        """Whether `sample_proba` can draw different samples (an ensemble, or a head with dropout)."""
        return isinstance(self.head, HeadEnsemble) or has_dropout(self.head)

    def proba(self, features: torch.Tensor) -> torch.Tensor:
        """(n, C) softmax probabilities of (n, D) features."""
        return predict_proba(self.head, features)

    def sample_proba(self, features: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
        """(samples, n, C): the first `samples` members' probabilities (an ensemble; `seed` unused), or
        `samples` MC-dropout passes with masks seeded by `seed`."""
        if isinstance(self.head, HeadEnsemble):
            return member_proba(self.head, features, samples)
        return mc_dropout_proba(self.head, features, samples, seed)
