"""Stage 1a over shards of images: each rank runs the backbone and the per-image MaxHerding on its shards
and writes the picks' features to a pool on disk (`features.shards`).

Every number is the single process's: the local picks come from `TwoStageStrategy.local_picks_of`
(the very function `TwoStageStrategy.select` calls: the same candidates, seeds and picks), and the
features from a `FeatureStore` that sees the images under their indices in the whole split, so every
noise sample is seeded by (seed, split, image, sample) as in a single-process run. Only this rank's
shard of images is ever read from disk (`ShardImages`).

Shards are dealt round robin (shard i to rank i mod G) and their count does not depend on G, so a
rerun with another number of processes resumes the same pool.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparseseg.backbones.registry import build_backbone
from sparseseg.config import ExperimentConfig, StrategyConfig
from sparseseg.data.dataset import load_meta, load_split, split_names
from sparseseg.distributed.launch import Launch
from sparseseg.errors import SparsesegError
from sparseseg.features.shards import PoolStore, Shard
from sparseseg.features.store import DETERMINISTIC, build_stores
from sparseseg.labels import PixelLabels
from sparseseg.selection.scores import SCORES, is_diffusion, sample_source
from sparseseg.selection.strategies import (
    RoundContext,
    ScheduledStrategy,
    TwoStageStrategy,
    check_strategy,
    create_strategy,
)

Progress = Callable[[str, int, int], None]


class ShardImages:
    """A split's images as `FeatureStore` indexes them, with only one shard's images in memory.

    Args:
        images: (n, S, S, 3) uint8 images start .. start + n - 1 of the split.
        start: index of images[0] in the split.
        total: images in the whole split.
    """

    def __init__(self, images: torch.Tensor, start: int, total: int) -> None:
        self.local, self.start = images, start
        self.shape = (total, *images.shape[1:])

    def __getitem__(self, ids: list[int]) -> torch.Tensor:
        idx = torch.as_tensor(ids, dtype=torch.long) - self.start
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self.local)):
            raise IndexError(f"images {ids} are outside this shard ({self.start}..{self.start + len(self.local) - 1})")
        return self.local[idx]


def pool_strategy(config: ExperimentConfig) -> TwoStageStrategy:
    """The two-stage MaxHerding strategy whose stage 1a the pool holds (the first one of a schedule)."""
    strategy = create_strategy(config.strategy)
    if isinstance(strategy, ScheduledStrategy):
        strategy = strategy.first
    if not isinstance(strategy, TwoStageStrategy) or strategy.coverage != "max_herding":
        raise SparsesegError(f"strategy.name={config.strategy.name!r}: a pool holds MaxHerding's local picks; use "
                             "two_stage_<score> (for example two_stage_edald) or max_herding")
    return strategy


def stored_samples(strategy: TwoStageStrategy, diffusion: bool, noise_samples: int) -> list[int]:
    """Noise samples the pool keeps: 0 (herding, training), plus 1..M (+1 for eDALD) when stage 2 needs them."""
    if strategy.score is None or sample_source(strategy.score, diffusion) != "noise":
        return [DETERMINISTIC]
    return [DETERMINISTIC, *range(1, noise_samples + 1 + (1 if SCORES[strategy.score].extra else 0))]



def stage1_settings(s: StrategyConfig) -> dict:
    """The strategy settings a pool's stage-1 picks depend on (recorded in and checked against its manifest)."""
    return {"name": s.name, "candidates_per_image": s.candidates_per_image, "k_per_image": s.k_per_image,
            "herding": s.herding, "bandwidth_fraction": s.bandwidth_fraction, "max_memory_gb": s.max_memory_gb,
            "noise_samples": s.noise_samples, "local_projection": s.local_projection}

