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

Core-set (k-center greedy) can replace MaxHerding in both stages. Single-stage uncertainty ("UC
only") scores every unlabelled pixel of every image, streaming image by image and keeping only the
best b, and takes a random round 1 (there is no head to score with). Names:

    random | max_herding | coreset | <score> | two_stage_<score> | coreset_<score>

with <score> one of `scores.SCORES`. `strategy.switch_after` + `strategy.then` switch to another
strategy after a given round (the paper's two-stage eDALD for rounds 1-10, then Margin).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparseseg.config import StrategyConfig
from sparseseg.errors import SparsesegError
from sparseseg.features.store import DETERMINISTIC, FeatureStore, sample_maps
from sparseseg.labels import PixelLabels
from sparseseg.seeding import derived_generator, derived_seed
from sparseseg.selection.coreset import k_center_greedy
from sparseseg.selection.kernels import median_bandwidth, random_projection
from sparseseg.selection.max_herding import max_herding
from sparseseg.selection.rules import TopK, balanced_top, power_keys, top_fraction_count
from sparseseg.selection.scores import (
    SCORES,
    Predictor,
    check_score,
    is_diffusion,
    sample_source,
    score_features,
)

Progress = Callable[[str, int, int], None]


@dataclass
class Picks:
    """Pixels chosen in one round: parallel (b,) tensors, plus what the strategy wants logged."""

    image: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    info: dict = field(default_factory=dict)


@dataclass
class RoundContext:
    """Everything a strategy may use in one round; `predictor` is None before the first labels."""

    store: FeatureStore
    labels: PixelLabels
    predictor: Predictor | None
    budget: int
    round: int
    seed: int
    noise_samples: int
    progress: Progress | None = None
    tile_pixels: int = 16384  # pixels per tile when a strategy scores whole images


class Strategy:
    """Base class: holds its config and whatever it caches across rounds."""

    #: uncertainty scores this strategy computes (checked against backbone and head up front)
    scores: tuple[str, ...] = ()

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config

    def select(self, ctx: RoundContext) -> Picks:
        raise NotImplementedError

    def check_budget(self, num_images: int, size: int, budget: int) -> None:
        """Fail before any work when `budget` pixels per round cannot be found."""
        if budget > num_images * size * size:
            raise SparsesegError(f"budget {budget} is larger than the {num_images * size * size} pixels of the images")

    def state_dict(self) -> dict:
        """What the strategy caches across rounds, as plain lists (a labelling project keeps it on
        disk between commands); {} for strategies that cache nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` of a strategy built from the same settings on the same images."""


def check_strategy(strategy: Strategy, backbone, head_dropout: float, head_ensemble: int = 1) -> None:
    """Fail before any work when a strategy's scores cannot be computed with this backbone and head."""
    for name in strategy.scores:
        check_score(name, is_diffusion(backbone), head_dropout, head_ensemble, strategy.config.noise_samples)


def _random_picks(ctx: RoundContext, purpose: str = "random") -> Picks:
    """b pixels uniformly over every unlabelled pixel of every training image."""
    n, s = len(ctx.store), ctx.store.size
    gen = derived_generator(ctx.seed, purpose, ctx.round)
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


class RandomStrategy(Strategy):
    """Uniform over every unlabelled pixel of every training image."""

    def select(self, ctx: RoundContext) -> Picks:
        return _random_picks(ctx)


class _Chooser:
    """The selection rule of a score: top-b, power sampling or PixelPick, fed chunk by chunk.

    Keys are the scores (top-b), or Gumbel-perturbed powered log-scores (power sampling); with
    `top_fraction` the best fraction of all `total` candidates is kept, then b drawn uniformly.
    """

    def __init__(self, config: StrategyConfig, score: str, ctx: RoundContext, total: int) -> None:
        self.power = SCORES[score].power
        self.power_exponent = config.power
        self.fraction = config.top_fraction
        self.budget = ctx.budget
        self.gen = derived_generator(ctx.seed, "rule", ctx.round)
        keep = top_fraction_count(total, self.fraction, ctx.budget) if self.fraction else ctx.budget
        self.top = TopK(keep)
        self.score_sum, self.count = 0.0, 0

    def push(self, scores: torch.Tensor, items: torch.Tensor) -> None:
        self.score_sum += float(scores.double().sum())
        self.count += len(scores)
        keys = power_keys(scores, self.power_exponent, self.gen) if self.power else scores
        self.top.push(keys, items)

    def result(self) -> tuple[torch.Tensor, dict]:
        """(b, P) chosen items and what to log."""
        _, items = self.top.result()
        info = {"scored": self.count, "score_mean": self.score_sum / max(self.count, 1)}
        if self.fraction:
            info["top_fraction_kept"] = len(items)
            items = items[torch.randperm(len(items), generator=self.gen)[: self.budget]]
        return items, info


class TwoStageStrategy(Strategy):
    """Local then global coverage (MaxHerding or Core-set), then an uncertainty score over the pool.

    Args:
        config: strategy settings.
        score: uncertainty used in stage 2 (a key of `scores.SCORES`), or None for coverage alone
            (the global stage goes straight to b).
        coverage: "max_herding" or "coreset" (k-center greedy), used in both coverage stages.
    """

    def __init__(self, config: StrategyConfig, score: str | None, coverage: str = "max_herding") -> None:
        super().__init__(config)
        self.score = score
        self.coverage = coverage
        self.scores = (score,) if score else ()
        # local picks depend only on (image, its labelled pixels): cache them across rounds
        self._local: dict[int, tuple[frozenset[int], torch.Tensor]] = {}

    def pool_size(self, num_images: int, size: int) -> int:
        """M = pool_ratio x N x K (K capped by the candidates an image offers)."""
        per_image = min(self.config.k_per_image, self.config.candidates_per_image, size * size)
        return round(self.config.pool_ratio * num_images * per_image)

    def check_budget(self, num_images: int, size: int, budget: int) -> None:
        super().check_budget(num_images, size, budget)
        pool = self.pool_size(num_images, size)
        if (self.score is not None or self.config.balance == "predicted") and budget > pool:
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

    def _cover(self, z: torch.Tensor, k: int, covered: torch.Tensor | None, sigma_gen: torch.Generator,
               gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """k picks by the configured coverage objective, `covered` counting as already picked."""
        if self.coverage == "coreset":
            return k_center_greedy(z, k, labelled=covered, generator=gen,
                                   max_memory_gb=self.config.max_memory_gb), {}
        sigma = median_bandwidth(z, fraction=self.config.bandwidth_fraction, generator=sigma_gen)
        picked = max_herding(z, k, sigma, labelled=covered, method=self.config.herding, generator=gen,
                             max_memory_gb=self.config.max_memory_gb)
        return picked, {"sigma": float(sigma)}

    def _local_picks(self, ctx: RoundContext) -> torch.Tensor:
        """Stage 1a: K pixels per image (flat indices, (N, K) padded with -1 where fewer)."""
        s, k = ctx.store.size, self.config.k_per_image
        by_image = ctx.labels.pixels_of(s)
        out = torch.full((len(ctx.store), k), -1, dtype=torch.long)
        for image in range(len(ctx.store)):
            picks = self.local_picks_of(ctx, image, by_image.get(image, torch.empty(0, dtype=torch.long)))
            out[image, : len(picks)] = picks
            if ctx.progress is not None:
                ctx.progress("local coverage", image + 1, len(ctx.store))
        return out

    def local_picks_of(self, ctx: RoundContext, image: int, labelled: torch.Tensor) -> torch.Tensor:
        """Stage 1a for one image: up to K flat pixel indices, given its labelled flat pixels (cached)."""
        s, k = ctx.store.size, self.config.k_per_image
        key = frozenset(labelled.tolist())
        cached = self._local.get(image)
        if cached is None or cached[0] != key:
            cand = self._candidates(ctx, image, set(key))
            ids = torch.full_like(cand, image)
            z = ctx.store.at_pixels(ids, cand // s, cand % s)
            covered = None
            if len(labelled):
                li = torch.full_like(labelled, image)
                covered = ctx.store.at_pixels(li, labelled // s, labelled % s)
            dim = self.config.local_projection
            if dim is not None and dim < z.shape[1]:  # one projection per run (docs/performance.md)
                proj = random_projection(z.shape[1], dim, derived_generator(ctx.seed, "local-projection"))
                z, covered = z @ proj, None if covered is None else covered @ proj
            # seeded by the image's labels, not the round: a cached result equals a recomputed one
            picked, _ = self._cover(z, min(k, len(cand)), covered, derived_generator(ctx.seed, "sigma", image),
                                    derived_generator(ctx.seed, "local", image, *sorted(key)))
            self._local[image] = (key, cand[picked])
        return self._local[image][1]

    def state_dict(self) -> dict:
        return {"local": {image: [sorted(key), picks.tolist()] for image, (key, picks) in self._local.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._local = {int(image): (frozenset(key), torch.tensor(picks, dtype=torch.long))
                       for image, (key, picks) in state.get("local", {}).items()}

    def select(self, ctx: RoundContext) -> Picks:
        s = ctx.store.size
        local = self._local_picks(ctx)
        image = torch.arange(len(ctx.store))[:, None].expand_as(local)[local >= 0]
        flat = local[local >= 0]
        y, x = flat // s, flat % s
        pool_size = round(self.config.pool_ratio * len(flat))
        first_round = ctx.predictor is None
        # Coverage alone goes straight to b, unless its picks are to be balanced over predicted classes.
        to_pool = not first_round and (self.score is not None or self.config.balance == "predicted")
        keep = pool_size if to_pool else ctx.budget
        if ctx.budget > pool_size and to_pool:
            raise SparsesegError(
                f"budget {ctx.budget} is larger than the candidate pool of {pool_size} "
                f"(pool_ratio {self.config.pool_ratio} x {len(flat)} local picks): raise k_per_image or pool_ratio"
            )
        if keep > len(flat):
            raise SparsesegError(f"budget {keep} is larger than the {len(flat)} local picks: raise k_per_image")
        # Stage 1b: global coverage, every labelled pixel counts as covered.
        z = ctx.store.at_pixels(image, y, x)
        covered = None
        if len(ctx.labels):
            covered = ctx.store.at_pixels(ctx.labels.image, ctx.labels.y, ctx.labels.x)
        if ctx.progress is not None:
            ctx.progress("global coverage", 0, 1)
        pool, info = self._cover(z, keep, covered, derived_generator(ctx.seed, "sigma-global", ctx.round),
                                 derived_generator(ctx.seed, "global", ctx.round))
        if ctx.progress is not None:
            ctx.progress("global coverage", 1, 1)
        info = {"local_pool": len(flat), "pool": len(pool), **info}
        if not to_pool:
            return Picks(image[pool], y[pool], x[pool], info)
        if self.score is None:  # the coverage order is the score: earlier greedy picks first
            scores = -torch.arange(len(pool), dtype=torch.float64)
        else:
            # Stage 2: uncertainty over the pool. Every local pick is scored, not just the pool: the
            # noisy-sample features of an image's local picks are then remembered as one request, and
            # a later round asks the UNet again only for images whose local picks changed.
            def features_of(sample: int) -> torch.Tensor:
                tick = None
                if ctx.progress is not None:
                    tick = lambda done, total: ctx.progress("pool features", done, total)  # noqa: E731
                return ctx.store.at_pixels(image, y, x, sample, progress=tick)

            def noise_proba(samples) -> torch.Tensor:
                """Every noise sample of an image from one backbone call, image by image."""
                tick = None
                if ctx.progress is not None:
                    tick = lambda done, total: ctx.progress(f"noise samples ({len(samples)})", done, total)  # noqa: E731
                probs = None
                for idx, feats in ctx.store.at_pixels_samples(image, y, x, samples, progress=tick):
                    p = ctx.predictor.proba(feats.flatten(0, 1)).view(len(samples), len(idx), -1)
                    if probs is None:
                        probs = torch.empty(len(samples), len(image), p.shape[-1])
                    probs[:, idx] = p
                return probs

            scores = score_features(self.score, ctx.predictor, features_of, ctx.noise_samples,
                                    is_diffusion(ctx.store.backbone),
                                    derived_seed("dropout", ctx.seed, ctx.round, "pool"), noise_proba)[pool]
        if self.config.balance == "predicted":
            predicted = ctx.predictor.proba(z[pool]).argmax(1)
            chosen = balanced_top(scores, predicted, ctx.budget)
            info["predicted_classes_in_pool"] = int(predicted.unique().numel())
            info["predicted_classes_picked"] = int(predicted[chosen].unique().numel())
        else:  # the score's rule (top-b: ties keep the coverage order)
            chooser = _Chooser(self.config, self.score, ctx, len(pool))
            chooser.push(scores, torch.arange(len(pool))[:, None])
            chosen = chooser.result()[0][:, 0]
        top = pool[chosen]
        if self.score is not None:
            info["score_mean_pool"] = float(scores.double().sum()) / len(scores)
            info["score_mean_picked"] = float(scores[chosen].double().mean())
        return Picks(image[top], y[top], x[top], info)


class UncertaintyStrategy(Strategy):
    """Single-stage uncertainty ("UC only"): score every unlabelled pixel of every image.

    Images are visited in order, `backbone.batch_size` at a time; each image's maps are read once
    per noise sample and its pixels scored in tiles of `features.tile_pixels`, keeping only the
    best candidates (`rules.TopK`), so memory stays at one batch of maps plus one tile of
    features. `strategy.pixels_per_image` scores a seeded subsample of each image instead.
    Round 1 has no head and takes a uniform random draw.
    """

    def __init__(self, config: StrategyConfig, score: str) -> None:
        super().__init__(config)
        self.score = score
        self.scores = (score,)

    def _pixels(self, ctx: RoundContext, image: int, labelled: torch.Tensor) -> torch.Tensor:
        s = ctx.store.size
        if self.config.pixels_per_image is None:
            flat = torch.arange(s * s)
        else:
            gen = derived_generator(ctx.seed, "uc-pixels", image)
            flat = torch.randperm(s * s, generator=gen)[: self.config.pixels_per_image].sort().values
        if len(labelled):
            flat = flat[~torch.isin(flat, labelled)]
        return flat

    def select(self, ctx: RoundContext) -> Picks:
        if ctx.predictor is None:
            picks = _random_picks(ctx, "uc-first-round")
            picks.info["first_round"] = "random"
            return picks
        store, s = ctx.store, ctx.store.size
        n = len(store)
        by_image = ctx.labels.pixels_of(s)
        per_image = s * s if self.config.pixels_per_image is None else min(self.config.pixels_per_image, s * s)
        chooser = _Chooser(self.config, self.score, ctx, n * per_image - len(ctx.labels))
        diffusion = is_diffusion(store.backbone)
        source = sample_source(self.score, diffusion)
        spec = SCORES[self.score]
        samples = [DETERMINISTIC] if source != "noise" else list(range(1, ctx.noise_samples + 1 + spec.extra))
        for start in range(0, n, store.batch_size):
            group = list(range(start, min(start + store.batch_size, n)))
            maps = store.maps([(i, smp) for i in group for smp in samples])
            for j, image in enumerate(group):
                ready = {smp: store.ready(maps[j * len(samples) + k]) for k, smp in enumerate(samples)}
                flat = self._pixels(ctx, image, by_image.get(image, torch.empty(0, dtype=torch.long)))
                for t, chunk in enumerate(torch.split(flat, ctx.tile_pixels)):
                    ys, xs = chunk // s, chunk % s
                    scores = score_features(self.score, ctx.predictor,
                                            lambda smp, ys=ys, xs=xs, ready=ready: sample_maps(ready[smp], ys, xs, s),
                                            ctx.noise_samples, diffusion, derived_seed("dropout", ctx.seed, ctx.round, image, t))
                    chooser.push(scores, torch.stack([torch.full_like(ys, image), ys, xs], dim=1))
            if ctx.progress is not None:
                ctx.progress(f"scoring ({self.score})", group[-1] + 1, n)
        items, info = chooser.result()
        return Picks(items[:, 0], items[:, 1], items[:, 2], info)


class ScheduledStrategy(Strategy):
    """One strategy for rounds 1..switch_after, another after (paper: two-stage eDALD, then Margin)."""

    def __init__(self, config: StrategyConfig, first: Strategy, then: Strategy) -> None:
        super().__init__(config)
        self.first, self.then = first, then
        self.scores = tuple(dict.fromkeys(first.scores + then.scores))

    def check_budget(self, num_images: int, size: int, budget: int) -> None:
        self.first.check_budget(num_images, size, budget)
        self.then.check_budget(num_images, size, budget)

    def state_dict(self) -> dict:
        return {"first": self.first.state_dict(), "then": self.then.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.first.load_state_dict(state.get("first", {}))
        self.then.load_state_dict(state.get("then", {}))

    def select(self, ctx: RoundContext) -> Picks:
        active = self.first if ctx.round <= self.config.switch_after else self.then
        picks = active.select(ctx)
        picks.info["strategy"] = self.config.name if active is self.first else self.config.then
        return picks


def _registry() -> dict[str, Callable[[StrategyConfig], Strategy]]:
    names: dict[str, Callable[[StrategyConfig], Strategy]] = {
        "random": RandomStrategy,
        "max_herding": lambda cfg: TwoStageStrategy(cfg, None),
        "coreset": lambda cfg: TwoStageStrategy(cfg, None, "coreset"),
    }
    for score in SCORES:
        names[score] = lambda cfg, score=score: UncertaintyStrategy(cfg, score)
        names[f"two_stage_{score}"] = lambda cfg, score=score: TwoStageStrategy(cfg, score)
        names[f"coreset_{score}"] = lambda cfg, score=score: TwoStageStrategy(cfg, score, "coreset")
    return names


STRATEGIES: dict[str, Callable[[StrategyConfig], Strategy]] = _registry()


def _build(name: str, config: StrategyConfig) -> Strategy:
    try:
        return STRATEGIES[name](config)
    except KeyError:
        raise SparsesegError(f"strategy.name={name!r} is not known; choose one of {sorted(STRATEGIES)}") from None


def create_strategy(config: StrategyConfig) -> Strategy:
    """Build the strategy a config names (with its schedule); unknown names list the valid ones."""
    strategy = _build(config.name, config)
    if config.then is None:
        return strategy
    return ScheduledStrategy(config, strategy, _build(config.then, config))
