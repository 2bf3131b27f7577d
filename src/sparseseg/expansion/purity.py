"""How good are a backend's regions? Purity against the ground truth, size, and what the overlap rule
leaves, for clicks answered from the ground truth (docs/expansion.md, "Choosing the superpixel
settings").

Definitions (void ground-truth pixels are left out of every fraction):

* **purity**: over every kept region's pixels (the clicked pixel included), the fraction whose true
  class is the click's true class, pooled over regions (a large region weighs more).
* **mean region purity**: the same fraction per region, averaged over regions (each region weighs
  the same: small regions on thin objects count as much as a road region).
* **region pixels per click**: mean pixels of a kept region, over the clicks that were expanded.
* **supervised pixels per click**: (clicked pixels with a class + region pixels after the overlap
  rule) / clicks, void clicks included, as `supervised_pixels / clicks` in rounds.jsonl.
* **label accuracy**: over the region pixels after the overlap rule (the labels the head is given
  beyond the clicks), the fraction whose assigned class is the true one.
* **trained-label accuracy**: the same over the region pixels drawn for training (at most R per
  click, `training_pixels`), weighted by their loss weights: every click's draw weighs w whatever
  its region's size, so this is what the head is taught, and a small impure region counts as much
  as a large pure one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparseseg.expansion.regions import RegionSet, clicked_pixels, resolve, training_pixels
from sparseseg.labels import IGNORE
from sparseseg.seeding import derived_generator


@dataclass(frozen=True)
class Purity:
    """Counts behind the purity figures of one set of clicks (module docstring)."""

    clicks: int  # every click, void answers included
    trainable: int  # clicks whose answer is a class
    kept: int  # clicks whose region was kept
    region_pixels: int  # pixels of kept regions (clicks included), summed over regions
    judged: int  # of those, with a non-void true class
    pure: int  # of those, of the click's true class
    judged_regions: int  # kept regions with a non-void pixel
    region_purity_sum: float  # sum over those of each region's purity
    supervised_regions: int  # region pixels after the overlap rule
    supervised_judged: int  # of those, with a non-void true class
    supervised_correct: int  # of those, labelled with their true class
    trained_weight: float  # loss weight of the drawn region pixels with a non-void true class
    trained_correct_weight: float  # of it, on pixels labelled with their true class

    @property
    def purity(self) -> float:
        return self.pure / self.judged if self.judged else float("nan")

    @property
    def mean_region_purity(self) -> float:
        return self.region_purity_sum / self.judged_regions if self.judged_regions else float("nan")

    @property
    def pixels_per_region(self) -> float:
        return self.region_pixels / self.kept if self.kept else 0.0

    @property
    def supervised_per_click(self) -> float:
        return (self.trainable + self.supervised_regions) / self.clicks if self.clicks else 0.0

    @property
    def label_accuracy(self) -> float:
        return self.supervised_correct / self.supervised_judged if self.supervised_judged else float("nan")

    @property
    def trained_accuracy(self) -> float:
        return self.trained_correct_weight / self.trained_weight if self.trained_weight else float("nan")


def region_purity(regions: RegionSet, truth: np.ndarray, max_region_pixels: int = 32, region_weight: float = 1.0,
                  seed: int = 0) -> Purity:
    """Purity figures of one set of clicks and their regions.

    Args:
        regions: one record per click (`expand_clicks`), `cls` being the click's answer; every click
            counts as clicked for the overlap rule.
        truth: (N, S, S) integer ground truth of the images the records index, void = IGNORE.
        max_region_pixels, region_weight, seed: the training draw (R, w and the run seed).
    """
    truth = np.asarray(truth)
    region_pixels = judged = pure = judged_regions = 0
    purity_sum = 0.0
    for i in np.nonzero(regions.kept)[0].tolist():
        true = truth[regions.image[i]][regions.mask(i)]
        valid = true != IGNORE
        hits = int((true[valid] == truth[regions.image[i], regions.y[i], regions.x[i]]).sum())
        region_pixels += len(true)
        judged += int(valid.sum())
        pure += hits
        if valid.any():
            judged_regions += 1
            purity_sum += hits / int(valid.sum())
    ids = [torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in (regions.image, regions.y, regions.x)]
    resolved = resolve(regions, clicked_pixels(*ids, regions.size))
    true = truth[resolved.image, resolved.y, resolved.x] if len(resolved) else np.zeros(0, dtype=np.int64)
    valid = true != IGNORE
    drawn = training_pixels(resolved, regions, max_region_pixels, region_weight, seed)
    drawn_true = torch.from_numpy(truth[drawn.image.numpy(), drawn.y.numpy(), drawn.x.numpy()].astype(np.int64))
    drawn_valid = drawn_true != IGNORE
    weight = drawn.weight.double()
    return Purity(len(regions), int((regions.cls != IGNORE).sum()), int(regions.kept.sum()), region_pixels, judged,
                  pure, judged_regions, purity_sum, len(resolved), int(valid.sum()),
                  int((true[valid] == resolved.cls[valid]).sum()), float(weight[drawn_valid].sum()),
                  float(weight[drawn_valid & (drawn_true == drawn.cls)].sum()))


def random_clicks(num_images: int, size: int, clicks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`clicks` distinct pixels drawn uniformly over N (S, S) images: (image, y, x), each (clicks,) long.

    Seeded by (seed, "purity clicks"), so a seed always gives the same clicks.
    """
    total = num_images * size * size
    if clicks > total:
        raise ValueError(f"{clicks} clicks asked of {total} pixels")
    flat = torch.randperm(total, generator=derived_generator(seed, "purity clicks"))[:clicks]
    return flat // (size * size), flat % (size * size) // size, flat % size
