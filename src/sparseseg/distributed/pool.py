"""Stages 1b and 2 over a pool on disk, sharded across ranks: global coverage, then uncertainty.

Stage 1b keeps M = pool_ratio x (pool rows) by MaxHerding over the whole pool, every labelled pixel
counting as covered, exactly as `TwoStageStrategy.select` does in one process:

* "exact": `selection.distributed.sharded_max_herding`; each rank holds whole blocks of pool rows and
  the gains are all-reduced. The picks are the same at any number of ranks.
* "knn": facility location on a k-nearest-neighbour graph (`selection.knn`): each rank searches the
  neighbours of its rows in a FAISS index of the whole pool, the graph is gathered, and every rank
  runs the same sparse greedy. For pools whose all-pairs cost is out of reach.

Stage 2 scores the kept rows under a head (the score of the strategy, eDALD by default) from the
stored noise-sample features: each rank scores a contiguous share of the kept rows in fixed chunks
(dropout masks are seeded per chunk, so scores do not depend on the number of ranks) and the scores
are gathered; the strategy's rule (top-b, power sampling, PixelPick's top fraction, or the
class-balanced top-b) then picks b. Round 1 has no head: the global MaxHerding goes straight to b.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparseseg.config import ExperimentConfig
from sparseseg.distributed.extract import stage1_settings
from sparseseg.distributed.launch import Launch
from sparseseg.errors import SparsesegError
from sparseseg.features.shards import PoolStore
from sparseseg.features.store import DETERMINISTIC
from sparseseg.io import atomic_write
from sparseseg.seeding import derived_generator, derived_seed
from sparseseg.selection.distributed import partition, pool_bandwidth, sharded_max_herding
from sparseseg.selection.knn import build_knn_graph, knn_max_herding, nearest_d2
from sparseseg.selection.rules import balanced_top, power_keys, top_fraction_count
from sparseseg.selection.scores import SCORES, Predictor, score_features

Progress = Callable[[str, int, int], None]
METHODS = ("exact", "knn")
#: Kept rows scored per chunk in stage 2 (fixed, so per-chunk dropout seeds do not depend on the ranks).
SCORE_CHUNK = 4096


@dataclass
class PoolSelection:
    """A round's picks from a pool.

    Attributes:
        rows: (b,) pool rows picked, in pick order.
        coords: (b, 3) image, y, x of those rows.
        pool: (M,) pool rows kept by stage 1b, in greedy order.
        scores: (M,) stage-2 scores of `pool` (None in round 1 / coverage alone).
        info: what to log (sizes, sigma, seconds per phase, method).
    """

    rows: torch.Tensor
    coords: torch.Tensor
    pool: torch.Tensor
    scores: torch.Tensor | None
    info: dict = field(default_factory=dict)


def check_pool(pool: PoolStore, config: ExperimentConfig) -> None:
    """Fail when the pool was extracted with another seed, data or stage-1 settings than `config`'s."""
    made = pool.manifest.get("settings", {})
    s = config.strategy
    now = {"data": str(config.data), "split": config.train_split, "seed": config.seed,
           "strategy": stage1_settings(s)}
    for key, value in now.items():
        if made.get(key) != value:
            raise SparsesegError(f"{pool.root}: extracted with {key}={made.get(key)!r}, the config says {value!r}; "
                                 "extract again with this config, or select with the config that made the pool")


def _share(n: int, run: Launch) -> tuple[int, int]:
    """This rank's contiguous share of n items, in whole SCORE_CHUNKs."""
    return partition(n, run.size, SCORE_CHUNK)[run.rank]


