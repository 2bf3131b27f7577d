"""The head trained on scribbled pixels, with or without synthetic images (ScribbleGen's schemes).

Scribble supervision is the partial cross-entropy: the loss is the cross-entropy over scribbled
pixels only. A synthetic image is generated from a real image's scribble, so it shares the
real image's scribbled pixels and their labels: only the features differ. Each epoch's training
set is a list of (source, image) pairs, where source -1 is the real image and k >= 0 its twin in
synthetic dataset k (one dataset per encode ratio, in the order given):

- `none`: real images only.
- `append`: every real image and every synthetic twin, every epoch.
- `sample`: each real image is replaced by a synthetic twin with probability p, the twin's
  dataset drawn uniformly among those given (one dataset: fixed lambda; several: uniform lambda).
- `synthetic`: the synthetic twins only (every dataset), no real image.
- `curriculum` (adaptive lambda): dataset k becomes the current one at epoch starts[k] (starts
  ascending, one per dataset, usually in ascending lambda: realistic first, diverse later); each
  real image is replaced by its twin in the current dataset with probability p; before starts[0],
  real images only.

Training follows `sparseseg.head.mlp`'s recipe (the same MLP, Adam, weight decay and cosine
schedule), for `head.epochs` epochs without early stopping: the data change from epoch to epoch,
so a plateau of the loss says little. Each epoch's draws come from a generator seeded by (seed,
epoch), so a result can be replayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparseseg.backbones.registry import build_backbone
from sparseseg.config import ExperimentConfig, HeadConfig
from sparseseg.data.dataset import load_meta, load_split
from sparseseg.device import resolve_device
from sparseseg.errors import SparsesegError
from sparseseg.features.store import DETERMINISTIC, build_stores
from sparseseg.head.mlp import make_head
from sparseseg.loop.engine import evaluate_head, head_seed
from sparseseg.loop.supervised import sample_dense_pixels
from sparseseg.scribbles.io import load_scribbles
from sparseseg.seeding import derived_generator

SCHEMES = ("none", "append", "sample", "synthetic", "curriculum")
REAL = -1


def check_scheme(scheme: str, num_synthetic: int, p: float, starts: Sequence[int] | None) -> None:
    """Raises SparsesegError unless the scheme's arguments fit together."""
    if scheme not in SCHEMES:
        raise SparsesegError(f"scheme {scheme!r} is not known; choose one of {', '.join(SCHEMES)}")
    if scheme != "none" and num_synthetic == 0:
        raise SparsesegError(f"scheme {scheme!r} needs at least one synthetic dataset (--synthetic)")
    if scheme in ("sample", "curriculum") and not 0 <= p <= 1:
        raise SparsesegError(f"p {p}: the replacement probability must be in [0, 1]")
    if scheme == "curriculum":
        if starts is None or len(starts) != num_synthetic:
            raise SparsesegError(f"curriculum: give one start epoch per synthetic dataset ({num_synthetic}), "
                                 f"got {list(starts or [])}")
        if any(b <= a for a, b in zip(starts, starts[1:], strict=False)) or min(starts) < 0:
            raise SparsesegError(f"curriculum: start epochs {list(starts)} must be non-negative and ascending")


def current_dataset(epoch: int, starts: Sequence[int]) -> int:
    """The curriculum's dataset at `epoch`: the last k with starts[k] <= epoch, or REAL before starts[0]."""
    current = REAL
    for k, start in enumerate(starts):
        if epoch >= start:
            current = k
    return current


