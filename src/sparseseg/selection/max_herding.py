"""MaxHerding: greedy maximisation of generalised coverage (paper Section 3.2, Eq. 3).

Coverage of a set S of picked candidates, given optional already-labelled features L:

    C(S) = (1/n) Σ_{x in pool} max_{x' in L ∪ S} k(x, x'),     k = RBF (see `kernels.rbf`)

with the convention that a pool point covered by nothing (S and L empty) contributes 0. This is
facility location divided by n: monotone submodular, so the lazy greedy optimiser (stale gains
are valid upper bounds) returns exactly the picks of the naive greedy, with far fewer kernel
evaluations. The reference code runs the naive greedy over a dense n x n kernel.

Two layouts (`herding_plan` chooses; `herding_plan.py` says how):

* dense: when the whole call fits the memory cap (DEFAULT_STORE_GB = 2 GB without one), the
  n x n kernel is built once, from R = TILE_ROWS-row products (a large matrix product runs at the
  speed of the hardware; a 32-row one is 1.3-2x slower per row), and the greedy reads it. The
  lazy greedy then costs one kernel pass plus its refreshes, each a gather of G = 32 rows and a
  reduction. A local stage of 10,000 candidates (0.4 GB in float32) is always in this layout.
* row cache: R = G = 32 rows per kernel call; the lazy greedy caches the rows of its most
  promising candidates and recomputes the others (global stages past the cap).

Exactness of lazy == naive. It holds when both compute every per-candidate quantity -- the kernel
row k(z_j, ·) and the gain -- with the same bits. Floating point makes that fragile, so it is
designed in, not hoped for:

* "naive" and "lazy" use the same layout for the same arguments (one test decides it), and in
  the dense layout both read the kernel from one function, `_dense_kernel`: each row is computed
  once.
* A BLAS result depends on the shape of the product (a 1-row matmul takes another code path than
  a 32-row one; the reduction dimension is blocked by shape) AND on the position of a row inside
  it: MKL computes float64 rows in a tail panel (rows 4..6 of a 7-row product, say) with another
  instruction sequence than rows in a full panel, so the same row gets other last bits at another
  position. So in the row-cache layout every kernel row, in every method and in the cache, is row
  `j mod R` of a `kernels.rbf` call on exactly R rows against the whole pool: a batch holds at
  most one candidate per residue mod R, at its own slot; free slots are padding whose values are
  discarded. Row t of a matrix product depends on row t of the left operand only, so what the
  other slots hold cannot change it.
* Gains come from one shared function, `_gains`, applied to (G, n) blocks with candidate j at
  slot j mod G in every method (gathered from the dense kernel or the cache, or computed): the
  reduction runs on a fresh temporary at the same position of the same shape, on the same bits.
* Elementwise IEEE operations (subtraction, clamp, max, copies) are correctly rounded, so they
  give the same bits wherever they run; `exp` (vectorised, with a scalar tail) and the reductions
  need not, and always see a row at the same offset of a same-shaped buffer.

What remains assumed is only that one operation on identical operands at an identical position
gives identical bits (a deterministic library and a fixed thread count). Given identical kernel
rows and gains, the monotonicity of floating-point subtraction and addition keeps stale gains
valid upper bounds bit for bit, and ties are broken the same way (lowest index wins) by ordering
the lazy heap on (-gain, index).

Across layouts (a cap that rules the dense kernel out, an explicit block_size) a row comes from a
product of another shape, which a BLAS may round differently in the last bit: picks can then
differ where two gains agree to that rounding (exact duplicates included). With MKL in float32
the rows had the same bits in 32-row and 1024-row products, and the tests comparing the layouts
pass; in float64 they need not.

Memory. `max_memory_gb` caps the tensors a call allocates (not the caller's input features;
GB = 2^30 bytes). `herding_plan` turns the cap into a layout -- dense, row cache, or exact herding
of contiguous shards with budgets by largest remainder when even the running state does not fit
(an approximation, measured in the tests and `benchmarks/bench_herding.py`); docs/performance.md
gives the arithmetic.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch

from sparseseg.errors import SparsesegError
from sparseseg.selection import kernels
from sparseseg.selection.herding_plan import (
    DEFAULT_STORE_GB,
    EVAL_ROWS,
    GB,
    METHODS,
    TILE_ROWS,
    HerdingPlan,
    herding_plan,
)
from sparseseg.selection.herding_plan import apportion as _apportion  # noqa: F401 (tests reach it here)

__all__ = ["max_herding", "coverage", "herding_plan", "HerdingPlan", "EVAL_ROWS", "TILE_ROWS",
           "DEFAULT_STORE_GB", "METHODS", "GB"]


# ----------------------------------------------------------------------------------------------
# validation


def _check_features(z: object, name: str) -> torch.Tensor:
    # Finiteness is checked on the squared norms, which every method computes anyway (a row with
    # a NaN or an infinity has a non-finite squared norm): no extra pass, no (n, D) temporary.
    return kernels.check_matrix(z, name)


def _sqnorm(x: torch.Tensor) -> torch.Tensor:
    """(n,) squared row norms as n dot products: a batched matmul, no (n, D) temporary."""
    return torch.bmm(x[:, None, :], x[:, :, None]).view(-1)


def _not_finite(name: str) -> SparsesegError:
    return SparsesegError(
        f"{name} contains NaN or infinite values (or values whose squares overflow); features must be finite"
    )


def _work_dtype(z: torch.Tensor) -> torch.dtype:
    # ||a||² + ||b||² - 2ab cancels badly in half precision: compute in float32.
    return torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype


def _check_labelled(labelled: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | None:
    """The labelled features, validated but not copied: rows are converted batch by batch."""
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
    return labelled


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise SparsesegError(f"{name}={value!r}; expected an integer >= {minimum}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# shared building blocks (used identically by every method: this is what makes lazy == naive)


class _Pool:
    """The candidate features plus what every kernel-row evaluation needs.

    Args:
        z: (n, D) pool features, in the working dtype.
        sigma: RBF bandwidth.
        rows: R, rows per kernel call (candidate j at row j mod R).
        gain_rows: G, rows per gain reduction and per batch of outside (source) points; R is a
            multiple of G.
        dense: the dense layout (the whole kernel is built by `_dense_kernel`).
    """

    def __init__(self, z: torch.Tensor, sigma: float, rows: int, gain_rows: int, dense: bool = False,
                 name: str = "z") -> None:
        self.z = z
        self.dense = dense
        self.n = z.shape[0]
        self.sigma = sigma
        self.rows = rows
        self.gain_rows = gain_rows
        # Squared norms computed once; indexing them keeps each row's value batch-independent.
        self.sqnorm = _sqnorm(z)
        if not bool(torch.isfinite(self.sqnorm).all()):
            raise _not_finite(name)

    def kernel_rows(self, idx: Sequence[int]) -> torch.Tensor:
        """(R, n) kernel block: row `j mod R` is k(z_j, z) for each candidate j in `idx`.

        `idx` holds at most one candidate per residue mod R (see `_slot_batches`). The other rows
        are padding (copies of idx[0]'s row; discard them). Every kernel row of every method comes
        from here, so a row always has the same slot in the same shape: the same bits.
        """
        first = int(idx[0])
        sel = [first] * self.rows
        for j in idx:
            sel[j % self.rows] = j
        sel_t = torch.tensor(sel, dtype=torch.long, device=self.z.device)
        return kernels.rbf(self.z[sel_t], self.z, self.sigma, a_sqnorm=self.sqnorm[sel_t], b_sqnorm=self.sqnorm)

    def source_rows(
        self, src: torch.Tensor, start: int, stop: int, idx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, n) kernel rows of outside points against the pool, padded to G rows, and the (G,)
        squared norms of those points.

        The points are src[start:stop] (idx None) or src[idx[start:stop]], stop - start <= G; src
        may have another dtype or device than the pool (converted here, G rows at a time).
        """
        g = self.gain_rows
        if idx is None:
            a = src[start:stop]
            if a.shape[0] < g:
                a = torch.cat([a, a[-1:].expand(g - a.shape[0], -1)])
        else:
            sel = idx[start:stop]
            if sel.numel() < g:
                sel = torch.cat([sel, sel[-1:].expand(g - sel.numel())])
            a = src[sel.to(src.device)]
        a = a.to(device=self.z.device, dtype=self.z.dtype)
        a_sqnorm = _sqnorm(a)
        return kernels.rbf(a, self.z, self.sigma, a_sqnorm=a_sqnorm, b_sqnorm=self.sqnorm), a_sqnorm


def _gains(rows: torch.Tensor, cov: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """Marginal gains (times n) of the candidates whose kernel rows are given.

    gain_j = Σ_i max(0, k(z_j, z_i) - cov_i). Always called on (G, n) blocks with candidate j at
    slot j mod G, so a candidate's reduction runs at the same position of the same shape in every
    method (module docstring). The reduction runs on a fresh temporary, wherever `rows` lives.

    Args:
        rows: (G, n) kernel rows, slot layout.
        cov: (n,) current coverage (running max of the kernel to L ∪ S, 0 if nothing yet).
        scratch: `rows` is a fresh contiguous copy that may be overwritten: the subtraction runs in
            place instead of into a temporary. The sum then reads the same bits at the same
            offsets of a same-shaped fresh buffer (subtraction and clamp are exactly rounded).

    Returns:
        (G,) gains, by slot.
    """
    if scratch:
        return rows.sub_(cov[None, :]).clamp_(min=0.0).sum(dim=1)
    return (rows - cov[None, :]).clamp_(min=0.0).sum(dim=1)


def _slot_batches(cands: Sequence[int], r: int) -> list[list[int]]:
    """Split candidates into batches holding at most one candidate per residue mod r.

    Batch t takes the t-th candidate (in the given order) of every residue class, so there are
    as many batches as the largest class has members.
    """
    by_slot: dict[int, list[int]] = {}
    for j in cands:
        by_slot.setdefault(j % r, []).append(j)
    depth = max((len(v) for v in by_slot.values()), default=0)
    return [[v[t] for v in by_slot.values() if t < len(v)] for t in range(depth)]


def _initial_coverage(
    pool: _Pool, sources: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]]
) -> torch.Tensor:
    """(n,) running max of the kernel from the given points to the pool; zeros without any.

    Each source is (name, features, None) for all its rows, or (name, features, idx) for the rows
    idx. Rows are evaluated in padded batches of exactly G, so the coverage -- and hence the
    picks -- do not depend on a memory cap.

    Raises:
        SparsesegError: a source with non-finite features (named).
    """
    cov = torch.zeros(pool.n, dtype=pool.z.dtype, device=pool.z.device)
    for name, src, idx in sources:
        count = src.shape[0] if idx is None else idx.numel()
        finite = torch.ones((), dtype=torch.bool, device=pool.z.device)
        for start in range(0, count, pool.gain_rows):
            blk, a_sqnorm = pool.source_rows(src, start, min(start + pool.gain_rows, count), idx)
            finite &= torch.isfinite(a_sqnorm).all()
            torch.maximum(cov, blk.amax(dim=0), out=cov)
        if not bool(finite):  # one synchronisation per source
            raise _not_finite(name)
    return cov


