"""Uncertainty scores of pixels under the current head, and where their probability samples come from.

| score              | probability samples                              | formula                      |
| ------------------ | ------------------------------------------------ | ---------------------------- |
| entropy, margin,   | one deterministic pass (noise sample 0)          | `uncertainty.<name>`         |
| least_confidence   |                                                  |                              |
| bald               | S head samples on noise sample 0: MC-dropout     | mutual information           |
|                    | passes, or S members of a head ensemble          |                              |
| ebald              | S head samples + 1 independent one               | MI + entropy of the extra    |
| dald               | S diffusion noise samples (1..S)                 | mutual information (Eq. 5-7) |
| edald              | S noise samples + the independent z(0) (S+1)     | MI + entropy of z(0) (Eq. 8) |
| power_bald/_dald   | as bald/dald                                     | power sampling, see `rules`  |
| balentacq          | noise samples on a diffusion backbone, else      | `uncertainty.balentacq`      |
|                    | MC-dropout passes                                |                              |

S is `strategy.noise_samples`. Head samples are the members of an ensemble of heads (`head.ensemble`
> S; members 1..S for the MI, member S+1 as the independent one) or MC-dropout passes of a head
trained with `head.dropout > 0`; noise samples need a diffusion backbone (one whose maps carry a
timestep).

Probabilities come from a `Predictor` that the caller passes in (the loop wraps its trained head in
one), so selection never runs the head itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from sparseseg.errors import SparsesegError
from sparseseg.features.store import DETERMINISTIC
from sparseseg.selection import uncertainty


class Predictor(Protocol):
    """What selection needs of a trained model: class probabilities of pixel features, and samples of them."""

    @property
    def can_sample(self) -> bool:
        """Whether `sample_proba` gives different samples (for example, a head with dropout)."""
        ...

    def proba(self, features: torch.Tensor) -> torch.Tensor:
        """(n, C) probabilities of (n, D) features."""
        ...

    def sample_proba(self, features: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
        """(samples, n, C) stochastic probability samples of (n, D) features, drawn with `seed`."""
        ...


@dataclass(frozen=True)
class ScoreSpec:
    """How a score is computed: its sample source, its formula and its selection rule."""

    source: str  # "single", "dropout", "noise" or "bayes" (noise on diffusion backbones, else dropout)
    formula: str  # a function of `uncertainty`
    extra: bool = False  # needs one independent extra sample (eBALD / eDALD)
    power: bool = False  # select by power sampling instead of top-b


SCORES: dict[str, ScoreSpec] = {
    "entropy": ScoreSpec("single", "entropy"),
    "margin": ScoreSpec("single", "margin"),
    "least_confidence": ScoreSpec("single", "least_confidence"),
    "bald": ScoreSpec("dropout", "mutual_information"),
    "ebald": ScoreSpec("dropout", "edald", extra=True),
    "dald": ScoreSpec("noise", "mutual_information"),
    "edald": ScoreSpec("noise", "edald", extra=True),
    "power_bald": ScoreSpec("dropout", "mutual_information", power=True),
    "power_dald": ScoreSpec("noise", "mutual_information", power=True),
    "balentacq": ScoreSpec("bayes", "balentacq"),
}


def is_diffusion(backbone) -> bool:
    """A diffusion backbone's maps carry a timestep; noise samples then give different features."""
    return any(info.timestep >= 0 for info in backbone.feature_info)


def sample_source(name: str, diffusion: bool) -> str:
    """Where the score's samples come from on this backbone: 'single', 'dropout' or 'noise'."""
    source = SCORES[name].source
    if source == "bayes":
        return "noise" if diffusion else "dropout"
    return source


def check_score(name: str, diffusion: bool, head_dropout: float, head_ensemble: int = 1, samples: int = 1) -> None:
    """Fail before any work when a score cannot be computed with this backbone and head.

    Args:
        name: a key of SCORES.
        diffusion: whether the backbone has noise samples.
        head_dropout, head_ensemble: the head's settings; the head's samples are the members of an
            ensemble (then at least S, plus one for eBALD, are needed), else MC-dropout passes.
        samples: S, `strategy.noise_samples`.
    """
    if name not in SCORES:
        raise SparsesegError(f"unknown uncertainty score {name!r}; choose one of {sorted(SCORES)}")
    source = sample_source(name, diffusion)
    if source == "noise" and not diffusion:
        raise SparsesegError(
            f"{name} needs diffusion noise samples, and this backbone has no timesteps: "
            "use the MC-dropout counterpart (bald, ebald, power_bald) with head.dropout > 0"
        )
    if source == "dropout" and head_ensemble > 1:
        needed = samples + (1 if SCORES[name].extra else 0)
        if head_ensemble < needed:
            raise SparsesegError(
                f"{name} needs {needed} head samples (strategy.noise_samples={samples}"
                f"{' + 1 independent' if SCORES[name].extra else ''}) but head.ensemble={head_ensemble}: "
                f"set head.ensemble >= {needed} or lower strategy.noise_samples")
    elif source == "dropout" and head_dropout <= 0:
        raise SparsesegError(f"{name} samples MC dropout from the head: set head.dropout > 0 (for example 0.1), "
                             "or train an ensemble of heads (head.ensemble > 1)")


def score_features(
    name: str,
    predictor: Predictor,
    features_of: Callable[[int], torch.Tensor],
    samples: int,
    diffusion: bool,
    seed: int,
    noise_proba: Callable[[Sequence[int]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scores (n,) of some pixels, higher = more informative.

    Args:
        name: a key of SCORES.
        predictor: the current model's probabilities (and samples).
        features_of: noise sample index -> (n, D) features of the pixels (sample 0 deterministic).
        samples: S, the probability samples of MI-type scores.
        diffusion: whether the backbone's features depend on the noise sample.
        seed: seeds the MC-dropout masks (derive it from the round and the pixels scored).
        noise_proba: noise sample indices -> (len, n, C) probabilities under them, for callers that
            compute every sample of an image at once (`FeatureStore.at_pixels_samples`); without
            it the noise samples come from `features_of`, one at a time.
    """
    spec = SCORES[name]
    fn = getattr(uncertainty, spec.formula)
    source = sample_source(name, diffusion)
    if source == "single":
        return fn(predictor.proba(features_of(DETERMINISTIC))[None])
    count = samples + (1 if spec.extra else 0)
    if source == "dropout":
        if not predictor.can_sample:
            raise SparsesegError(f"{name} samples MC dropout from the head: set head.dropout > 0 (for example 0.1), "
                                 "or train an ensemble of heads (head.ensemble > 1)")
        probs = predictor.sample_proba(features_of(DETERMINISTIC), count, seed)
    elif noise_proba is not None:
        probs = noise_proba(range(1, count + 1))
    else:
        probs = torch.stack([predictor.proba(features_of(s)) for s in range(1, count + 1)])
    if spec.extra:
        return fn(probs[:samples], probs[samples])
    return fn(probs)