def epoch_sources(scheme: str, epoch: int, num_images: int, num_synthetic: int, p: float = 0.5,
                  starts: Sequence[int] | None = None, seed: int = 0) -> list[np.ndarray]:
    """Which version of each image an epoch trains on (module docstring).

    Returns:
        A list of (N,) int arrays; in each, entry i is the source of image i (REAL = -1 or a
        synthetic dataset index). Every array adds one copy of each image to the epoch.
    """
    check_scheme(scheme, num_synthetic, p, starts)
    real = np.full(num_images, REAL, dtype=np.int64)
    if scheme == "none":
        return [real]
    if scheme == "append":
        return [real] + [np.full(num_images, k, dtype=np.int64) for k in range(num_synthetic)]
    if scheme == "synthetic":
        return [np.full(num_images, k, dtype=np.int64) for k in range(num_synthetic)]
    gen = derived_generator(seed, "scribblegen", "epoch", epoch)
    replace = (torch.rand(num_images, generator=gen) < p).numpy()
    if scheme == "sample":
        twin = torch.randint(num_synthetic, (num_images,), generator=gen).numpy()
    else:  # curriculum
        twin = np.full(num_images, current_dataset(epoch, starts or []), dtype=np.int64)
    return [np.where(replace & (twin != REAL), twin, REAL).astype(np.int64)]


