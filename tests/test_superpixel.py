"""`expansion: superpixel`: regions from the image alone (SLIC, Felzenszwalb, feature-space growth), the
purity measure, and the same loops and files as SAM expansion, on synthetic scenes and toy backbones.

References are independent of the code under test: scikit-image's own segmentations, a plain
Python breadth-first search, scipy's connected components over brute-force similarities, and
purity figures worked by hand.
"""

from __future__ import annotations

import io
import json
import sqlite3
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage.segmentation import felzenszwalb, slic

from sparseseg.annotate.init import init_project
from sparseseg.annotate.store import DB_FILE
from sparseseg.config import SuperpixelConfig, load_config
from sparseseg.data.dataset import load_split
from sparseseg.data.readers import read_image
from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.expansion.purity import random_clicks, region_purity
from sparseseg.expansion.regions import RegionSet, clicked_pixels, expand_clicks, resolve
from sparseseg.expansion.registry import backbone_tag, build_expander, describe, expansion_of
from sparseseg.expansion.superpixel import SuperpixelExpander, grow
from sparseseg.features.store import DETERMINISTIC, FeatureStore
from sparseseg.labels import IGNORE
from sparseseg.loop.experiment import Experiment
from sparseseg.loop.preview import PANEL, save_preview
from tests.conftest import ToyBackbone, answer_first_round, assert_review_shows_regions, save_tiny_adm

SIZE = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("superpixel")
    make_synthetic(root / "data", n_train=6, n_test=2, size=SIZE, seed=0)
    save_tiny_adm(root / "adm.pt", SIZE)
    return root


@pytest.fixture(scope="module")
def train(world):
    return load_split(world / "data", "train")


