"""Naive vs lazy MaxHerding on the same pool, side by side in one run.

Times both optimisers, checks that they return identical picks, and reports peak extra memory:

* CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before the call.
* CPU: each method runs in its own fresh (spawned) process, and the figure is the increase of
  resource.getrusage(RUSAGE_SELF).ru_maxrss over its value just before the call (the process's
  peak resident set, so it includes allocator slack; it is not a tensor-level measurement).

Example:
    python benchmarks/bench_herding.py --n 5000 --dim 512 --keep 2500 --device cpu \
        --out benchmarks/results/herding.json

`--out` appends one record to a JSON list (created when missing): benchmark, hardware, date, the
sizes, seconds and peak_gb for ours (lazy) and the reference (naive), their ratio, identical_picks.
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

from sparseseg.selection.kernels import median_bandwidth
from sparseseg.selection.max_herding import max_herding


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


def _maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _run_cpu(pool_path: str, method: str, keep: int, sigma: float, block_size: int, threads: int) -> dict:
    """Child-process body: load the pool, run one method, report time, picks and maxrss delta."""
    torch.set_num_threads(threads)
    z = torch.load(pool_path)
    before = _maxrss_bytes()
    t0 = time.perf_counter()
    picks = max_herding(z, keep, sigma, method=method, block_size=block_size)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_extra_bytes": _maxrss_bytes() - before,
        "picks": picks.tolist(),
    }


def _run_cuda(z: torch.Tensor, method: str, keep: int, sigma: float, block_size: int) -> dict:
    # Warm-up outside the timed region (CUDA context, cuBLAS handles).
    max_herding(z[:256], 4, sigma, method=method, block_size=block_size)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    picks = max_herding(z, keep, sigma, method=method, block_size=block_size)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_extra_bytes": torch.cuda.max_memory_allocated() - base,
        "picks": picks.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="pool size")
    ap.add_argument("--dim", type=int, default=512, help="feature dimension")
    ap.add_argument("--keep", type=int, default=2500, help="number of picks")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--out", type=Path, default=None, help="append a record to this JSON list")
    ap.add_argument("--pool", choices=("clustered", "gaussian"), default="clustered")
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per run")
    ap.add_argument("--methods", default="lazy,naive", help="comma-separated, run in this order")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    z = make_pool(args.n, args.dim, args.pool, args.seed)
    sigma = median_bandwidth(z, generator=torch.Generator().manual_seed(args.seed))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results: dict[str, dict] = {}
    if device.type == "cuda":
        zd = z.to(device)
        for m in methods:
            results[m] = _run_cuda(zd, m, args.keep, sigma, args.block_size)
        memory_note = "torch.cuda.max_memory_allocated() minus allocated before the call"
    else:
        memory_note = "ru_maxrss increase in a fresh spawned process per method (process peak RSS)"
        with tempfile.TemporaryDirectory() as tmp:
            pool_path = os.path.join(tmp, "pool.pt")
            torch.save(z, pool_path)
            ctx = mp.get_context("spawn")
            for m in methods:
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                    fut = ex.submit(_run_cpu, pool_path, m, args.keep, sigma, args.block_size, args.threads)
                    results[m] = fut.result()

    picks = {m: r.pop("picks") for m, r in results.items()}
    identical = len({tuple(p) for p in picks.values()}) == 1
    report = {
        "n": args.n,
        "dim": args.dim,
        "keep": args.keep,
        "pool": args.pool,
        "sigma": sigma,
        "block_size": args.block_size,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": args.threads if device.type == "cpu" else None,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "memory_measure": memory_note,
        "identical_picks": identical,
        "results": results,
    }
    if "naive" in results and "lazy" in results:
        report["speedup_lazy_over_naive"] = results["naive"]["seconds"] / results["lazy"]["seconds"]

    print(
        f"pool {args.pool} n={args.n} D={args.dim} keep={args.keep} sigma={sigma:.4g} on {report['device']}"
    )
    print(f"{'method':<12}{'seconds':>10}{'peak extra MiB':>18}")
    for m, r in results.items():
        print(f"{m:<12}{r['seconds']:>10.2f}{r['peak_extra_bytes'] / 2**20:>18.1f}")
    if "speedup_lazy_over_naive" in report:
        print(f"naive / lazy time ratio: {report['speedup_lazy_over_naive']:.2f}x")
    print(f"identical picks: {identical}")
    print(f"memory: {memory_note}")
    if args.out is not None:
        append_record(args.out, report)
    return 0 if identical else 1


def append_record(path: Path, report: dict) -> None:
    """Append the run to a JSON list of records in the shared benchmark-results layout."""
    def side(method: str) -> dict | None:
        r = report["results"].get(method)
        return None if r is None else {"method": method, "seconds": round(r["seconds"], 4),
                                       "peak_gb": round(r["peak_extra_bytes"] / 2**30, 4)}

    record = {
        "benchmark": "max_herding",
        "hardware": f"{report['device']}, {report['platform']}"
        + (f", {report['threads']} threads" if report["threads"] else ""),
        "date": time.strftime("%Y-%m-%d"),
        "n": report["n"], "dim": report["dim"], "keep": report["keep"], "pool": report["pool"],
        "ours": side("lazy"),
        "reference": side("naive"),
        "ratio_reference_over_ours": report.get("speedup_lazy_over_naive"),
        "identical_picks": report["identical_picks"],
        "memory_measure": report["memory_measure"],
        "load_avg_1m_at_end": report["load_avg_1m_at_end"],
    }
    records = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records + [record], indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
