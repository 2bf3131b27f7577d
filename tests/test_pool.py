"""The pool on disk (`features.shards`, `sparseseg extract`) and the kNN coverage path (`selection.knn`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors
from typer.testing import CliRunner

from sparseseg.cli import app
from sparseseg.config import load_config
from sparseseg.data.synthetic import make_synthetic
from sparseseg.distributed.extract import extract_pool
from sparseseg.distributed.launch import Launch
from sparseseg.distributed.pool import select_from_pool
from sparseseg.errors import SparsesegError
from sparseseg.features.shards import PoolStore
from sparseseg.selection.kernels import median_bandwidth
from sparseseg.selection.knn import build_knn_graph, knn_max_herding, nearest_d2
from sparseseg.selection.max_herding import coverage, max_herding
from tests.conftest import save_tiny_adm

SIZE = 32


def _clustered(n: int, d: int, seed: int, clusters: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g) * 2
    return centers[torch.randint(0, clusters, (n,), generator=g)] + torch.randn(n, d, generator=g)


# ------------------------------------------------------------------ kNN graph and its greedy


def test_flat_knn_graph_finds_the_exact_neighbours():
    z = _clustered(600, 6, 0)
    graph = build_knn_graph(lambda a, b: z[a:b], len(z), 6, neighbours=8, index="Flat", queries=(100, 400), chunk=128)
    ref_d, ref_i = NearestNeighbors(n_neighbors=9).fit(z.numpy()).kneighbors(z[100:400].numpy())
    assert graph.start == 100 and graph.neighbours.shape == (300, 8)
    assert [set(r) for r in graph.neighbours.tolist()] == [set(r[1:]) for r in ref_i.tolist()]  # itself dropped
    assert np.allclose(np.sort(graph.d2.numpy(), 1), np.sort(ref_d[:, 1:] ** 2, 1), rtol=1e-4, atol=1e-4)


def _naive_sparse_greedy(nb: np.ndarray, d2: np.ndarray, k: int, sigma: float, cov: np.ndarray) -> list[int]:
    """The textbook greedy on the dense matrix K[i, j] = k(z_i, z_j) for j in N(i) ∪ {i}, else 0."""
    n = len(nb)
    kmat = np.zeros((n, n))
    for i in range(n):
        found = nb[i] >= 0  # -1: the index found fewer neighbours
        kmat[i, nb[i][found]] = np.exp(-d2[i][found] / sigma**2)
        kmat[i, i] = 1.0
    cov, out = cov.copy(), []
    for _ in range(k):
        gains = np.maximum(kmat - cov[:, None], 0.0).sum(0)
        gains[out] = -np.inf
        j = int(np.argmax(gains))
        out.append(j)
        cov = np.maximum(cov, kmat[:, j])
    return out


@pytest.mark.parametrize("labelled", [False, True])
def test_knn_greedy_equals_the_naive_greedy_on_the_sparse_kernel(labelled):
    z = _clustered(300, 5, 1, clusters=8)
    sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(0)) / 2
    graph = build_knn_graph(lambda a, b: z[a:b], len(z), 5, neighbours=10, index="Flat")
    lab = _clustered(6, 5, 2, clusters=8)
    lab_d2 = nearest_d2(lambda a, b: z[a:b], (0, len(z)), lab) if labelled else None
    cov = np.exp(-lab_d2.double().numpy() / sigma**2) if labelled else np.zeros(len(z))
    got = knn_max_herding(graph.neighbours, graph.d2, 40, sigma, lab_d2).tolist()
    assert got == _naive_sparse_greedy(graph.neighbours.numpy(), graph.d2.double().numpy(), 40, sigma, cov)


def test_knn_greedy_skips_missing_neighbours():
    z = _clustered(200, 4, 6, clusters=6)
    graph = build_knn_graph(lambda a, b: z[a:b], len(z), 4, neighbours=6, index="Flat")
    nb = graph.neighbours.clone()
    nb[::3, 4:] = -1  # as an inverted-file index reports rows it found fewer neighbours for
    sigma = 0.5 * median_bandwidth(z, generator=torch.Generator().manual_seed(0))
    got = knn_max_herding(nb, graph.d2, 25, sigma).tolist()
    assert got == _naive_sparse_greedy(nb.numpy(), graph.d2.double().numpy(), 25, sigma, np.zeros(len(z)))


def test_nearest_labelled_distance_is_the_cdist_minimum():
    z, lab = _clustered(500, 7, 3), _clustered(9, 7, 4)
    got = nearest_d2(lambda a, b: z[a:b], (50, 450), lab, chunk=64)
    want = torch.cdist(z[50:450].double(), lab.double()).min(1).values ** 2
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)


def test_knn_picks_cover_almost_as_well_as_the_exact_greedy():
    # measured with the exact objective (`coverage`) of the whole pool, as the benchmark does
    z = _clustered(3000, 16, 5, clusters=40)
    sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(0))
    exact = max_herding(z, 100, sigma)
    graph = build_knn_graph(lambda a, b: z[a:b], len(z), 16, neighbours=32)
    approx = knn_max_herding(graph.neighbours, graph.d2, 100, sigma)
    assert len(set(approx.tolist())) == 100
    ratio = coverage(z, approx, sigma) / coverage(z, exact, sigma)
    assert 0.99 < ratio < 1.01  # the greedy is not optimal: the kNN one may even cover a little more


def test_knn_rejects_bad_settings():
    z = _clustered(50, 4, 0)
    with pytest.raises(SparsesegError, match="neighbours=50"):
        build_knn_graph(lambda a, b: z[a:b], 50, 4, neighbours=50)
    with pytest.raises(SparsesegError, match="FAISS index 'Nope'"):
        build_knn_graph(lambda a, b: z[a:b], 50, 4, neighbours=5, index="Nope")


# ------------------------------------------------------------------ the pool on disk


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    make_synthetic(root / "data", n_train=5, n_test=1, size=SIZE, seed=0)
    ckpt = save_tiny_adm(root / "adm.pt", SIZE)
    overrides = [f"data={root / 'data'}", f"out={root / 'run'}", f"backbone.checkpoint={ckpt}", "backbone.device=cpu",
                 "budget=4", "strategy.candidates_per_image=40", "strategy.k_per_image=4", "strategy.noise_samples=2"]
    return root, overrides


def _world() -> Launch:
    return Launch(0, 1, 0, torch.device("cpu"), None)


def test_extract_resumes_only_unfinished_shards_and_refuses_other_settings(tiny):
    root, overrides = tiny
    cfg = load_config(None, overrides)
    out = root / "resume"
    first = extract_pool(cfg, out, _world(), images_per_shard=2)
    assert (first["shards"], first["done_here"], first["rows"]) == (3, 3, 20)
    pool = PoolStore.open(out)
    assert pool.samples == [0, 1, 2, 3] and pool.dtype == "float16"  # eDALD: noise samples 1..M+1
    before = {s: pool.features(s).clone() for s in pool.samples}
    coords = pool.coords()
    assert coords[:, 0].tolist() == sorted(coords[:, 0].tolist())  # image by image, the single-process order
    # a shard interrupted before its done marker: reopening refuses, a rerun redoes just that one
    (out / "shards" / "00001" / "done.json").unlink()
    np.lib.format.open_memmap(out / "shards" / "00001" / "s0.npy", mode="r+")[:] = 0
    with pytest.raises(SparsesegError, match=r"shard\(s\) \[1\] of 3 not finished"):
        PoolStore.open(out)
    again = extract_pool(cfg, out, _world(), images_per_shard=2)
    assert (again["done_here"], again["skipped"]) == (1, 2)
    pool = PoolStore.open(out)
    for s in pool.samples:
        assert torch.equal(pool.features(s), before[s])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["done"] for e in manifest["shards"]] == [True] * 3
    with pytest.raises(SparsesegError, match="other settings"):
        extract_pool(load_config(None, [*overrides, "seed=9"]), out, _world(), images_per_shard=2)
    with pytest.raises(SparsesegError, match="another layout"):
        extract_pool(cfg, out, _world(), images_per_shard=3)


def test_knn_selection_from_a_pool_picks_new_distinct_pixels(tiny):
    root, overrides = tiny
    cfg = load_config(None, overrides)
    extract_pool(cfg, root / "knn", _world(), images_per_shard=5, dtype="float32")
    pool = PoolStore.open(root / "knn")
    exact = select_from_pool(pool, cfg, _world(), 4, 1)
    approx = select_from_pool(pool, cfg, _world(), 4, 1, method="knn", neighbours=8)
    assert len({tuple(c) for c in approx.coords.tolist()}) == 4
    assert approx.info["index"] == "Flat" and exact.info["sigma"] == approx.info["sigma"]
    z = pool.features(0)
    assert coverage(z, approx.rows, exact.info["sigma"]) >= 0.9 * coverage(z, exact.rows, exact.info["sigma"])


def test_cli_bad_input_is_one_line_and_exit_code_2(tiny):
    root, overrides = tiny
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text("seed: 0\n")
    sets = [x for o in overrides for x in ("--set", o)]
    runner = CliRunner()
    bad = runner.invoke(app, ["extract", str(cfg_path), "--out", str(root / "bad"), "--dtype", "int8", *sets])
    assert bad.exit_code == 2 and "pool dtype 'int8'" in bad.output
    missing = runner.invoke(app, ["select", str(cfg_path), "--pool", str(root / "nothing"), *sets])
    assert missing.exit_code == 2 and "manifest.json: not found" in missing.output
