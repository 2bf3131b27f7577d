"""A labelling round against the speed of the hardware, measured side by side in one process.

Part `local` (per-image MaxHerding, the local stage of a round): for each of `--images` pools of
`--n` candidates (clustered, L2-normalised, `--dim` dimensions) and `--keep` picks:

* floor: the bare kernel of the same size, `kernels.rbf(z, z, sigma)` (one matrix product and
  its elementwise exp) and its row sums -- what any MaxHerding must at least compute once;
* new: `max_herding(z, keep, sigma)` with the default layout (the dense kernel when it fits the
  memory rule; `herding_plan` is printed);
* current: the lazy row-cache path (`block_size=4096`: 32-row kernel calls, 4,096 cached rows),
  the previous default (`--no-current` skips);
* naive: the naive greedy in the new path's layout, the exactness reference (`--no-naive` skips);
* projected (`--projection DIM`): `strategy.local_projection`, the features projected to DIM
  dimensions (projection and bandwidth timed), herded exactly; approximate picks, so the record
  gives their coverage on the original kernel relative to the exact picks'.

It prints each time, the ratios to the floor, and whether the picks are identical. Wall seconds
and the process's CPU seconds are both recorded: on a shared machine the wall time includes
waiting for a core, so with one thread the CPU time is the steadier figure. With `--repeat R`
each side runs R times and the fastest run counts (wall and CPU separately).

`--parallel` then times the same `--images` images herded one after the other (torch threads as
set by `--threads`) against a pool of `--threads` worker threads, each image on one intra-op
thread, and checks that the picks agree.

Part `round` (a whole labelling round through the project API, `sparseseg.annotate.project`): a
project on the first `--images` training images of a prepared dataset (`--data`, e.g. from
`sparseseg prepare camvid`), then `--rounds` rounds of `Project.query` -- feature extraction, local
and global MaxHerding, from round 2 the head and the uncertainty of the pool, the export of the
round's files -- with the answers of each round read from the dataset's masks and imported as a
CSV between rounds (not timed). Each round is split into phases from the progress events, and
`max_herding` is timed where the strategy calls it, so features and herding separate:

    head: `Project.head` before the query (training the head on the answers so far)
    loading: loading the images (round 1)
    features: the local-coverage phase less its herding (candidate features from the backbone;
        in round 1 also building the backbone and the feature store)
    local herding: `max_herding` and the bandwidth in the local stage
    global herding: the global-coverage phase
    uncertainty: from the end of the global stage to the end of the query, less the export
    export: `Project.export_round`, timed again on its own (the query writes the same files)
    other: the rest

`--herding current` runs the strategy on the previous lazy path (`block_size=4096`) instead.

Examples:
    OMP_NUM_THREADS=1 python benchmarks/bench_round.py --n 10000 --dim 6144 --keep 50 --threads 1 \\
        --out benchmarks/results/round.json
    python benchmarks/bench_round.py --n 10000 --dim 512 --keep 50 --threads 2 --images 2 --parallel \\
        --no-naive --out benchmarks/results/round.json
    python benchmarks/bench_round.py --part round --data /path/to/camvid128 --images 20 --rounds 2 \\
        --set backbone.name=efficientnet_lite0 --set strategy.name=two_stage_ebald --set head.dropout=0.1

Part `noise` (the noise-sample features of eDALD / DALD on a diffusion backbone): `--keep` seeded
pixels on each of the first `--images` training images of `--data`, features under noise samples
1..`--samples` through a `FeatureStore` of the backbone that `--set` configures (e.g.
`--set backbone.name=adm --set backbone.checkpoint=adm.pt`), side by side in one process, each side on a fresh store:

    previous: one sample at a time over all images (`at_pixels(..., sample)`): a backbone call per
        image and sample
    new: `at_pixels_samples`, every sample of an image in one backbone call (a batch of samples)
    again: the new side asked a second time (the next round, the image's picks unchanged):
        remembered pixel features, no backbone call

It prints seconds per image of each side, their ratio and the largest difference of the features.

    python benchmarks/bench_round.py --part noise --data data/camvid64 --images 20 --keep 50 --samples 6 \
        --set backbone.name=adm --set backbone.checkpoint=adm.pt --out benchmarks/results/round.json

`--out` appends one record to a JSON list (created when missing): benchmark, hardware, date, the
sizes, the seconds (for `local` also CPU seconds, ratios to the floor and identical_picks).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from bench_herding import make_pool
from PIL import Image

from sparseseg.annotate.init import init_project
from sparseseg.backbones.registry import build_backbone
from sparseseg.config import ProjectConfig, load_config
from sparseseg.data.dataset import load_meta, load_split
from sparseseg.features.store import FeatureStore
from sparseseg.selection import kernels, strategies
from sparseseg.selection.max_herding import coverage, herding_plan, max_herding

SIDES = ("floor", "new", "current", "naive")


def timed(fn):
    """(result, wall seconds, process CPU seconds) of fn()."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def floor(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """The bare kernel and its row sums: the least any MaxHerding computes."""
    return kernels.rbf(z, z, sigma).sum(dim=1)


def projected(z: torch.Tensor, keep: int, dim: int, seed: int) -> torch.Tensor:
    """`strategy.local_projection`: herd a seeded random projection (its own bandwidth)."""
    zp = z @ kernels.random_projection(z.shape[1], dim, torch.Generator().manual_seed(seed))
    return max_herding(zp, keep, kernels.median_bandwidth(zp, generator=torch.Generator().manual_seed(seed)))


def run_side(side: str, z: torch.Tensor, keep: int, sigma: float, args: argparse.Namespace):
    if side == "projected":
        return projected(z, keep, args.projection, args.seed)
    if side == "floor":
        return floor(z, sigma)
    if side == "new":
        return max_herding(z, keep, sigma)
    if side == "current":
        return max_herding(z, keep, sigma, block_size=4096)
    return max_herding(z, keep, sigma, method="naive")


def local_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    sides = [s for s in SIDES if (s != "naive" or args.naive) and (s != "current" or args.current)]
    if args.projection:
        sides.append("projected")
    pools = [make_pool(args.n, args.dim, "clustered", args.seed + i) for i in range(args.images)]
    sigmas = [kernels.median_bandwidth(z, generator=torch.Generator().manual_seed(args.seed)) for z in pools]
    plan = herding_plan(args.n, args.dim, args.keep)
    print(f"local herding: {args.images} image(s) of n={args.n} D={args.dim}, keep {args.keep}, "
          f"{args.threads} thread(s); new path: {'dense' if plan.dense else 'row cache'} layout, "
          f"{plan.rows} rows per kernel call, peak ~{plan.peak_bytes / 2**30:.2f} GB")
    wall = {s: 0.0 for s in sides}
    cpu = {s: 0.0 for s in sides}
    picks: dict[str, list[list[int]]] = {s: [] for s in sides if s != "floor"}
    for z, sigma in zip(pools, sigmas, strict=True):
        for side in sides:
            # the fastest of --repeat runs: what the code costs, not what the neighbours took
            runs = [timed(lambda side=side, z=z, sigma=sigma: run_side(side, z, args.keep, sigma, args))
                    for _ in range(args.repeat)]
            wall[side] += min(r[1] for r in runs)
            cpu[side] += min(r[2] for r in runs)
            if side != "floor":
                assert all(torch.equal(r[0], runs[0][0]) for r in runs), f"{side}: picks differ between repeats"
                picks[side].append(runs[0][0].tolist())
    print(f"{'side':<10}{'wall s':>10}{'cpu s':>10}{'wall / floor':>14}{'cpu / floor':>13}")
    for side in sides:
        print(f"{side:<10}{wall[side]:>10.2f}{cpu[side]:>10.2f}{wall[side] / wall['floor']:>14.2f}"
              f"{cpu[side] / cpu['floor']:>13.2f}")
    identical = {}
    if args.current:
        identical["new_vs_current"] = picks["new"] == picks["current"]
    if args.naive:
        identical["new_vs_naive"] = picks["new"] == picks["naive"]
    print("identical picks: " + ", ".join(f"{k} {v}" for k, v in identical.items()))
    record = {
        "benchmark": "local_herding",
        "n": args.n, "dim": args.dim, "keep": args.keep, "images": args.images, "repeat": args.repeat,
        "layout": {"dense": plan.dense, "rows": plan.rows, "peak_gb": round(plan.peak_bytes / 2**30, 4)},
        "seconds": {s: round(v, 4) for s, v in wall.items()},
        "cpu_seconds": {s: round(v, 4) for s, v in cpu.items()},
        "ratio_to_floor": {s: round(wall[s] / wall["floor"], 3) for s in sides if s != "floor"},
        "cpu_ratio_to_floor": {s: round(cpu[s] / cpu["floor"], 3) for s in sides if s != "floor"},
        "identical_picks": identical,
    }
    if args.projection:
        # the projected picks are approximate: their coverage on the original kernel, against the exact picks'
        ratio = [coverage(z, p, s) / coverage(z, e, s)
                 for z, s, p, e in zip(pools, sigmas, picks["projected"], picks["new"], strict=True)]
        record["projection"] = {"dim": args.projection, "coverage_ratio_to_exact": [round(r, 6) for r in ratio]}
        print(f"projected to {args.projection} dims: coverage / exact coverage "
              + ", ".join(f"{r:.5f}" for r in ratio))
    if args.parallel:
        record["parallel"] = parallel_part(args, pools, sigmas, picks["new"])
    return record


def _herd_one_thread(z: torch.Tensor, keep: int, sigma: float) -> list[int]:
    torch.set_num_threads(1)  # this worker's intra-op threads (and MKL's, thread-locally)
    return max_herding(z, keep, sigma).tolist()


def parallel_part(args: argparse.Namespace, pools: list[torch.Tensor], sigmas: list[float],
                  reference: list[list[int]]) -> dict:
    """Images one after the other with `threads` intra-op threads, against `threads` workers."""
    torch.set_num_threads(args.threads)
    seq, w_seq, c_seq = timed(lambda: [max_herding(z, args.keep, s).tolist()
                                       for z, s in zip(pools, sigmas, strict=True)])
    with ThreadPoolExecutor(args.threads) as ex:
        par, w_par, c_par = timed(lambda: list(ex.map(_herd_one_thread, pools, [args.keep] * len(pools), sigmas)))
    torch.set_num_threads(args.threads)
    print(f"{len(pools)} images: one after the other ({args.threads} threads each) {w_seq:.2f} s wall; "
          f"{args.threads} workers x 1 thread {w_par:.2f} s wall; speed-up {w_seq / w_par:.2f}x; "
          f"picks identical {seq == par == reference}")
    return {"sequential_seconds": round(w_seq, 4), "workers_seconds": round(w_par, 4),
            "sequential_cpu_seconds": round(c_seq, 4), "workers_cpu_seconds": round(c_par, 4),
            "workers": args.threads, "speedup": round(w_seq / w_par, 3), "identical_picks": seq == par == reference}


class RoundTimer:
    """Phase times of one `Project.query` from its progress events, and the time spent in the
    strategy's `max_herding` / `median_bandwidth` calls per coverage stage."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.phases: dict[str, float] = {}
        self.herding = {"local": 0.0, "global": 0.0}
        self.stage = "local"
        self.mark = time.perf_counter()
        self.global_done: float | None = None  # when the global stage ended

    def progress(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        name = "noise samples" if phase.startswith("noise sample") else phase
        self.phases[name] = self.phases.get(name, 0.0) + now - self.mark  # the time since the last event
        self.mark = now
        if phase == "global coverage":
            self.stage = "global" if done == 0 else "after"
            if done:
                self.global_done = now

    def wrap(self, fn):
        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.stage in self.herding:
                    self.herding[self.stage] += time.perf_counter() - t0
        return timed_call


def _answers_csv(project, round: int, masks_dir: Path, classes: list[str], path: Path) -> None:
    """The round's answers read from the dataset's masks (void: `unsure`), as an import CSV."""
    rows = []
    for q in project.round_queries(round):
        mask = np.asarray(Image.open(masks_dir / f"{q.image}.png"))
        c = int(mask[q.y, q.x])
        rows.append([q.id, classes[c] if c < len(classes) else "unsure"])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["query_id", "class"], *rows])


