"""Global selection at scale: the kNN approximation against the exact greedy, time, memory and coverage.

Two benchmarks (`--benchmark`):

* `knn` (default): for each pool size in `--sizes`, the kNN path (`selection.knn`: a FAISS graph of
  `--neighbours` neighbours, then the lazy greedy of facility location on it) and, up to
  `--exact-up-to` rows, the exact greedy (`selection.distributed.sharded_max_herding` in one process,
  which `tests/test_distributed.py` checks against `max_herding`). Each side runs in a fresh spawned
  process; the pool is read from a float16 `.npy` file (as `sparseseg extract` stores it) with plain
  reads, not a memory map, so the process's peak resident set (VmHWM, reset just before the call)
  counts what the path itself holds:
  for kNN the index, the graph and the greedy's heap (the pool is never in memory as a whole); for
  the exact greedy the float32 pool as well. Both sides are scored with the exact objective
  (`max_herding.coverage` over the whole pool) and the record gives the ratio kNN / exact. The
  record names the largest size whose kNN peak stayed under `--cap`.
  `--pool PATH` takes a pool written by `sparseseg extract` instead of a synthetic one.
* `exact`: `sharded_max_herding` on one synthetic pool under torchrun, each rank its `partition`
  of the rows; rank 0 records the seconds, the world size and a hash of the picks, so runs at
  1 and G ranks can be compared (`--nproc-per-node G`).

Examples:
    python benchmarks/bench_scaling.py --sizes 10000,50000,200000 --dim 256 --cap 2 \\
        --out benchmarks/results/scaling.json
    python benchmarks/bench_scaling.py --pool /tmp/pool64 --out benchmarks/results/scaling.json
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_scaling.py --benchmark exact --rows 20000 \\
        --dim 256 --out benchmarks/results/scaling.json

`--out` appends one record to a JSON list (created when missing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sparseseg.selection.distributed import partition, pool_bandwidth, sharded_max_herding
from sparseseg.selection.knn import build_knn_graph, knn_max_herding
from sparseseg.selection.max_herding import coverage

GB = 2**30


def make_pool(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) L2-normalised mixture of 20 Gaussians, as `bench_herding.make_pool` ("clustered")."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g)
    member = torch.randint(0, 20, (n,), generator=g)
    z = centres[member] + 0.7 * torch.randn(n, dim, generator=g)
    return z / z.norm(dim=1, keepdim=True)


class FileRows:
    """Rows [start, stop) of a 2-D `.npy` file by plain reads (no memory map), as float32."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
            self.offset = fh.tell()
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        width = self.shape[1] * self.dtype.itemsize
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * width)
            data = np.fromfile(fh, dtype=self.dtype, count=(stop - start) * self.shape[1])
        return torch.from_numpy(data.reshape(stop - start, self.shape[1]).astype(np.float32))


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM (peak) of this process from /proc/self/status, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset the process's peak resident set to its current one (Linux clear_refs 5); the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _side(path: str, method: str, keep: int, sigma: float, neighbours: int, index: str | None, seed: int) -> dict:
    """Child-process body: one method on the pool file; seconds, peak RSS increase and picks."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = FileRows(path)
    n, dim = rows.shape
    before = _reset_peak()
    t0 = time.perf_counter()
    info: dict = {}
    if method == "knn":
        graph = build_knn_graph(rows, n, dim, neighbours, index, seed=seed)
        picks = knn_max_herding(graph.neighbours, graph.d2, keep, sigma)
        info = {"index": graph.index, "index_gb": graph.index_bytes / GB,
                "phases_s": {**{k: round(v, 3) for k, v in graph.seconds.items()}}}
        info["phases_s"]["greedy"] = round(time.perf_counter() - t0 - sum(graph.seconds.values()), 3)
    else:
        z = rows(0, n)  # the exact greedy holds the float32 pool
        picks = sharded_max_herding(z, 0, n, keep, sigma)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "peak_extra_gb": round((_status_bytes("VmHWM") - before) / GB, 4),
            "picks": picks.tolist(), **info}


def _run(path: str, method: str, *args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(_side, path, method, *args).result()


def _record(args: argparse.Namespace, **fields) -> dict:
    return {"benchmark": args.benchmark, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "platform": platform.platform(), "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
            "load_avg_1m_at_end": os.getloadavg()[0], **fields}


def _append(path: Path | None, record: dict) -> None:
    print(json.dumps(record, indent=1))
    if path is not None:
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*old, record], indent=1) + "\n")


def bench_knn(args: argparse.Namespace) -> None:
    pools: list[tuple[str, int, int, Path | None]] = []
    tmp = tempfile.TemporaryDirectory()
    if args.pool is not None:  # a pool written by `sparseseg extract`: its deterministic features
        from sparseseg.features.shards import PoolStore

        store = PoolStore.open(args.pool)
        path = Path(tmp.name) / "pool.npy"
        np.save(path, store.features(0).numpy().astype(np.float16))
        pools.append((str(path), len(store), store.dim, args.pool))
    else:
        for n in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp.name) / f"pool_{n}.npy"
            np.save(path, make_pool(n, args.dim, args.seed).numpy().astype(np.float16))
            pools.append((str(path), n, args.dim, None))
    largest = None
    for path, n, dim, source in pools:
        rows = FileRows(path)
        keep = max(1, round(args.keep_fraction * n))
        sigma = pool_bandwidth(lambda idx, rows=rows: torch.cat([rows(int(i), int(i) + 1) for i in idx]), n,
                               0.01, torch.Generator().manual_seed(args.seed))
        sides = {"knn": _run(path, "knn", keep, sigma, args.neighbours, args.index, args.seed)}
        if n <= args.exact_up_to:
            sides["exact"] = _run(path, "exact", keep, sigma, args.neighbours, args.index, args.seed)
        picks = {m: torch.tensor(r.pop("picks")) for m, r in sides.items()}
        cov = {}
        if "exact" in sides:  # the exact objective costs k n D, as much as the greedy's first pass
            z = rows(0, n)
            cov = {m: round(coverage(z, p, sigma, block_size=32), 6) for m, p in picks.items()}
            del z
        under = sides["knn"]["peak_extra_gb"] <= args.cap
        if under:
            largest = n if largest is None else max(largest, n)
        record = _record(args, n=n, dim=dim, keep=keep, neighbours=args.neighbours, sigma=sigma,
                         pool="from " + str(source) if source else "clustered (make_pool)",
                         cap_gb=args.cap, knn_under_cap=under, results=sides, coverage=cov,
                         coverage_ratio_knn_over_exact=round(cov["knn"] / cov["exact"], 6) if cov else None,
                         memory_measure="peak resident set (VmHWM, reset before the call) above the resident set "
                                        "before it, in a fresh spawned process per side; the pool is read from disk "
                                        "with plain reads; the exact side holds the float32 pool")
        _append(args.out, record)
    print(f"largest pool under {args.cap} GB (kNN path): {largest}")
    tmp.cleanup()


def bench_exact(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if size > 1 else 0
    z = make_pool(args.rows, args.dim, args.seed)
    keep = max(1, round(args.keep_fraction * args.rows))
    sigma = pool_bandwidth(lambda idx: z[idx], args.rows, 0.01, torch.Generator().manual_seed(args.seed))
    lo, hi = partition(args.rows, size, args.block)[rank]
    local = z[lo:hi].clone()
    t0 = time.perf_counter()
    picks = sharded_max_herding(local, lo, args.rows, keep, sigma, block=args.block)
    seconds = time.perf_counter() - t0
    if rank == 0:
        _append(args.out, _record(args, n=args.rows, dim=args.dim, keep=keep, ranks=size, block=args.block,
                                  seconds=round(seconds, 3),
                                  picks_sha256=hashlib.sha256(json.dumps(picks.tolist()).encode()).hexdigest()[:16]))
    if size > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", choices=("knn", "exact"), default="knn")
    ap.add_argument("--sizes", default="10000,50000", help="knn: comma-separated pool sizes")
    ap.add_argument("--pool", type=Path, default=None, help="knn: a pool folder from `sparseseg extract` instead")
    ap.add_argument("--rows", type=int, default=20000, help="exact: pool size")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--keep-fraction", type=float, default=0.1, help="picks as a fraction of the pool")
    ap.add_argument("--neighbours", type=int, default=32)
    ap.add_argument("--index", default=None, help="FAISS factory string (default: selection.knn.default_index)")
    ap.add_argument("--exact-up-to", type=int, default=50000, help="knn: run the exact greedy up to this size")
    ap.add_argument("--cap", type=float, default=2.0, help="knn: memory cap in GB the sizes are judged by")
    ap.add_argument("--block", type=int, default=4096, help="exact: pool rows per kernel block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    (bench_knn if args.benchmark == "knn" else bench_exact)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