def bfs_distances(allowed: np.ndarray, y: int, x: int) -> np.ndarray:
    """Breadth-first 8-neighbour distance from (y, x) within `allowed` (-1: unreachable); a plain loop."""
    dist = np.full(allowed.shape, -1)
    dist[y, x] = 0
    todo = deque([(y, x)])
    while todo:
        cy, cx = todo.popleft()
        for ny, nx in ((cy + dy, cx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
            if 0 <= ny < allowed.shape[0] and 0 <= nx < allowed.shape[1] and allowed[ny, nx] and dist[ny, nx] < 0:
                dist[ny, nx] = dist[cy, cx] + 1
                todo.append((ny, nx))
    return dist


# ---------------------------------------------------------------------------- growing and cutting a region
def test_grow_by_hand():
    allowed = np.ones((5, 5), dtype=bool)
    block = np.zeros((5, 5), dtype=bool)
    block[1:4, 1:4] = True
    assert np.array_equal(grow(allowed, 2, 2, 9), block)  # the click and its eight neighbours
    three = np.zeros((5, 5), dtype=bool)
    three[2, 2] = three[1, 1] = three[1, 2] = True  # of the ring, the first two in raster order
    assert np.array_equal(grow(allowed, 2, 2, 3), three)
    only = np.zeros((5, 5), dtype=bool)
    only[2, 2] = True
    assert np.array_equal(grow(allowed & ~block, 2, 2, 25), only)  # no neighbour allowed: the click alone
    wall = allowed.copy()
    wall[:, 2] = False
    assert np.array_equal(grow(wall, 0, 0, 25), wall & (np.arange(5) < 2))  # never through the wall


@pytest.mark.parametrize("seed", range(4))
def test_grow_takes_the_nearest_pixels_of_the_connected_component(seed):
    rng = np.random.default_rng(seed)
    allowed = rng.random((20, 24)) < 0.65
    y, x = 10, 12
    allowed[y, x] = True
    dist = bfs_distances(allowed, y, x)
    labels, _ = ndimage.label(allowed, np.ones((3, 3)))  # scipy's 8-connected components
    component = labels == labels[y, x]
    assert np.array_equal(grow(allowed, y, x, allowed.size), component)
    for cap in (1, 7, 30, int(component.sum()) - 1):
        region = grow(allowed, y, x, cap)
        assert region.sum() == cap and region[y, x] and not (region & ~component).any()
        # nearest first: no pixel left out is nearer than one taken
        assert dist[region].max() <= dist[component & ~region].min()


# ---------------------------------------------------------------------------- the three methods
@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_region_is_the_superpixel_that_holds_the_click(train, method):
    config = SuperpixelConfig(method=method, n_segments=30, scale=50, min_size=20, max_pixels=SIZE * SIZE)
    image = train.images[0].numpy()
    theirs = (slic(image, n_segments=30, compactness=10.0, sigma=0.5, start_label=0, channel_axis=-1)
              if method == "slic" else felzenszwalb(image, scale=50, sigma=0.5, min_size=20, channel_axis=-1))
    ys, xs = np.array([0, 5, 17, 31, 20]), np.array([0, 30, 8, 31, 20])
    expander = SuperpixelExpander(config)
    proposals = expander.propose(image, ys, xs)
    assert proposals.masks.shape == (5, 1, SIZE, SIZE) and (proposals.scores == 1).all()
    assert expander.segmentations_computed == 1
    for i, (y, x) in enumerate(zip(ys, xs, strict=True)):
        segment = theirs == theirs[y, x]
        # scikit-image's segments are 8-connected (SLIC enforces 4-connectivity; Felzenszwalb merges 8-neighbours)
        assert np.array_equal(proposals.masks[i, 0], segment), (y, x)
    # a cap cuts the superpixel to the pixels nearest the click
    capped = SuperpixelExpander(config.model_copy(update={"max_pixels": 5})).propose(image, ys, xs)
    for i, (y, x) in enumerate(zip(ys, xs, strict=True)):
        segment = theirs == theirs[y, x]
        mask = capped.masks[i, 0]
        assert mask.sum() == min(5, segment.sum()) and mask[y, x] and not (mask & ~segment).any()
        dist = bfs_distances(segment, y, x)
        if (segment & ~mask).any():
            assert dist[mask].max() <= dist[segment & ~mask].min()


def test_feature_region_matches_brute_force_similarity(train):
    backbone = ToyBackbone(input_size=SIZE)
    store = FeatureStore(backbone, train.images, seed=0, split="train")
    config = SuperpixelConfig(method="feature", threshold=0.8, radius=6, max_pixels=SIZE * SIZE)
    expander = build_expander(config, "cpu", store)
    assert expander.name == "superpixel:feature(threshold=0.8,radius=6,max_pixels=1024)" == describe(config)
    image = 2
    whole = torch.cat(list(store.image_tiles(image, DETERMINISTIC))).view(SIZE, SIZE, -1)  # every pixel's feature
    ys, xs = np.array([3, 16, 30, 16]), np.array([4, 16, 0, 17])
    proposals = expander.propose(train.images[image].numpy(), ys, xs, image_id=image)
    grown = 0
    for i, (y, x) in enumerate(zip(ys, xs, strict=True)):
        similarity = (whole @ whole[y, x]).numpy()
        window = np.zeros((SIZE, SIZE), dtype=bool)
        window[max(0, y - 6): y + 7, max(0, x - 6): x + 7] = True
        labels, _ = ndimage.label(window & (similarity >= 0.8 - 1e-5), np.ones((3, 3)))
        want = labels == labels[y, x]
        got = proposals.masks[i, 0]
        # equal up to pixels within float rounding of the threshold
        borderline = np.abs(similarity - 0.8) < 1e-5
        assert np.array_equal(got & ~borderline, want & ~borderline), (y, x)
        grown += int(got.sum())
    assert grown > len(ys)  # the toy features do make regions larger than the clicks
    with pytest.raises(ValueError, match="image's index"):
        expander.propose(train.images[image].numpy(), ys, xs)
    with pytest.raises(SparsesegError, match="method=feature needs the backbone's features"):
        build_expander(config)


def test_config_names_and_settings(world):
    base = [f"data={world / 'data'}", f"backbone.checkpoint={world / 'adm.pt'}"]
    plain = load_config(None, base)
    assert plain.superpixel == SuperpixelConfig() and expansion_of(plain) is None
    # the defaults chosen from the purity table (docs/expansion.md)
    assert expansion_of(load_config(None, [*base, "expansion=superpixel"])).model == \
        "superpixel:felzenszwalb(scale=25,sigma=0.5,min_size=10,max_pixels=4096)"
    cfg = load_config(None, [*base, "expansion=superpixel", "superpixel.method=felzenszwalb",
                             "superpixel.scale=50", "superpixel.max_region_pixels=8"])
    expansion = expansion_of(cfg)
    assert expansion.model == "superpixel:felzenszwalb(scale=50,sigma=0.5,min_size=10,max_pixels=4096)"
    assert expansion.tau == 0.0 and expansion.max_region_pixels == 8 and not expansion.needs_features
    assert expansion.record()["method"] == "superpixel" and expansion.record()["scale"] == 50
    assert expansion.record()["superpixel_method"] == "felzenszwalb"
    with pytest.raises(SparsesegError, match="superpixel.method"):
        load_config(None, [*base, "expansion=superpixel", "superpixel.method=watershed"])
    with pytest.raises(SparsesegError, match="superpixel.n_segmets"):
        load_config(None, [*base, "superpixel.n_segmets=3"])


# ---------------------------------------------------------------------------- purity
def test_purity_by_hand():
    truth = np.array([[[1, 1, 1, 2],
                       [1, 1, 2, 2],
                       [3, 3, IGNORE, 2],
                       [3, 3, 3, 3]]])
    a = np.zeros((4, 4), dtype=bool)
    a[0:3, 0:3] = True  # click (0, 0), class 1: truth 1,1,1 / 1,1,2 / 3,3,void -> 5 of 8 non-void
    b = np.zeros((4, 4), dtype=bool)
    b[1:4, 2:4] = True  # click (1, 3), class 2: truth 2,2 / void,2 / 3,3 -> 3 of 5 non-void
    regions = RegionSet(4, np.array([0, 0, 0]), np.array([0, 1, 3]), np.array([0, 3, 0]), np.array([1, 2, IGNORE]),
                        np.array([1, 1, 1]), np.array([1.0, 1.0, np.nan], dtype=np.float32),
                        np.array([True, True, False]),
                        np.stack([np.packbits(a.reshape(-1)), np.packbits(b.reshape(-1)),
                                  np.zeros(2, dtype=np.uint8)]))
    got = region_purity(regions, truth)
    assert (got.clicks, got.trainable, got.kept, got.region_pixels, got.judged, got.pure) == (3, 2, 2, 15, 13, 8)
    assert got.purity == pytest.approx(8 / 13) and got.pixels_per_region == 7.5
    assert got.mean_region_purity == pytest.approx((5 / 8 + 3 / 5) / 2)
    # overlap rule: (1, 2) and (2, 2) are covered by both classes -> unlabelled; the three clicks keep their
    # own answers; a keeps 9 - 2 - 1 = 6 pixels, b keeps 6 - 2 - 1 = 3
    # a's: (0,1) 1 ok, (0,2) 1 ok, (1,0) 1 ok, (1,1) 1 ok, (2,0) 3 no, (2,1) 3 no -> 4 of 6
    # b's: (2,3) 2 ok, (3,2) 3 no, (3,3) 3 no -> 1 of 3
    assert (got.supervised_regions, got.supervised_judged, got.supervised_correct) == (9, 9, 5)
    assert got.supervised_per_click == pytest.approx((2 + 9) / 3) and got.label_accuracy == pytest.approx(5 / 9)
    # every owned pixel is drawn (R = 32); each click's draw weighs 1: (4/6 of a) + (1/3 of b) out of 2
    assert got.trained_accuracy == pytest.approx((4 / 6 + 1 / 3) / 2)
    assert np.isnan(region_purity(regions, truth, max_region_pixels=0).trained_accuracy)
    resolved = resolve(regions, clicked_pixels(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 3]),
                                               torch.tensor([0, 3, 0]), 4))
    assert len(resolved) == got.supervised_regions


