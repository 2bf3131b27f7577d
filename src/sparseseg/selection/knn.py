"""MaxHerding on a k-nearest-neighbour graph: facility location with a sparse RBF kernel (FAISS).

Exact MaxHerding reads every pair of the pool: O(n²·D) work however lazy the greedy is, which stops
being affordable somewhere past a few hundred thousand rows. Here each pool point i keeps only its
`neighbours` nearest pool points N(i) (found by FAISS), and the kernel is cut to them:

    C_knn(S) = (1/n) Σ_i max_{j in S ∩ (N(i) ∪ {i})} k(z_i, z_j),     k = exp(-||z_i - z_j||² / σ²)

(a point never covered by a pick among its neighbours contributes 0, or its coverage by the labelled
points, which is exact: the nearest labelled point is found by a flat index). The objective is again
monotone submodular, and the lazy greedy below is its exact greedy, in O(n·neighbours) memory. Far
pairs, where the RBF is smallest, are what is dropped: with a kernel whose value at the
`neighbours`-th neighbour is already small, the picks cover almost as well as the exact greedy's.
How well is measured, not assumed: `benchmarks/bench_scaling.py` reports the exact coverage
(`max_herding.coverage`) of both pick sets wherever the exact greedy fits.

Indexes are FAISS factory strings: "Flat" (exact search; n·D·4 bytes), "IVF<lists>,SQ8" (8 bits per
dimension, n·D bytes, distances approximate to about 1%), "IVF<lists>,PQ<m>" (m bytes per row). The
squared distances FAISS returns are used as they are, so a compressed index also approximates the
kernel values of the edges it finds. With a CUDA device and a FAISS build that has GPU support
(faiss-gpu), the index is moved to that GPU; faiss-cpu from PyPI has none, and then the CPU searches.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sparseseg.errors import SparsesegError
from sparseseg.seeding import derived_generator

__all__ = ["KnnGraph", "default_index", "build_knn_graph", "nearest_d2", "knn_max_herding"]

ReadRows = Callable[[int, int], torch.Tensor]  # (start, stop) -> (stop - start, D) features


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a pinned dependency
        raise SparsesegError("the kNN selection needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


@dataclass
class KnnGraph:
    """Each query row's nearest pool rows.

    Attributes:
        start: first pool row the rows of `neighbours` belong to (a rank's range).
        neighbours: (q, kk) int64 pool rows, nearest first; -1 where the index found fewer.
        d2: (q, kk) float32 squared distances (as the index computes them).
        index: the FAISS factory string used.
        index_bytes: size of the serialised index (the memory it holds).
        seconds: {"train", "add", "search"}.
    """

    start: int
    neighbours: torch.Tensor
    d2: torch.Tensor
    index: str
    index_bytes: int
    seconds: dict


def default_index(n: int) -> str:
    """Exact search for pools up to 100,000 rows; beyond, an inverted file of 8-bit codes."""
    if n <= 100_000:
        return "Flat"
    lists = 2 ** round(math.log2(4 * math.sqrt(n)))
    return f"IVF{lists},SQ8"


def _numpy(z: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(z.detach().to("cpu", torch.float32).numpy())


def build_knn_graph(read_rows: ReadRows, n: int, dim: int, neighbours: int = 32, index: str | None = None,
                    queries: tuple[int, int] | None = None, nprobe: int = 16, chunk: int = 8192,
                    train_rows: int = 100_000, seed: int = 0, device: torch.device | str = "cpu") -> KnnGraph:
    """The `neighbours` nearest pool rows of each row in `queries`, searched over the whole pool.

    The index is filled chunk by chunk from `read_rows`, so the pool is never in memory as a whole
    beyond what the index itself holds.

    Args:
        read_rows: (start, stop) -> (stop - start, D) pool rows (float16/32; searched in float32).
        n, dim: pool size and feature dimension.
        neighbours: neighbours kept per row, itself excluded.
        index: FAISS factory string; None: `default_index(n)`.
        queries: [start, stop) rows to search for (one rank's share); None: all.
        nprobe: inverted lists visited per query (IVF indexes).
        chunk: rows read, added or searched at a time.
        train_rows: rows a trainable index (IVF, PQ, SQ) is trained on, drawn with `seed`; at
            least 40 per inverted list (FAISS's k-means asks for 39).
        device: a CUDA device moves the index to that GPU when FAISS has GPU support.
    """
    faiss = _faiss()
    spec = index or default_index(n)
    if neighbours < 1 or neighbours >= n:
        raise SparsesegError(f"neighbours={neighbours}; expected 1 <= neighbours < n={n}")
    try:
        idx = faiss.index_factory(dim, spec, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise SparsesegError(f"FAISS index {spec!r}: {str(exc).splitlines()[0][:200]}") from None
    seconds = {"train": 0.0, "add": 0.0, "search": 0.0}
    t = time.perf_counter()
    if not idx.is_trained:
        ivf = faiss.try_extract_index_ivf(idx)
        rows = max(train_rows, 40 * ivf.nlist if ivf is not None else 0)
        take = torch.randperm(n, generator=derived_generator(seed, "knn-train"))[: min(n, rows)].sort().values
        sample = torch.cat([read_rows(int(i), int(i) + 1) for i in take]) if len(take) < 4096 else \
            _gather_sorted(read_rows, take, chunk)
        idx.train(_numpy(sample))
        del sample
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(0, n, chunk):
        idx.add(_numpy(read_rows(s, min(s + chunk, n))))
    seconds["add"] = time.perf_counter() - t
    index_bytes = _index_bytes(faiss, idx, n)
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        ivf.nprobe = nprobe
    device = torch.device(device)
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):  # faiss-gpu builds only
        idx = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, idx)
    lo, hi = queries if queries is not None else (0, n)
    kk = neighbours + 1  # the row itself is usually its own nearest neighbour
    out_i = np.empty((hi - lo, neighbours), dtype=np.int64)
    out_d = np.empty((hi - lo, neighbours), dtype=np.float32)
    t = time.perf_counter()
    for s in range(lo, hi, chunk):
        e = min(s + chunk, hi)
        d, i = idx.search(_numpy(read_rows(s, e)), kk)
        own = i == np.arange(s, e)[:, None]
        # drop the row itself (or, when it was not returned, the farthest neighbour)
        drop = np.where(own.any(1), own.argmax(1), kk - 1)
        keep = np.ones_like(own)
        keep[np.arange(e - s), drop] = False
        out_i[s - lo : e - lo] = i[keep].reshape(e - s, neighbours)
        out_d[s - lo : e - lo] = d[keep].reshape(e - s, neighbours)
    seconds["search"] = time.perf_counter() - t
    return KnnGraph(lo, torch.from_numpy(out_i), torch.from_numpy(out_d), spec, index_bytes, seconds)


def _gather_sorted(read_rows: ReadRows, take: torch.Tensor, chunk: int) -> torch.Tensor:
    """Rows `take` (sorted) read chunk by chunk of the pool, keeping only those asked for."""
    parts = []
    for s in range(0, int(take[-1]) + 1, chunk):
        sel = take[(take >= s) & (take < s + chunk)]
        if len(sel):
            parts.append(read_rows(s, min(s + chunk, int(take[-1]) + 1))[sel - s])
    return torch.cat(parts)


def _index_bytes(faiss, idx, n: int) -> int:
    """Bytes the index holds: n codes (in an inverted file with an 8-byte id each) and its centroids."""
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        return int(n * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4)
    return int(n * idx.code_size)  # flat codes: d x 4 bytes (Flat), d (SQ8), m (PQm)


def nearest_d2(read_rows: ReadRows, rows: tuple[int, int], labelled: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(stop - start,) squared distance of each pool row in `rows` to its nearest labelled point (exact)."""
    faiss = _faiss()
    lab = _numpy(labelled)
    idx = faiss.IndexFlatL2(lab.shape[1])
    idx.add(lab)
    lo, hi = rows
    out = np.empty(hi - lo, dtype=np.float32)
    for s in range(lo, hi, chunk):
        e = min(s + chunk, hi)
        out[s - lo : e - lo] = idx.search(_numpy(read_rows(s, e)), 1)[0][:, 0]
    return torch.from_numpy(out)


def _by_candidate(nb: np.ndarray, d2: np.ndarray, inv: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse kernel as CSR by candidate j: the rows i it covers, k(z_i, z_j), offsets (n + 1,).

    Edges are every kNN pair (i, nb[i, t]) plus each point's own (similarity 1), laid out flat as
    e = i x kk + t, then n x kk + i; sorting the candidates of the edges (stably) groups them by j.
    Int32 indices and one int64 sort order at a time keep the peak near 24 bytes per edge.
    """
    n, kk = nb.shape
    itype = np.int32 if n < 2**31 else np.int64
    cols = np.concatenate([nb.reshape(-1), np.arange(n)]).astype(itype)
    cols[cols < 0] = n  # "no neighbour": a sentinel candidate past the end, dropped below
    order = np.argsort(cols, kind="stable")
    counts = np.bincount(cols, minlength=n + 1)
    del cols
    order = order[: len(order) - counts[n]]  # the sentinels sort last
    ptr = np.concatenate([[0], np.cumsum(counts[:n])])
    knn = order < n * kk
    rows = np.where(knn, order // kk, order - n * kk).astype(itype)
    sims = np.ones(len(order))
    sims[knn] = np.exp(-np.maximum(d2.reshape(-1)[order[knn]].astype(np.float64), 0.0) * inv)
    return rows, sims, ptr


def knn_max_herding(neighbours: torch.Tensor, d2: torch.Tensor, k: int, sigma: float,
                    labelled_d2: torch.Tensor | None = None) -> torch.Tensor:
    """Exact lazy greedy of facility location on a kNN graph (module docstring).

    Args:
        neighbours: (n, kk) int64 pool rows near each pool row (-1: none), itself excluded.
        d2: (n, kk) squared distances of those pairs.
        k: picks, 0 <= k <= n.
        sigma: RBF bandwidth (as for the exact MaxHerding).
        labelled_d2: optional (n,) squared distance of each row to its nearest labelled point.

    Returns:
        (k,) int64 pool rows in pick order; ties go to the lowest index.
    """
    n, kk = neighbours.shape
    if not 0 <= k <= n:
        raise SparsesegError(f"budget k={k} larger than the pool of n={n} candidates")
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    inv = 1.0 / (float(sigma) ** 2)
    rows, sims, ptr = _by_candidate(neighbours.numpy(), d2.numpy(), inv)
    cov = np.zeros(n) if labelled_d2 is None else np.exp(-np.maximum(labelled_d2.numpy().astype(np.float64), 0.0) * inv)
    # every candidate covers at least itself, so no segment of the CSR is empty
    gains = np.add.reduceat(np.maximum(sims - cov[rows], 0.0), ptr[:-1])
    heap = [(-g, j) for j, g in enumerate(gains.tolist())]
    heapq.heapify(heap)
    out: list[int] = []
    while len(out) < k:
        _, j = heapq.heappop(heap)
        r, s = rows[ptr[j] : ptr[j + 1]], sims[ptr[j] : ptr[j + 1]]
        g = float(np.maximum(s - cov[r], 0.0).sum())
        if not heap or (-g, j) <= heap[0]:  # a fresh bound no smaller than every stale one: the greedy choice
            out.append(j)
            np.maximum.at(cov, r, s)
        else:
            heapq.heappush(heap, (-g, j))
    return torch.tensor(out, dtype=torch.long)
