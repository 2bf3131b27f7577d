"""Acquisition strategies: compose coverage (MaxHerding) and uncertainty scores into picks.

A strategy sees only image content, the features, the labels so far and the current head; it never
sees ground truth (the reference code drew its local candidates from non-void pixels, which a real
user cannot do).

Two-stage selection at round r (paper, Algorithm 1):
  1. per image: draw up to `candidates_per_image` pixels uniformly (seeded per image, fixed for the
     run, labelled pixels removed), pick K of them by MaxHerding with the image's labelled pixels
     counted as covered;
  2. across images: MaxHerding over the N*K local picks keeps M = pool_ratio*N*K, with every
     labelled pixel counted as covered;
  3. score the pool by the uncertainty (eDALD by default) and take the top b.
Round 1 has no head, so it takes b pixels by the global MaxHerding alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseseg.config import StrategyConfig
from sparseseg.errors import SparsesegError
from sparseseg.features.store import DETERMINISTIC, FeatureStore
from sparseseg.head.mlp import predict_proba
from sparseseg.labels import PixelLabels
from sparseseg.selection import uncertainty
from sparseseg.selection.kernels import median_bandwidth
from sparseseg.selection.max_herding import max_herding

Progress = Callable[[str, int, int], None]


def derived_generator(seed: int, *parts: object) -> torch.Generator:
    """A generator whose seed depends only on (seed, parts): replaying a round replays its draws."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class Picks:
    """Pixels chosen in one round: parallel (b,) tensors, plus what the strategy wants logged."""

    image: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    info: dict = field(default_factory=dict)


@dataclass
class RoundContext:
    """Everything a strategy may use in one round."""

    store: FeatureStore
    labels: PixelLabels
    head: nn.Module | None
    budget: int
    round: int
    seed: int
    noise_samples: int
    progress: Progress | None = None


