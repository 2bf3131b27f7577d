"""Core-set selection: k-center greedy (Sener & Savarese, 2018), with bounded memory.

Each step picks the pool point farthest from its nearest centre, where the centres are the
already-labelled points and the picks so far. Only two (n,) vectors are kept: the squared distance
of every pool point to its nearest centre, and the pool's squared norms. A new centre's squared
distances ||z||² + ||c||² - 2 z·c come from one matrix-vector product per block of pool rows (a
single read of the pool, no (n, D) temporary); the labelled centres at the start are handled
many at a time, as (rows x centres) distance blocks. No n x n matrix is ever built.

Memory: `block_size` bounds the rows and the centres per distance block; `max_memory_gb` instead
derives both from a cap on the bytes the call allocates (inputs not counted; GB = 2^30 bytes).
The two (n,) vectors are the whole running state, so unlike MaxHerding nothing is sharded: a cap
below them is an error. Distances are clamped at 0 (rounding can make the expansion slightly
negative); the picks do not depend on the block sizes up to that rounding.

Without labelled points the first centre is drawn uniformly with the given generator (index 0
without one). Ties go to the lowest index (`torch.argmax` returns the first maximum).
"""

from __future__ import annotations

import math
import numbers

import torch

from sparseseg.errors import SparsesegError
from sparseseg.selection.kernels import check_matrix

__all__ = ["k_center_greedy", "GB"]

#: Bytes per GB in `max_memory_gb`.
GB = 2**30


def _block_sizes(n: int, d: int, m: int, itemsize: int, convert: int, block_size: int,
                 max_memory_gb: float | None) -> tuple[int, int, int]:
    """(pool rows per one-centre update, pool rows per labelled block, centres per labelled block).

    Allocations: the (n,) nearest distances and squared norms (+ a float32 copy of a half
    precision pool), then either a (rows,) distance vector of one centre, or a (rows, centres)
    distance block with its (rows,) minimum, the centres converted and squared (up to 3 x centres
    x D values) and their (centres,) norms.
    """
    if max_memory_gb is None:
        return min(n, block_size), min(n, block_size), max(1, min(m, block_size))
    cap = float(max_memory_gb)
    if not math.isfinite(cap) or cap <= 0:
        raise SparsesegError(f"max_memory_gb={max_memory_gb!r}; expected a positive number of GB")
    state = 2 * n * itemsize + n * d * convert + 64 * 1024  # + index tensors and scalars
    free = (int(cap * GB * 0.99) - state) // itemsize  # in values; 1% left for allocator rounding
    if free < 1:
        raise SparsesegError(
            f"max_memory_gb={max_memory_gb} is too small for k-center greedy on n={n} points: its "
            f"running state alone needs about {state / GB:.3g} GB; raise the cap"
        )
    rows_step = min(n, free)
    centres = max(1, min(m, math.isqrt(free) // 2))  # square-ish labelled blocks
    rows_init = min(n, (free - centres * (3 * d + 1)) // (centres + 1))
    if m and rows_init < 1:
        centres, rows_init = 1, min(n, (free - (3 * d + 1)) // 2)
        if rows_init < 1:
            raise SparsesegError(
                f"max_memory_gb={max_memory_gb} is too small for k-center greedy with labelled points "
                f"at D={d}; raise the cap"
            )
    return rows_step, max(1, rows_init), centres


def _update_with_centre(nearest: torch.Tensor, z: torch.Tensor, sqnorm: torch.Tensor, centre: torch.Tensor,
                        rows: int) -> None:
    """nearest <- min(nearest, ||z - centre||²), in place, `rows` pool rows at a time."""
    c_sq = float((centre * centre).sum())
    for start in range(0, z.shape[0], rows):
        blk = slice(start, start + rows)
        d2 = z[blk] @ centre
        d2.mul_(-2.0).add_(sqnorm[blk]).add_(c_sq).clamp_(min=0.0)
        torch.minimum(nearest[blk], d2, out=nearest[blk])


def k_center_greedy(
    z: torch.Tensor,
    k: int,
    labelled: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    block_size: int = 4096,
    max_memory_gb: float | None = None,
) -> torch.Tensor:
    """Indices of k pool points chosen by k-center greedy, in pick order.

    Args:
        z: (n, D) pool features (float16/bfloat16 are computed in float32).
        k: points to pick, 0 <= k <= n.
        labelled: (m, D) already-labelled features; they are centres from the start.
        generator: draws the first centre when there are no labelled points.
        block_size: pool rows and labelled centres per distance block (peak extra memory about
            block_size² values); ignored when `max_memory_gb` is given.
        max_memory_gb: cap, in GB (2^30 bytes), on the tensors the call allocates beyond its
            inputs; the block sizes are derived from it.

    Returns:
        (k,) long tensor of distinct indices into z.

    Raises:
        SparsesegError: bad arguments, or a cap below the running state (2 values per point).
    """
    z = check_matrix(z, "z")
    n, d = z.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= n:
        raise SparsesegError(f"k={k} must be between 0 and the pool size {n}")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise SparsesegError(f"block_size={block_size}; expected a positive integer")
    k, block_size = int(k), int(block_size)
    if labelled is not None and len(labelled):
        labelled = check_matrix(labelled, "labelled")
        if labelled.shape[1] != d:
            raise SparsesegError(f"labelled has D={labelled.shape[1]}; expected D={d} like z")
    else:
        labelled = None
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
    itemsize = torch.empty(0, dtype=dtype).element_size()
    m = 0 if labelled is None else labelled.shape[0]
    rows, rows_init, centres = _block_sizes(
        n, d, m, itemsize, itemsize if dtype != z.dtype else 0, block_size, max_memory_gb
    )

    with torch.no_grad():
        z = z.to(dtype)
        sqnorm = torch.empty(n, dtype=dtype, device=z.device)
        for start in range(0, n, rows):  # row dot products: no (rows, D) temporary
            blk = z[start : start + rows]
            torch.bmm(blk[:, None, :], blk[:, :, None], out=sqnorm[start : start + rows].view(-1, 1, 1))
        nearest = torch.full((n,), math.inf, dtype=dtype, device=z.device)
        if labelled is not None:
            for c0 in range(0, m, centres):
                c = labelled[c0 : c0 + centres].to(device=z.device, dtype=dtype)
                c_sq = (c * c).sum(dim=1)
                for start in range(0, n, rows_init):
                    blk = slice(start, start + rows_init)
                    d2 = z[blk] @ c.T
                    d2.mul_(-2.0).add_(sqnorm[blk, None]).add_(c_sq[None, :]).clamp_(min=0.0)
                    torch.minimum(nearest[blk], d2.amin(dim=1), out=nearest[blk])
                    del d2
                del c, c_sq
        picks: list[int] = []
        if labelled is None:  # no labelled centre: the first pick is a seeded draw
            first = 0 if generator is None else int(torch.randint(n, (1,), generator=generator))
            picks.append(first)
            _update_with_centre(nearest, z, sqnorm, z[first], rows)
            nearest[first] = -1.0
        while len(picks) < k:
            j = int(torch.argmax(nearest))
            picks.append(j)
            _update_with_centre(nearest, z, sqnorm, z[j], rows)
            nearest[j] = -1.0  # picked: never again, even when duplicates leave every distance at 0
    return torch.tensor(picks, dtype=torch.long)
