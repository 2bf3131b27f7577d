"""MaxHerding: greedy maximisation of generalised coverage (paper Section 3.2, Eq. 3).

Coverage of a set S of picked candidates, given optional already-labelled features L:

    C(S) = (1/n) Σ_{x in pool} max_{x' in L ∪ S} k(x, x'),     k = RBF (see `kernels.rbf`)

with the convention that a pool point covered by nothing (S and L empty) contributes 0. This is
facility location divided by n: monotone submodular, so the lazy greedy optimiser (stale gains
are valid upper bounds) returns exactly the picks of the naive greedy, with far fewer kernel
evaluations. The reference code runs the naive greedy over a dense n x n kernel.

Exactness of lazy == naive. Two things would make them differ in floating point, and both are
designed out here:

* BLAS results depend on the matrix shape (a 1-row matmul takes a different code path from a
  32-row one, and a long reduction dimension is blocked differently by shape). So every kernel
  row, in every method, comes from `kernels.rbf` on a batch of exactly R = min(block_size,
  EVAL_ROWS) candidate rows against the whole pool (short batches are padded by repeating the
  last index). The value of k(x_j, ·) is then the same bits whichever batch j is evaluated in.
* Gains come from one shared function, `_gains`, applied to (R, n) blocks in every method.
  The lazy row cache stores those same rows, so cached and recomputed rows are the same bits.

With identical kernel rows and gains, the monotonicity of floating-point subtraction and
addition keeps stale gains valid upper bounds bit for bit, and ties are broken the same way
(lowest index wins) by ordering the lazy heap on (-gain, index).
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Sequence

import torch

from sparseseg.errors import SparsesegError
from sparseseg.selection import kernels

__all__ = ["max_herding", "coverage", "EVAL_ROWS", "METHODS"]

#: Candidate rows evaluated per kernel call (capped by block_size). Fixed so that every kernel
#: row is produced by an identically shaped matmul (see module docstring).
EVAL_ROWS = 32

METHODS = ("naive", "lazy", "stochastic")


# ----------------------------------------------------------------------------------------------
# validation


def _check_features(z: object, name: str) -> torch.Tensor:
    z = kernels.check_matrix(z, name)
    if z.numel() and not bool(torch.isfinite(z).all()):
        raise SparsesegError(f"{name} contains NaN or infinite values; features must be finite")
    if z.dtype in (torch.float16, torch.bfloat16):
        # ||a||² + ||b||² - 2ab cancels badly in half precision.
        z = z.float()
    return z


def _check_labelled(labelled: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | None:
    if labelled is None:
        return None
    labelled = _check_features(labelled, "labelled")
    if labelled.shape[1] != z.shape[1]:
        raise SparsesegError(
            f"labelled has feature dimension {labelled.shape[1]} (shape {tuple(labelled.shape)}); "
            f"expected D={z.shape[1]} like z {tuple(z.shape)}"
        )
    if labelled.shape[0] == 0:
        return None
    return labelled.to(device=z.device, dtype=z.dtype)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise SparsesegError(f"{name}={value!r}; expected an integer >= {minimum}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# shared building blocks (used identically by every method: this is what makes lazy == naive)


class _Pool:
    """The candidate features plus what every kernel-row evaluation needs."""

    def __init__(self, z: torch.Tensor, sigma: float, rows: int) -> None:
        self.z = z
        self.n = z.shape[0]
        self.sigma = sigma
        self.rows = rows
        # Squared norms computed once; indexing them keeps each row's value batch-independent.
        self.sqnorm = (z * z).sum(dim=1)

    def kernel_rows(self, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(R, n) kernel rows k(z_j, z) for the candidates `idx` (len <= R), padded to R rows."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.z.device)
        m = idx.numel()
        if m < self.rows:
            # Always the same matmul shape: pad with copies of the last index (results discarded).
            idx = torch.cat([idx, idx[-1:].expand(self.rows - m)])
        return kernels.rbf(self.z[idx], self.z, self.sigma, a_sqnorm=self.sqnorm[idx], b_sqnorm=self.sqnorm)


def _gains(rows: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Marginal gains (times n) of the candidates whose kernel rows are given.

    gain_j = Σ_i max(0, k(z_j, z_i) - cov_i). Always called on (R, n) blocks so the reduction runs
    over identically shaped tensors in every method.

    Args:
        rows: (R, n) kernel rows.
        cov: (n,) current coverage (running max of the kernel to L ∪ S, 0 if nothing yet).

    Returns:
        (R,) gains.
    """
    return (rows - cov[None, :]).clamp_(min=0.0).sum(dim=1)


