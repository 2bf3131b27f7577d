"""How one `max_herding` call is laid out, and the memory each layout takes.

Two layouts hold the kernel rows the greedy reads (the module docstring of `max_herding` says why
the layout is part of the computation):

* dense: the whole n x n kernel, built once in tiles of R = min(TILE_ROWS, n rounded up to 32)
  rows per kernel call (large matrix products run at the speed of the hardware), then read by
  the greedy. Chosen when block_size is left to the plan (None) and the whole call, kernel
  included, fits the cap -- or DEFAULT_STORE_GB without one. The same test decides for "naive"
  and "lazy", so the two always share one layout.
* row cache: R = min(block_size, EVAL_ROWS) rows per kernel call; "lazy" keeps the rows of its
  most promising candidates in a cache (as many as the cap, or DEFAULT_STORE_GB, or an explicit
  block_size allows) and recomputes the others. "stochastic" always uses this layout, without a
  cache. When even the running state does not fit a cap, the pool is split into shards.

Gains are reduced over (G, n) blocks, G = min(R, EVAL_ROWS), in both layouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sparseseg.errors import SparsesegError

__all__ = ["HerdingPlan", "herding_plan", "EVAL_ROWS", "TILE_ROWS", "DEFAULT_STORE_GB", "GB", "METHODS"]

#: Candidate rows per kernel call (capped by block_size) in the row-cache layout, and rows per
#: gain reduction in both layouts.
EVAL_ROWS = 32

#: Rows per kernel call when the whole kernel is held: large enough that the matrix product runs
#: at full speed (measured in `benchmarks/bench_round.py`), small enough for a tile temporary.
TILE_ROWS = 1024

#: Without a cap, the most memory (GB) the call may take to hold kernel rows: the dense kernel
#: when the whole call fits in it, else the lazy row cache.
DEFAULT_STORE_GB = 2.0

METHODS = ("naive", "lazy", "stochastic")

#: Bytes per GB in `max_memory_gb`.
GB = 2**30


@dataclass(frozen=True)
class HerdingPlan:
    """How `max_herding` lays out one call: shards, their budgets, the kernel rows it holds.

    Attributes:
        shards: [start, stop) row ranges of z, herded in this order. One range: the exact greedy.
        budgets: picks per shard (summing to k), proportional to the shard sizes.
        cache_rows: kernel rows held at once, n values each: n with the dense kernel, else the
            "lazy" row-cache capacity (0: no cache).
        peak_bytes: estimated peak of the tensors the call allocates, inputs not counted. Under a
            cap it is at most the cap. Host-side bookkeeping (the lazy heap: about 100 bytes of
            Python objects per pool point) is not included.
        rows: R, kernel rows per kernel call (candidate j at row j mod R).
        gain_rows: G, rows per gain reduction (candidate j at row j mod G).
        dense: the dense layout: the whole kernel built once from R-row products and held
            ("naive" holds the whole kernel in either layout, built as its layout computes rows).
    """

    shards: tuple[tuple[int, int], ...]
    budgets: tuple[int, ...]
    cache_rows: int
    peak_bytes: int
    rows: int = EVAL_ROWS
    gain_rows: int = EVAL_ROWS
    dense: bool = False

    @property
    def exact(self) -> bool:
        """True when the pool is herded as a whole (no sharding approximation)."""
        return len(self.shards) == 1


def _padded(n: int, g: int) -> int:
    return -(-n // g) * g


def estimate_bytes(method: str, n: int, d: int, k: int, rows: int, gain_rows: int, cache: int, dense: bool,
                   itemsize: int, convert: int) -> int:
    """Upper estimate of the peak bytes `max_herding` allocates for a pool (or shard) of n points.

    Every term is a tensor `max_herding` allocates (checked against a per-allocation tracker in
    the tests): a float32 copy of a half-precision pool (`convert` bytes per element), the (n,)
    squared norms and coverage, then the largest of three phases -- the finiteness check of the
    norms, the coverage from labelled points and earlier picks (G gathered and converted source
    rows, a (G, n) kernel block and its (n,) max), and the optimiser itself.
    """
    e, r, g = itemsize, rows, gain_rows
    resident = n * d * convert + 2 * n * e + 8 * k
    small = 64 * 8 * max(r, g) + 4096  # index tensors, per-batch gains and norms, flags
    norms = n * (e + 3)  # the finiteness check of the squared norms: |x| and three masks
    init = 2 * g * d * e + (g * n + n) * e  # gathered and converted source rows, kernel block, max
    # The whole kernel (padded to whole gain blocks). The dense layout writes each product
    # straight into it; the row-cache layout ("naive" only) computes an (R, n) block from an
    # R x D gather, then copies it in.
    kernel = _padded(n, g) * n * e + (0 if dense else (r * n + r * d) * e)
    if method == "naive":
        # the kernel, then per step a (G, n) gain temporary and the concatenated gains
        run = kernel + (g * n + 3 * _padded(n, g)) * e + 9 * n
    elif dense:  # lazy on the dense kernel: the kernel, a gathered (G, n) batch and its gain temporary
        run = kernel + 2 * g * n * e
    elif method == "lazy":
        # cache (+ float64 bounds), then at most 3 (R, n) blocks at once (a partly cached batch:
        # the computed block, the gathered cached rows, the gain temporary) and one R x D gather.
        run = cache * (n * e + 8) + (3 * r * n + r * d) * e
    else:  # stochastic
        # availability mask, nonzero/randperm/gather index tensors, (R, n) rows and gains,
        # the best row so far (two while it is replaced).
        run = 49 * n + (2 * r * n + r * d + 2 * n) * e
    return resident + small + max(norms, init, run)


def apportion(k: int, sizes: Sequence[int]) -> list[int]:
    """Largest-remainder split of k picks proportionally to `sizes` (ties: lowest index first)."""
    n = sum(sizes)
    base = [k * size // n for size in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(k * sizes[i] % n), i))
    for i in order[: k - sum(base)]:
        base[i] += 1
    return base


def _cap_bytes(max_memory_gb: float | None) -> int | None:
    if max_memory_gb is None:
        return None
    cap = float(max_memory_gb)
    if not math.isfinite(cap) or cap <= 0:
        raise SparsesegError(f"max_memory_gb={max_memory_gb!r}; expected a positive number of GB")
    return int(cap * GB * 0.99)  # 1% left for allocator rounding (CUDA: 512-byte blocks)


def herding_plan(
    n: int,
    d: int,
    k: int,
    *,
    method: str = "lazy",
    block_size: int | None = None,
    max_memory_gb: float | None = None,
    itemsize: int = 4,
    convert: int = 0,
) -> HerdingPlan:
    """The layout `max_herding` uses for an (n, D) pool and k picks (see the module docstring).

    With block_size None: the dense kernel when the whole call fits the cap (DEFAULT_STORE_GB
    without one), else the row-cache layout with R = EVAL_ROWS. With an explicit block_size: the
    row-cache layout with R = min(block_size, EVAL_ROWS) and at most block_size cached rows.
    Row-cache layout without a cap: one shard, the cache as above. With a cap: the largest pool
    that fits the running state with no cache sets the shard size (one shard when the whole pool
    fits); the cache then takes whatever the cap leaves over, up to the shard size.

    Args:
        n, d, k: pool size, feature dimension, picks.
        method: "naive", "lazy" or "stochastic" ("naive" is never sharded: it needs the n x n
            kernel, and a cap it cannot meet is an error).
        block_size: as in `max_herding`.
        max_memory_gb: cap on the bytes the call allocates, in GB (2^30 bytes); None: no cap.
        itemsize: bytes per value of the computation (4: float32, 8: float64).
        convert: extra bytes per pool value for a working copy (4 when the pool is half precision).

    Raises:
        SparsesegError: a cap too small for even one candidate, or a cap "naive" cannot meet.
    """
    cap_bytes = _cap_bytes(max_memory_gb)
    g = min(block_size, EVAL_ROWS) if block_size is not None else EVAL_ROWS
    one = ((0, n),), (k,)

    def need(size: int, cache: int = 0, r: int = g, dense: bool = False, how: str = method) -> int:
        return estimate_bytes(how, size, d, k, r, g, cache, dense, itemsize, convert)

    tile = min(TILE_ROWS, _padded(n, g))
    dense = block_size is None and method != "stochastic" and (
        need(n, n, tile, True, "lazy") <= (cap_bytes if cap_bytes is not None else DEFAULT_STORE_GB * GB))
    r = tile if dense else g
    if method == "naive":
        if cap_bytes is not None and need(n, r=r) > cap_bytes:
            raise SparsesegError(
                f"method='naive' holds the whole {n} x {n} kernel: about {need(n, r=r) / GB:.3g} GB > "
                f"max_memory_gb={max_memory_gb}; use method='lazy' (the same picks) or raise the cap"
            )
        return HerdingPlan(*one, n, need(n, r=r), r, g, dense)
    if dense:
        return HerdingPlan(*one, n, need(n, n, r, True), r, g, True)
    if cap_bytes is None:
        cache = 0
        if method == "lazy" and block_size is not None:
            cache = min(block_size, n)
        elif method == "lazy":  # as many rows as DEFAULT_STORE_GB leaves after the running state
            cache = min(n, max(0, int(DEFAULT_STORE_GB * GB - need(n)) // (n * itemsize + 8)))
        return HerdingPlan(*one, cache, need(n, cache), r, g)
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
    budgets = apportion(k, [stop - start for start, stop in shards])
    return HerdingPlan(shards, tuple(budgets), cache, need(largest, cache), r, g)
