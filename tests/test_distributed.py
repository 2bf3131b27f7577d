"""The pipeline over torch.distributed: two gloo processes under torchrun pick what one process picks.

The references are the single-process code paths the rest of the suite checks: `max_herding` (itself
checked against the naive greedy and apricot), `TwoStageStrategy.select` on a whole-split
`FeatureStore`, and `predict_image` / `evaluate_head`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sparseseg.backbones.registry import build_backbone
from sparseseg.config import load_config
from sparseseg.data.dataset import load_meta, load_split, split_names
from sparseseg.data.synthetic import make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.features.store import build_stores
from sparseseg.head.mlp import train_head
from sparseseg.head.predictor import HeadPredictor
from sparseseg.labels import PixelLabels
from sparseseg.loop.engine import evaluate_head, predict_image
from sparseseg.selection.distributed import partition, pool_bandwidth, sharded_max_herding
from sparseseg.selection.kernels import median_bandwidth
from sparseseg.selection.max_herding import max_herding
from sparseseg.selection.strategies import RoundContext, create_strategy
from tests.conftest import save_tiny_adm
from tests.distributed_worker import HERDING_CASES, random_pool

ROOT = Path(__file__).resolve().parents[1]
SIZE, BUDGET = 32, 5


# ------------------------------------------------------------------ the exact greedy, one process


@pytest.mark.parametrize("case", HERDING_CASES)
def test_sharded_greedy_in_one_process_equals_max_herding(case):
    n, d, k, block, m, seed = case
    z, lab, sigma = random_pool(n, d, m, seed)
    assert sharded_max_herding(z, 0, n, k, sigma, lab, block=block).tolist() == max_herding(z, k, sigma, lab).tolist()


def test_sharded_greedy_is_the_same_whatever_the_cache_and_half_precision_is_computed_in_float32():
    z, lab, sigma = random_pool(500, 10, 4, 7)
    want = max_herding(z, 30, sigma, lab).tolist()
    assert sharded_max_herding(z, 0, 500, 30, sigma, lab, block=32, cache_rows=0).tolist() == want
    half = z.half()
    assert sharded_max_herding(half, 0, 500, 30, sigma, lab, block=64).tolist() == \
        max_herding(half, 30, sigma, lab).tolist()


def test_sharded_greedy_rejects_ranges_that_do_not_tile_the_pool():
    z, _, sigma = random_pool(100, 4, 0, 0)
    with pytest.raises(SparsesegError, match="n=120"):
        sharded_max_herding(z, 0, 120, 5, sigma, block=32)
    with pytest.raises(SparsesegError, match="budget k=101"):
        sharded_max_herding(z, 0, 100, 101, sigma, block=32)
    with pytest.raises(SparsesegError, match="block=40"):
        sharded_max_herding(z, 0, 100, 5, sigma, block=40)


def test_partition_gives_whole_blocks_that_tile_the_pool():
    assert partition(100, 3, 32) == [(0, 32), (32, 64), (64, 100)]
    assert partition(10, 4, 32) == [(0, 0), (0, 0), (0, 0), (0, 10)]
    for n, size, block in [(1000, 2, 64), (77, 5, 1), (4096, 8, 4096)]:
        parts = partition(n, size, block)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
        assert all(lo % block == 0 for lo, hi in parts if hi > lo)


def test_pool_bandwidth_reads_the_rows_median_bandwidth_draws():
    z, _, _ = random_pool(3000, 6, 0, 3)
    read = []

    def rows(idx):
        read.append(len(idx))
        return z[idx]

    got = pool_bandwidth(rows, len(z), 0.05, torch.Generator().manual_seed(4))
    assert got == median_bandwidth(z, 0.05, generator=torch.Generator().manual_seed(4))
    assert read == [150]  # only the subsample is read


# ------------------------------------------------------------------ two processes under torchrun


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny dataset and ADM, and what one process picks and predicts with them."""
    root = tmp_path_factory.mktemp("dist")
    make_synthetic(root / "data", n_train=6, n_test=2, size=SIZE, seed=0)
    ckpt = save_tiny_adm(root / "adm.pt", SIZE)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": str(root / "data"), "out": str(root / "run"), "budget": BUDGET, "seed": 3,
        "backbone": {"checkpoint": str(ckpt), "device": "cpu"}, "head": {"epochs": 20},
        "strategy": {"name": "two_stage_edald", "candidates_per_image": 48, "k_per_image": 5, "noise_samples": 2}}))
    cfg = load_config(config)
    meta = load_meta(cfg.data)
    train = load_split(cfg.data, cfg.train_split)
    test = load_split(cfg.data, cfg.eval_split)
    backbone = build_backbone(cfg.backbone, torch.device("cpu"), default_size=SIZE)
    stores = build_stores(backbone, {cfg.train_split: train.images, cfg.eval_split: test.images}, cfg.seed,
                          cfg.features, cfg.backbone.batch_size, "cpu", evaluation=[cfg.eval_split])
    store = stores[cfg.train_split]
    round1 = create_strategy(cfg.strategy).select(
        RoundContext(store, PixelLabels(), None, BUDGET, 1, cfg.seed, cfg.strategy.noise_samples))
    labels = PixelLabels()
    labels.add(round1.image, round1.y, round1.x, train.masks[round1.image, round1.y, round1.x], 1)
    names = split_names(cfg.data, cfg.train_split)
    labels.write_csv(root / "labels.csv", names, meta.classes)
    head = train_head(store.at_pixels(labels.image, labels.y, labels.x), labels.cls, len(meta.classes), cfg.head,
                      cfg.seed)
    torch.save({"state_dict": head.state_dict()}, root / "head.pt")
    round2 = create_strategy(cfg.strategy).select(
        RoundContext(store, labels, HeadPredictor(head), BUDGET, 2, cfg.seed, cfg.strategy.noise_samples))
    test_store = stores[cfg.eval_split]
    masks = [predict_image(head, test_store, i, cfg.features.tile_pixels) for i in range(len(test_store))]
    metrics = evaluate_head(head, test_store, test.masks, meta.classes, cfg.features.tile_pixels)
    picks = {r: [(names[int(i)], int(y), int(x)) for i, y, x in zip(p.image, p.y, p.x, strict=True)]
             for r, p in ((1, round1), (2, round2))}
    return root, config, picks, masks, metrics, split_names(cfg.data, cfg.eval_split)


