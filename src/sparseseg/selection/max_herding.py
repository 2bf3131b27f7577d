"""MaxHerding: greedy maximisation of generalised coverage (paper Section 3.2, Eq. 3).

Coverage of a set S of picked candidates, given optional already-labelled features L:

    C(S) = (1/n) Σ_{x in pool} max_{x' in L ∪ S} k(x, x'),     k = RBF (see `kernels.rbf`)

with the convention that a pool point covered by nothing (S and L empty) contributes 0. This is
facility location divided by n: monotone submodular, so the lazy greedy optimiser (stale gains
are valid upper bounds) returns exactly the picks of the naive greedy, with far fewer kernel
evaluations. The reference code runs the naive greedy over a dense n x n kernel.

Exactness of lazy == naive. lazy == naive holds when every method computes every per-candidate
quantity -- the kernel row k(z_j, ·) and the gain -- with the same bits. Floating point makes that
fragile, and it is designed in here rather than hoped for:

* A BLAS result depends on the shape of the product (a 1-row matmul takes another code path than
  a 32-row one; the reduction dimension is blocked by shape) AND on the position of a row inside
  the product: MKL computes float64 rows in a tail panel (rows 4..6 of a 7-row product, say) with
  another instruction sequence than rows in a full panel, so the same row gets other last bits at
  another position. So every kernel row, in every method and in the row cache, is row `j mod R`
  of an `kernels.rbf` call on exactly R = min(block_size, EVAL_ROWS) rows against the whole pool:
  a batch holds at most one candidate per residue mod R, at its own slot; free slots are padding
  whose values are discarded. Row t of a matrix product depends on row t of the left operand
  only, so what the other slots hold cannot change it.
* Gains come from one shared function, `_gains`, applied to (R, n) blocks laid out the same way
  (candidate j at slot j mod R) in every method: the reduction over the pool runs at the same
  position of the same shape, on rows with the same bits. The row cache stores the rows `rbf`
  produced and puts them back at their slot.
* Elementwise IEEE operations (subtraction, clamp, max) are correctly rounded, so they give the
  same bits wherever they run. `exp` (vectorised, with a scalar tail) and the row reduction need
  not; they always see the same row at the same offset of a same-shaped buffer.

What remains assumed is only that one operation on identical operands at an identical position
gives identical bits (a deterministic library with a fixed thread count: MKL with several threads
and dynamic threading can split work differently from call to call). Given identical kernel rows
and gains, the monotonicity of floating-point subtraction and addition keeps stale gains valid
upper bounds bit for bit, and ties are broken the same way (lowest index wins) by ordering the
lazy heap on (-gain, index).

Memory. Nothing here ever needs the n x n kernel except the "naive" reference. `max_memory_gb`
caps the tensors a call allocates (the input features themselves are the caller's and are not
counted; GB = 2^30 bytes); `herding_plan` turns the cap into a layout:
the row cache takes what the cap leaves over (speed only, never the picks), and a pool whose running
state does not fit is sharded, an approximation (the memory arithmetic: docs/performance.md).
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparseseg.errors import SparsesegError
from sparseseg.selection import kernels

__all__ = ["max_herding", "coverage", "herding_plan", "HerdingPlan", "EVAL_ROWS", "METHODS", "GB"]

#: Candidate rows evaluated per kernel call (capped by block_size). Fixed so that every kernel
#: row is produced by an identically shaped matmul (see module docstring).
EVAL_ROWS = 32

METHODS = ("naive", "lazy", "stochastic")

#: Bytes per GB in `max_memory_gb`.
GB = 2**30


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
    """The candidate features plus what every kernel-row evaluation needs."""

    def __init__(self, z: torch.Tensor, sigma: float, rows: int, name: str = "z") -> None:
        self.z = z
        self.n = z.shape[0]
        self.sigma = sigma
        self.rows = rows
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
        """(R, n) kernel rows of outside points against the pool, padded to R rows like `kernel_rows`,
        and the (R,) squared norms of those points.

        The points are src[start:stop] (idx None) or src[idx[start:stop]], stop - start <= R; src
        may have another dtype or device than the pool (converted here, R rows at a time).
        """
        if idx is None:
            a = src[start:stop]
            if a.shape[0] < self.rows:
                a = torch.cat([a, a[-1:].expand(self.rows - a.shape[0], -1)])
        else:
            sel = idx[start:stop]
            if sel.numel() < self.rows:
                sel = torch.cat([sel, sel[-1:].expand(self.rows - sel.numel())])
            a = src[sel.to(src.device)]
        a = a.to(device=self.z.device, dtype=self.z.dtype)
        a_sqnorm = _sqnorm(a)
        return kernels.rbf(a, self.z, self.sigma, a_sqnorm=a_sqnorm, b_sqnorm=self.sqnorm), a_sqnorm


def _gains(rows: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Marginal gains (times n) of the candidates whose kernel rows are given.

    gain_j = Σ_i max(0, k(z_j, z_i) - cov_i). Always called on (R, n) blocks with candidate j at
    slot j mod R, so a candidate's reduction runs at the same position of the same shape in every
    method (module docstring).

    Args:
        rows: (R, n) kernel rows, slot layout.
        cov: (n,) current coverage (running max of the kernel to L ∪ S, 0 if nothing yet).

    Returns:
        (R,) gains, by slot.
    """
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
    idx. Rows are evaluated in padded batches of exactly R (as candidate rows are), so the
    coverage -- and hence the picks -- do not depend on block_size or on a memory cap.

    Raises:
        SparsesegError: a source with non-finite features (named).
    """
    cov = torch.zeros(pool.n, dtype=pool.z.dtype, device=pool.z.device)
    for name, src, idx in sources:
        count = src.shape[0] if idx is None else idx.numel()
        finite = torch.ones((), dtype=torch.bool, device=pool.z.device)
        for start in range(0, count, pool.rows):
            blk, a_sqnorm = pool.source_rows(src, start, min(start + pool.rows, count), idx)
            finite &= torch.isfinite(a_sqnorm).all()
            torch.maximum(cov, blk.amax(dim=0), out=cov)
        if not bool(finite):  # one synchronisation per source
            raise _not_finite(name)
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
    O(n·D), reading a cached row O(n). Cached rows are the very bits `kernel_rows` produced and go
    back to the same slot, so gains computed from them are identical. When full, the cache drops
    the candidate with the lowest current upper bound (the one the heap reaches last).
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
            return self.store[torch.tensor(sel, device=dev)]
        out = pool.kernel_rows(miss)
        out[torch.tensor([j % r for j in hit], device=dev)] = self.store[
            torch.tensor([self.slot[j] for j in hit], device=dev)
        ]
        return out

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


def _pop_batch(heap: list[tuple[float, int]], r: int) -> list[tuple[float, int]]:
    """Pop up to r of the most promising heap entries, at most one per residue mod r.

    Entries whose slot is already taken go back on the heap unchanged (their stale bounds stay
    valid); at most 2r entries are looked at.
    """
    batch: list[tuple[float, int]] = []
    deferred: list[tuple[float, int]] = []
    taken: set[int] = set()
    while heap and len(batch) < r and len(batch) + len(deferred) < 2 * r:
        key = heapq.heappop(heap)
        if key[1] % r in taken:
            deferred.append(key)
        else:
            taken.add(key[1] % r)
            batch.append(key)
    for key in deferred:
        heapq.heappush(heap, key)
    return batch


def _lazy(pool: _Pool, k: int, cov: torch.Tensor, cache_rows: int) -> list[int]:
    n, r = pool.n, pool.rows
    cache = _RowCache(pool, min(cache_rows, n))
    # Heap of (-gain upper bound, index): the smallest key is the largest bound, lowest index
    # first among equal bounds -- the same tie-break as the naive argmax.
    heap: list[tuple[float, int]] = []
    for start in range(0, n, r):  # aligned batches: candidate j at slot j mod r
        idx = list(range(start, min(start + r, n)))
        rows = pool.kernel_rows(idx)
        g = _gains(rows, cov)[: len(idx)].tolist()
        cache.offer(idx, g, rows)
        heap.extend((-gi, j) for gi, j in zip(g, idx, strict=True))
        del rows  # before the next batch is built: bounds the peak (module docstring, Memory)
    heapq.heapify(heap)
    out: list[int] = []
    while len(out) < k:
        # Refresh the most promising candidates at once (one per slot).
        idx = [j for _, j in _pop_batch(heap, r)]
        rows = cache.rows(idx)
        by_slot = _gains(rows, cov).tolist()
        g = [by_slot[j % r] for j in idx]
        keys = [(-gi, j) for gi, j in zip(g, idx, strict=True)]
        best = min(range(len(keys)), key=keys.__getitem__)
        # Every key left in the heap is a lower bound on its true key (submodularity), so a
        # fresh key no larger than the heap's smallest is the exact greedy choice.
        picked = not heap or keys[best] <= heap[0]
        if picked:
            out.append(idx[best])
            torch.maximum(cov, rows[idx[best] % r], out=cov)
            cache.drop(idx[best])
        cache.offer(idx, g, rows, skip=idx[best] if picked else -1)
        for t, key in enumerate(keys):
            if not (picked and t == best):
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
            j = min(idx, key=lambda j: (-by_slot[j % r], j))
            if (-by_slot[j % r], j) < best_key:
                best_key, best_row = (-by_slot[j % r], j), rows[j % r].clone()
        out.append(best_key[1])
        available[best_key[1]] = False
        torch.maximum(cov, best_row, out=cov)
    return out


# ----------------------------------------------------------------------------------------------
# memory plan


@dataclass(frozen=True)
class HerdingPlan:
    """How `max_herding` lays out one call: shards, their budgets, the row-cache capacity.

    Attributes:
        shards: [start, stop) row ranges of z, herded in this order. One range: the exact greedy.
        budgets: picks per shard (summing to k), proportional to the shard sizes.
        cache_rows: "lazy" row-cache capacity (kernel rows of n values each; 0: no cache).
        peak_bytes: estimated peak of the tensors the call allocates, inputs not counted. Under a
            cap it is at most the cap. Host-side bookkeeping (the lazy heap: about 100 bytes of
            Python objects per pool point) is not included.
    """

    shards: tuple[tuple[int, int], ...]
    budgets: tuple[int, ...]
    cache_rows: int
    peak_bytes: int

    @property
    def exact(self) -> bool:
        """True when the pool is herded as a whole (no sharding approximation)."""
        return len(self.shards) == 1


def _estimate_bytes(method: str, n: int, d: int, k: int, rows: int, cache: int, itemsize: int, convert: int) -> int:
    """Upper estimate of the peak bytes `max_herding` allocates for a pool (or shard) of n points.

    Every term is a tensor the code below allocates (checked against a per-allocation tracker in
    the tests): a float32 copy of a half-precision pool (`convert` bytes per element), the (n,)
    squared norms and coverage, then the largest of three phases -- the finiteness check of the
    norms, the coverage from labelled points and earlier picks (R gathered and converted source
    rows, an (R, n) kernel block and its (n,) max), and the optimiser itself.
    """
    e, r = itemsize, rows
    resident = n * d * convert + 2 * n * e + 8 * k
    small = 64 * 8 * r + 4096  # index tensors, per-batch gains and norms, flags
    norms = n * (e + 3)  # the finiteness check of the squared norms: |x| and three masks
    init = 2 * r * d * e + (r * n + n) * e  # gathered and converted source rows, kernel block, max
    if method == "lazy":
        # cache (+ float64 bounds), then at most 3 (R, n) blocks at once (a partly cached batch:
        # fresh rows, the assembled batch, the gathered cached rows) and one R x D gather.
        run = cache * (n * e + 8) + (3 * r * n + r * d) * e
    elif method == "stochastic":
        # availability mask, nonzero/randperm/gather/sort index tensors, (R, n) rows and gains,
        # the best row so far (two while it is replaced).
        run = 49 * n + (2 * r * n + r * d + 2 * n) * e
    else:  # naive: the whole padded kernel, the concatenated gains
        n_pad = -(-n // r) * r
        run = (n_pad * n + 3 * n_pad + r * n + r * d) * e + 9 * n
    return resident + small + max(norms, init, run)


def _apportion(k: int, sizes: Sequence[int]) -> list[int]:
    """Largest-remainder split of k picks proportionally to `sizes` (ties: lowest index first)."""
    n = sum(sizes)
    base = [k * size // n for size in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(k * sizes[i] % n), i))
    for i in order[: k - sum(base)]:
        base[i] += 1
    return base


def herding_plan(
    n: int,
    d: int,
    k: int,
    *,
    method: str = "lazy",
    block_size: int = 4096,
    max_memory_gb: float | None = None,
    itemsize: int = 4,
    convert: int = 0,
) -> HerdingPlan:
    """The layout `max_herding` uses for an (n, D) pool and k picks (see the module docstring).

    Without a cap: one shard, a row cache of min(block_size, n) rows. With a cap: the largest
    pool that fits the running state with no cache sets the shard size (one shard when the whole
    pool fits); the cache then takes whatever the cap leaves over, up to the shard size.

    Args:
        n, d, k: pool size, feature dimension, picks.
        method: "naive", "lazy" or "stochastic" ("naive" is never sharded: it needs the n x n
            kernel, and a cap it cannot meet is an error).
        block_size: as in `max_herding` (R = min(block_size, EVAL_ROWS) rows per kernel call).
        max_memory_gb: cap on the bytes the call allocates, in GB (2^30 bytes); None: no cap.
        itemsize: bytes per value of the computation (4: float32, 8: float64).
        convert: extra bytes per pool value for a working copy (4 when the pool is half precision).

    Raises:
        SparsesegError: a cap too small for even one candidate, or a cap "naive" cannot meet.
    """
    rows = min(block_size, EVAL_ROWS)
    if max_memory_gb is None:
        cache = min(block_size, n) if method == "lazy" else 0
        return HerdingPlan(((0, n),), (k,), cache, _estimate_bytes(method, n, d, k, rows, cache, itemsize, convert))
    cap = float(max_memory_gb)
    if not math.isfinite(cap) or cap <= 0:
        raise SparsesegError(f"max_memory_gb={max_memory_gb!r}; expected a positive number of GB")
    cap_bytes = int(cap * GB * 0.99)  # 1% left for allocator rounding (CUDA: 512-byte blocks)

    def need(size: int, cache: int = 0) -> int:
        return _estimate_bytes(method, size, d, k, rows, cache, itemsize, convert)

    if method == "naive":
        if need(n) > cap_bytes:
            raise SparsesegError(
                f"method='naive' holds the whole {n} x {n} kernel: about {need(n) / GB:.3g} GB > "
                f"max_memory_gb={max_memory_gb}; use method='lazy' (the same picks) or raise the cap"
            )
        return HerdingPlan(((0, n),), (k,), 0, need(n))
    if need(1) > cap_bytes:
        raise SparsesegError(
            f"max_memory_gb={max_memory_gb} is too small for MaxHerding at D={d}: even one candidate "
            f"needs about {need(1) / GB:.3g} GB; raise the cap"
        )
    # Largest shard whose running state fits (need() grows with the size).
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= cap_bytes else (lo, mid - 1)
    count = -(-n // lo)
    bounds = [i * n // count for i in range(count + 1)]
    shards = tuple(zip(bounds[:-1], bounds[1:], strict=True))
    largest = max(stop - start for start, stop in shards)
    cache = 0
    if method == "lazy":
        per_row = largest * itemsize + 8
        # need(largest, cache) <= need(largest) + cache * per_row <= cap.
        cache = min(largest, max(0, (cap_bytes - need(largest)) // per_row))
    budgets = _apportion(k, [stop - start for start, stop in shards])
    return HerdingPlan(shards, tuple(budgets), cache, need(largest, cache))


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
            gains: see the module docstring). Never materialises the (n, n) kernel: kernel rows
            are computed from the features for R = min(block_size, EVAL_ROWS) candidates at a
            time, and the rows of the candidates with the highest current bounds are cached
            (at most block_size of them; with a cap, as many as fit), since lazy greedy refreshes
            those again and again. Peak extra memory: the row cache, three (R, n) blocks, the (n,)
            coverage and norms, an n-entry heap on the host.
        "stochastic": stochastic greedy (Mirzasoleiman et al. 2015). Each step evaluates a
            uniformly random subset of ceil((n/k)·log(1/epsilon)) not-yet-picked candidates,
            drawn with `generator`: (1 - 1/e - epsilon) approximation in expectation,
            O(n²·log(1/epsilon)·D) work in total whatever k is. Memory as "lazy" without cache.

    Memory cap: with `max_memory_gb`, the tensors this call allocates stay below the cap (see
    `herding_plan`). The picks stay exactly those of the uncapped call while the running state
    fits; below that the pool is sharded, an approximation described in the module docstring.

    Args:
        z: (n, D) floating candidate features (the pool). float16/bfloat16 are computed in float32.
        k: number of picks, 0 <= k <= n.
        sigma: RBF bandwidth σ > 0 (k(x, x') = exp(-||x - x'||² / σ²)); see `median_bandwidth`.
        labelled: optional (m, D) features of already-labelled points: they count as covering
            the pool from the start and cannot be picked.
        method: "naive", "lazy" or "stochastic".
        block_size: speed/memory knob without a cap: the lazy row cache holds at most block_size
            rows; never more than EVAL_ROWS rows per kernel call.
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
    block_size = _check_int(block_size, "block_size", 1)
    if method == "stochastic" and not (0.0 < float(epsilon) < 1.0):
        raise SparsesegError(f"epsilon={epsilon!r}; expected a value in (0, 1)")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)

    dtype = _work_dtype(z)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    plan = herding_plan(n, d, k, method=method, block_size=block_size, max_memory_gb=max_memory_gb,
                        itemsize=itemsize, convert=itemsize if dtype != z.dtype else 0)
    rows = min(block_size, EVAL_ROWS)
    picks: list[int] = []
    with torch.no_grad():
        for (start, stop), budget in zip(plan.shards, plan.budgets, strict=True):
            if budget == 0:
                continue
            pool = _Pool(z[start:stop].to(dtype), s, rows)  # a view unless converted
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
                local = _lazy(pool, budget, cov, plan.cache_rows)
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
        pool = _Pool(z.to(_work_dtype(z)), s, min(block_size, longest))
        return float(_initial_coverage(pool, sources).double().mean())
