"""Reliability: herding and prediction under a hard memory cap (RLIMIT_AS in a child process).

Each child warms its code paths up on a tiny input, reads its own address-space size, then limits
itself to that plus an allowance and runs the real call. The allowance is what the documented
bound promises (docs/reliability.md); a control run that the bound does not cover (no cap, or
the whole image in one tile) must fail under the same limit, so the limit is known to bite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD_MB = 32  # allocator slack and Python objects (the lazy heap: about 100 B per pool point)

PRELUDE = textwrap.dedent("""
    import resource, sys
    import torch
    torch.set_num_threads(1)

    def limit_to(extra_bytes):
        status = open("/proc/self/status").read().splitlines()
        size = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, size + extra_bytes))

    def attempt(fn):
        try:
            fn()
        except (MemoryError, RuntimeError) as err:  # torch: "DefaultCPUAllocator: can't allocate memory"
            print("OUT OF MEMORY", str(err)[:80])
            sys.exit(3)
        print("ok")
""")

HERDING = PRELUDE + textwrap.dedent("""
    from sparseseg.selection.max_herding import max_herding
    n, d, cap, extra_mb = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    cap = None if cap == 0 else cap
    max_herding(z[:300], 5, 1.0, max_memory_gb=cap)  # warm-up
    limit_to(int((cap or 0) * 2**30 + extra_mb * 2**20))
    attempt(lambda: max_herding(z, 50, 1.0, max_memory_gb=cap))
""")

PREDICTION = PRELUDE + textwrap.dedent("""
    from sparseseg.features.store import FeatureStore
    from sparseseg.loop.engine import predict_image
    from tests.conftest import ToyBackbone
    size, tile, extra_mb = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    backbone = ToyBackbone(input_size=size, channels=(256, 256, 256))  # D = 768
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    store = FeatureStore(backbone, images, seed=0, split="test", cache_gb=0.0)
    head = torch.nn.Linear(store.dim, 8)
    tiny = FeatureStore(backbone, images[:, :16, :16].contiguous(), seed=0, split="test", cache_gb=0.0)
    with torch.no_grad():
        predict_image(head, tiny, 0, 64)  # warm-up
    limit_to(int(extra_mb * 2**20))
    with torch.no_grad():
        attempt(lambda: predict_image(head, store, 1, tile))
""")


def _child(script: str, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_sharded_herding_stays_under_its_cap_plus_overhead():
    # n = 5000, D = 64: exact lazy herding caches up to 4096 kernel rows (~78 MiB); the cap is 20 MiB.
    capped = _child(HERDING, 5000, 64, 0.02, OVERHEAD_MB)
    assert capped.returncode == 0 and "ok" in capped.stdout, capped.stderr[-2000:]
    uncapped = _child(HERDING, 5000, 64, 0, 0.02 * 1024 + OVERHEAD_MB)
    assert uncapped.returncode == 3 and "OUT OF MEMORY" in uncapped.stdout, (uncapped.stdout, uncapped.stderr[-2000:])


def test_tiled_prediction_stays_within_one_image_and_one_tile():
    # A 128x128 image with D = 768: its backbone pass and maps take about 60 MiB; a tile of 1024
    # pixels adds about 9 MiB, the whole image in one tile about 150 MiB.
    tiled = _child(PREDICTION, 128, 1024, 96)
    assert tiled.returncode == 0 and "ok" in tiled.stdout, tiled.stderr[-2000:]
    whole = _child(PREDICTION, 128, 128 * 128, 96)
    assert whole.returncode == 3 and "OUT OF MEMORY" in whole.stdout, (whole.stdout, whole.stderr[-2000:])