def train_head_scheme(features: torch.Tensor, pixel_image: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      config: HeadConfig, scheme: str, p: float = 0.5, starts: Sequence[int] | None = None,
                      seed: int = 0, device: str | torch.device = "cpu") -> nn.Sequential:
    """Trains a fresh head with partial cross-entropy under an augmentation scheme.

    Args:
        features: (1 + K, n, D): row 0 the real images' features of the n scribbled pixels,
            row 1 + k the same pixels in synthetic dataset k.
        pixel_image: (n,) image index of each pixel.
        labels: (n,) scribble class of each pixel.
        seed: fixes the initialisation, the batch order and every epoch's draws.

    Returns:
        The head in eval mode.
    """
    sources, n = features.shape[0], features.shape[1]
    if n == 0:
        raise SparsesegError("no scribbled pixels to train the head on")
    num_images = int(pixel_image.max()) + 1
    check_scheme(scheme, sources - 1, p, starts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train_head: the same head bit for bit under any load
    try:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = make_head(features.shape[2], num_classes, config.hidden, config.dropout).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.t_max, eta_min=config.eta_min)
        pixels = torch.arange(n)
        head.train()
        for epoch in range(config.epochs):
            plan = epoch_sources(scheme, epoch, num_images, sources - 1, p, starts, seed)
            rows = [torch.from_numpy(src)[pixel_image] + 1 for src in plan]  # +1: row 0 is the real images
            x = torch.cat([features[r, pixels] for r in rows])
            y = labels.repeat(len(rows)).long()
            if len(y) == 1:  # BatchNorm needs two samples
                x, y = x.repeat(2, 1), y.repeat(2)
            perm = torch.randperm(len(y), generator=gen)
            batches = list(torch.split(perm, config.batch_size))
            if len(batches) > 1 and len(batches[-1]) == 1:
                batches[-2] = torch.cat(batches[-2:])
                batches.pop()
            for idx in batches:
                loss = F.cross_entropy(head(x[idx].to(device)), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return head.eval()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, S', S', 3) uint8 -> (N, size, size, 3) uint8, bilinear with antialiasing."""
    if images.shape[1] == size:
        return images
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class SchemeSpec:
    """One arm of a comparison: a scheme over a subset of the synthetic datasets.

    Attributes:
        label: the row name in tables ("fixed lambda 0.30", "adaptive lambda", ...).
        scheme: one of SCHEMES.
        datasets: indices into the comparison's synthetic datasets that this arm trains with.
        p: replacement probability (sample, curriculum).
        starts: curriculum start epochs, one per dataset in `datasets`.
    """

    label: str
    scheme: str
    datasets: tuple[int, ...] = ()
    p: float = 0.5
    starts: tuple[int, ...] | None = None


def standard_schemes(names: Sequence[str], epochs: int, p: float = 0.5) -> list[SchemeSpec]:
    """The comparison of the ScribbleGen paper for synthetic datasets named `names` (low to high lambda).

    Real only; each dataset alone as a fixed lambda (sample with p); uniform lambda (sample over
    all); adaptive lambda (curriculum with the datasets taking over at evenly spaced epochs,
    the first at epoch 0: realistic first, diverse later); append (every twin, every epoch).
    """
    k = len(names)
    arms = [SchemeSpec("real only", "none")]
    if k == 0:
        return arms
    arms += [SchemeSpec(f"fixed {name}", "sample", (i,), p) for i, name in enumerate(names)]
    if k > 1:
        arms.append(SchemeSpec("uniform lambda", "sample", tuple(range(k)), p))
        arms.append(SchemeSpec("adaptive lambda", "curriculum", tuple(range(k)), p,
                               tuple(round(i * epochs / k) for i in range(k))))
    arms.append(SchemeSpec("append", "append", tuple(range(k))))
    return arms


@torch.no_grad()
def scribble_agreement(head: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                       device: str | torch.device = "cpu", chunk: int = 65536) -> list[float]:
    """Per version of the images (row of `features`), the share of scribbled pixels the head labels
    with their scribble's class.

    For the head trained on real scribbles only, the synthetic rows measure how far a generator
    kept the classes its scribbles asked for, as the segmentation model sees them: a twin that
    draws sky where the scribble says road scores low, whatever it looks like.
    """
    head.eval()
    shares = []
    for row in features:
        hits = sum(int((head(row[i:i + chunk].to(device)).argmax(1).cpu() == labels[i:i + chunk]).sum())
                   for i in range(0, len(labels), chunk))
        shares.append(hits / max(len(labels), 1))
    return shares


def evaluate_schemes(
    config: ExperimentConfig,
    scribbles_dir: str | Path,
    synthetic: Sequence[str | Path],
    arms: Sequence[SchemeSpec],
    pixels_per_image: int = 64,
    ignore_id: int = 255,
    backbone=None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict]:
    """Trains one head per arm on real scribbles (plus synthetic images), returns each one's test mIoU.

    Features come from the config's backbone (or `backbone`, any `FeatureBackbone`) exactly as in
    the active-learning loop, at the training images' scribbled pixels: at most
    `pixels_per_image` of them per image (a seeded uniform draw, as the supervised reference),
    which bounds memory at (1 + K) x N x pixels_per_image x D floats. They are extracted once and
    shared by every arm, as are the test split's features. Synthetic images are resized to the
    dataset's size. The evaluation is `evaluate_head` on the config's eval split.

    Returns:
        Per arm, the metrics of `evaluate_head` plus label, scheme, p, starts, synthetic folders,
        pixel counts, `scribble_agreement` (the arm's head on the scribbled pixels of the real
        images and of every synthetic dataset, by folder name: `scribble_agreement`) and seconds
        (the arm's own, plus an equal share of the feature extraction).

    Raises:
        SparsesegError: missing or mismatched files, a bad scheme, no scribbled pixel.
    """
    start_time = time.perf_counter()

    def tick(task: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(task, done, total)) if progress else None

    for arm in arms:
        if any(not 0 <= k < len(synthetic) for k in arm.datasets):
            raise SparsesegError(f"{arm.label}: dataset index out of range for {len(synthetic)} synthetic datasets")
        check_scheme(arm.scheme, len(arm.datasets), arm.p, arm.starts)
    if pixels_per_image < 1:
        raise SparsesegError(f"pixels_per_image {pixels_per_image}: must be at least 1")
    # 1. real images, their scribbles, the test split
    device = resolve_device(config.backbone.device)
    meta = load_meta(config.data)
    train = load_split(config.data, config.train_split, progress=tick(f"loading {config.train_split}"))
    test = load_split(config.data, config.eval_split, progress=tick(f"loading {config.eval_split}"))
    if test.masks is None:
        raise SparsesegError(f"{config.data}/{config.eval_split}: no masks to evaluate against")
    scribbles = load_scribbles(scribbles_dir, train.names, meta.size, ignore_id, meta.num_classes)
    # 2. synthetic twins, in the real split's image order
    twins = []
    for folder in synthetic:
        data = load_split(Path(folder), "train")
        if load_meta(Path(folder)).classes != meta.classes:
            raise SparsesegError(f"{Path(folder) / 'meta.json'}: classes differ from {config.data}'s")
        index = {name: i for i, name in enumerate(data.names)}
        missing = [n for n in train.names if n not in index]
        if missing:
            raise SparsesegError(f"{Path(folder) / 'train' / 'images'}: no synthetic twin of {missing[0]}.png "
                                 f"({len(missing)} missing)")
        twins.append(_resize(data.images[[index[n] for n in train.names]], meta.size))
    # 3. features of the scribbled pixels in every version of the images
    image, y, x, cls = sample_dense_pixels(scribbles, pixels_per_image, config.seed)
    if len(cls) == 0:
        raise SparsesegError(f"{scribbles_dir}: no scribbled pixel in any training image")
    if backbone is None:
        backbone = build_backbone(config.backbone, device, default_size=meta.size)
    # a twin's feature noise is keyed by its folder's name, so it does not depend on which other
    # datasets are compared alongside it
    names = [config.train_split, *(f"synthetic:{Path(f).name}" for f in synthetic)]
    stores = build_stores(backbone, {**dict(zip(names, [train.images, *twins], strict=True)),
                                     config.eval_split: test.images}, config.seed, config.features,
                          config.backbone.batch_size, device, evaluation=[config.eval_split], pixel_cache_limit=0)
    features = torch.stack([stores[split].at_pixels(image, y, x, DETERMINISTIC, progress=tick(f"features {split}"))
                            for split in names])
    versions = ["real", *(Path(f).name for f in synthetic)]
    test_store = stores[config.eval_split]
    shared = (time.perf_counter() - start_time) / max(len(arms), 1)
    # 4. per arm: the head on its rows (real first), then the loop's evaluation
    results = []
    for arm in arms:
        arm_start = time.perf_counter()
        # one head seed for every arm: the arms differ in their data only
        seed = head_seed(config.seed, "scribblegen")
        rows = features[[0, *(1 + k for k in arm.datasets)]]
        head = train_head_scheme(rows, image, cls, meta.num_classes, config.head, arm.scheme, arm.p, arm.starts,
                                 seed, device)
        metrics = evaluate_head(head, test_store, test.masks, list(meta.classes), config.features.tile_pixels,
                                tick(f"evaluating {arm.label}"))
        agreement = dict(zip(versions, scribble_agreement(head, features, cls, device), strict=True))
        results.append({**metrics, "label": arm.label, "scheme": arm.scheme, "p": arm.p,
                        "starts": list(arm.starts) if arm.starts is not None else None,
                        "synthetic": [str(Path(synthetic[k])) for k in arm.datasets],
                        "scribbled_pixels": int((scribbles != 255).sum()), "pixels": len(cls),
                        "train_images": len(train.names), "dataset": meta.name, "seed": config.seed,
                        "scribble_agreement": agreement,
                        "seconds": round(time.perf_counter() - arm_start + shared, 3)})
    return results


def evaluate_scheme(
    config: ExperimentConfig,
    scribbles_dir: str | Path,
    synthetic: Sequence[str | Path] = (),
    scheme: str = "none",
    p: float = 0.5,
    starts: Sequence[int] | None = None,
    pixels_per_image: int = 64,
    ignore_id: int = 255,
    backbone=None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """`evaluate_schemes` for one scheme over every dataset of `synthetic` (the `evaluate` command)."""
    arm = SchemeSpec(scheme, scheme, tuple(range(len(synthetic))), p, tuple(starts) if starts is not None else None)
    return evaluate_schemes(config, scribbles_dir, synthetic, [arm], pixels_per_image, ignore_id, backbone,
                            progress)[0]