def test_random_clicks_are_distinct_seeded_and_in_range():
    a = random_clicks(5, 8, 100, seed=3)
    b = random_clicks(5, 8, 100, seed=3)
    c = random_clicks(5, 8, 100, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)) and not torch.equal(a[0], c[0])
    image, y, x = a
    assert image.max() < 5 and y.max() < 8 and x.max() < 8 and min(image.min(), y.min(), x.min()) >= 0
    assert len({(i, j, k) for i, j, k in zip(image.tolist(), y.tolist(), x.tolist(), strict=True)}) == 100
    with pytest.raises(ValueError, match="321 clicks asked of 320 pixels"):
        random_clicks(5, 8, 321, seed=0)


def test_purity_script_prints_its_table(world, capsys):
    from experiments.region_purity import main

    assert main([str(world / "data"), "--seeds", "0,1", "--clicks", "20", "--setting", "method=slic,n_segments=20"]) == 0
    out = capsys.readouterr().out
    assert "| slic | n_segments=20, compactness=10, sigma=0.5, max_pixels=4096 |" in out
    assert main([str(world / "data"), "--setting", "method=feature"]) == 2  # no --config for the backbone
    config = world / "purity.yaml"
    config.write_text(f"data: {world / 'data'}\nbackbone:\n  checkpoint: {world / 'adm.pt'}\n")
    assert main([str(world / "data"), "--seeds", "0", "--clicks", "10", "--config", str(config),
                 "--setting", "method=feature,threshold=0.5,radius=3"]) == 0
    assert "| feature | threshold=0.5, radius=3, max_pixels=4096 |" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the simulated loop