def _score(name: str, ctx: RoundContext, image: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Uncertainty of pixels under the current head; higher = more informative."""
    assert ctx.head is not None

    def probs(sample: int) -> torch.Tensor:
        tick = None
        if ctx.progress is not None:
            tick = lambda done, total: ctx.progress(f"noise sample {sample}", done, total)  # noqa: E731
        return predict_proba(ctx.head, ctx.store.at_pixels(image, y, x, sample, progress=tick))

    if name in ("entropy", "margin", "least_confidence"):
        return getattr(uncertainty, name)(probs(DETERMINISTIC)[None])
    samples = torch.stack([probs(s) for s in range(1, ctx.noise_samples + 1)])
    if name == "dald":
        return uncertainty.mutual_information(samples)
    if name == "edald":
        return uncertainty.edald(samples, probs(ctx.noise_samples + 1))
    raise SparsesegError(f"unknown uncertainty score {name!r}")


class Strategy:
    """Base class: holds its config and whatever it caches across rounds."""

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config

    def select(self, ctx: RoundContext) -> Picks:
        raise NotImplementedError

    def check_budget(self, num_images: int, size: int, budget: int) -> None:
        """Fail before any work when `budget` pixels per round cannot be found."""
        if budget > num_images * size * size:
            raise SparsesegError(f"budget {budget} is larger than the {num_images * size * size} pixels of the images")


class RandomStrategy(Strategy):
    """Uniform over every unlabelled pixel of every training image."""

    def select(self, ctx: RoundContext) -> Picks:
        n, s = len(ctx.store), ctx.store.size
        gen = derived_generator(ctx.seed, "random", ctx.round)
        taken = set(ctx.labels.flat_index(s).tolist())
        if n * s * s - len(taken) < ctx.budget:
            raise SparsesegError(f"budget {ctx.budget} is larger than the {n * s * s - len(taken)} unlabelled pixels")
        chosen: list[int] = []
        while len(chosen) < ctx.budget:  # rejection sampling: labelled pixels are a vanishing fraction
            for flat in torch.randint(n * s * s, (2 * ctx.budget,), generator=gen).tolist():
                if flat not in taken:
                    taken.add(flat)
                    chosen.append(flat)
                    if len(chosen) == ctx.budget:
                        break
        flat_t = torch.tensor(chosen)
        return Picks(flat_t // (s * s), (flat_t % (s * s)) // s, flat_t % s)


class TwoStageStrategy(Strategy):
    """Local then global MaxHerding, then an uncertainty score over the pool (or coverage alone).

    Args:
        config: strategy settings.
        score: uncertainty used in stage 2 ("edald", "dald", "entropy", "margin",
            "least_confidence"), or None for MaxHerding alone (global herding straight to b).
    """

    def __init__(self, config: StrategyConfig, score: str | None) -> None:
        super().__init__(config)
        self.score = score
        # local picks depend only on (image, its labelled pixels): cache them across rounds
        self._local: dict[int, tuple[frozenset[int], torch.Tensor]] = {}

    def pool_size(self, num_images: int, size: int) -> int:
        """M = pool_ratio x N x K (K capped by the candidates an image offers)."""
        per_image = min(self.config.k_per_image, self.config.candidates_per_image, size * size)
        return round(self.config.pool_ratio * num_images * per_image)

    def check_budget(self, num_images: int, size: int, budget: int) -> None:
        super().check_budget(num_images, size, budget)
        pool = self.pool_size(num_images, size)
        if self.score is not None and budget > pool:
            raise SparsesegError(
                f"budget {budget} is larger than the candidate pool of {pool} "
                f"(pool_ratio {self.config.pool_ratio} x {num_images} images x K={self.config.k_per_image}): "
                "raise strategy.k_per_image or strategy.pool_ratio, or lower the budget"
            )

    def _candidates(self, ctx: RoundContext, image: int, taken: set[int]) -> torch.Tensor:
        s = ctx.store.size
        n = min(self.config.candidates_per_image, s * s)
        flat = torch.randperm(s * s, generator=derived_generator(ctx.seed, "candidates", image))[:n]
        if taken:
            flat = flat[~torch.isin(flat, torch.tensor(sorted(taken)))]
        return flat

    def _local_picks(self, ctx: RoundContext) -> torch.Tensor:
        """Stage 1a: K pixels per image (flat indices, (N, K) padded with -1 where fewer)."""
        s, k = ctx.store.size, self.config.k_per_image
        by_image = ctx.labels.pixels_of(s)
        out = torch.full((len(ctx.store), k), -1, dtype=torch.long)
        for image in range(len(ctx.store)):
            labelled = by_image.get(image, torch.empty(0, dtype=torch.long))
            key = frozenset(labelled.tolist())
            cached = self._local.get(image)
            if cached is None or cached[0] != key:
                cand = self._candidates(ctx, image, set(key))
                ids = torch.full_like(cand, image)
                z = ctx.store.at_pixels(ids, cand // s, cand % s)
                sigma = median_bandwidth(
                    z, fraction=self.config.bandwidth_fraction, generator=derived_generator(ctx.seed, "sigma", image)
                )
                covered = None
                if len(labelled):
                    li = torch.full_like(labelled, image)
                    covered = ctx.store.at_pixels(li, labelled // s, labelled % s)
                # seeded by the image's labels, not the round: a cached result equals a recomputed one
                picked = max_herding(z, min(k, len(cand)), sigma, labelled=covered, method=self.config.herding,
                                     generator=derived_generator(ctx.seed, "local", image, *sorted(key)))
                self._local[image] = (key, cand[picked])
            picks = self._local[image][1]
            out[image, : len(picks)] = picks
            if ctx.progress is not None:
                ctx.progress("local herding", image + 1, len(ctx.store))
        return out

    def select(self, ctx: RoundContext) -> Picks:
        s = ctx.store.size
        local = self._local_picks(ctx)
        image = torch.arange(len(ctx.store))[:, None].expand_as(local)[local >= 0]
        flat = local[local >= 0]
        y, x = flat // s, flat % s
        pool_size = round(self.config.pool_ratio * len(flat))
        first_round = ctx.head is None
        keep = ctx.budget if (first_round or self.score is None) else pool_size
        if ctx.budget > pool_size and not first_round and self.score is not None:
            raise SparsesegError(
                f"budget {ctx.budget} is larger than the candidate pool of {pool_size} "
                f"(pool_ratio {self.config.pool_ratio} x {len(flat)} local picks): raise k_per_image or pool_ratio"
            )
        if keep > len(flat):
            raise SparsesegError(f"budget {keep} is larger than the {len(flat)} local picks: raise k_per_image")
        # Stage 1b: global MaxHerding, every labelled pixel counts as covered.
        z = ctx.store.at_pixels(image, y, x)
        sigma = median_bandwidth(z, fraction=self.config.bandwidth_fraction,
                                 generator=derived_generator(ctx.seed, "sigma-global", ctx.round))
        covered = None
        if len(ctx.labels):
            covered = ctx.store.at_pixels(ctx.labels.image, ctx.labels.y, ctx.labels.x)
        if ctx.progress is not None:
            ctx.progress("global herding", 0, 1)
        pool = max_herding(z, keep, sigma, labelled=covered, method=self.config.herding,
                           generator=derived_generator(ctx.seed, "global", ctx.round))
        if ctx.progress is not None:
            ctx.progress("global herding", 1, 1)
        info = {"local_pool": len(flat), "pool": len(pool), "sigma": float(sigma)}
        if first_round or self.score is None:
            return Picks(image[pool], y[pool], x[pool], info)
        # Stage 2: uncertainty over the pool, top b (stable sort: ties keep the herding order).
        # Every local pick is scored, not just the pool: the noisy-sample features of an image's
        # local picks are then remembered as one request, and a later round asks the UNet again
        # only for images whose local picks changed (those that got labels).
        scores = _score(self.score, ctx, image, y, x)[pool]
        top = pool[torch.argsort(scores, descending=True, stable=True)[: ctx.budget]]
        info["score_mean_pool"] = float(scores.mean())
        info["score_mean_picked"] = float(scores.sort(descending=True).values[: ctx.budget].mean())
        return Picks(image[top], y[top], x[top], info)


STRATEGIES: dict[str, Callable[[StrategyConfig], Strategy]] = {
    "random": RandomStrategy,
    "max_herding": lambda cfg: TwoStageStrategy(cfg, None),
    "two_stage_edald": lambda cfg: TwoStageStrategy(cfg, "edald"),
    "two_stage_dald": lambda cfg: TwoStageStrategy(cfg, "dald"),
    "two_stage_entropy": lambda cfg: TwoStageStrategy(cfg, "entropy"),
    "two_stage_margin": lambda cfg: TwoStageStrategy(cfg, "margin"),
}


def create_strategy(config: StrategyConfig) -> Strategy:
    """Build the strategy a config names; unknown names list the valid ones."""
    try:
        return STRATEGIES[config.name](config)
    except KeyError:
        raise SparsesegError(f"strategy.name={config.name!r} is not known; choose one of {sorted(STRATEGIES)}") from None
