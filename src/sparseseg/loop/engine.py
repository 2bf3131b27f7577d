"""The round engine: what one round of active learning needs, for simulated runs and labelling projects alike.

An `Engine` owns the backbone, builds the feature stores, fits the head on clicks (and, with
expansion, on their regions), runs the strategy for a round, and predicts and evaluates. What
differs between its two users stays with them:

    Experiment (loop/experiment.py) = Engine + an oracle (the ground-truth masks) + a run directory
    Project (annotate/project.py)   = Engine + a SQLite store of queries and answers + exporters

The fully supervised reference (loop/supervised.py) and the ScribbleGen evaluation use the same
backbone factory, feature-store builder, head training and evaluation.

Head seed rule: the head trained on the answers of rounds 1..r is seeded by
`derived_seed(seed, "head", r)`, whoever trains it (a run after round r; a project whose latest
answered round is r), so replaying a round retrains the same head bit for bit. A head trained for
another purpose takes a name in place of r ("supervised", "scribblegen").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparseseg.backbones.registry import build_backbone
from sparseseg.config import RoundSettings
from sparseseg.device import resolve_device
from sparseseg.expansion.base import Expander
from sparseseg.expansion.regions import (
    RegionSet,
    Resolved,
    TrainingPixels,
    clicked_pixels,
    resolve,
    training_pixels,
)
from sparseseg.expansion.registry import Expansion, expansion_of
from sparseseg.features.store import DETERMINISTIC, FeatureStore, build_stores
from sparseseg.head.mlp import balanced_weights, predict_proba, train_head
from sparseseg.head.predictor import HeadPredictor
from sparseseg.labels import IGNORE, PixelLabels
from sparseseg.loop.metrics import ConfusionMatrix
from sparseseg.seeding import derived_seed
from sparseseg.selection.strategies import Picks, RoundContext, Strategy, check_strategy, create_strategy

Progress = Callable[[str, int, int], None]


def head_seed(seed: int, round: int | str) -> int:
    """The seed of the head trained on the answers of rounds 1..`round` (module docstring)."""
    return derived_seed(seed, "head", round)


def predict_image(head: nn.Module, store: FeatureStore, image: int, tile_pixels: int) -> torch.Tensor:
    """(S, S) predicted class ids of one image of `store`, computed tile by tile."""
    tiles = [predict_proba(head, t).argmax(1) for t in store.image_tiles(image, DETERMINISTIC, tile_pixels)]
    return torch.cat(tiles).view(store.size, store.size)


def evaluate_head(head: nn.Module, store: FeatureStore, masks: torch.Tensor, class_names: Sequence[str],
                  tile_pixels: int, progress: Callable[[int, int], None] | None = None) -> dict:
    """Confusion-matrix mIoU of `head` over every image of `store` against `masks` (N, S, S).

    Shared by the active-learning loop, the fully supervised reference and ScribbleGen, so all are
    scored alike.
    """
    cm = ConfusionMatrix(len(class_names), ignore_index=IGNORE)
    for i in range(len(store)):
        cm.update(predict_image(head, store, i, tile_pixels), masks[i])
        if progress:
            progress(i + 1, len(store))
    return cm.to_dict(list(class_names))


@dataclass
class TrainingSet:
    """The pixels a head is trained on: the trainable clicks, then the region pixels drawn for training.

    Attributes:
        clicks: the clicks whose answer is a class (void and skipped answers are never trained on).
        regions: region pixels drawn for training, with their loss weights (None without expansion).
        resolved: every region pixel after the overlap rule (None without expansion).
    """

    clicks: PixelLabels
    regions: TrainingPixels | None = None
    resolved: Resolved | None = None

    def __len__(self) -> int:
        return len(self.clicks) + (len(self.regions) if self.regions is not None else 0)

    @property
    def last_round(self) -> int:
        """The latest round with a trainable answer (0 when there is none)."""
        return int(self.clicks.round.max()) if len(self.clicks) else 0


class Engine:
    """The backbone and everything a round does with it (module docstring).

    Building an Engine loads the backbone; the strategy is built and checked by `prepare_strategy`
    (a fully supervised run needs none), the expander on first use (`expander`).

    Args:
        settings: the round settings of an experiment or a project.
        class_names: the dataset's classes (line i = class id i).
        default_size: the backbone's input size when neither the settings nor the checkpoint give one
            (the data's working resolution).
    """

    def __init__(self, settings: RoundSettings, class_names: Sequence[str], default_size: int) -> None:
        self.settings = settings
        self.class_names = list(class_names)
        self.device = resolve_device(settings.backbone.device)
        self.backbone = build_backbone(settings.backbone, self.device, default_size=default_size)
        self.strategy: Strategy | None = None
        self._expander = None

    # ------------------------------------------------------------------ building
    def prepare_strategy(self, num_images: int, size: int, budget: int) -> Strategy:
        """Build the configured strategy and fail before any work when it cannot run here."""
        strategy = create_strategy(self.settings.strategy)
        strategy.check_budget(num_images, size, budget)
        check_strategy(strategy, self.backbone, self.settings.head.dropout, self.settings.head.ensemble)
        self.strategy = strategy
        return strategy

    def stores(self, splits: Mapping[str, torch.Tensor], evaluation: Sequence[str] = (),
               pixel_cache_limit: int = 256) -> dict[str, FeatureStore]:
        """One FeatureStore per split on this engine's backbone (`features.store.build_stores`)."""
        s = self.settings
        return build_stores(self.backbone, splits, s.seed, s.features, s.backbone.batch_size, self.device,
                            evaluation, pixel_cache_limit)

    @property
    def expands(self) -> bool:
        """Whether clicks are expanded into regions."""
        return self.settings.expansion != "none"

    @property
    def expansion(self) -> Expansion | None:
        """The configured expansion (SAM or superpixels): keep threshold, training draw, model name."""
        return expansion_of(self.settings)

    def expander(self, features: FeatureStore | None = None) -> Expander:
        """The configured region expander, loaded on first use.

        Args:
            features: the store over the images it will expand, whose index is the image id it is
                given; needed by regions grown in feature space (`superpixel.method: feature`) only.
        """
        if self._expander is None:
            self._expander = self.expansion.build(self.device, features)
        return self._expander

    # ------------------------------------------------------------------ the head
    def training_set(self, clicks: PixelLabels, regions: RegionSet | None, size: int) -> TrainingSet:
        """What the head trains on (cheap: no features).

        Args:
            clicks: every clicked pixel with its answer (IGNORE for void, skipped or pending); all
                of them keep their own answer under the overlap rule, the trainable ones are trained on.
            regions: every region so far, or None without expansion.
            size: the working resolution.
        """
        trainable = clicks.subset(clicks.trainable())
        if regions is None:
            return TrainingSet(trainable)
        expansion = self.expansion or Expansion("sam", self.settings.sam)  # regions handed in without expansion
        resolved = resolve(regions, clicked_pixels(clicks.image, clicks.y, clicks.x, size))
        drawn = training_pixels(resolved, regions, expansion.max_region_pixels, expansion.region_weight,
                                self.settings.seed)
        return TrainingSet(trainable, drawn, resolved)

    def click_features(self, store: FeatureStore, data: TrainingSet) -> torch.Tensor:
        """(n, D) deterministic features of the trainable clicks, in click order."""
        c = data.clicks
        return store.labelled_features(c.image, c.y, c.x)

    def train_head(self, store: FeatureStore, data: TrainingSet, round: int | str) -> nn.Module | None:
        """A fresh head on `data`, seeded by `head_seed(seed, round)`; None when there is nothing to train on.

        Clicks weigh 1; with expansion, each click's drawn region pixels share the region weight w;
        with `head.class_weighting: balanced` those weights are rescaled so every class seen weighs alike.
        """
        if len(data.clicks) == 0:
            return None
        s = self.settings
        feats, cls = self.click_features(store, data), data.clicks.cls
        weights = None
        if data.regions is not None:
            extra = data.regions
            if len(extra):
                feats = torch.cat([feats, store.at_pixels(extra.image, extra.y, extra.x, DETERMINISTIC)])
            cls = torch.cat([cls, extra.cls])
            weights = torch.cat([torch.ones(len(data.clicks)), extra.weight])
        if s.head.class_weighting == "balanced":
            weights = balanced_weights(cls, weights)
        return train_head(feats, cls, len(self.class_names), s.head, head_seed(s.seed, round), self.device,
                          weights=weights)

    # ------------------------------------------------------------------ a round
    def select(self, store: FeatureStore, labels: PixelLabels, head: nn.Module | None, budget: int, round: int,
               progress: Progress | None = None) -> Picks:
        """The strategy's picks for `round` (`prepare_strategy` first).

        Args:
            store: the features of the images to choose from.
            labels: every pixel asked so far (never asked again; counted as covered).
            head: the current head, or None before any answer (coverage alone, or a random draw).
        """
        if self.strategy is None:
            raise RuntimeError("Engine.select before prepare_strategy")
        s = self.settings
        ctx = RoundContext(store, labels, HeadPredictor(head) if head is not None else None, budget, round, s.seed,
                           s.strategy.noise_samples, progress, s.features.tile_pixels)
        return self.strategy.select(ctx)

    def predict(self, head: nn.Module, store: FeatureStore, image: int) -> torch.Tensor:
        """(S, S) predicted class ids of one image."""
        return predict_image(head, store, image, self.settings.features.tile_pixels)

    def evaluate(self, head: nn.Module, store: FeatureStore, masks: torch.Tensor,
                 progress: Callable[[int, int], None] | None = None) -> dict:
        """Confusion-matrix mIoU over every image of `store`."""
        return evaluate_head(head, store, masks, self.class_names, self.settings.features.tile_pixels, progress)