def round_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    meta = load_meta(args.data)
    split = args.data / "train"
    names = sorted(p.stem for p in (split / "images").glob("*.png"))[: args.images]
    timer = RoundTimer()
    herd = max_herding if args.herding == "new" else functools.partial(max_herding, block_size=4096)
    strategies.max_herding = timer.wrap(herd)
    strategies.median_bandwidth = timer.wrap(strategies.median_bandwidth)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for name in names:
            (images / f"{name}.png").symlink_to((split / "images" / f"{name}.png").resolve())
        classes_file = Path(tmp) / "classes.txt"
        classes_file.write_text("".join(f"{c}\n" for c in meta.classes))
        project = init_project(Path(tmp) / "project", images, classes_file, size=meta.size, overrides=args.set)
        try:
            for r in range(1, args.rounds + 1):
                _, head, _ = timed(lambda: project.head(progress=timer.progress))  # trained and saved once
                timer.reset()
                t0 = time.perf_counter()
                result = project.query(args.budget, progress=timer.progress)
                end = time.perf_counter()
                total = end - t0
                after_global = end - (timer.global_done or end)
                _, export, _ = timed(lambda r=r: project.export_round(r))
                phases = timer.phases
                parts = {
                    "head": head,
                    "loading": phases.get("loading images", 0.0),
                    "features": phases.get("local coverage", 0.0) - timer.herding["local"],
                    "local herding": timer.herding["local"],
                    "global herding": phases.get("global coverage", 0.0),
                    # what follows the global stage: the scores of the pool, the database, the export
                    "uncertainty": max(0.0, after_global - export),
                    "export": export,
                }
                parts["other"] = head + total - sum(parts.values())
                rounds.append({"round": r, "pixels": result.queries, "coverage_only": result.coverage_only,
                               "seconds": round(head + total, 3), "parts": {k: round(v, 3) for k, v in parts.items()},
                               "global_herding_call_seconds": round(timer.herding["global"], 3)})
                print(f"round {r}: {result.queries} pixels in {head + total:.1f} s ("
                      + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")")
                if r < args.rounds:
                    answers = Path(tmp) / f"answers_{r}.csv"
                    _answers_csv(project, r, split / "masks", list(meta.classes), answers)
                    project.import_file(answers)
            config = project.config
        finally:
            project.close()
    return {
        "benchmark": "labelling_round",
        "data": str(args.data), "images": len(names), "size": meta.size, "herding": args.herding,
        "backbone": config.backbone.name, "strategy": config.strategy.name,
        "candidates_per_image": config.strategy.candidates_per_image, "k_per_image": config.strategy.k_per_image,
        "overrides": args.set or [], "rounds": rounds,
    }


