"""Region purity of `expansion: superpixel` settings on a prepared dataset (docs/expansion.md).

Random clicks (per seed, `--clicks` distinct pixels drawn uniformly over the split's images) are
answered from the ground truth and expanded exactly as `sparseseg run` expands them
(`expand_clicks`); the table gives, per setting, mean ± std over seeds of: purity of the regions
against the ground truth, region pixels per click, supervised pixels per click after the overlap
rule, and the accuracy of the region labels after it (`sparseseg.expansion.purity`).

    python experiments/region_purity.py data/camvid128 --config configs/camvid128_effnet.yaml
    python experiments/region_purity.py DATA --setting method=slic,n_segments=400 --setting method=felzenszwalb

Without `--setting` it runs the grid below. Method `feature` needs `--config`: an experiment config
whose backbone gives the features (its `data` is replaced by DATA). Choose settings on the training
split: the test split is for the final figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from sparseseg.config import SuperpixelConfig, load_config
from sparseseg.data.dataset import load_meta, load_split
from sparseseg.errors import SparsesegError
from sparseseg.expansion.purity import Purity, random_clicks, region_purity
from sparseseg.expansion.regions import expand_clicks
from sparseseg.expansion.registry import build_expander, describe
from sparseseg.features.store import FeatureStore
from sparseseg.labels import IGNORE

# Every key its method reads is spelled out, so the grid does not move with the defaults.
_SLIC = "method=slic,n_segments={n},compactness={c},sigma=0.5,max_pixels=1024"
_FELZ = "method=felzenszwalb,scale={s},sigma={g},min_size={m},max_pixels={x}"
_FEATURE = "method=feature,threshold={t},radius={r},max_pixels=1024"
GRID = [
    *(_SLIC.format(n=n, c=10) for n in (200, 400, 800, 1600)),
    *(_SLIC.format(n=400, c=c) for c in (5, 20)),
    *(_FELZ.format(s=s, g=0.5, m=20, x=1024) for s in (10, 25, 50, 100, 200)),
    *(_FELZ.format(s=25, g=0.5, m=m, x=1024) for m in (10, 50)),
    _FELZ.format(s=25, g=0.8, m=20, x=1024),
    *(_FELZ.format(s=25, g=0.5, m=20, x=x) for x in (256, 4096, 16384)),
    *(_FELZ.format(s=s, g=0.5, m=10, x=4096) for s in (10, 25, 50, 100)),
    *(_FELZ.format(s=s, g=0.5, m=5, x=4096) for s in (25, 10)),
    *(_FEATURE.format(t=t, r=16) for t in (0.8, 0.85, 0.9, 0.95)),
    _FEATURE.format(t=0.9, r=32),
]


def parse_setting(text: str) -> SuperpixelConfig:
    """'method=slic,n_segments=400' -> SuperpixelConfig (unknown keys and bad values are errors)."""
    pairs = dict(item.split("=", 1) for item in text.split(",") if item)
    try:
        return SuperpixelConfig.model_validate(pairs)
    except ValidationError as err:
        first = err.errors()[0]
        raise SparsesegError(f"--setting {text}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def label(config: SuperpixelConfig) -> str:
    """The setting as a table cell: the keys its method reads (as in the region's model name)."""
    return describe(config).split("(", 1)[1].rstrip(")").replace(",", ", ")


def feature_store(path: Path, data: Path, split) -> FeatureStore:
    """The run's training-split feature store under the backbone of the experiment config at `path`."""
    from sparseseg.loop.engine import Engine

    config = load_config(path, [f"data={data}"])
    meta = load_meta(data)
    engine = Engine(config, meta.classes, default_size=meta.size)
    return engine.stores({config.train_split: split.images})[config.train_split]


def measure(config: SuperpixelConfig, split, seeds: list[int], clicks: int, store: FeatureStore | None) -> list[Purity]:
    """One Purity per seed; every seed's clicks are expanded in one pass over the images."""
    expander = build_expander(config, "cpu", store)
    drawn = [random_clicks(len(split.names), split.images.shape[1], clicks, seed) for seed in seeds]
    image, y, x = (torch.cat([d[k] for d in drawn]) for k in range(3))
    answers = split.masks[image, y, x].long()
    regions = expand_clicks(expander, split.images, image, y, x, answers, round=1, tau=0.0)
    truth = split.masks.numpy()
    return [region_purity(regions.subset(np.arange(k * clicks, (k + 1) * clicks)), truth, config.max_region_pixels,
                          config.region_weight, seed) for k, seed in enumerate(seeds)]


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a prepared dataset (sparseseg prepare ...)")
    parser.add_argument("--split", default="train", help="the split whose images are clicked (default train)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of the random clicks")
    parser.add_argument("--clicks", type=int, default=370, help="clicks per seed (default 370: 10 rounds of 0.1 N)")
    parser.add_argument("--setting", action="append", help="superpixel settings, e.g. method=slic,n_segments=400 "
                        "(repeatable; default: the built-in grid)")
    parser.add_argument("--config", type=Path, help="an experiment config whose backbone gives the features "
                        "(method=feature only)")
    args = parser.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in (args.setting or GRID)]
        seeds = [int(s) for s in args.seeds.split(",")]
        split = load_split(args.data, args.split)
        if split.masks is None:
            raise SparsesegError(f"{args.data}/{args.split}: no masks; purity needs the ground truth")
        store = None
        if any(s.method == "feature" for s in settings):
            if args.config is None:
                raise SparsesegError("method=feature needs --config: an experiment config that names the backbone")
            store = feature_store(args.config, args.data, split)
        void = float((split.masks == IGNORE).float().mean())
        print(f"{args.data} ({args.split}: {len(split.names)} images, {split.images.shape[1]}x{split.images.shape[1]}, "
              f"{100 * void:.1f}% void); {args.clicks} random clicks x seeds {args.seeds}; mean ± std over seeds\n")
        print("| method | settings | purity (%) | mean region purity (%) | region px/click | supervised px/click "
              "| label accuracy (%) | trained-label accuracy (%) | s |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for config in settings:
            start = time.perf_counter()
            stats = measure(config, split, seeds, args.clicks, store)
            print(f"| {config.method} | {label(config)} | {spread([s.purity for s in stats], 100)} "
                  f"| {spread([s.mean_region_purity for s in stats], 100)} "
                  f"| {spread([s.pixels_per_region for s in stats], digits=0)} "
                  f"| {spread([s.supervised_per_click for s in stats], digits=0)} "
                  f"| {spread([s.label_accuracy for s in stats], 100)} "
                  f"| {spread([s.trained_accuracy for s in stats], 100)} | {time.perf_counter() - start:.0f} |", flush=True)
    except SparsesegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