def _config(world, out, *extra):
    return load_config(None, [f"data={world / 'data'}", f"out={out}", f"backbone.checkpoint={world / 'adm.pt'}",
                              "rounds=2", "budget=4", "strategy.name=entropy", "strategy.pixels_per_image=64",
                              "strategy.noise_samples=1", "head.epochs=10", "preview_images=2",
                              "expansion=superpixel", "superpixel.method=slic", "superpixel.n_segments=30",
                              "superpixel.max_region_pixels=6",
                              "superpixel.region_weight=2", *extra])


@pytest.fixture(scope="module")
def whole(world):
    exp = Experiment(_config(world, world / "whole"))
    return exp, exp.run()


def test_run_writes_regions_and_counts_like_sam(world, train, whole):
    exp, records = whole
    out = world / "whole"
    model = "superpixel:slic(n_segments=30,compactness=10,sigma=0.5,max_pixels=4096)"
    regions = RegionSet.empty(SIZE)
    labels = (out / "labels.csv").read_text().splitlines()[1:]
    for r, record in enumerate(records, start=1):
        stored, name, tau = RegionSet.load_npz(out / "regions" / f"round_{r:02d}.npz")
        assert name == model and tau == 0.0 and len(stored) == 4
        assert (out / "regions" / f"round_{r:02d}.csv").read_text().startswith("image,y,x,class_id,class,round,score")
        void = stored.cls == IGNORE
        assert not stored.kept[void].any() and stored.kept[~void].all()
        for i in np.nonzero(stored.kept)[0]:  # each region is scikit-image's superpixel of the click
            theirs = slic(train.images[stored.image[i]].numpy(), n_segments=30, compactness=10.0, sigma=0.5,
                          start_label=0, channel_axis=-1)
            assert np.array_equal(stored.mask(i), theirs == theirs[stored.y[i], stored.x[i]])
        regions = regions.concat(stored)
        rows = [line.split(",") for line in labels if int(line.split(",")[5]) <= r]
        idx = torch.tensor([train.names.index(row[0]) for row in rows])
        ys, xs = torch.tensor([int(row[1]) for row in rows]), torch.tensor([int(row[2]) for row in rows])
        resolved = resolve(regions, clicked_pixels(idx, ys, xs, SIZE))
        trainable = sum(int(row[3]) != IGNORE for row in rows)
        assert record["clicks"] == record["labelled"] == 4 * r
        assert record["region_pixels"] == len(resolved) > 0
        assert record["supervised_pixels"] == trainable + len(resolved)
        assert record["training_region_pixels"] == sum(min(6, int((resolved.owner == o).sum()))
                                                       for o in np.unique(resolved.owner))
        assert record["regions"]["kept"] == int(stored.kept.sum()) and "expand" in record["phases"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["expansion"]["method"] == "superpixel" and meta["expansion"]["model"] == model
    assert meta["expansion"]["n_segments"] == 30


def test_preview_tints_exactly_the_region_pixels(world, whole, tmp_path):
    exp, _ = whole
    resolved = exp.resolved
    assert resolved is not None and len(resolved)
    args = (2, exp.labels, exp.train.images, exp.train.masks, exp.meta.palette, 2, exp.predict)
    save_preview(tmp_path / "tinted.png", *args, resolved)
    save_preview(tmp_path / "plain.png", *args, None)
    tinted = np.asarray(Image.open(tmp_path / "tinted.png").convert("RGB")).astype(int)
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")).astype(int)
    scale = PANEL // SIZE
    differ = (tinted != plain).any(-1)[18:]  # below the title row (its text differs)
    new = exp.labels.image[exp.labels.round == 2].unique().tolist()
    shown = (new + [i for i in range(len(exp.train.names)) if i not in new])[:2]
    for row, img in enumerate(shown):
        panel = differ[row * (SIZE * scale + 10): row * (SIZE * scale + 10) + SIZE * scale, : SIZE * scale]
        mine = np.zeros((SIZE, SIZE), dtype=bool)
        mine[resolved.y[resolved.image == img], resolved.x[resolved.image == img]] = True
        region = np.kron(mine, np.ones((scale, scale), dtype=bool))
        assert not (panel & ~region).any()  # only region pixels change ...
        assert panel.any() == mine.any()  # ... and they do where an image has some
        assert not differ[row * (SIZE * scale + 10): row * (SIZE * scale + 10) + SIZE * scale, SIZE * scale:].any()


def test_a_superpixel_run_resumes_identically(world, whole):
    _, records = whole
    cut_dir = world / "cut"
    Experiment(_config(world, cut_dir)).step()
    resumed = Experiment(_config(world, cut_dir))
    assert resumed.completed == 1
    again = resumed.run()
    assert (cut_dir / "labels.csv").read_text() == (world / "whole" / "labels.csv").read_text()
    for r in (1, 2):
        a, _, _ = RegionSet.load_npz(cut_dir / "regions" / f"round_{r:02d}.npz")
        b, _, _ = RegionSet.load_npz(world / "whole" / "regions" / f"round_{r:02d}.npz")
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.image, b.image)
    keys = ("miou", "clicks", "supervised_pixels", "training_region_pixels")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in records]