def select_from_pool(pool: PoolStore, config: ExperimentConfig, run: Launch, budget: int, round_number: int = 1,
                     predictor: Predictor | None = None, method: str = "exact", neighbours: int = 32,
                     index: str | None = None, block: int = 4096, progress: Progress | None = None) -> PoolSelection:
    """One round's picks from a finished pool; every rank calls it and gets the same picks.

    Args:
        pool: a finished pool (`PoolStore.open`).
        config: the config that made it (seed, strategy settings; `check_pool` first).
        run: this process's place in the launch.
        budget: b, pixels to pick.
        round_number: the round (seeds sigma's subsample, the dropout masks and the rules).
        predictor: the current head's probabilities; None in round 1 (coverage alone).
        method: "exact" or "knn" (module docstring).
        neighbours, index: kNN graph settings (`selection.knn`).
        block: pool rows per kernel block of the exact greedy.
        progress: (task, done, total) callback.
    """
    if method not in METHODS:
        raise SparsesegError(f"method={method!r}; choose one of {', '.join(METHODS)}")
    s, seed = config.strategy, config.seed
    score = pool.manifest.get("score")
    n = len(pool)
    info: dict = {"method": method, "local_pool": n, "ranks": run.size}
    to_pool = predictor is not None and (score is not None or s.balance == "predicted")
    keep = round(s.pool_ratio * n) if to_pool else budget  # half to even, as TwoStageStrategy
    if keep > n:
        raise SparsesegError(f"budget {keep} is larger than the {n} local picks of {pool.root}: raise k_per_image")
    if to_pool and budget > keep:
        raise SparsesegError(f"budget {budget} is larger than the candidate pool of {keep} (pool_ratio {s.pool_ratio} x "
                             f"{n} local picks): raise k_per_image or pool_ratio")
    # -- stage 1b: global coverage
    t0 = time.perf_counter()
    sigma = pool_bandwidth(lambda idx: pool.rows_of(DETERMINISTIC, idx), n, s.bandwidth_fraction,
                           derived_generator(seed, "sigma-global", round_number))
    _, lab = pool.labelled()
    lo, hi = partition(n, run.size, block)[run.rank]
    if method == "exact":
        z_local = pool.features(DETERMINISTIC, lo, hi).to(run.device)
        tick = (lambda d, t: progress("global coverage", d, t)) if progress else None
        kept = sharded_max_herding(z_local, lo, n, keep, sigma, lab.to(run.device) if len(lab) else None,
                                   block=block, progress=tick)
        del z_local
    else:
        read = lambda a, b: pool.features(DETERMINISTIC, a, b)  # noqa: E731
        graph = build_knn_graph(read, n, pool.dim, neighbours, index, queries=(lo, hi), seed=seed, device=run.device)
        nb, d2 = run.gather_rows(graph.neighbours), run.gather_rows(graph.d2)
        lab_d2 = run.gather_rows(nearest_d2(read, (lo, hi), lab)) if len(lab) else None
        kept = knn_max_herding(nb, d2, keep, sigma, lab_d2)
        info.update(index=graph.index, neighbours=neighbours, index_gb=round(graph.index_bytes / 2**30, 4),
                    knn_seconds={k: round(v, 3) for k, v in graph.seconds.items()})
    info.update(sigma=sigma, pool=len(kept), labelled=len(lab), coverage_seconds=round(time.perf_counter() - t0, 3))
    coords = pool.coords()
    if not to_pool:
        return PoolSelection(kept, coords[kept], kept, None, info)
    # -- stage 2: uncertainty of the kept rows, each rank its share, gathered in pool order
    t1 = time.perf_counter()
    a, b = _share(len(kept), run)
    diffusion = bool(pool.manifest.get("diffusion"))
    parts, classes = [], []
    for c in range(a, b, SCORE_CHUNK):
        rows = kept[c : min(c + SCORE_CHUNK, b)]
        if score is not None:
            parts.append(score_features(score, predictor, lambda smp, rows=rows: pool.rows_of(smp, rows),
                                        s.noise_samples, diffusion, derived_seed("dropout", seed, round_number, "pool", c)))
        if s.balance == "predicted":
            classes.append(predictor.proba(pool.rows_of(DETERMINISTIC, rows)).argmax(1))
        if progress is not None:
            progress("scoring pool", min(c + SCORE_CHUNK, b) - a, b - a)
    if score is not None:
        scores = run.gather_rows(torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32))
    else:  # the coverage order is the score: earlier greedy picks first
        scores = -torch.arange(len(kept), dtype=torch.float64)
    info["scoring_seconds"] = round(time.perf_counter() - t1, 3)
    if s.balance == "predicted":
        predicted = run.gather_rows(torch.cat(classes) if classes else torch.empty(0, dtype=torch.long))
        chosen = balanced_top(scores, predicted, budget)
        info["predicted_classes_in_pool"] = int(predicted.unique().numel())
        info["predicted_classes_picked"] = int(predicted[chosen].unique().numel())
    else:
        chosen = _rule(scores, config, score, budget, round_number)
    if score is not None:
        info["score_mean_pool"] = float(scores.double().mean())
        info["score_mean_picked"] = float(scores[chosen].double().mean())
    picked = kept[chosen]
    return PoolSelection(picked, coords[picked], kept, scores, info)


def _rule(scores: torch.Tensor, config: ExperimentConfig, score: str | None, budget: int, round: int) -> torch.Tensor:
    """The strategy's selection rule on the whole pool's scores (as `TwoStageStrategy`'s chooser)."""
    s = config.strategy
    gen = derived_generator(config.seed, "rule", round)
    keys = power_keys(scores, s.power, gen) if score is not None and SCORES[score].power else scores
    count = top_fraction_count(len(scores), s.top_fraction, budget) if s.top_fraction else budget
    top = torch.argsort(keys.double(), descending=True, stable=True)[:count]  # ties keep the coverage order
    if s.top_fraction:
        top = top[torch.randperm(len(top), generator=gen)[:budget]]
    return top


def write_picks(path: Path, selection: PoolSelection, names: list[str], round: int) -> None:
    """picks CSV: image, y, x, pool_row, score, round (one row per pick, in pick order)."""
    scores = None
    if selection.scores is not None:
        where = {int(r): i for i, r in enumerate(selection.pool.tolist())}
        scores = [float(selection.scores[where[int(r)]]) for r in selection.rows.tolist()]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "y", "x", "pool_row", "score", "round"])
            for t, (row, (i, y, x)) in enumerate(zip(selection.rows.tolist(), selection.coords.tolist(), strict=True)):
                w.writerow([names[i], y, x, row, "" if scores is None else f"{scores[t]:.6g}", round])

    atomic_write(Path(path), write)
