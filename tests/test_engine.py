"""The round engine on a toy backbone: what it trains on, how the head is seeded and weighted."""

from __future__ import annotations

import numpy as np
import torch

from sparseseg.config import HeadConfig, load_config
from sparseseg.expansion.regions import RegionSet
from sparseseg.features.store import build_stores
from sparseseg.head.mlp import balanced_weights, train_head
from sparseseg.labels import IGNORE, PixelLabels
from sparseseg.loop.engine import Engine, TrainingSet, head_seed
from sparseseg.seeding import derived_seed
from tests.conftest import ToyBackbone

SIZE = 16


def _engine(monkeypatch, *sets):
    monkeypatch.setattr("sparseseg.loop.engine.build_backbone", lambda cfg, device, default_size: ToyBackbone(SIZE))
    cfg = load_config(None, ["data=unused", "backbone.name=efficientnet_lite0", "head.epochs=5", "head.dropout=0", *sets])
    return Engine(cfg, ["a", "b", "c"], default_size=SIZE)


def _labels():
    labels = PixelLabels()
    labels.add(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]),
               torch.tensor([0, IGNORE, 1, 1]), 1)
    labels.add(torch.tensor([2]), torch.tensor([9]), torch.tensor([9]), torch.tensor([2]), 2)
    return labels


def test_the_head_trains_on_the_answered_clicks_with_the_round_seed(monkeypatch):
    engine = _engine(monkeypatch)
    images = torch.randint(0, 256, (3, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    store = engine.stores({"train": images})["train"]
    data = engine.training_set(_labels(), None, SIZE)
    assert data.clicks.cls.tolist() == [0, 1, 1, 2] and data.regions is None and data.last_round == 2
    head = engine.train_head(store, data, round=2)
    assert head_seed(7, 3) == derived_seed(7, "head", 3)
    # the same head from the parts: features at the clicks, the paper's head, seed (seed, "head", 2)
    feats = store.at_pixels(data.clicks.image, data.clicks.y, data.clicks.x)
    ref = train_head(feats, data.clicks.cls, 3, HeadConfig(epochs=5), derived_seed(0, "head", 2))
    for a, b in zip(head.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert engine.train_head(store, TrainingSet(PixelLabels()), round=1) is None


def test_balanced_class_weighting_reaches_the_loss(monkeypatch):
    engine = _engine(monkeypatch, "head.class_weighting=balanced")
    images = torch.randint(0, 256, (3, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    store = build_stores(ToyBackbone(SIZE), {"train": images}, 0, engine.settings.features, 4, "cpu")["train"]
    data = engine.training_set(_labels(), None, SIZE)
    head = engine.train_head(store, data, round=2)
    feats = store.at_pixels(data.clicks.image, data.clicks.y, data.clicks.x)
    cls = data.clicks.cls
    ref = train_head(feats, cls, 3, HeadConfig(epochs=5), derived_seed(0, "head", 2), weights=balanced_weights(cls))
    for a, b in zip(head.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_regions_add_their_drawn_pixels_after_the_clicks(monkeypatch):
    engine = _engine(monkeypatch, "sam.max_region_pixels=2", "sam.region_weight=0.5")
    labels = _labels()
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[0:3, 0:3] = True  # 9 pixels around nothing clicked in image 0
    regions = RegionSet(SIZE, np.array([0]), np.array([1]), np.array([5]), np.array([0]), np.array([1]),
                        np.array([0.9], dtype=np.float32), np.array([True]), np.packbits(mask.reshape(-1))[None])
    data = engine.training_set(labels, regions, SIZE)
    assert len(data.resolved) == 9 and len(data.regions) == 2  # at most 2 drawn, sharing weight 0.5
    assert data.regions.weight.tolist() == [0.25, 0.25] and set(data.regions.cls.tolist()) == {0}
    assert len(data) == 4 + 2