def noise_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    meta = load_meta(args.data)
    split = load_split(args.data, "train", only=range(args.images))
    config = load_config(None, args.set or [], schema=ProjectConfig)
    backbone = build_backbone(config.backbone, "cpu", meta.size)
    gen = torch.Generator().manual_seed(args.seed)
    n, s = len(split.images), meta.size
    image = torch.arange(n).repeat_interleave(args.keep)
    flat = torch.cat([torch.randperm(s * s, generator=gen)[: args.keep] for _ in range(n)])
    y, x = flat // s, flat % s
    samples = list(range(1, args.samples + 1))

    def store() -> FeatureStore:
        return FeatureStore(backbone, split.images, seed=args.seed, split="train")

    def previous(st: FeatureStore) -> torch.Tensor:
        return torch.stack([st.at_pixels(image, y, x, smp) for smp in samples])

    def new(st: FeatureStore) -> torch.Tensor:
        out = torch.empty(len(samples), len(image), st.dim)
        for idx, feats in st.at_pixels_samples(image, y, x, samples):
            out[:, idx] = feats
        return out

    new_store = store()
    store().sample_set_maps(0, samples[:1])  # warm-up: the first backbone call pays one-time costs
    old, t_old, c_old = timed(lambda: previous(store()))
    got, t_new, c_new = timed(lambda: new(new_store))
    again, t_again, _ = timed(lambda: new(new_store))
    diff = float((got - old).abs().max())
    print(f"{n} images x {args.keep} pixels x {len(samples)} noise samples, {backbone.__class__.__name__} "
          f"({new_store.dim} dims): previous {t_old / n:.3f} s/image, new {t_new / n:.3f} s/image "
          f"(x{t_old / t_new:.2f}), again {t_again / n:.4f} s/image; largest feature difference {diff:.2e}")
    return {
        "benchmark": "noise_samples", "data": str(args.data), "images": n, "pixels_per_image": args.keep,
        "samples": len(samples), "dim": new_store.dim, "overrides": args.set or [],
        "seconds_per_image": {"previous": round(t_old / n, 4), "new": round(t_new / n, 4),
                              "again": round(t_again / n, 5)},
        "cpu_seconds_per_image": {"previous": round(c_old / n, 4), "new": round(c_new / n, 4)},
        "ratio": round(t_old / t_new, 3), "max_feature_difference": diff,
        "identical_again": bool(torch.equal(again, got)),
    }