def _initial_coverage(pool: _Pool, labelled: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """(n,) running max of the kernel from the labelled set to the pool; zeros without one."""
    cov = torch.zeros(pool.n, dtype=pool.z.dtype, device=pool.z.device)
    if labelled is None:
        return cov
    for start in range(0, labelled.shape[0], block_size):
        blk = kernels.rbf(labelled[start : start + block_size], pool.z, pool.sigma, b_sqnorm=pool.sqnorm)
        torch.maximum(cov, blk.amax(dim=0), out=cov)
    return cov


# ----------------------------------------------------------------------------------------------
# optimisers


def _naive(pool: _Pool, k: int, cov: torch.Tensor) -> list[int]:
    n, r = pool.n, pool.rows
    n_pad = -(-n // r) * r
    # The whole kernel, built from the same (R, n) row batches the other methods use.
    kmat = torch.empty(n_pad, n, dtype=pool.z.dtype, device=pool.z.device)
    for start in range(0, n, r):
        kmat[start : start + r] = pool.kernel_rows(range(start, min(start + r, n)))
    picked = torch.zeros(n, dtype=torch.bool, device=pool.z.device)
    out: list[int] = []
    for _ in range(k):
        gains = torch.cat([_gains(kmat[s : s + r], cov) for s in range(0, n_pad, r)])[:n]
        gains[picked] = -math.inf
        j = int(torch.argmax(gains))  # first maximum: lowest index wins ties
        out.append(j)
        picked[j] = True
        torch.maximum(cov, kmat[j], out=cov)
    return out


class _RowCache:
    """Kernel rows of the most promising candidates, at most `capacity` of them.

    Lazy greedy refreshes the same top candidates again and again; recomputing k(z_j, ·) costs
    O(n·D), reading a cached row O(n). Cached rows are the very bits `kernel_rows` produced, so
    gains computed from them are identical. When full, the cache drops the candidate with the
    lowest current upper bound (the one the heap reaches last).
    """

    def __init__(self, pool: _Pool, capacity: int) -> None:
        self.pool = pool
        self.capacity = capacity
        self.store: torch.Tensor | None = None  # (capacity, n), allocated on first insert
        self.slot: dict[int, int] = {}
        self.owner = [-1] * capacity
        # Upper bound of each slot's candidate; -inf marks a free slot. Kept on the CPU.
        self.bound = torch.full((capacity,), -math.inf, dtype=torch.float64)

    def rows(self, idx: list[int]) -> torch.Tensor:
        """(R, n) kernel rows for `idx` (len <= R); rows past len(idx) are padding."""
        pool = self.pool
        hit = [t for t, j in enumerate(idx) if j in self.slot]
        if not hit:
            return pool.kernel_rows(idx)
        assert self.store is not None
        dev = pool.z.device
        if len(hit) == len(idx):
            slots = [self.slot[j] for j in idx]
            slots += [slots[-1]] * (pool.rows - len(slots))
            return self.store[torch.tensor(slots, device=dev)]
        miss = [t for t, j in enumerate(idx) if j not in self.slot]
        fresh = pool.kernel_rows([idx[t] for t in miss])
        out = torch.empty(pool.rows, pool.n, dtype=pool.z.dtype, device=dev)
        out[torch.tensor(hit, device=dev)] = self.store[
            torch.tensor([self.slot[idx[t]] for t in hit], device=dev)
        ]
        out[torch.tensor(miss, device=dev)] = fresh[: len(miss)]
        out[len(idx) :] = out[len(idx) - 1]
        return out

    def offer(self, idx: list[int], gains: list[float], rows: torch.Tensor, skip: int = -1) -> None:
        """Record fresh bounds (rows[t] is idx[t]'s row); cache rows that beat the worst cached one."""
        for t, (j, g) in enumerate(zip(idx, gains, strict=True)):
            if t == skip:
                continue
            s = self.slot.get(j)
            if s is None:
                s = int(torch.argmin(self.bound))
                if float(self.bound[s]) >= g:
                    continue
                if self.store is None:
                    self.store = torch.empty(
                        self.capacity, self.pool.n, dtype=self.pool.z.dtype, device=self.pool.z.device
                    )
                if self.owner[s] >= 0:
                    del self.slot[self.owner[s]]
                self.store[s] = rows[t]
                self.owner[s] = j
                self.slot[j] = s
            self.bound[s] = g

    def drop(self, j: int) -> None:
        s = self.slot.pop(j, None)
        if s is not None:
            self.owner[s] = -1
            self.bound[s] = -math.inf


def _lazy(pool: _Pool, k: int, cov: torch.Tensor, cache_rows: int) -> list[int]:
    n, r = pool.n, pool.rows
    cache = _RowCache(pool, min(cache_rows, n))
    # Heap of (-gain upper bound, index): the smallest key is the largest bound, lowest index
    # first among equal bounds -- the same tie-break as the naive argmax.
    heap: list[tuple[float, int]] = []
    for start in range(0, n, r):
        idx = list(range(start, min(start + r, n)))
        rows = pool.kernel_rows(idx)
        g = _gains(rows, cov)[: len(idx)].tolist()
        cache.offer(idx, g, rows)
        heap.extend((-gi, j) for gi, j in zip(g, idx, strict=True))
    heapq.heapify(heap)
    out: list[int] = []
    while len(out) < k:
        # Refresh the R most promising candidates at once.
        batch = [heapq.heappop(heap) for _ in range(min(r, len(heap)))]
        idx = [j for _, j in batch]
        rows = cache.rows(idx)
        g = _gains(rows, cov)[: len(idx)].tolist()
        keys = [(-gi, j) for gi, j in zip(g, idx, strict=True)]
        best = min(range(len(keys)), key=keys.__getitem__)
        # Every key left in the heap is a lower bound on its true key (submodularity), so a
        # fresh key no larger than the heap's smallest is the exact greedy choice.
        picked = not heap or keys[best] <= heap[0]
        if picked:
            out.append(idx[best])
            torch.maximum(cov, rows[best], out=cov)
            cache.drop(idx[best])
        cache.offer(idx, g, rows, skip=best if picked else -1)
        for t, key in enumerate(keys):
            if not (picked and t == best):
                heapq.heappush(heap, key)
    return out


def _stochastic(
    pool: _Pool, k: int, cov: torch.Tensor, epsilon: float, generator: torch.Generator | None
) -> list[int]:
    n, r = pool.n, pool.rows
    sample_size = max(1, math.ceil(n / k * math.log(1.0 / epsilon)))
    available = torch.ones(n, dtype=torch.bool, device=pool.z.device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out: list[int] = []
    for _ in range(k):
        remaining = available.nonzero().squeeze(1)
        s = min(sample_size, remaining.numel())
        perm = torch.randperm(remaining.numel(), generator=generator, device=gen_device)[:s]
        # Ascending order + strict ">" below: lowest index wins ties within the sample.
        cand = remaining[perm.to(remaining.device)].sort().values.tolist()
        best_g, best_j, best_row = -math.inf, -1, None
        for start in range(0, len(cand), r):
            idx = cand[start : start + r]
            rows = pool.kernel_rows(idx)
            g = _gains(rows, cov)[: len(idx)]
            t = int(torch.argmax(g))
            if float(g[t]) > best_g:
                best_g, best_j, best_row = float(g[t]), idx[t], rows[t].clone()
        out.append(best_j)
        available[best_j] = False
        torch.maximum(cov, best_row, out=cov)
    return out


# ----------------------------------------------------------------------------------------------
# public API


def max_herding(
    z: torch.Tensor,
    k: int,
    sigma: float,
    labelled: torch.Tensor | None = None,
    method: str = "lazy",
    block_size: int = 4096,
    generator: torch.Generator | None = None,
    epsilon: float = 0.01,
) -> torch.Tensor:
    """Greedily pick k pool points that maximise generalised coverage C (MaxHerding).

    Each step adds the candidate j maximising C(S ∪ {j}), i.e. the gain
    Σ_i max(0, k(z_i, z_j) - cov_i), where cov_i = max_{x' in L ∪ S} k(z_i, x') (0 when L ∪ S is
    empty, so the first pick maximises the kernel row sum). Ties go to the lowest index. A point
    is never picked twice.

    Methods:
        "naive": reference. Holds the full (n, n) kernel -- O(n²) memory -- and recomputes every
            gain at every step: O(k·n²) work.
        "lazy": lazy greedy (Minoux) with a heap of stale upper-bound gains, valid because C is
            monotone submodular. Returns exactly the naive picks (same tie-break, bit-identical
            gains: see the module docstring). Never materialises the (n, n) kernel: kernel rows
            are computed from the features for R = min(block_size, EVAL_ROWS) candidates at a
            time, and the rows of the (at most block_size) candidates with the highest current
            bounds are cached, since lazy greedy refreshes those again and again. Peak extra
            memory is O(n·block_size): the (block_size, n) row cache, a few (R, n) blocks, the
            (n,) coverage and norms, an n-entry heap (with `labelled`, blocks of block_size
            labelled rows x n while initialising the coverage, before the cache exists).
        "stochastic": stochastic greedy (Mirzasoleiman et al. 2015). Each step evaluates a
            uniformly random subset of ceil((n/k)·log(1/epsilon)) not-yet-picked candidates,
            drawn with `generator`: (1 - 1/e - epsilon) approximation in expectation,
            O(n²·log(1/epsilon)·D) work in total whatever k is. Memory as "lazy".

    Args:
        z: (n, D) floating candidate features (the pool). float16/bfloat16 are computed in float32.
        k: number of picks, 0 <= k <= n.
        sigma: RBF bandwidth σ > 0 (k(x, x') = exp(-||x - x'||² / σ²)); see `median_bandwidth`.
        labelled: optional (m, D) features of already-labelled points: they count as covering
            the pool from the start and cannot be picked.
        method: "naive", "lazy" or "stochastic".
        block_size: memory knob: at most about block_size kernel rows (each of n values) are
            held at once ("lazy": row cache; labelled initialisation; never more than EVAL_ROWS
            candidates per kernel call).
        generator: torch.Generator for "stochastic" (CPU or on z's device); ignored otherwise.
        epsilon: stochastic-greedy accuracy parameter in (0, 1); ignored otherwise.

    Returns:
        (k,) int64 tensor on z's device: indices into z in pick order.

    Raises:
        SparsesegError: bad arguments, e.g. k larger than the pool, non-finite features,
            mismatched feature dimensions, unknown method.
    """
    z = _check_features(z, "z")
    n = z.shape[0]
    k = _check_int(k, "k", 0)
    if k > n:
        raise SparsesegError(f"budget k={k} larger than the pool of n={n} candidates")
    s = kernels.check_sigma(sigma)
    labelled = _check_labelled(labelled, z)
    if method not in METHODS:
        raise SparsesegError(f"method={method!r}; expected one of {', '.join(METHODS)}")
    block_size = _check_int(block_size, "block_size", 1)
    if method == "stochastic" and not (0.0 < float(epsilon) < 1.0):
        raise SparsesegError(f"epsilon={epsilon!r}; expected a value in (0, 1)")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)

    pool = _Pool(z, s, min(block_size, EVAL_ROWS))
    with torch.no_grad():
        cov = _initial_coverage(pool, labelled, block_size)
        if method == "naive":
            picks = _naive(pool, k, cov)
        elif method == "lazy":
            picks = _lazy(pool, k, cov, block_size)
        else:
            picks = _stochastic(pool, k, cov, float(epsilon), generator)
    return torch.tensor(picks, dtype=torch.long, device=z.device)


def coverage(
    z: torch.Tensor,
    picked_idx: Sequence[int] | torch.Tensor,
    sigma: float,
    labelled: torch.Tensor | None = None,
    block_size: int = 4096,
) -> float:
    """Generalised coverage C(S) = (1/n) Σ_{x in pool} max_{x' in L ∪ S} k(x, x').

    A pool point covered by nothing contributes 0, so C(∅) = 0 without labelled points.
    Memory: kernel blocks of at most block_size rows x n.

    Args:
        z: (n, D) floating pool features.
        picked_idx: indices into z (any order; repeats are harmless).
        sigma: RBF bandwidth σ > 0.
        labelled: optional (m, D) features that cover the pool from the start.
        block_size: cap on kernel rows computed at once.

    Returns:
        C as a Python float in [0, 1].

    Raises:
        SparsesegError: bad arguments or out-of-range indices.
    """
    z = _check_features(z, "z")
    n = z.shape[0]
    if n == 0:
        raise SparsesegError("z has n=0 rows; coverage needs a non-empty pool")
    s = kernels.check_sigma(sigma)
    labelled = _check_labelled(labelled, z)
    block_size = _check_int(block_size, "block_size", 1)
    idx = torch.as_tensor(picked_idx, dtype=torch.long).reshape(-1).to(z.device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise SparsesegError(
            f"picked_idx has values in [{int(idx.min())}, {int(idx.max())}]; expected indices in [0, {n - 1}]"
        )
    pool = _Pool(z, s, block_size)
    with torch.no_grad():
        cov = _initial_coverage(pool, labelled, block_size)
        for start in range(0, idx.numel(), block_size):
            chunk = idx[start : start + block_size]
            blk = kernels.rbf(z[chunk], z, s, a_sqnorm=pool.sqnorm[chunk], b_sqnorm=pool.sqnorm)
            torch.maximum(cov, blk.amax(dim=0), out=cov)
        return float(cov.double().mean())