def pool_header(config: ExperimentConfig, names: list[str], labels: PixelLabels, samples: list[int],
                dtype: str, images_per_shard: int) -> dict:
    """What made the pool, and its hash: a rerun with anything else that changes a row is refused."""
    s = config.strategy
    settings = {
        "data": str(config.data), "split": config.train_split, "seed": config.seed,
        "images": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "backbone": config.backbone.model_dump(mode="json", exclude={"device", "batch_size"}),
        "strategy": stage1_settings(s),
        "labels": torch.stack([labels.image, labels.y, labels.x]).T.tolist(),
        "samples": samples,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    # the layout (shards, dtype) is compared on its own, with its own message (`PoolStore.create`)
    settings.update(labels=len(labels), dtype=dtype, images_per_shard=images_per_shard)
    return {"config_hash": digest, "settings": settings, "names": names, "seed": config.seed,
            "split": config.train_split, "noise_samples": s.noise_samples}


def extract_pool(config: ExperimentConfig, out: Path, run: Launch, images_per_shard: int = 64,
                 dtype: str = "float16", labels_csv: Path | None = None, backbone=None,
                 progress: Progress | None = None) -> dict:
    """Write (or finish) the pool of `config`'s training split in `out`; every rank calls it.

    Args:
        config: the experiment config (data, seed, backbone, strategy).
        out: the pool folder.
        run: this process's place in the launch.
        images_per_shard: images per shard (the unit of resuming).
        dtype: "float16" or "float32" features on disk.
        labels_csv: labelled pixels so far (a run's labels.csv): excluded from the candidates and
            counted as covered, as in `TwoStageStrategy`; their features are stored too.
        backbone: a ready `FeatureBackbone` (tests); None builds the config's.
        progress: (task, done, total) callback.

    Returns:
        {"shards": total, "done_here": shards this rank wrote, "skipped": already finished, "rows", "seconds"}.
    """
    start_time = time.perf_counter()
    meta = load_meta(config.data)
    names = split_names(config.data, config.train_split)
    labels = PixelLabels.read_csv(Path(labels_csv), names) if labels_csv is not None else PixelLabels()
    if backbone is None:
        backbone = build_backbone(config.backbone, run.device, default_size=meta.size)
    strategy = pool_strategy(config)
    strategy.check_budget(len(names), meta.size, config.budget_for(len(names)))
    check_strategy(strategy, backbone, config.head.dropout, config.head.ensemble)
    diffusion = is_diffusion(backbone)
    samples = stored_samples(strategy, diffusion, config.strategy.noise_samples)
    rows_per_image = min(config.strategy.k_per_image, config.strategy.candidates_per_image, meta.size ** 2)
    header = pool_header(config, names, labels, samples, dtype, images_per_shard)
    header.update(score=strategy.score, diffusion=diffusion)
    dim = sum(info.num_chs for info in backbone.feature_info)
    pool, problem = None, None
    if run.main:
        try:
            pool = PoolStore.create(out, header, len(names), images_per_shard, rows_per_image, samples, dim, dtype)
        except SparsesegError as exc:
            problem = exc
    if not run.all_ok(problem is None):
        raise problem or SparsesegError(f"{out}: rank 0 could not create the pool")
    if pool is None:
        pool = PoolStore.open(out, check_done=False)
    mine = [s for s in pool.shards if s.index % run.size == run.rank]
    todo = [s for s in mine if not pool.is_done(s)]
    by_image = labels.pixels_of(meta.size)
    for n, shard in enumerate(todo):
        _extract_shard(config, pool, shard, backbone, strategy, labels, by_image, len(names), run.device, progress)
        if progress is not None:
            progress("shards", n + 1, len(todo))
    run.barrier()
    if run.main:
        pool.finish()
    run.barrier()
    pool = PoolStore.open(out, check_done=False)
    done = [s for s in pool.shards if pool.is_done(s)]
    return {"shards": len(pool.shards), "done_here": len(todo), "skipped": len(mine) - len(todo),
            "finished": len(done), "rows": sum(pool.shard_rows) if len(done) == len(pool.shards) else None,
            "seconds": round(time.perf_counter() - start_time, 3)}


def _extract_shard(config: ExperimentConfig, pool: PoolStore, shard: Shard, backbone, strategy: TwoStageStrategy,
                   labels: PixelLabels, by_image: dict[int, torch.Tensor], total: int, device: torch.device,
                   progress: Progress | None) -> None:
    images = load_split(config.data, config.train_split, only=range(shard.start, shard.stop)).images
    view = ShardImages(images, shard.start, total)
    writer = pool.writer(shard)
    group = config.backbone.batch_size
    size = images.shape[1]
    for g in range(shard.start, shard.stop, group):
        ids = list(range(g, min(g + group, shard.stop)))
        # A fresh store per group of images: its cache then always has room for the group's maps, so
        # the candidates' backbone pass also serves the picks' features (never computed twice).
        store = build_stores(backbone, {config.train_split: view}, config.seed, config.features, group, device)[
            config.train_split]
        ctx = RoundContext(store, labels, None, 1, 1, config.seed, config.strategy.noise_samples)
        picks = [strategy.local_picks_of(ctx, i, by_image.get(i, torch.empty(0, dtype=torch.long))) for i in ids]
        image = torch.cat([torch.full_like(p, i) for i, p in zip(ids, picks, strict=True)])
        flat = torch.cat(picks)
        y, x = flat // size, flat % size
        feats = {s: store.at_pixels(image, y, x, s) for s in pool.samples}
        writer.append(image, y, x, feats)
        lab = [(i, by_image[i]) for i in ids if i in by_image]
        if lab:
            li = torch.cat([torch.full_like(f, i) for i, f in lab])
            lf = torch.cat([f for _, f in lab])
            writer.append_labelled(li, lf // size, lf % size, store.at_pixels(li, lf // size, lf % size))
        if progress is not None:
            progress(f"shard {shard.index}", ids[-1] + 1 - shard.start, shard.stop - shard.start)
    writer.close()
