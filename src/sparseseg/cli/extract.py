"""`sparseseg extract`, `select` and `segment`: the two-stage pipeline beyond one process (docs/scaling.md).

Each command runs as one process, or as G processes under torchrun (one per GPU; gloo on CPU):

    torchrun --nproc-per-node G -m sparseseg.cli extract CONFIG [--out POOL]
    torchrun --nproc-per-node G -m sparseseg.cli select CONFIG [--pool POOL] [--head head.pt] [--round R]
    torchrun --nproc-per-node G -m sparseseg.cli segment CONFIG --head head.pt --out MASKS

(`torchrun --no-python sparseseg ...` works too where the script is on PATH.) Only rank 0 shows
progress and prints; every rank does its share of the work.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from sparseseg.cli.app import app, console, friendly, progress_bars

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override: key=value (dotted keys).")]


@contextmanager
def _launched(device: str):
    """The launch (process group) for the duration of a command; progress bars on rank 0 only."""
    from sparseseg.distributed.launch import launch

    run = launch(device)
    try:
        if run.main:
            with progress_bars() as update:
                yield run, update
        else:
            yield run, None
    finally:
        run.close()


def _say(run, text: str) -> None:
    if run.main:
        console.print(text, soft_wrap=True, markup=False, highlight=False)


@app.command()
@friendly
def extract(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (data, seed, backbone, strategy).")],
    out: Annotated[Path | None, typer.Option(help="Pool folder (default: the config's out/pool).")] = None,
    images_per_shard: Annotated[int, typer.Option(help="Images per shard: the unit of work and of resuming.")] = 64,
    dtype: Annotated[str, typer.Option(help="Features on disk: float16 (half the disk) or float32 (exact).")] = "float16",
    labels: Annotated[Path | None, typer.Option(help="labels.csv of the pixels labelled so far (a run's).")] = None,
    set_: SetOption = None,
) -> None:
    """Stage 1a on every training image, sharded over the processes: local MaxHerding picks and their
    features (deterministic and the noise samples stage 2 needs) to a pool on disk. Rerun to resume."""
    from sparseseg.config import load_config
    from sparseseg.distributed.extract import extract_pool

    cfg = load_config(config, set_)
    pool = out or cfg.out / "pool"
    with _launched(cfg.backbone.device) as (run, update):
        summary = extract_pool(cfg, pool, run, images_per_shard, dtype, labels, progress=update)
    _say(run, f"{pool}: {summary['finished']}/{summary['shards']} shards finished ({summary['done_here']} written by "
              f"rank 0, {summary['skipped']} already done), {summary['rows']} pool rows, {run.size} process(es), "
              f"{summary['seconds']:.1f} s")


@app.command()
@friendly
def select(
    config: Annotated[Path, typer.Argument(help="The experiment YAML the pool was extracted with.")],
    pool: Annotated[Path | None, typer.Option(help="Pool folder (default: the config's out/pool).")] = None,
    head: Annotated[Path | None, typer.Option(help="head.pt to score the pool with (none: round 1, coverage only).")] = None,
    round: Annotated[int, typer.Option(help="Round number (seeds sigma, dropout masks and the rule).")] = 1,
    budget: Annotated[int | None, typer.Option(help="Pixels to pick (default: the config's budget).")] = None,
    method: Annotated[str, typer.Option(help="Global coverage: exact (sharded lazy MaxHerding) or knn (FAISS graph).")] = "exact",
    neighbours: Annotated[int, typer.Option(help="knn: neighbours per pool row.")] = 32,
    index: Annotated[str | None, typer.Option(help="knn: FAISS factory string (default: Flat, IVF..,SQ8 past 100k).")] = None,
    out: Annotated[Path | None, typer.Option(help="Picks CSV (default: POOL/picks/round_XX.csv).")] = None,
    set_: SetOption = None,
) -> None:
    """Stages 1b and 2 over a pool: global MaxHerding, then the uncertainty score under a head; writes the picks."""
    import json

    from sparseseg.config import load_config
    from sparseseg.data.dataset import load_meta
    from sparseseg.distributed.pool import check_pool, select_from_pool, write_picks
    from sparseseg.distributed.predict import load_head
    from sparseseg.features.shards import PoolStore
    from sparseseg.head.predictor import HeadPredictor
    from sparseseg.io import atomic_write_text

    cfg = load_config(config, set_)
    folder = pool or cfg.out / "pool"
    store = PoolStore.open(folder)
    check_pool(store, cfg)
    names = store.manifest["names"]
    b = budget or cfg.budget_for(len(names))
    with _launched(cfg.backbone.device) as (run, update):
        predictor = None
        if head is not None:
            predictor = HeadPredictor(load_head(head, store.dim, len(load_meta(cfg.data).classes), cfg, run.device))
        result = select_from_pool(store, cfg, run, b, round, predictor, method, neighbours, index, progress=update)
        path = out or folder / "picks" / f"round_{round:02d}.csv"
        if run.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_picks(path, result, names, round)
            atomic_write_text(path.with_suffix(".json"), json.dumps(result.info, indent=1) + "\n")
    _say(run, f"round {round}: {len(result.rows)} pixels from a pool of {result.info['pool']} "
              f"({result.info['local_pool']} local picks, {method}, {run.size} process(es)) -> {path}")


@app.command()
@friendly
def segment(
    config: Annotated[Path, typer.Argument(help="The experiment YAML (data, backbone, head settings).")],
    head: Annotated[Path, typer.Option(help="head.pt to predict with (a run's or a project's).")],
    out: Annotated[Path, typer.Option(help="Folder for one palette PNG mask per image and summary.json.")],
    split: Annotated[str | None, typer.Option(help="Split to segment (default: the config's eval_split).")] = None,
    set_: SetOption = None,
) -> None:
    """The head's mask of every image of a split, sharded over the processes; mIoU when the split has masks."""
    from sparseseg.config import load_config
    from sparseseg.distributed.predict import segment_split

    cfg = load_config(config, set_)
    with _launched(cfg.backbone.device) as (run, update):
        summary = segment_split(cfg, head, out, run, split, progress=update)
    miou = summary.get("metrics", {}).get("miou")
    _say(run, f"{summary['images']} masks in {out} ({run.size} process(es), {summary['seconds']:.1f} s)"
              + (f"; mIoU {100 * miou:.2f}%" if miou is not None else ""))
