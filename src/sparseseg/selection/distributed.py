"""MaxHerding over a pool sharded across processes: the exact lazy greedy with torch.distributed collectives.

Each process (rank) holds a contiguous range of pool rows and the coverage of those rows. A greedy step
needs, for a few candidates, the gain sum_i max(0, k(z_j, z_i) - cov_i) over the WHOLE pool: every rank
computes the sum over its own rows, and one all-reduce adds them. The candidates' features reach every
rank through an all-reduce of a zero-filled (R, D) buffer that only their owners fill (x + 0 = x exactly).
The lazy heap, the row cache and every decision are replicated: each rank takes the same steps from the
same reduced numbers, so no decision is ever broadcast. Ties go to the lowest global index, as in
`max_herding`.

The same picks at any number of processes, bit for bit. Floating-point sums depend on their order, and
a pool split another way would add its gains in another order. So:

* kernel rows are computed in fixed column blocks of `block` pool rows aligned to global multiples of
  `block` (ranks own whole blocks), with candidates at slot `j mod R` of an R-row batch, as in
  `max_herding`: every kernel value comes from an identically shaped product at the same position,
  whichever rank computes it;
* each clamped term max(0, k - cov) is rounded to a multiple of 2^-32 and the gains are summed as
  64-bit integers, which add exactly in any order (the rounding, 2^-33 per term at most, is far below
  float32's own summation error; pools up to 2^31 rows cannot overflow). Integer gains also keep the
  lazy bounds valid bit for bit: a larger coverage never rounds to a larger term.

Against one process's `max_herding` on the same pool, sigma and labelled points the picks are the same
greedy, but `max_herding` adds its gains in float32: a step whose two best gains differ by less than
that rounding (about 1e-6 relative) may go the other way. The tests and `benchmarks/bench_scaling.py`
compare both pick lists.

`pool_bandwidth` gives the median-heuristic sigma of a pool that is not in one process's memory: the
same subsample rows `kernels.median_bandwidth` would draw, read wherever they live.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from sparseseg.errors import SparsesegError
from sparseseg.selection import kernels
from sparseseg.selection.max_herding import EVAL_ROWS

__all__ = ["world", "partition", "pool_bandwidth", "sharded_max_herding", "SCALE"]

#: Fixed-point scale of the gain terms: terms in [0, 1] become integers in [0, 2^32].
SCALE = 2.0**32


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def partition(n: int, size: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) rows of each of `size` ranks: whole blocks of `block` rows, near-equal counts."""
    blocks = -(-n // block)
    cuts = [min(n, (blocks * r // size) * block) for r in range(size + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def pool_bandwidth(read_rows: Callable[[torch.Tensor], torch.Tensor], n: int, fraction: float = 0.01,
                   generator: torch.Generator | None = None) -> float:
    """Median-heuristic sigma of a pool read row by row: `kernels.median_bandwidth` without the pool.

    Args:
        read_rows: global row indices (m,) -> (m, D) features (from disk, or gathered from ranks).
        n: pool size.
        fraction, generator: as in `kernels.median_bandwidth` (the same rows are drawn, in the same
            order, so sigma is bit for bit `median_bandwidth(z, fraction, generator=...)` of the pool).
    """
    if n < 2:
        raise SparsesegError(f"a pool of n={n} rows has no median bandwidth; it needs at least 2")
    if not 0.0 < float(fraction) <= 1.0:
        raise SparsesegError(f"fraction={fraction!r}; expected a value in (0, 1]")
    return kernels.subsample_bandwidth(read_rows(kernels.bandwidth_subsample(n, fraction, generator=generator).cpu()))


def _sqnorm(x: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x[:, None, :], x[:, :, None]).view(-1)


class _Shard:
    """This rank's rows of the pool, in column blocks aligned to global multiples of `block`."""

    def __init__(self, z_local: torch.Tensor, offset: int, sigma: float, block: int, dtype: torch.dtype) -> None:
        self.z = z_local.to(dtype)
        self.offset, self.n = offset, z_local.shape[0]
        self.sigma, self.rows = sigma, EVAL_ROWS
        self.blocks = [(s, min(s + block, self.n)) for s in range(0, self.n, block)]
        self.sq = torch.cat([_sqnorm(self.z[s:e]) for s, e in self.blocks]) if self.n else self.z.new_zeros(0)

    def kernel(self, a: torch.Tensor, a_sq: torch.Tensor) -> torch.Tensor:
        """(R, n_local) kernel of R candidate rows against this rank's rows, block by block."""
        out = torch.empty(a.shape[0], self.n, dtype=self.z.dtype, device=self.z.device)
        for s, e in self.blocks:
            out[:, s:e] = kernels.rbf(a, self.z[s:e], self.sigma, a_sqnorm=a_sq, b_sqnorm=self.sq[s:e])
        return out

    def gains(self, rows: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """(R,) int64 fixed-point partial gains over this rank's rows (exact in any order)."""
        total = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
        for s, e in self.blocks:
            # x 2^32 is exact in any binary float; a float32 term >= 2^-8 is then already an integer
            terms = (rows[:, s:e] - cov[None, s:e]).clamp_(min=0.0).mul_(SCALE).round_()
            total += terms.long().sum(dim=1)
        return total


class _Comm:
    """The collectives of one call (no-ops in a single process)."""

    def __init__(self, shard: _Shard, dim: int, size: int) -> None:
        self.shard, self.dim, self.size = shard, dim, size

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def fetch(self, sel: list[int]) -> torch.Tensor:
        """(len(sel), D) features of global rows `sel`, on every rank."""
        sh = self.shard
        sel_t = torch.tensor(sel, dtype=torch.long, device=sh.z.device)
        buf = torch.zeros(len(sel), self.dim, dtype=sh.z.dtype, device=sh.z.device)
        mine = (sel_t >= sh.offset) & (sel_t < sh.offset + sh.n)
        buf[mine] = sh.z[sel_t[mine] - sh.offset]
        return self.sum_(buf)


def _slots(idx: list[int], r: int) -> list[int]:
    """R global rows with candidate j at slot j mod R; free slots repeat idx[0] (padding)."""
    sel = [idx[0]] * r
    for j in idx:
        sel[j % r] = j
    return sel


def _pop_batch(heap: list[tuple[int, int]], r: int) -> list[tuple[int, int]]:
    """Up to r of the most promising entries, at most one per residue mod r (others go back)."""
    batch, deferred, taken = [], [], set()
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


class _Cache:
    """This rank's segments of the kernel rows of the most promising candidates (speed only: the
    rows are the very values `_Shard.kernel` gave). Decisions depend on replicated numbers only."""

    def __init__(self, shard: _Shard, capacity: int) -> None:
        self.shard, self.capacity = shard, capacity
        self.store: torch.Tensor | None = None
        self.slot: dict[int, int] = {}
        self.owner = [-1] * capacity
        self.bound = torch.full((capacity,), -math.inf, dtype=torch.float64)

    def offer(self, idx: list[int], gains: list[int], rows: torch.Tensor, skip: int = -1) -> None:
        r = rows.shape[0]
        for j, g in zip(idx, gains, strict=True):
            if j == skip or self.capacity == 0:
                continue
            s = self.slot.get(j)
            if s is None:
                s = int(torch.argmin(self.bound))
                if float(self.bound[s]) >= g:
                    continue
                if self.store is None:
                    self.store = rows.new_empty(self.capacity, self.shard.n)
                if self.owner[s] >= 0:
                    del self.slot[self.owner[s]]
                self.store[s] = rows[j % r]
                self.owner[s], self.slot[j] = j, s
            self.bound[s] = float(g)

    def drop(self, j: int) -> None:
        s = self.slot.pop(j, None)
        if s is not None:
            self.owner[s], self.bound[s] = -1, -math.inf


def sharded_max_herding(
    z_local: torch.Tensor,
    offset: int,
    n: int,
    k: int,
    sigma: float,
    labelled: torch.Tensor | None = None,
    *,
    block: int = 4096,
    cache_rows: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Exact lazy-greedy MaxHerding over a pool whose rows are spread over the ranks of the default group.

    Every rank calls it with its own rows; all return the same picks. Without a process group it is
    a single-process run of the same algorithm (module docstring).

    Args:
        z_local: (n_local, D) pool rows [offset, offset + n_local) held by this rank (half precision is
            computed in float32; may be on a GPU, as NCCL needs).
        offset: first global row of z_local: a multiple of `block` (see `partition`).
        n: rows of the whole pool (the ranks' ranges must tile [0, n) in rank order).
        k: picks, 0 <= k <= n.
        sigma: RBF bandwidth (the same on every rank, e.g. from `pool_bandwidth`).
        labelled: optional (m, D) features that cover the pool from the start, the same on every rank.
        block: rows per kernel block (a multiple of 32); must be the same at every world size for the
            picks to be the same.
        cache_rows: kernel rows (this rank's part of each) kept for the most promising candidates.
        progress: called as progress(picks so far, k).

    Returns:
        (k,) int64 global row indices in pick order, on CPU.
    """
    rank, size = world()
    z_local = kernels.check_matrix(z_local, "z_local")
    dim = z_local.shape[1]
    sigma = kernels.check_sigma(sigma)
    if block % EVAL_ROWS or block < EVAL_ROWS:
        raise SparsesegError(f"block={block}; expected a positive multiple of {EVAL_ROWS}")
    if not 0 <= k <= n:
        raise SparsesegError(f"budget k={k} larger than the pool of n={n} candidates" if k > n else f"k={k}; expected >= 0")
    if n >= 2**31:
        raise SparsesegError(f"a pool of {n} rows is beyond the 2^31 rows whose integer gains cannot overflow")
    dev = z_local.device
    spans = torch.tensor([offset, z_local.shape[0]], dtype=torch.long, device=dev)
    every = [torch.zeros_like(spans) for _ in range(size)]
    if size > 1:
        dist.all_gather(every, spans)
    else:
        every = [spans]
    cursor = 0
    for r, (o, m) in enumerate(t.tolist() for t in every):
        if o != cursor or (m and o % block):
            raise SparsesegError(f"rank {r} holds rows {o}..{o + m}; expected rows from {cursor} on, starting at a "
                                 f"multiple of block={block} (use selection.distributed.partition)")
        cursor += m
    if cursor != n:
        raise SparsesegError(f"the ranks hold {cursor} rows between them; n={n}")
    dtype = torch.float32 if z_local.dtype in (torch.float16, torch.bfloat16) else z_local.dtype
    shard = _Shard(z_local, offset, sigma, block, dtype)
    comm = _Comm(shard, dim, size)
    bad = comm.sum_(torch.tensor([0 if bool(torch.isfinite(shard.sq).all()) else 1], device=dev))
    if int(bad.item()):
        raise SparsesegError("z contains NaN or infinite values (or values whose squares overflow); features must be finite")
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    r = EVAL_ROWS
    with torch.no_grad():
        cov = torch.zeros(shard.n, dtype=dtype, device=dev)
        if labelled is not None and len(labelled):
            lab = kernels.check_matrix(labelled, "labelled").to(device=dev, dtype=dtype)
            if lab.shape[1] != dim:
                raise SparsesegError(f"labelled has feature dimension {lab.shape[1]}; expected D={dim}")
            for s in range(0, len(lab), r):
                a = lab[s : s + r]
                a = torch.cat([a, a[-1:].expand(r - len(a), -1)]) if len(a) < r else a
                a_sq = _sqnorm(a)
                if not bool(torch.isfinite(a_sq).all()):
                    raise SparsesegError("labelled contains NaN or infinite values; features must be finite")
                if shard.n:
                    torch.maximum(cov, shard.kernel(a, a_sq).amax(dim=0), out=cov)
        cache = _Cache(shard, min(cache_rows, n))

        def evaluate(idx: list[int]) -> tuple[torch.Tensor, list[int]]:
            """(R, n_local) kernel rows of `idx` (slot layout) and their exact global gains."""
            hit = [j for j in idx if j in cache.slot]
            miss = [j for j in idx if j not in cache.slot]
            rows = torch.zeros(r, shard.n, dtype=dtype, device=dev)  # hit-only batches: padding slots stay 0
            if miss:
                a = comm.fetch(_slots(miss, r))
                rows = shard.kernel(a, _sqnorm(a))
            if hit:
                assert cache.store is not None
                rows[torch.tensor([j % r for j in hit], device=dev)] = cache.store[
                    torch.tensor([cache.slot[j] for j in hit], device=dev)]
            g = comm.sum_(shard.gains(rows, cov)).tolist()
            return rows, [g[j % r] for j in idx]

        heap: list[tuple[int, int]] = []
        for start in range(0, n, r):  # every candidate once, in aligned batches
            idx = list(range(start, min(start + r, n)))
            rows, g = evaluate(idx)
            cache.offer(idx, g, rows)
            heap.extend((-gi, j) for gi, j in zip(g, idx, strict=True))
        heapq.heapify(heap)
        out: list[int] = []
        while len(out) < k:
            idx = [j for _, j in _pop_batch(heap, r)]
            rows, g = evaluate(idx)
            keys = [(-gi, j) for gi, j in zip(g, idx, strict=True)]
            best = min(range(len(keys)), key=keys.__getitem__)
            # Left-over keys are lower bounds on their true keys (submodularity, exact in integers).
            picked = not heap or keys[best] <= heap[0]
            if picked:
                out.append(idx[best])
                torch.maximum(cov, rows[idx[best] % r], out=cov)
                cache.drop(idx[best])
                if progress is not None:
                    progress(len(out), k)
            cache.offer(idx, g, rows, skip=idx[best] if picked else -1)
            for t, key in enumerate(keys):
                if not (picked and t == best):
                    heapq.heappush(heap, key)
    return torch.tensor(out, dtype=torch.long)