@pytest.fixture(scope="module")
def torchrun(reference):
    root, config, *_ = reference
    out = root / "torchrun"
    out.mkdir()
    args = root / "args.json"
    args.write_text(json.dumps({"out": str(out), "config": str(config), "head": str(root / "head.pt"),
                                "labels": str(root / "labels.csv")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "distributed_worker.py"), str(args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _picks(path: Path) -> list[tuple[str, int, int]]:
    with path.open(newline="") as fh:
        return [(row["image"], int(row["y"]), int(row["x"])) for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_two_processes_herd_random_pools_as_one(torchrun):
    got = json.loads((torchrun / "herding.json").read_text())
    assert got["ranks"] == 2
    for case, picks in zip(HERDING_CASES, got["picks"], strict=True):
        n, d, k, block, m, seed = case
        z, lab, sigma = random_pool(n, d, m, seed)
        assert picks == max_herding(z, k, sigma, lab).tolist(), case


@pytest.mark.slow
def test_two_processes_extract_and_select_what_one_process_picks(reference, torchrun):
    _, _, picks, *_ = reference
    manifest = json.loads((torchrun / "pool1" / "manifest.json").read_text())
    assert [s["done"] for s in manifest["shards"]] == [True] * 3 and sum(s["rows"] for s in manifest["shards"]) == 30
    assert _picks(torchrun / "pool1" / "picks" / "round_01.csv") == picks[1]
    # round 2: the round-1 labels count as covered, and eDALD under the head ranks the pool
    assert _picks(torchrun / "pool2" / "picks" / "round_02.csv") == picks[2]
    info = json.loads((torchrun / "pool2" / "picks" / "round_02.json").read_text())
    assert info["ranks"] == 2 and info["labelled"] == BUDGET and info["pool"] == 15


@pytest.mark.slow
def test_two_processes_segment_what_one_process_predicts(reference, torchrun):
    *_, masks, metrics, test_names = reference
    for name, want in zip(test_names, masks, strict=True):
        got = np.asarray(Image.open(torchrun / "masks" / f"{name}.png"))
        assert np.array_equal(got, want.numpy())
    summary = json.loads((torchrun / "masks" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["metrics"]["miou"] == pytest.approx(metrics["miou"], abs=1e-12)