# ----------------------------------------------------------------------------------------------
# optimisers


def _dense_kernel(pool: _Pool) -> torch.Tensor:
    """The whole kernel, (n rounded up to G, n): row j is k(z_j, z).

    Dense layout: R-row products on z[0:R], z[R:2R], ..., written straight into the kernel;
    "naive" and "lazy" both build it here, so each row has one computation. Row-cache layout
    ("naive" only): from `kernel_rows`, exactly as the lazy greedy computes its rows. The rows
    past n pad the last gain block (copies of row n - 1; discarded).
    """
    n, r, g = pool.n, pool.rows, pool.gain_rows
    kmat = torch.empty(-(-n // g) * g, n, dtype=pool.z.dtype, device=pool.z.device)
    for start in range(0, n, r):
        stop = min(start + r, n)
        if pool.dense:
            kernels.rbf(pool.z[start:stop], pool.z, pool.sigma, a_sqnorm=pool.sqnorm[start:stop],
                        b_sqnorm=pool.sqnorm, out=kmat[start:stop])
        else:
            kmat[start:stop] = pool.kernel_rows(range(start, stop))[: stop - start]
    kmat[n:] = kmat[n - 1]
    return kmat


@contextmanager
def _greedy_threads(pool: _Pool):
    """One intra-op thread for the greedy that follows a dense kernel build, on the CPU.

    The greedy is thousands of small operations on (32, n) blocks: a second OpenMP thread gains
    little on them and, when other processes load the cores, makes each one wait for a wake-up
    (docs/performance.md has the measurement). The kernel build keeps the caller's threads.
    torch's thread count is process-wide, so it is restored on exit.
    """
    before = torch.get_num_threads()
    if pool.z.device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _naive(pool: _Pool, k: int, cov: torch.Tensor) -> list[int]:
    n, g = pool.n, pool.gain_rows
    kmat = _dense_kernel(pool)
    with _greedy_threads(pool) if pool.dense else nullcontext():
        return _naive_steps(kmat, n, g, k, cov)


def _naive_steps(kmat: torch.Tensor, n: int, g: int, k: int, cov: torch.Tensor) -> list[int]:
    picked = torch.zeros(n, dtype=torch.bool, device=kmat.device)
    out: list[int] = []
    for _ in range(k):
        gains = torch.cat([_gains(kmat[s : s + g], cov) for s in range(0, kmat.shape[0], g)])[:n]
        gains[picked] = -math.inf
        j = int(torch.argmax(gains))  # first maximum: lowest index wins ties
        out.append(j)
        picked[j] = True
        torch.maximum(cov, kmat[j], out=cov)
    return out


class _DenseRows:
    """Kernel rows for the lazy greedy from the dense kernel (nothing is ever recomputed)."""

    scratch = True  # `rows` returns a gathered copy

    def __init__(self, pool: _Pool) -> None:
        self.kmat = _dense_kernel(pool)
        self.g = pool.gain_rows

    def first(self, start: int) -> torch.Tensor:
        """(G, n) rows of candidates start.. start + G - 1 (start a multiple of G)."""
        return self.kmat[start : start + self.g]

    def rows(self, idx: list[int]) -> torch.Tensor:
        """(G, n) block for `idx` (at most one candidate per residue mod G), slot layout."""
        sel = [idx[0]] * self.g
        for j in idx:
            sel[j % self.g] = j
        return torch.index_select(self.kmat, 0, torch.tensor(sel, device=self.kmat.device))

    def row(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        """Candidate j's kernel row (`rows`, from `rows()`, may have been overwritten)."""
        return self.kmat[j]

    def offer(self, idx: list[int], gains: list[float], rows: torch.Tensor, skip: int = -1) -> None:
        pass

    def drop(self, j: int) -> None:
        pass


class _RowCache:
    """Kernel rows of the most promising candidates, at most `capacity` of them (R = G).

    Lazy greedy refreshes the same top candidates again and again; recomputing k(z_j, ·) costs
    O(n·D), reading a cached row O(n). Cached rows are the very bits `kernel_rows` produced and go
    back to the same slot, so gains computed from them are identical. When full, the cache drops
    the candidate with the lowest current upper bound (the one the heap reaches last).
    """

    scratch = False  # `rows` may return cached storage or rows to be cached

    def __init__(self, pool: _Pool, capacity: int) -> None:
        self.pool = pool
        self.capacity = capacity
        self.store: torch.Tensor | None = None  # (capacity, n), allocated on first insert
        self.slot: dict[int, int] = {}
        self.owner = [-1] * capacity
        # Upper bound of each slot's candidate; -inf marks a free slot. Kept on the CPU.
        self.bound = torch.full((capacity,), -math.inf, dtype=torch.float64)

    def first(self, start: int) -> torch.Tensor:
        """(R, n) rows of candidates start.. start + R - 1 (start a multiple of R), computed."""
        return self.pool.kernel_rows(range(start, min(start + self.pool.rows, self.pool.n)))

    def rows(self, idx: list[int]) -> torch.Tensor:
        """(R, n) kernel block for `idx` (at most one candidate per residue mod R), slot layout
        as `_Pool.kernel_rows`: cached rows copied to their slot, the others computed."""
        pool = self.pool
        r, dev = pool.rows, pool.z.device
        hit = [j for j in idx if j in self.slot] if self.slot else []
        if not hit:
            return pool.kernel_rows(idx)
        assert self.store is not None
        miss = [j for j in idx if j not in self.slot]
        if not miss:
            # One gather; free slots repeat the first hit's row (padding, discarded).
            sel = [self.slot[hit[0]]] * r
            for j in hit:
                sel[j % r] = self.slot[j]
            return torch.index_select(self.store, 0, torch.tensor(sel, device=dev))
        out = pool.kernel_rows(miss)
        out[torch.tensor([j % r for j in hit], device=dev)] = torch.index_select(
            self.store, 0, torch.tensor([self.slot[j] for j in hit], device=dev)
        )
        return out

    def row(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        """Candidate j's kernel row, from the block `rows()` returned."""
        return rows[j % self.pool.rows]

    def offer(self, idx: list[int], gains: list[float], rows: torch.Tensor, skip: int = -1) -> None:
        """Record fresh bounds (gains[t] is idx[t]'s, its row is rows[idx[t] mod R]); cache rows
        that beat the worst cached one. Candidate `skip` (just picked) is left out."""
        if self.capacity == 0:
            return
        r = self.pool.rows
        for j, g in zip(idx, gains, strict=True):
            if j == skip:
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
                self.store[s] = rows[j % r]
                self.owner[s] = j
                self.slot[j] = s
            self.bound[s] = g

    def drop(self, j: int) -> None:
        s = self.slot.pop(j, None)
        if s is not None:
            self.owner[s] = -1
            self.bound[s] = -math.inf


def _pop_batch(heap: list[tuple[float, int]], g: int) -> list[int]:
    """The most promising candidates: of the g best heap entries, the first of each residue mod g.

    They leave the heap; the others (their slot already taken) stay, with their stale bounds.
    """
    batch: list[int] = []
    deferred: list[tuple[float, int]] = []
    taken: set[int] = set()
    for _ in range(min(g, len(heap))):
        key = heapq.heappop(heap)
        if key[1] % g in taken:
            deferred.append(key)
        else:
            taken.add(key[1] % g)
            batch.append(key[1])
    for key in deferred:
        heapq.heappush(heap, key)
    return batch


def _lazy(pool: _Pool, k: int, cov: torch.Tensor, source: _DenseRows | _RowCache) -> list[int]:
    """Lazy greedy; `source` gives kernel rows in (G, n) slot-layout blocks (R = G for a cache)."""
    n, g = pool.n, pool.gain_rows
    # Heap of (-gain upper bound, index): the smallest key is the largest bound, lowest index
    # first among equal bounds -- the same tie-break as the naive argmax.
    heap: list[tuple[float, int]] = []
    for start in range(0, n, g):  # aligned blocks: candidate j at slot j mod G
        idx = list(range(start, min(start + g, n)))
        rows = source.first(start)
        gains = _gains(rows, cov)[: len(idx)].tolist()
        source.offer(idx, gains, rows)
        heap.extend((-gi, j) for gi, j in zip(gains, idx, strict=True))
        del rows  # before the next block is read: bounds the peak (module docstring, Memory)
    heapq.heapify(heap)
    out: list[int] = []
    while len(out) < k:
        # Refresh the most promising candidates at once (one per slot).
        idx = _pop_batch(heap, g)
        rows = source.rows(idx)
        by_slot = _gains(rows, cov, source.scratch).tolist()
        keys = [(-by_slot[j % g], j) for j in idx]
        best = min(keys)
        # Every key left in the heap is a lower bound on its true key (submodularity), so a
        # fresh key no larger than the heap's smallest is the exact greedy choice.
        picked = not heap or best <= heap[0]
        if picked:
            out.append(best[1])
            torch.maximum(cov, source.row(best[1], rows), out=cov)
            source.drop(best[1])
        source.offer(idx, [-key[0] for key in keys], rows, skip=best[1] if picked else -1)
        for key in keys:
            if not (picked and key is best):
                heapq.heappush(heap, key)
        del rows
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
        cand = remaining[perm.to(remaining.device)].tolist()
        # Largest gain, lowest index on ties within the sample.
        best_key, best_row = (math.inf, -1), None
        for idx in _slot_batches(cand, r):
            rows = pool.kernel_rows(idx)
            by_slot = _gains(rows, cov).tolist()
            key = min((-by_slot[j % r], j) for j in idx)
            if key < best_key:
                best_key, best_row = key, rows[key[1] % r].clone()
        out.append(best_key[1])
        available[best_key[1]] = False
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
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    epsilon: float = 0.01,
    max_memory_gb: float | None = None,
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
            gains: see the module docstring). When the whole call fits the cap (2 GB,
            DEFAULT_STORE_GB, without one) and block_size is None, it builds the kernel once in
            TILE_ROWS-row products -- the cost of one kernel pass -- and the greedy only reads
            it. Otherwise it never materialises the (n, n) kernel: kernel rows are computed for
            R = min(block_size, EVAL_ROWS) candidates at a time, and the rows of the candidates
            with the highest current bounds are cached (as many as fit the cap or 2 GB; at most
            block_size of them when it is given), since lazy greedy refreshes those again and
            again. Peak extra memory then: the row cache, three (R, n) blocks, the (n,) coverage
            and norms, an n-entry heap on the host.
        "stochastic": stochastic greedy (Mirzasoleiman et al. 2015). Each step evaluates a
            uniformly random subset of ceil((n/k)·log(1/epsilon)) not-yet-picked candidates,
            drawn with `generator`: (1 - 1/e - epsilon) approximation in expectation,
            O(n²·log(1/epsilon)·D) work in total whatever k is. Memory as "lazy" without cache.

    Memory cap: with `max_memory_gb`, the tensors this call allocates stay below the cap (see
    `herding_plan`). While the running state fits, the picks are exactly those of the naive
    greedy in the same layout; below that the pool is sharded, an approximation described in the
    module docstring.

    Args:
        z: (n, D) floating candidate features (the pool). float16/bfloat16 are computed in float32.
        k: number of picks, 0 <= k <= n.
        sigma: RBF bandwidth σ > 0 (k(x, x') = exp(-||x - x'||² / σ²)); see `median_bandwidth`.
        labelled: optional (m, D) features of already-labelled points: they count as covering
            the pool from the start and cannot be picked.
        method: "naive", "lazy" or "stochastic".
        block_size: None (default): the layout follows the memory (dense kernel when it fits).
            An integer forces the row-cache layout: R = min(block_size, EVAL_ROWS) rows per
            kernel call, and without a cap at most block_size cached rows.
        generator: torch.Generator for "stochastic" (CPU or on z's device); ignored otherwise.
        epsilon: stochastic-greedy accuracy parameter in (0, 1); ignored otherwise.
        max_memory_gb: cap, in GB (2^30 bytes), on the tensors allocated on z's device beyond the
            inputs; None: no cap ("naive" raises when its n x n kernel would not fit).

    Returns:
        (k,) int64 tensor on z's device: indices into z in pick order (shard by shard when
        sharded).

    Raises:
        SparsesegError: bad arguments, e.g. k larger than the pool, non-finite features,
            mismatched feature dimensions, unknown method, a cap too small.
    """
    z = _check_features(z, "z")
    n, d = z.shape
    k = _check_int(k, "k", 0)
    if k > n:
        raise SparsesegError(f"budget k={k} larger than the pool of n={n} candidates")
    s = kernels.check_sigma(sigma)
    labelled = _check_labelled(labelled, z)
    if method not in METHODS:
        raise SparsesegError(f"method={method!r}; expected one of {', '.join(METHODS)}")
    if block_size is not None:
        block_size = _check_int(block_size, "block_size", 1)
    if method == "stochastic" and not (0.0 < float(epsilon) < 1.0):
        raise SparsesegError(f"epsilon={epsilon!r}; expected a value in (0, 1)")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)

    dtype = _work_dtype(z)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    plan = herding_plan(n, d, k, method=method, block_size=block_size, max_memory_gb=max_memory_gb,
                        itemsize=itemsize, convert=itemsize if dtype != z.dtype else 0)
    picks: list[int] = []
    with torch.no_grad():
        for (start, stop), budget in zip(plan.shards, plan.budgets, strict=True):
            if budget == 0:
                continue
            pool = _Pool(z[start:stop].to(dtype), s, plan.rows, plan.gain_rows, plan.dense)  # a view unless converted
            # Conditioned on every labelled point and every pick of the earlier shards.
            sources: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
            if labelled is not None:
                sources.append(("labelled", labelled, None))
            if picks:
                sources.append(("z", z, torch.tensor(picks, dtype=torch.long, device=z.device)))
            cov = _initial_coverage(pool, sources)
            if method == "naive":
                local = _naive(pool, budget, cov)
            elif method == "lazy":
                source = _DenseRows(pool) if plan.dense else _RowCache(pool, min(plan.cache_rows, pool.n))
                with _greedy_threads(pool) if plan.dense else nullcontext():
                    local = _lazy(pool, budget, cov, source)
                del source
            else:
                local = _stochastic(pool, budget, cov, float(epsilon), generator)
            picks.extend(start + j for j in local)
            del pool, cov, sources
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
    sources: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    if labelled is not None:
        sources.append(("labelled", labelled, None))
    if idx.numel():
        sources.append(("z", z, idx))
    with torch.no_grad():
        longest = max([1] + [src.shape[0] if i is None else i.numel() for _, src, i in sources])
        rows = min(block_size, longest)
        pool = _Pool(z.to(_work_dtype(z)), s, rows, rows)
        return float(_initial_coverage(pool, sources).double().mean())