def test_a_feature_space_run_grows_regions_within_the_threshold(world):
    exp = Experiment(_config(world, world / "feature", "rounds=1", "superpixel.method=feature",
                             "superpixel.threshold=0.9", "superpixel.radius=4"))
    exp.run()
    stored, name, _ = RegionSet.load_npz(world / "feature" / "regions" / "round_01.npz")
    # the features depend on the backbone, so its settings are part of the name (where it runs is not)
    tag = backbone_tag(exp.config.backbone)
    assert name == f"superpixel:feature(threshold=0.9,radius=4,max_pixels=4096,backbone={tag})" == exp.engine.expansion.model
    assert tag.startswith("adm#") and tag == backbone_tag(exp.config.backbone.model_copy(update={"device": "cuda"}))
    assert tag != backbone_tag(exp.config.backbone.model_copy(update={"timesteps": (10,)}))
    for i in np.nonzero(stored.kept)[0]:
        mask, y, x = stored.mask(i), int(stored.y[i]), int(stored.x[i])
        ys, xs = np.nonzero(mask)
        assert np.abs(ys - y).max() <= 4 and np.abs(xs - x).max() <= 4 and mask[y, x]
        feats = exp.train_store.at_pixels(torch.full((len(ys) + 1,), int(stored.image[i])),
                                          torch.tensor([y, *ys]), torch.tensor([x, *xs]), DETERMINISTIC)
        assert (feats[1:] @ feats[0] >= 0.9 - 1e-5).all()
        labels, _ = ndimage.label(mask, np.ones((3, 3)))
        assert labels.max() == 1  # connected


