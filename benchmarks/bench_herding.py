"""Coverage selection, ours against the naive reference on the same pool, side by side in one run.

Two benchmarks (`--benchmark`):

* `max_herding`: lazy greedy MaxHerding (ours; with `--max-memory`, under that cap) against the
  naive dense greedy (reference: the whole n x n kernel, every gain recomputed at every step).
  Checks that the picks are identical; when the cap forces sharding (an approximation) it reports
  the coverage of both pick sets instead, and their ratio.
* `coreset`: blocked k-center greedy (ours; matrix-vector distance updates, bounded blocks) against
  the textbook brute force (the full n x n distance matrix from `torch.cdist`). Reports whether
  the picks are identical and the covering radius of each.

Peak memory:

* CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before the call (the pool
  itself is not counted, as the cap does not count it).
* CPU: each method runs in its own fresh (spawned) process, and the figure is the increase of
  resource.getrusage(RUSAGE_SELF).ru_maxrss over its value just before the call (the process's
  peak resident set, so it includes allocator slack; it is not a tensor-level measurement).

Examples:
    python benchmarks/bench_herding.py --n 5000 --dim 512 --keep 2500 --device cpu \\
        --out benchmarks/results/herding.json
    python benchmarks/bench_herding.py --n 48200 --dim 6144 --keep 24100 --device cuda \\
        --max-memory 4 --out benchmarks/results/herding.json
    python benchmarks/bench_herding.py --benchmark coreset --n 5000 --dim 512 --keep 500

`--out` appends one record to a JSON list (created when missing): benchmark, hardware, date, the
sizes, seconds and peak_gb for ours and the reference, their ratio, identical_picks.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from sparseseg.selection.coreset import k_center_greedy
from sparseseg.selection.kernels import median_bandwidth
from sparseseg.selection.max_herding import coverage, herding_plan, max_herding

#: (ours, reference) per benchmark.
SIDES = {"max_herding": ("lazy", "naive"), "coreset": ("blocked", "brute")}


def make_pool(n: int, dim: int, kind: str, seed: int) -> torch.Tensor:
    """(n, dim) float32 pool. "clustered": L2-normalised mixture of 20 Gaussians (like per-pixel
    L2-normalised features of a few classes); "gaussian": isotropic N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, dim, generator=g)
    centres = torch.randn(20, dim, generator=g)
    member = torch.randint(0, 20, (n,), generator=g)
    z = centres[member] + 0.7 * torch.randn(n, dim, generator=g)
    return z / z.norm(dim=1, keepdim=True)


