"""How much coverage cheaper local-stage settings give up, on real features (docs/performance.md).

For each of `--images` training images (evenly spaced over the split): every pixel's feature from
the backbone of `--config`, then the local stage (per-image MaxHerding of `--k` picks, as
`TwoStageStrategy` runs it: seeded candidates, median bandwidth, optional seeded projection) under
each setting. A setting's score is the generalised coverage of its picks over ALL the image's
pixels, sum_x max_s k(x, s) at the exact default's bandwidth, divided by the exact default's
(10,000 candidates, full dimension). The CPU seconds are those of the local stage alone (one thread).

    python experiments/local_stage_coverage.py data/camvid128 --config configs/camvid128_effnet.yaml \\
        --set backbone.input_size=256 --images 8 --k 20

Choose on the training split; `strategy.preset: fast` was chosen with this table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sparseseg.backbones.registry import build_backbone
from sparseseg.config import load_config
from sparseseg.data.dataset import load_split
from sparseseg.features.store import FeatureStore
from sparseseg.seeding import derived_generator
from sparseseg.selection.kernels import median_bandwidth, random_projection, rbf
from sparseseg.selection.max_herding import max_herding

#: (candidates per image, projection dimension or None): the exact default first
SETTINGS = [(10000, None), (4096, None), (2048, None), (1024, None), (10000, 64), (2048, 64), (1024, 64), (2048, 128)]


def local_picks(z: torch.Tensor, k: int, projection: int | None, image: int, seed: int) -> torch.Tensor:
    """The local stage on one image's candidate features, as the strategy seeds it."""
    if projection is not None:
        z = z @ random_projection(z.shape[1], projection, derived_generator(seed, "local-projection"))
    sigma = median_bandwidth(z, fraction=0.01, generator=derived_generator(seed, "sigma", image))
    return max_herding(z, k, sigma, generator=derived_generator(seed, "local", image))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="a prepared dataset")
    ap.add_argument("--config", type=Path, required=True, help="an experiment config (its backbone is used)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--k", type=int, default=20, help="local picks per image (strategy.k_per_image)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"data={args.data}", *args.set])
    split = load_split(args.data, cfg.train_split)
    backbone = build_backbone(cfg.backbone, "cpu", split.images.shape[1])
    store = FeatureStore(backbone, split.images, seed=args.seed, split=cfg.train_split)
    rel: dict[tuple, list[float]] = {s: [] for s in SETTINGS}
    cpu: dict[tuple, list[float]] = {s: [] for s in SETTINGS}
    for image in torch.linspace(0, len(split.images) - 1, args.images).long().tolist():
        every = torch.cat(list(store.image_tiles(image)))
        order = torch.randperm(len(every), generator=derived_generator(args.seed, "candidates", image))
        picks = {}
        for cand, proj in SETTINGS:
            idx = order[: min(cand, len(every))]
            start = time.process_time()
            picks[cand, proj] = idx[local_picks(every[idx], args.k, proj, image, args.seed)]
            cpu[cand, proj].append(time.process_time() - start)
        sigma = median_bandwidth(every[order[:10000]], fraction=0.01,
                                 generator=derived_generator(args.seed, "sigma", image))
        coverage = {s: float(rbf(every, every[p], sigma).max(1).values.sum()) for s, p in picks.items()}
        for s in SETTINGS:
            rel[s].append(coverage[s] / coverage[SETTINGS[0]])
        print(f"image {image}: " + ", ".join(f"{c}/{p or 'full'} {rel[c, p][-1]:.4f}" for c, p in SETTINGS), flush=True)
    print(f"\n{args.images} images, K = {args.k}, features of {cfg.backbone.name} ({store.dim} dimensions)\n")
    print("| candidates | projection | coverage / exact default (mean) | (lowest) | local stage, CPU s per image |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for c, p in SETTINGS:
        print(f"| {c} | {p or 'none'} | {statistics.mean(rel[c, p]):.4f} | {min(rel[c, p]):.4f} "
              f"| {statistics.mean(cpu[c, p]):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
