"""Selection math: RBF kernel, MaxHerding (naive / lazy / stochastic), uncertainty scores."""

from __future__ import annotations

import importlib
import itertools
import math
import weakref

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sparseseg.errors import SparsesegError
from sparseseg.selection import kernels, uncertainty
from sparseseg.selection import max_herding as max_herding_module
from sparseseg.selection.coreset import k_center_greedy
from sparseseg.selection.kernels import median_bandwidth, rbf
from sparseseg.selection.max_herding import GB, coverage, herding_plan
from sparseseg.selection.max_herding import max_herding as herd

E1 = math.exp(-1.0)
E4 = math.exp(-4.0)


def _line(xs: list[float]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def _random_pool(seed: int, n: int = 300, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _clustered_pool(seed: int, n: int = 300, d: int = 16, clusters: int = 5, spread: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g, dtype=torch.float64) * 3.0
    member = torch.randint(0, clusters, (n,), generator=g)
    return centres[member] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)


def _duplicated_pool(seed: int, n: int = 300, d: int = 16) -> torch.Tensor:
    # Every point twice: exact ties in every gain, the hardest case for lazy == naive.
    half = _random_pool(seed, n // 2, d)
    return torch.cat([half, half])


POOLS = {"random": _random_pool, "clustered": _clustered_pool, "duplicated": _duplicated_pool}


@pytest.fixture(autouse=True)
def _one_thread():
    # These are many tiny kernels: with a second intra-op thread, every call pays an OpenMP
    # wake-up, which costs milliseconds when other processes load the (2) cores. Per test, since
    # apricot's numba (OpenMP layer) resets the shared OpenMP thread count when it starts.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- kernels


def test_rbf_uses_sigma_squared_without_factor_two():
    a = _line([0.0])
    b = _line([0.0, 2.0, 4.0])
    # k = exp(-d²/σ²) with σ = 2: d = 0, 2, 4 -> exp(0), exp(-1), exp(-4).
    np.testing.assert_allclose(rbf(a, b, 2.0).numpy(), [[1.0, E1, E4]], rtol=1e-12)


def test_rbf_matches_explicit_distances_and_is_never_above_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    b = torch.cat([a[:3], torch.randn(4, 5, generator=g, dtype=torch.float64)])
    expected = torch.exp(-(torch.cdist(a, b) ** 2) / 1.5**2)
    got = rbf(a, b, 1.5)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert float(got.max()) <= 1.0


def test_rbf_rejects_bad_arguments():
    with pytest.raises(SparsesegError, match="same feature dimension"):
        rbf(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(SparsesegError, match="sigma"):
        rbf(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(SparsesegError, match=r"shape \(n, D\)"):
        rbf(torch.zeros(3), torch.zeros(2, 3), 1.0)


def test_median_bandwidth_is_twice_the_median_distance():
    z = _line([0.0, 1.0, 3.0])
    # Pairwise distances 1, 3, 2 -> median 2 -> σ = 4 (n=3 < min_points: all points used).
    assert median_bandwidth(z) == pytest.approx(4.0)
    z = _random_pool(0, n=150, d=4)
    d = torch.pdist(z).numpy()
    assert median_bandwidth(z, min_points=150) == pytest.approx(2.0 * np.median(d), rel=1e-9)


def test_median_bandwidth_subsamples_reproducibly():
    z = _random_pool(1, n=5000, d=8)
    s1 = median_bandwidth(z, generator=torch.Generator().manual_seed(3))
    s2 = median_bandwidth(z, generator=torch.Generator().manual_seed(3))
    assert s1 == s2
    # 1% of 5000 = 50 < min_points: 100 points drawn; close to the full-data value.
    full = 2.0 * float(np.median(torch.pdist(z[:2000]).numpy()))
    assert s1 == pytest.approx(full, rel=0.1)
    with pytest.raises(SparsesegError, match="identical"):
        median_bandwidth(torch.ones(10, 3))


# ------------------------------------------------------------------------ herding by hand


def test_herding_worked_by_hand_on_a_line():
    # Pool x = [0, 1, 2, 10, 11] (indices 0..4), σ = 1, so k(x, x') = exp(-(x - x')²).
    # Cross-cluster values are exp(-64) or smaller: ~0 (below float64 resolution next to 1).
    # Step 1 (nothing covered, cov = 0): gains = row sums
    #   x=0: 1 + e^-1 + e^-4 = 1.386195   x=1: e^-1 + 1 + e^-1 = 1.735759   x=2: 1.386195
    #   x=10: 1 + e^-1 = 1.367879          x=11: 1.367879            -> pick index 1 (x=1).
    #   C = (e^-1 + 1 + e^-1 + 0 + 0) / 5 = 1.735759 / 5 = 0.347152
    # Step 2 (cov = [e^-1, 1, e^-1, ~0, ~0]):
    #   x=0: (1 - e^-1) + 0 + 0 = 0.632121 (the e^-4 - e^-1 < 0 term clamps); x=2: same
    #   x=10: (1 - 0) + (e^-1 - 0) = 1.367879; x=11: the same sum -> exact tie, lowest index wins
    #   -> pick index 3 (x=10).  C = (e^-1 + 1 + e^-1 + 1 + e^-1) / 5 = (2 + 3e^-1)/5 = 0.620728
    z = _line([0.0, 1.0, 2.0, 10.0, 11.0])
    for method in ("naive", "lazy"):
        assert herd(z, 2, 1.0, method=method).tolist() == [1, 3]
    assert coverage(z, [], 1.0) == 0.0
    assert coverage(z, [1], 1.0) == pytest.approx((1 + 2 * E1) / 5, rel=1e-12)
    assert coverage(z, [1], 1.0) == pytest.approx(0.347152, abs=1e-6)
    assert coverage(z, [1, 3], 1.0) == pytest.approx((2 + 3 * E1) / 5, rel=1e-12)
    assert coverage(z, [1, 3], 1.0) == pytest.approx(0.620728, abs=1e-6)


def test_labelled_point_covers_one_cluster_so_first_pick_goes_to_the_other():
    # Pool x = [0, 1, 10, 11, 12], σ = 1. Without labels the bigger cluster wins:
    #   row sums x=0: 1 + e^-1 = 1.367879, x=1: 1.367879, x=10: 1 + e^-1 + e^-4 = 1.386195,
    #   x=11: 1 + 2e^-1 = 1.735759 (largest), x=12: 1.386195 -> pick index 3 (x=11).
    z = _line([0.0, 1.0, 10.0, 11.0, 12.0])
    assert herd(z, 1, 1.0).tolist() == [3]
    # A labelled point at x=11 covers the right cluster: cov = [~0, ~0, e^-1, 1, e^-1],
    # C(∅) = (1 + 2e^-1)/5 = 0.347152. Gains: x=0: 1 + e^-1 = 1.367879, x=1: the same (tie ->
    # index 0), x=10: 1 - e^-1 = 0.632121, x=11: 0, x=12: 0.632121 -> pick index 0 (x=0).
    # Then C = (1 + e^-1 + e^-1 + 1 + e^-1)/5 = 0.620728.
    lab = _line([11.0])
    assert coverage(z, [], 1.0, labelled=lab) == pytest.approx((1 + 2 * E1) / 5, rel=1e-12)
    for method in ("naive", "lazy"):
        assert herd(z, 1, 1.0, labelled=lab, method=method).tolist() == [0]
    assert coverage(z, [0], 1.0, labelled=lab) == pytest.approx((2 + 3 * E1) / 5, rel=1e-12)


def test_naive_greedy_equals_brute_force_coverage_at_every_step():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(8, 3, generator=g, dtype=torch.float64)
    sigma = 1.3
    zn = z.numpy()
    kmat = np.exp(-((zn[:, None, :] - zn[None, :, :]) ** 2).sum(-1) / sigma**2)

    def brute_coverage(s: list[int]) -> float:
        # Slow and independent: (1/n) Σ_i max_{j in S} k(i, j), 0 for an empty S.
        return sum(max((kmat[i, j] for j in s), default=0.0) for i in range(8)) / 8

    picks = herd(z, 8, sigma, method="naive").tolist()
    chosen: list[int] = []
    for step in range(8):
        rest = [j for j in range(8) if j not in chosen]
        best = max(rest, key=lambda j: (brute_coverage(chosen + [j]), -j))
        assert picks[step] == best, f"step {step}"
        chosen.append(best)
        assert coverage(z, chosen, sigma) == pytest.approx(brute_coverage(chosen), rel=1e-12)


# -------------------------------------------------------------------------- lazy == naive


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("with_labelled", [False, True])
def test_lazy_equals_naive(pool, with_labelled):
    for seed in range(3):
        z = POOLS[pool](seed)
        labelled = None
        if with_labelled:
            # Some labelled points from the pool's own distribution, some elsewhere.
            labelled = torch.cat([z[:5] + 0.01, _random_pool(seed + 100, n=5, d=z.shape[1])])
        sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(seed))
        lazy_by_block = {}
        for block_size in (5, 64, 4096):
            naive = herd(z, 60, sigma, labelled=labelled, method="naive", block_size=block_size)
            lazy = herd(z, 60, sigma, labelled=labelled, method="lazy", block_size=block_size)
            assert torch.equal(naive, lazy), (pool, seed, block_size)
            lazy_by_block[block_size] = lazy
        # From block_size >= EVAL_ROWS on, the kernel batches have one shape: same bits, same picks.
        assert torch.equal(lazy_by_block[64], lazy_by_block[4096])


@pytest.mark.parametrize("method", ["lazy", "stochastic"])
def test_every_method_computes_a_row_at_the_same_slot(monkeypatch, method):
    # A BLAS may give a row other last bits at another position of the product (MKL does for
    # float64 rows in a tail panel), or in a product of another shape. Simulate one that always
    # does: each kernel row is shifted by (its position + 1) x 1e-9 + (rows in the product) x
    # 1e-8. Exact ties between duplicated points then depend on both, so lazy == naive only if
    # every method evaluates a candidate's row at one position of one shape.
    real_rbf = kernels.rbf

    def positional(a, b, sigma, **kw):
        out = real_rbf(a, b, sigma, **kw)
        return out.add_(1e-9 * torch.arange(1, a.shape[0] + 1, dtype=out.dtype)[:, None] + 1e-8 * a.shape[0])

    monkeypatch.setattr(kernels, "rbf", positional)
    seen = []
    for seed in range(3):
        z = _duplicated_pool(seed, n=200, d=8)
        sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(seed))
        for block_size in (5, 7, 32) if method == "stochastic" else (5, 7, 32, None):
            naive = herd(z, 40, sigma, method="naive", block_size=block_size)
            if method == "lazy":
                assert torch.equal(naive, herd(z, 40, sigma, method="lazy", block_size=block_size)), (seed, block_size)
            else:
                # stochastic greedy evaluates a random sample; with epsilon tiny the sample is the
                # whole pool at every step, so it is the naive greedy too.
                picks = herd(z, 40, sigma, method="stochastic", block_size=block_size, epsilon=1e-300,
                             generator=torch.Generator().manual_seed(seed))
                assert torch.equal(naive, picks), (seed, block_size)
            seen.append(naive)
    # The shift did decide ties: the picks are not those of the unshifted kernel everywhere.
    monkeypatch.setattr(kernels, "rbf", real_rbf)
    z = _duplicated_pool(0, n=200, d=8)
    sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(seen[0], herd(z, 40, sigma, method="naive", block_size=5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lazy_equals_naive_to_the_whole_pool(dtype):
    # k == n: every point picked once, including all the exact zero-gain ties at the end.
    z = _duplicated_pool(5, n=120, d=8).to(dtype)
    sigma = median_bandwidth(z)
    naive = herd(z, 120, sigma, method="naive", block_size=16)
    lazy = herd(z, 120, sigma, method="lazy", block_size=16)
    assert torch.equal(naive, lazy)
    assert sorted(lazy.tolist()) == list(range(120))
    assert lazy.dtype == torch.long and lazy.shape == (120,)


def test_lazy_equals_naive_float32_larger_pool():
    z = _clustered_pool(9, n=1500, d=48, clusters=12, spread=1.0).float()
    labelled = z[:20] + 0.1
    sigma = median_bandwidth(z)
    naive = herd(z, 150, sigma, labelled=labelled, method="naive")
    lazy = herd(z, 150, sigma, labelled=labelled, method="lazy")
    assert torch.equal(naive, lazy)


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_lazy_equals_naive_in_the_dense_layout(pool):
    # Default block_size: small pools take the dense layout (the kernel built once in
    # TILE_ROWS-row products); 2,100 points make three tiles, the last a partial one.
    for seed, n in ((0, 300), (1, 2100)):
        z = POOLS[pool](seed, n=n)
        labelled = torch.cat([z[:5] + 0.01, _random_pool(seed + 100, n=5, d=z.shape[1])])
        sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(seed))
        plan = herding_plan(n, 16, 60, itemsize=8)
        assert plan.dense and plan.rows == min(max_herding_module.TILE_ROWS, -(-n // 32) * 32)
        for lab in (None, labelled):
            naive = herd(z, 60, sigma, labelled=lab, method="naive")
            lazy = herd(z, 60, sigma, labelled=lab, method="lazy")
            assert torch.equal(naive, lazy), (pool, seed, lab is None)


def test_dense_layout_picks_equal_apricot():
    apricot = pytest.importorskip("apricot")
    # As test_picks_equal_apricot_facility_location (same tie-free pool), in the dense layout.
    z = _random_pool(12, n=200, d=8)
    sigma = median_bandwidth(z)
    assert herding_plan(200, 8, 30, itemsize=8).dense
    ours = herd(z, 30, sigma).tolist()
    kmat = rbf(z, z, sigma).numpy()
    sel = apricot.FacilityLocationSelection(30, metric="precomputed", optimizer="lazy").fit(kmat)
    assert [int(i) for i in sel.ranking] == ours


def test_picks_equal_apricot_facility_location():
    apricot = pytest.importorskip("apricot")
    # apricot maximises Σ_i max_{j in S} K_ij (no 1/n): the same argmax at every step, so the same
    # greedy order; its per-step gains are n x our coverage increments. Facility location has
    # exact ties (e.g. two mutually-nearest points whose gains are each other's mirror image),
    # and apricot breaks them its own way, so the pool and k are chosen tie-free (checked below).
    z = _random_pool(12, n=200, d=8)
    n, k = 200, 30
    sigma = median_bandwidth(z)
    kmat = rbf(z, z, sigma).numpy()
    ours = herd(z, k, sigma, method="lazy", block_size=16).tolist()
    cov = np.zeros(n)
    for t, j in enumerate(ours):
        gains = np.maximum(kmat - cov[None, :], 0.0).sum(axis=1)
        gains[ours[:t]] = -1.0  # already picked
        top2 = np.sort(gains)[-2:]
        assert (top2[1] - top2[0]) / top2[1] > 1e-6, "test pool has a near-tie"
        cov = np.maximum(cov, kmat[j])
    for optimizer in ("naive", "lazy"):
        sel = apricot.FacilityLocationSelection(k, metric="precomputed", optimizer=optimizer).fit(kmat)
        assert [int(i) for i in sel.ranking] == ours, optimizer
    cov_ours = [coverage(z, ours[: t + 1], sigma) for t in range(k)]
    np.testing.assert_allclose(np.cumsum(sel.gains) / n, cov_ours, rtol=1e-9)


# --------------------------------------------------------------------------- stochastic greedy


def test_stochastic_greedy_is_seeded_and_close_to_lazy():
    z = _clustered_pool(0, n=600, d=16, clusters=5, spread=0.5)
    sigma = median_bandwidth(z)
    k = 30
    a = herd(z, k, sigma, method="stochastic", generator=torch.Generator().manual_seed(1))
    b = herd(z, k, sigma, method="stochastic", generator=torch.Generator().manual_seed(1))
    c = herd(z, k, sigma, method="stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) == k
    lazy_cov = coverage(z, herd(z, k, sigma, method="lazy"), sigma)
    for picks in (a, c):
        assert coverage(z, picks, sigma) >= 0.97 * lazy_cov


def test_stochastic_greedy_can_take_the_whole_pool():
    z = _random_pool(3, n=40, d=4)
    picks = herd(z, 40, 2.0, method="stochastic", generator=torch.Generator().manual_seed(0))
    assert sorted(picks.tolist()) == list(range(40))


# ---------------------------------------------------------------------------------- memory


def test_lazy_never_builds_a_kernel_block_larger_than_n_times_block_size(monkeypatch):
    n, d, block_size = 6000, 64, 512
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=g)
    labelled = torch.randn(700, d, generator=g)  # > block_size rows: initialised in blocks too
    sizes: list[int] = []
    real_rbf = kernels.rbf

    def spy(a, b, sigma, **kw):
        out = real_rbf(a, b, sigma, **kw)
        sizes.append(out.numel())
        return out

    # The lazy optimiser also keeps a cache of kernel rows: record its size too.
    mh = importlib.import_module("sparseseg.selection.max_herding")
    real_cache = mh._RowCache

    def cache_spy(pool, capacity):
        sizes.append(capacity * pool.n)
        return real_cache(pool, capacity)

    monkeypatch.setattr(kernels, "rbf", spy)
    monkeypatch.setattr(mh, "_RowCache", cache_spy)
    picks = herd(z, 20, 12.0, labelled=labelled, method="lazy", block_size=block_size)
    assert len(set(picks.tolist())) == 20
    assert len(sizes) > 2, "the spies saw no kernel evaluation"
    assert max(sizes) <= n * block_size
    assert max(sizes) < n * n // 10


# ---------------------------------------------------------------------------------- errors


def test_budget_larger_than_pool_is_refused():
    with pytest.raises(SparsesegError, match="larger than the pool") as err:
        herd(torch.zeros(5, 2), 6, 1.0)
    assert "k=6" in str(err.value) and "n=5" in str(err.value)


def test_herding_argument_errors():
    z = _random_pool(0, n=10, d=3)
    assert herd(z, 0, 1.0).shape == (0,)
    with pytest.raises(SparsesegError, match="method="):
        herd(z, 2, 1.0, method="greedy")
    with pytest.raises(SparsesegError, match="feature dimension"):
        herd(z, 2, 1.0, labelled=torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(SparsesegError, match="NaN"):
        herd(torch.full((3, 2), float("nan")), 1, 1.0)
    with pytest.raises(SparsesegError, match="block_size"):
        herd(z, 2, 1.0, block_size=0)
    with pytest.raises(SparsesegError, match="sigma"):
        herd(z, 2, -1.0)
    with pytest.raises(SparsesegError, match=r"shape \(n, D\)"):
        herd(torch.zeros(5), 1, 1.0)
    with pytest.raises(SparsesegError, match="picked_idx"):
        coverage(z, [10], 1.0)


# ----------------------------------------------------------------------------- uncertainty


def _random_probs(seed: int, s: int = 5, n: int = 50, c: int = 7, peaked: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, n, c, generator=g, dtype=torch.float64) * (4.0 if peaked else 1.0)
    return logits.softmax(dim=-1)


def _baal_layout(probs: torch.Tensor) -> np.ndarray:
    # ours (S samples, N pixels, C classes) -> baal [n_sample=N, n_class=C, n_iterations=S]
    return probs.permute(1, 2, 0).numpy()


def test_entropy_matches_scipy():
    p = _random_probs(0)
    expected = scipy.stats.entropy(p.mean(dim=0).numpy(), axis=-1)
    np.testing.assert_allclose(uncertainty.entropy(p).numpy(), expected, atol=1e-12)


def test_scores_match_baal_heuristics():
    heur = pytest.importorskip("baal.active.heuristics")
    for seed, peaked in itertools.product(range(3), (False, True)):
        p = _random_probs(seed, peaked=peaked)
        arr = _baal_layout(p)
        np.testing.assert_allclose(
            uncertainty.mutual_information(p).numpy(), heur.BALD().compute_score(arr), atol=1e-6
        )
        np.testing.assert_allclose(
            uncertainty.entropy(p).numpy(), heur.Entropy().compute_score(arr), atol=1e-6
        )
        # baal's Margin is top1 - top2 (low = uncertain); ours is its negative (high = uncertain).
        np.testing.assert_allclose(
            uncertainty.margin(p).numpy(), -heur.Margin().compute_score(arr), atol=1e-6
        )


def test_least_confidence():
    p = torch.tensor([[[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64)
    np.testing.assert_allclose(uncertainty.least_confidence(p).numpy(), [0.3, 2 / 3], atol=1e-12)


def test_edald_closed_form_identical_one_hot_samples():
    # (a) M = 5 identical one-hot samples: H(mean) = 0, mean H = 0 -> MI = 0; z0 uniform over
    # C = 4 classes -> H(z0) = log 4 -> eDALD = log 4. One-hot rows must not give NaN (0 log 0).
    c, m = 4, 5
    probs = torch.zeros(m, 3, c, dtype=torch.float64)
    probs[:, :, 2] = 1.0
    z0 = torch.full((3, c), 1.0 / c, dtype=torch.float64)
    mi = uncertainty.mutual_information(probs)
    assert torch.equal(mi, torch.zeros(3, dtype=torch.float64))
    np.testing.assert_allclose(uncertainty.edald(probs, z0).numpy(), [math.log(c)] * 3, atol=1e-12)
    np.testing.assert_allclose(uncertainty.edald(probs, z0[None]).numpy(), [math.log(c)] * 3, atol=1e-12)


def test_edald_closed_form_two_disagreeing_samples():
    # (b) M = 2 one-hot samples on different classes: mean = [0.5, 0.5] -> H(mean) = log 2,
    # mean H = 0 -> MI = log 2; z0 = [0.5, 0.5] -> H(z0) = log 2 -> eDALD = 2 log 2.
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    z0 = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    np.testing.assert_allclose(uncertainty.mutual_information(probs).numpy(), [math.log(2)], atol=1e-12)
    np.testing.assert_allclose(uncertainty.entropy(probs).numpy(), [math.log(2)], atol=1e-12)
    np.testing.assert_allclose(uncertainty.edald(probs, z0).numpy(), [2 * math.log(2)], atol=1e-12)


def test_edald_random_case_against_explicit_loops():
    # (c) Eq. 6-8 written out with scalar loops.
    probs = _random_probs(4, s=5, n=12, c=6)
    z0 = _random_probs(5, s=1, n=12, c=6)[0]
    pa, za = probs.numpy(), z0.numpy()
    s_count, n_count, c_count = pa.shape
    expected = []
    for n in range(n_count):
        mean = [sum(pa[s, n, c] for s in range(s_count)) / s_count for c in range(c_count)]
        h_mean = -sum(q * math.log(q) for q in mean if q > 0)
        mean_h = 0.0
        for s in range(s_count):
            mean_h += -sum(pa[s, n, c] * math.log(pa[s, n, c]) for c in range(c_count) if pa[s, n, c] > 0)
        mean_h /= s_count
        h_z0 = -sum(za[n, c] * math.log(za[n, c]) for c in range(c_count) if za[n, c] > 0)
        expected.append(max(h_mean - mean_h, 0.0) + h_z0)
    np.testing.assert_allclose(uncertainty.edald(probs, z0).numpy(), expected, rtol=1e-10)


def test_single_sample_mutual_information_is_zero():
    p = _random_probs(6, s=1)
    assert torch.equal(uncertainty.mutual_information(p), torch.zeros(p.shape[1], dtype=p.dtype))


def test_uncertainty_input_errors():
    with pytest.raises(SparsesegError, match="add a samples axis"):
        uncertainty.entropy(torch.full((4, 3), 1 / 3))
    with pytest.raises(SparsesegError, match="sum to 1"):
        uncertainty.entropy(torch.rand(2, 4, 3) + 1.0)
    with pytest.raises(SparsesegError, match="probs_z0"):
        uncertainty.edald(_random_probs(0, n=4), _random_probs(1, n=5)[0])
    with pytest.raises(SparsesegError, match="at least 2"):
        uncertainty.margin(torch.ones(1, 3, 1))
    # within tolerance passes
    p = torch.full((1, 2, 4), 0.25 + 1e-4)
    assert uncertainty.entropy(p).shape == (2,)


# ------------------------------------------------------------------------------ memory cap


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created by torch ops inside the block (CPU or CUDA).

    Every op's outputs are inspected; a storage is counted once from its creation until it is
    freed (a finalizer on the storage object). Storages of `inputs` are never counted.
    """

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.ignored = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or key in self.ignored or storage.nbytes() == 0:
                    continue
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out


def test_peak_tracker_sees_allocations_and_frees():
    a = torch.zeros(1000, 250)  # 1 MB, an input
    with _PeakBytes(a) as tracker:
        b = a + 1  # 1 MB
        c = (b * 2).sum()  # a 1 MB temporary, then a scalar
        del b
        d = a[:10].clone()
    assert tracker.peak == 2_000_000 + 4
    assert tracker.now == 4 + 10_000
    del c, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_herding_memory_cap_is_respected_and_picks_stay_exact(dtype):
    g = torch.Generator().manual_seed(0)
    z = _clustered_pool(1, n=2000, d=32, clusters=8, spread=1.0).to(dtype)
    labelled = torch.randn(40, 32, generator=g).to(dtype)
    sigma = median_bandwidth(z.float(), generator=torch.Generator().manual_seed(0))
    with _PeakBytes(z, labelled) as free:
        uncapped = herd(z, 100, sigma, labelled=labelled)
    reference = herd(z, 100, sigma, labelled=labelled, method="naive")
    assert torch.equal(uncapped, reference)
    # A cap well below the uncapped peak that still holds the running state: smaller row cache,
    # same picks (bit for bit), and the measured peak stays below the cap.
    cap_gb = free.peak / 4 / GB
    plan = herding_plan(2000, 32, 100, max_memory_gb=cap_gb, convert=4 if dtype == torch.float16 else 0)
    assert plan.exact and 0 < plan.cache_rows < 2000
    with _PeakBytes(z, labelled) as capped:
        picks = herd(z, 100, sigma, labelled=labelled, max_memory_gb=cap_gb)
    assert torch.equal(picks, reference)
    assert capped.peak <= cap_gb * GB < free.peak
    assert capped.peak <= plan.peak_bytes


def _shard_reference(z, k, sigma, labelled, plan):
    """Sharded herding written out from its description: exact lazy greedy per shard, conditioned
    on every labelled point and every pick of the earlier shards."""
    picks: list[int] = []
    for (start, stop), budget in zip(plan.shards, plan.budgets, strict=True):
        cond = torch.cat([labelled, z[picks]]) if picks else labelled
        local = herd(z[start:stop], budget, sigma, labelled=cond)
        picks += (local + start).tolist()
    return picks


def test_sharded_herding_under_a_tight_cap():
    # 40 clusters, 40 picks: the exact greedy spends about one pick per cluster.
    z = _clustered_pool(2, n=3000, d=32, clusters=40, spread=1.0).float()
    labelled = z[:10] + 0.05
    k = 40
    sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(0))
    cap_gb = 0.6e6 / GB  # the running state of 3000 points (~1.2 MB here) does not fit
    plan = herding_plan(3000, 32, k, max_memory_gb=cap_gb)
    sizes = [stop - start for start, stop in plan.shards]
    assert len(sizes) == 3 and plan.shards[0][0] == 0 and plan.shards[-1][1] == 3000
    assert max(sizes) - min(sizes) <= 1 and sum(plan.budgets) == k
    assert all(abs(b - k * s / 3000) < 1 for b, s in zip(plan.budgets, sizes, strict=True))
    with _PeakBytes(z, labelled) as tracker:
        picks = herd(z, k, sigma, labelled=labelled, max_memory_gb=cap_gb)
    assert tracker.peak <= cap_gb * GB
    assert picks.tolist() == _shard_reference(z, k, sigma, labelled, plan)
    assert len(set(picks.tolist())) == k
    # An approximation of the global greedy, measured: within 0.5% of its coverage (here 0.9786
    # against 0.9792), while shards that ignore the picks before them re-cover the same clusters
    # (0.9616).
    exact = coverage(z, herd(z, k, sigma, labelled=labelled), sigma, labelled=labelled)
    sharded = coverage(z, picks, sigma, labelled=labelled)
    blind = [start + j for (start, stop), b in zip(plan.shards, plan.budgets, strict=True)
             for j in herd(z[start:stop], b, sigma, labelled=labelled).tolist()]
    assert sharded >= 0.995 * exact
    assert coverage(z, blind, sigma, labelled=labelled) < sharded - 0.01


def test_dense_layout_follows_the_memory_rule():
    from sparseseg.selection.herding_plan import DEFAULT_STORE_GB

    # A local stage: 10,000 candidates, 0.4 GB of float32 kernel, well inside the default 2 GB.
    plan = herding_plan(10_000, 512, 50)
    assert plan.dense and plan.rows == 1024 and plan.gain_rows == 32 and plan.cache_rows == 10_000
    assert 10_016 * 10_000 * 4 < plan.peak_bytes < 0.45 * GB
    # "naive" takes the same layout as "lazy" for the same arguments.
    assert herding_plan(10_000, 512, 50, method="naive").rows == 1024
    # Past the default store (24,000 points: 2.1 GB of kernel): the row cache, R = 32, with as
    # many rows as 2 GB holds; "naive" (uncapped) computes its rows the same way.
    big = herding_plan(24_000, 512, 50)
    assert not big.dense and big.rows == 32 and big.exact
    assert big.cache_rows == pytest.approx(DEFAULT_STORE_GB * GB / (24_000 * 4 + 8), rel=0.01)
    assert herding_plan(24_000, 512, 50, method="naive").rows == 32
    # A cap decides instead of the default: just above the dense need, dense; just below, not.
    need = plan.peak_bytes / GB
    assert herding_plan(10_000, 512, 50, max_memory_gb=need / 0.99 * 1.001).dense
    below = herding_plan(10_000, 512, 50, max_memory_gb=need * 0.98)
    assert not below.dense and below.rows == 32 and below.cache_rows < 10_000
    # An explicit block_size keeps the row-cache layout.
    assert not herding_plan(500, 8, 5, block_size=4096).dense
    # Stochastic greedy never holds the kernel.
    assert not herding_plan(500, 8, 5, method="stochastic").dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_layout_memory_is_measured(dtype):
    z = _clustered_pool(3, n=1500, d=24, clusters=10, spread=1.0).to(dtype)
    labelled = z[:40].float() + 0.05
    sigma = median_bandwidth(z.float(), generator=torch.Generator().manual_seed(0))
    convert = 4 if dtype == torch.float16 else 0
    plan = herding_plan(1500, 24, 80, convert=convert)
    assert plan.dense
    with _PeakBytes(z, labelled) as tracker:
        picks = herd(z, 80, sigma, labelled=labelled)
    assert tracker.peak <= plan.peak_bytes
    # The kernel is the bulk of it: 1,504 x 1,500 float32 values.
    assert tracker.peak >= 1504 * 1500 * 4
    # Under a cap that just holds the dense layout, the same picks within the cap.
    cap_gb = plan.peak_bytes / 0.99 / GB * 1.001
    with _PeakBytes(z, labelled) as capped:
        assert torch.equal(herd(z, 80, sigma, labelled=labelled, max_memory_gb=cap_gb), picks)
    assert capped.peak <= cap_gb * GB
    assert torch.equal(picks, herd(z, 80, sigma, labelled=labelled, method="naive"))


def test_stochastic_herding_respects_the_cap_too():
    z = _random_pool(4, n=2000, d=16).float()
    sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(0))
    for cap_gb in (2e6 / GB, 0.7e6 / GB):
        with _PeakBytes(z) as tracker:
            picks = herd(z, 60, sigma, method="stochastic", generator=torch.Generator().manual_seed(0),
                         max_memory_gb=cap_gb)
        assert tracker.peak <= cap_gb * GB and len(set(picks.tolist())) == 60


def test_memory_cap_errors_and_apportioning():
    z = _random_pool(0, n=300, d=8)
    with pytest.raises(SparsesegError, match=r"method='naive' holds the whole 300 x 300 kernel.*method='lazy'"):
        herd(z, 5, 1.0, method="naive", max_memory_gb=1e-4)
    with pytest.raises(SparsesegError, match=r"max_memory_gb=1e-09 is too small"):
        herd(z, 5, 1.0, max_memory_gb=1e-9)
    with pytest.raises(SparsesegError, match="positive number of GB"):
        herd(z, 5, 1.0, max_memory_gb=-1.0)
    assert herding_plan(10, 4, 7, max_memory_gb=1.0).exact
    # Largest remainder: floors of 7 * size / 10, then the largest fractional parts.
    assert max_herding_module._apportion(7, [4, 3, 3]) == [3, 2, 2]
    assert max_herding_module._apportion(5, [1, 1, 1, 1, 1, 1]) == [1, 1, 1, 1, 1, 0]
    assert max_herding_module._apportion(6, [2, 2, 2]) == [2, 2, 2]


@pytest.mark.parametrize("with_labelled", [False, True])
def test_k_center_greedy_memory_cap(with_labelled):
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(6, 24, generator=g, dtype=torch.float64)
    z = centres[torch.randint(6, (2000,), generator=g)] + 0.3 * torch.randn(2000, 24, generator=g, dtype=torch.float64)
    labelled = torch.randn(500, 24, generator=g, dtype=torch.float64) if with_labelled else None
    with _PeakBytes(z, labelled) as free:
        uncapped = k_center_greedy(z, 80, labelled=labelled, generator=torch.Generator().manual_seed(1))
    cap_gb = 125e3 / GB  # the (n,) state is 32 kB: distance blocks of ~3,400 values
    with _PeakBytes(z, labelled) as capped:
        picks = k_center_greedy(z, 80, labelled=labelled, generator=torch.Generator().manual_seed(1),
                                max_memory_gb=cap_gb)
    assert picks.tolist() == uncapped.tolist()
    assert capped.peak <= cap_gb * GB
    if with_labelled:  # uncapped, the labelled centres go 500 at a time: (2000, 500) blocks
        assert free.peak > 10 * cap_gb * GB
    with pytest.raises(SparsesegError, match="too small for k-center greedy"):
        k_center_greedy(z, 5, max_memory_gb=1e-6)


def test_strategy_config_passes_the_cap_to_both_coverage_objectives(monkeypatch):
    from sparseseg.config import StrategyConfig
    from sparseseg.selection import strategies

    seen = {}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name] = kwargs.get("max_memory_gb")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(strategies, "max_herding", spy("max_herding", herd))
    monkeypatch.setattr(strategies, "k_center_greedy", spy("coreset", k_center_greedy))
    z = _random_pool(0, n=200, d=8).float()
    config = StrategyConfig(max_memory_gb=0.25)
    for coverage_name in ("max_herding", "coreset"):
        strategy = strategies.TwoStageStrategy(config, None, coverage=coverage_name)
        picks, _ = strategy._cover(z, 5, None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
        assert len(set(picks.tolist())) == 5
    assert seen == {"max_herding": 0.25, "coreset": 0.25}
    assert StrategyConfig().max_memory_gb is None
    with pytest.raises(ValueError, match="greater than 0"):
        StrategyConfig(max_memory_gb=0)


def test_random_projection_keeps_distances_as_johnson_lindenstrauss_says():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 512, generator=g)
    p = kernels.random_projection(512, 256, torch.Generator().manual_seed(1))
    assert p.shape == (512, 256)
    assert torch.equal(p, kernels.random_projection(512, 256, torch.Generator().manual_seed(1)))
    before = torch.pdist(z.double()) ** 2
    after = torch.pdist((z @ p).double()) ** 2
    ratio = after / before
    # ||xP||²/||x||² is a chi-square with 256 degrees of freedom over 256: mean 1, sd sqrt(2/256)
    # = 0.088; over 19,900 pairs the mean is within a few hundredths, and no pair is off by half.
    assert abs(float(ratio.mean()) - 1.0) < 0.02
    assert float(ratio.std()) == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    assert 0.5 < float(ratio.min()) and float(ratio.max()) < 1.5
    with pytest.raises(SparsesegError, match="dimensions must be >= 1"):
        kernels.random_projection(512, 0)


def test_local_projection_herds_projected_features_in_the_local_stage_only(monkeypatch):
    from sparseseg.config import StrategyConfig
    from sparseseg.features.store import FeatureStore
    from sparseseg.labels import PixelLabels
    from sparseseg.seeding import derived_generator
    from sparseseg.selection import strategies
    from tests.conftest import ToyBackbone

    size, n_images = 12, 3
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, size, size, 3), generator=g, dtype=torch.uint8)
    store = FeatureStore(ToyBackbone(input_size=size), images, seed=0, split="train")
    labels = PixelLabels()
    labels.add(torch.tensor([0, 2]), torch.tensor([3, 5]), torch.tensor([4, 1]), torch.tensor([0, 1]), 1)
    calls = []

    def spy(z, k, sigma, labelled=None, **kw):
        calls.append((z, labelled))
        return herd(z, k, sigma, labelled=labelled, **kw)

    monkeypatch.setattr(strategies, "max_herding", spy)
    config = StrategyConfig(name="max_herding", candidates_per_image=40, k_per_image=6, pool_ratio=0.5,
                            local_projection=4)
    strategy = strategies.create_strategy(config)
    ctx = strategies.RoundContext(store, labels, None, 4, 1, 0, noise_samples=1, tile_pixels=50)
    picks = strategy.select(ctx)
    assert len(picks.image) == 4
    assert len(calls) == n_images + 1  # one local call per image, then the global one
    proj = torch.randn(store.dim, 4, generator=derived_generator(0, "local-projection")) / 2.0  # N(0, 1/4)
    for image, (z, covered) in enumerate(calls[:n_images]):
        taken = {3 * size + 4} if image == 0 else {5 * size + 1} if image == 2 else set()
        cand = strategy._candidates(ctx, image, taken)
        full = store.at_pixels(torch.full_like(cand, image), cand // size, cand % size)
        torch.testing.assert_close(z, full @ proj)
        if image == 1:
            assert covered is None
        else:
            (y, x), = [divmod(t, size) for t in taken]
            lab = store.at_pixels(torch.tensor([image]), torch.tensor([y]), torch.tensor([x]))
            torch.testing.assert_close(covered, lab @ proj)
    assert calls[-1][0].shape[1] == store.dim  # the global stage herds the features as they are


def test_dense_greedy_runs_on_one_thread_and_restores_the_setting(monkeypatch):
    z = _duplicated_pool(3, n=600, d=16).float()
    sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(0))
    seen = []
    real_gains = max_herding_module._gains

    def spy(rows, cov, scratch=False):
        seen.append(torch.get_num_threads())
        return real_gains(rows, cov, scratch)

    monkeypatch.setattr(max_herding_module, "_gains", spy)
    torch.set_num_threads(2)
    try:
        picks = {method: herd(z, 40, sigma, method=method) for method in ("lazy", "naive")}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert torch.equal(picks["lazy"], picks["naive"])
    assert seen and set(seen) == {1}