def brute_k_center(z: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Textbook k-center greedy over the full (n, n) squared-distance matrix."""
    dist = torch.cdist(z, z).pow_(2)
    nearest = dist[first].clone()
    nearest[first] = -1.0
    picks = [first]
    while len(picks) < k:
        j = int(torch.argmax(nearest))
        picks.append(j)
        torch.minimum(nearest, dist[j], out=nearest)
        nearest[j] = -1.0
    return torch.tensor(picks)


def select(z: torch.Tensor, method: str, keep: int, sigma: float, block_size: int | None,
           max_memory_gb: float | None, seed: int) -> torch.Tensor:
    """One side of a benchmark: the picks of `method` on pool z."""
    if method in ("lazy", "naive", "stochastic"):
        cap = max_memory_gb if method != "naive" else None  # the reference is the uncapped dense greedy
        return max_herding(z, keep, sigma, method=method, block_size=block_size, max_memory_gb=cap,
                           generator=torch.Generator(z.device).manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    if method == "blocked":
        return k_center_greedy(z, keep, generator=gen, block_size=block_size or 4096, max_memory_gb=max_memory_gb)
    first = int(torch.randint(z.shape[0], (1,), generator=gen))  # the draw k_center_greedy makes
    return brute_k_center(z, keep, first)


def _maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _run_cpu(pool_path: str, method: str, keep: int, sigma: float, block_size: int | None, threads: int,
             max_memory_gb: float | None, seed: int) -> dict:
    """Child-process body: load the pool, run one method, report time, picks and maxrss delta."""
    torch.set_num_threads(threads)
    z = torch.load(pool_path)
    before = _maxrss_bytes()
    t0 = time.perf_counter()
    picks = select(z, method, keep, sigma, block_size, max_memory_gb, seed)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_extra_bytes": _maxrss_bytes() - before, "picks": picks.tolist()}


def _run_cuda(z: torch.Tensor, method: str, keep: int, sigma: float, block_size: int | None,
              max_memory_gb: float | None, seed: int) -> dict:
    # Warm-up outside the timed region (CUDA context, cuBLAS handles).
    select(z[:256], method, 4, sigma, block_size, None, seed)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    picks = select(z, method, keep, sigma, block_size, max_memory_gb, seed)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_extra_bytes": torch.cuda.max_memory_allocated() - base,
            "picks": picks.tolist()}


def covering_radius(z: torch.Tensor, picks: list[int], block: int = 4096) -> float:
    """max over the pool of the distance to the nearest pick (k-center's objective; lower is better)."""
    centres = z[picks]
    return max(float(torch.cdist(z[i : i + block], centres).amin(dim=1).max()) for i in range(0, len(z), block))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", choices=sorted(SIDES), default="max_herding")
    ap.add_argument("--n", type=int, default=5000, help="pool size")
    ap.add_argument("--dim", type=int, default=512, help="feature dimension")
    ap.add_argument("--keep", type=int, default=2500, help="number of picks")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--out", type=Path, default=None, help="append a record to this JSON list")
    ap.add_argument("--pool", choices=("clustered", "gaussian"), default="clustered")
    ap.add_argument("--block-size", type=int, default=None,
                    help="MaxHerding: none = the layout follows the memory (dense kernel when it fits); "
                         "an integer forces the row-cache layout. Core-set: rows per block (default 4096)")
    ap.add_argument("--max-memory", type=float, default=None, metavar="GB",
                    help="memory cap for ours (max_memory_gb); the reference runs uncapped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per run")
    ap.add_argument("--methods", default=None,
                    help="comma-separated, run in this order (default: ours then the reference)")
    args = ap.parse_args(argv)

    ours, reference = SIDES[args.benchmark]
    device = torch.device(args.device)
    z = make_pool(args.n, args.dim, args.pool, args.seed)
    sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(args.seed))
    methods = [m.strip() for m in (args.methods or f"{ours},{reference}").split(",") if m.strip()]
    results: dict[str, dict] = {}
    if device.type == "cuda":
        zd = z.to(device)
        for m in methods:
            results[m] = _run_cuda(zd, m, args.keep, sigma, args.block_size, args.max_memory, args.seed)
        memory_note = "torch.cuda.max_memory_allocated() minus allocated before the call"
    else:
        memory_note = "ru_maxrss increase in a fresh spawned process per method (process peak RSS)"
        with tempfile.TemporaryDirectory() as tmp:
            pool_path = os.path.join(tmp, "pool.pt")
            torch.save(z, pool_path)
            ctx = mp.get_context("spawn")
            for m in methods:
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                    fut = ex.submit(_run_cpu, pool_path, m, args.keep, sigma, args.block_size, args.threads,
                                    args.max_memory, args.seed)
                    results[m] = fut.result()

    picks = {m: r.pop("picks") for m, r in results.items()}
    identical = len({tuple(p) for p in picks.values()}) == 1
    report = {
        "benchmark": args.benchmark,
        "n": args.n,
        "dim": args.dim,
        "keep": args.keep,
        "pool": args.pool,
        "block_size": args.block_size,
        "max_memory_gb": args.max_memory,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": args.threads if device.type == "cpu" else None,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "memory_measure": memory_note,
        "identical_picks": identical,
        "results": results,
        "ours": ours,
        "reference": reference,
    }
    if args.benchmark == "max_herding":
        plan = herding_plan(args.n, args.dim, args.keep, block_size=args.block_size, max_memory_gb=args.max_memory)
        report["shards"] = len(plan.shards)
        report["cache_rows"] = plan.cache_rows
        report["sigma"] = sigma
        report["coverage"] = {m: coverage(z, p, sigma) for m, p in picks.items()}
    else:
        report["covering_radius"] = {m: covering_radius(z, p) for m, p in picks.items()}
    if ours in results and reference in results:
        report["ratio_reference_over_ours"] = results[reference]["seconds"] / results[ours]["seconds"]

    print(f"{args.benchmark}: pool {args.pool} n={args.n} D={args.dim} keep={args.keep} on {report['device']}"
          + (f", ours capped at {args.max_memory} GB" if args.max_memory else ""))
    if args.benchmark == "max_herding":
        print(f"plan for ours: {report['shards']} shard(s), row cache {report['cache_rows']} rows, sigma {sigma:.4g}")
    objective = "coverage" if args.benchmark == "max_herding" else "covering_radius"
    print(f"{'method':<12}{'seconds':>10}{'peak extra MiB':>18}{objective:>18}")
    for m, r in results.items():
        print(f"{m:<12}{r['seconds']:>10.2f}{r['peak_extra_bytes'] / 2**20:>18.1f}{report[objective][m]:>18.6f}")
    if "ratio_reference_over_ours" in report:
        print(f"{reference} / {ours} time ratio: {report['ratio_reference_over_ours']:.2f}x")
    print(f"identical picks: {identical}")
    print(f"memory: {memory_note}")
    if args.out is not None:
        append_record(args.out, report)
    sharded = report.get("shards", 1) > 1
    return 0 if identical or sharded or args.benchmark == "coreset" else 1


def append_record(path: Path, report: dict) -> None:
    """Append the run to a JSON list of records in the shared benchmark-results layout."""
    def side(method: str) -> dict | None:
        r = report["results"].get(method)
        return None if r is None else {"method": method, "seconds": round(r["seconds"], 4),
                                       "peak_gb": round(r["peak_extra_bytes"] / 2**30, 4)}

    record = {
        "benchmark": report["benchmark"],
        "hardware": f"{report['device']}, {report['platform']}"
        + (f", {report['threads']} threads" if report["threads"] else ""),
        "date": time.strftime("%Y-%m-%d"),
        "n": report["n"], "dim": report["dim"], "keep": report["keep"], "pool": report["pool"],
        "max_memory_gb": report["max_memory_gb"],
        "ours": side(report["ours"]),
        "reference": side(report["reference"]),
        "ratio_reference_over_ours": report.get("ratio_reference_over_ours"),
        "identical_picks": report["identical_picks"],
        "memory_measure": report["memory_measure"],
        "load_avg_1m_at_end": report["load_avg_1m_at_end"],
    }
    if report["benchmark"] == "max_herding":
        record["shards"] = report["shards"]
        record["cache_rows"] = report["cache_rows"]
        cov = report["coverage"]
        record["coverage"] = {m: round(c, 6) for m, c in cov.items()}
        if report["ours"] in cov and report["reference"] in cov:
            record["coverage_ratio_ours_over_reference"] = round(cov[report["ours"]] / cov[report["reference"]], 6)
    else:
        record["covering_radius"] = {m: round(r, 6) for m, r in report["covering_radius"].items()}
    records = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records + [record], indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