# ---------------------------------------------------------------------------- the labelling project
def test_project_stores_trains_on_and_draws_superpixel_regions(world, tmp_path):
    root = tmp_path / "proj"
    (tmp_path / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    settings = ["budget=3", "strategy.candidates_per_image=64", "strategy.k_per_image=5", "strategy.noise_samples=1",
                "head.epochs=10", "backbone.device=cpu", "expansion=superpixel", "superpixel.method=felzenszwalb",
                "superpixel.scale=50", "superpixel.max_pixels=40", "superpixel.max_region_pixels=5"]
    proj = init_project(root, world / "data" / "train" / "images", tmp_path / "classes.txt", size=SIZE,
                        overrides=settings, backbone={"checkpoint": str(world / "adm.pt")})
    model = "superpixel:felzenszwalb(scale=50,sigma=0.5,min_size=10,max_pixels=40)"
    proj.query()
    queries = answer_first_round(proj, SYNTHETIC_CLASSES, tmp_path / "a.csv")
    result = proj.import_file(tmp_path / "a.csv")
    assert result.regions == 2 and result.expansion_error is None
    conn = sqlite3.connect(root / DB_FILE)
    rows = conn.execute("SELECT query_id, model, tau, score, kept, pixels, mask FROM regions ORDER BY query_id").fetchall()
    conn.close()
    assert [r[0] for r in rows] == [int(q[0]) for q in queries[1:]]
    for r, q in zip(rows, queries[1:], strict=True):
        assert r[1:5] == (model, 0.0, 1.0, 1)
        mask = np.asarray(Image.open(io.BytesIO(r[6])))
        image = np.asarray(read_image(root / "data" / "train" / "images" / f"{q[1]}.png"))
        theirs = felzenszwalb(image, scale=50, sigma=0.5, min_size=10, channel_axis=-1)
        y, x = int(q[3]), int(q[2])
        segment = theirs == theirs[y, x]
        assert mask.shape == (SIZE, SIZE) and int(mask.sum()) == r[5] == min(40, int(segment.sum()))
        assert mask[y, x] and not (mask & ~segment).any()
    trained = proj.train()
    assert trained.pixels == 2 and 0 < trained.training_region_pixels <= 10
    assert trained.region_pixels == len(proj.resolved_regions()[1])
    assert proj.status()["regions"][0]["model"] == model
    second = proj.query()
    assert_review_shows_regions(proj, second.round)
    proj.close()


def test_expand_clicks_gives_the_backend_each_image_index(train):
    seen = []

    class Spy(SuperpixelExpander):
        def propose(self, image, ys, xs, image_id=None):
            seen.append((image_id, np.array_equal(image, train.images[image_id].numpy())))
            return super().propose(image, ys, xs, image_id)

    spy = Spy(SuperpixelConfig(n_segments=20))
    got = expand_clicks(spy, train.images, torch.tensor([3, 1, 3]), torch.tensor([0, 5, 9]), torch.tensor([1, 2, 3]),
                        torch.tensor([0, 1, 2]), round=1, tau=0.0)
    assert seen == [(1, True), (3, True)] and got.kept.all()
