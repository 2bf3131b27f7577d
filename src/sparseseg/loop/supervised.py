"""The fully supervised reference: the same head, trained on densely labelled training pixels.

Active learning is judged against it ("rounds to reach 80% / 90% of the fully supervised mIoU",
the paper's Table 5). Every training pixel would be N x S x S features of D floats (CamVid at
256x256 with the ImageNet ADM: 367 x 65,536 x 6,144 x 4 bytes = 590 GB), so we train on a seeded
uniform subsample of P labelled (non-void) pixels per image instead: D x P x N x 4 bytes, 2.3 GB
for the default P = 256 on that setting (94k pixels, about 250 times what 10 rounds at 0.1 N
label). Features, head, optimiser and evaluation are exactly the active-learning loop's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparseseg.config import ExperimentConfig
from sparseseg.data.dataset import load_meta
from sparseseg.errors import SparsesegError
from sparseseg.features.store import DETERMINISTIC
from sparseseg.head.mlp import train_head
from sparseseg.io import atomic_write_text
from sparseseg.labels import IGNORE
from sparseseg.loop.engine import Engine, head_seed
from sparseseg.loop.experiment import load_splits
from sparseseg.seeding import derived_generator

Progress = Callable[[str, int, int], None]

DEFAULT_PIXELS_PER_IMAGE = 256
SUPERVISED_FILE = "supervised.json"


def sample_dense_pixels(masks: torch.Tensor, per_image: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A seeded uniform draw of up to `per_image` labelled pixels from every image.

    Args:
        masks: (N, S, S) ground-truth label maps, IGNORE for void.
        per_image: P; an image with fewer labelled pixels gives all of them.
        seed: run seed; image i draws from its own generator, so P or N never shift other images.

    Returns:
        (image, y, x, cls): parallel (n,) int64 tensors, images in order, pixels row-major.
    """
    size = masks.shape[-1]
    parts = []
    for i in range(masks.shape[0]):
        flat = masks[i].reshape(-1).long()
        valid = (flat != IGNORE).nonzero().squeeze(1)
        gen = derived_generator(seed, "supervised", i)
        take = valid[torch.randperm(len(valid), generator=gen)[:per_image]].sort().values
        parts.append(torch.stack([torch.full_like(take, i), take // size, take % size, flat[take]]))
    image, y, x, cls = torch.cat(parts, dim=1) if parts else torch.empty(4, 0, dtype=torch.long)
    return image, y, x, cls


def train_supervised(config: ExperimentConfig, pixels_per_image: int = DEFAULT_PIXELS_PER_IMAGE,
                     progress: Progress | None = None) -> dict:
    """Train the head on P labelled pixels of every training image, evaluate like the loop does.

    Returns:
        What `supervised.json` holds: miou, pixel_accuracy, per_class_iou, pixels used, seconds
        (feature extraction, training and evaluation), and the config.
    """
    if pixels_per_image < 1:
        raise SparsesegError(f"--pixels-per-image {pixels_per_image}: must be at least 1")
    start = time.perf_counter()

    def tick(task: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(task, done, total)) if progress else None

    # 1. data, backbone and feature stores, as Experiment builds them
    meta = load_meta(config.data)
    train, test = load_splits(config, progress)
    engine = Engine(config, meta.classes, default_size=meta.size)
    # pixel_cache_limit=0: each pixel is read once, remembering it would only double the memory
    stores = engine.stores({config.train_split: train.images, config.eval_split: test.images},
                           evaluation=[config.eval_split], pixel_cache_limit=0)
    train_store, test_store = stores[config.train_split], stores[config.eval_split]
    # 2. a seeded uniform subsample of labelled pixels, and their deterministic features
    image, y, x, cls = sample_dense_pixels(train.masks, pixels_per_image, config.seed)
    if len(cls) == 0:
        raise SparsesegError(f"{config.data}/{config.train_split}: every training pixel is void")
    features = train_store.at_pixels(image, y, x, DETERMINISTIC, progress=tick("pixel features"))
    # 3. the loop's head and optimiser, on every sampled pixel at once
    head = train_head(features, cls, len(meta.classes), config.head, head_seed(config.seed, "supervised"),
                      engine.device)
    # 4. the loop's evaluation
    metrics = engine.evaluate(head, test_store, test.masks, tick("evaluating"))
    return {
        **metrics,
        "pixels_per_image": pixels_per_image,
        "pixels": len(cls),
        "train_images": len(train.names),
        "labelled_fraction": len(cls) / (len(train.names) * meta.size * meta.size),
        "feature_dim": train_store.dim,
        "dataset": meta.name,
        "seconds": round(time.perf_counter() - start, 3),
        "config": config.model_dump(mode="json"),
    }


def write_supervised(out: Path, result: dict) -> Path:
    """Write `out/supervised.json` (atomically) and return its path."""
    path = Path(out) / SUPERVISED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


def read_supervised(path: Path) -> dict:
    """A supervised.json, given the file or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / SUPERVISED_FILE
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise SparsesegError(f"{path}: cannot read ({exc.strerror}); run `sparseseg supervised` first") from None
    except json.JSONDecodeError:
        raise SparsesegError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("miou"), (int, float)):
        raise SparsesegError(f"{path}: no 'miou' number; is this a supervised.json from `sparseseg supervised`?")
    return data