def append_record(path: Path, record: dict, args: argparse.Namespace) -> None:
    """Append the run to a JSON list of records in the shared benchmark-results layout."""
    record = {
        "benchmark": record.pop("benchmark"),
        "hardware": f"cpu, {platform.platform()}, {os.cpu_count()} cores, {args.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        **record,
        "torch": torch.__version__,
        "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    records = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records + [record], indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("local", "round", "noise"), default="local")
    ap.add_argument("--samples", type=int, default=6, help="noise: noise samples (M + 1 for eDALD)")
    ap.add_argument("--n", type=int, default=10_000, help="candidates per image")
    ap.add_argument("--dim", type=int, default=6144, help="feature dimension")
    ap.add_argument("--keep", type=int, default=50, help="picks per image (noise: pixels per image)")
    ap.add_argument("--images", type=int, default=1, help="pools (local) or project images (round)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="local: runs per side; the fastest counts")
    ap.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive reference")
    ap.add_argument("--no-current", dest="current", action="store_false", help="skip the previous lazy path")
    ap.add_argument("--projection", type=int, default=None, metavar="DIM",
                    help="local: also herd a random projection to DIM dims (strategy.local_projection)")
    ap.add_argument("--parallel", action="store_true", help="also time the images on worker threads")
    ap.add_argument("--data", type=Path, default=None, help="round: a prepared dataset folder")
    ap.add_argument("--rounds", type=int, default=2, help="round: rounds to run")
    ap.add_argument("--budget", type=int, default=None, help="round: pixels per round (default: the project's)")
    ap.add_argument("--herding", choices=("new", "current"), default="new", help="round: the herding path")
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="round, noise: project settings")
    ap.add_argument("--out", type=Path, default=None, help="append a record to this JSON list")
    args = ap.parse_args(argv)
    if args.part in ("round", "noise") and args.data is None:
        ap.error(f"--part {args.part} needs --data (a prepared dataset)")
    record = {"round": round_part, "noise": noise_part, "local": local_part}[args.part](args)
    if args.out is not None:
        append_record(args.out, record, args)
    if args.part == "round":
        return 0
    if args.part == "noise":
        return 0 if record["identical_again"] and record["max_feature_difference"] < 1e-3 else 1
    ok = all(record["identical_picks"].values()) and record.get("parallel", {}).get("identical_picks", True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
