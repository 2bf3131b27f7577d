"""One process of `tests/test_distributed.py`'s torchrun launch (gloo on CPU); not a test module itself.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py ARGS.json

ARGS.json names the config, head, labels and output folder the test prepared. Every rank runs the same
steps; rank 0 writes what the test compares with its single-process reference:

1. `sharded_max_herding` on seeded random pools, each rank holding its `partition` of the rows;
2. the CLI commands under one process group: `extract` (round 1 pool, and a round 2 pool given the
   round 1 labels), `select` (round 1: coverage alone; round 2: eDALD under the head), `segment`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sparseseg.cli import app
from sparseseg.distributed.launch import launch
from sparseseg.selection.distributed import partition, sharded_max_herding

#: (n, D, k, block, labelled points, seed): pools the test draws in the same way (`random_pool`).
HERDING_CASES = [(700, 16, 40, 64, 0, 0), (1000, 8, 60, 32, 5, 1), (333, 12, 333, 32, 3, 2)]


def random_pool(n: int, d: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Clustered (n, D) features, m labelled points and a bandwidth, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, d, generator=g) * 3
    z = centers[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, d, generator=g)
    lab = torch.randn(m, d, generator=g) if m else None
    return z, lab, (2.0 * d) ** 0.5


def main(args_path: str) -> None:
    args = json.loads(Path(args_path).read_text())
    out = Path(args["out"])
    run = launch("cpu")
    herding = []
    for n, d, k, block, m, seed in HERDING_CASES:
        z, lab, sigma = random_pool(n, d, m, seed)
        lo, hi = partition(n, run.size, block)[run.rank]
        herding.append(sharded_max_herding(z[lo:hi], lo, n, k, sigma, lab, block=block).tolist())
    if run.main:
        (out / "herding.json").write_text(json.dumps({"ranks": run.size, "picks": herding}))
    cfg, common = args["config"], ["--set", "backbone.device=cpu"]
    commands = [
        ["extract", cfg, "--out", str(out / "pool1"), "--images-per-shard", "2", "--dtype", "float32", *common],
        ["select", cfg, "--pool", str(out / "pool1"), "--round", "1", "--budget", "5", *common],
        ["extract", cfg, "--out", str(out / "pool2"), "--images-per-shard", "2", "--dtype", "float32",
         "--labels", args["labels"], *common],
        ["select", cfg, "--pool", str(out / "pool2"), "--round", "2", "--budget", "5", "--head", args["head"], *common],
        ["segment", cfg, "--head", args["head"], "--out", str(out / "masks"), *common],
    ]
    for command in commands:
        app(command, standalone_mode=False)
    run.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
