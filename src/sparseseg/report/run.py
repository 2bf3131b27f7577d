"""The report of one run directory (`sparseseg run`): curves, rounds, per-class IoU, the class mix of
the picks, phase times, and previews of training images (picks, prediction, ground truth) and of
test images (prediction, ground truth) under the run's last head (`head.pt`, through the engine)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from sparseseg.compare.rundir import read_rounds
from sparseseg.config import ExperimentConfig, load_config
from sparseseg.errors import SparsesegError
from sparseseg.labels import IGNORE, PixelLabels
from sparseseg.report.charts import SERIES_COLOURS, Chart, Series, bar_chart, line_chart
from sparseseg.report.page import Page, Raw, esc, legend, swatch, table
from sparseseg.report.previews import ANSWERED, VOID, Marker, card, class_map, marker_legend, with_markers

Progress = Callable[[str, int, int], None]
PHASES = ("select", "expand", "train", "evaluate")
VOID_COLOUR = "#000000"


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def load_run(run_dir: Path) -> tuple[ExperimentConfig, list[dict], dict]:
    """(config, rounds.jsonl records, meta.json) of a run directory."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    records = read_rounds(run_dir)
    try:
        meta = json.loads((run_dir / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    return config, records, meta


def curves_chart(records: list[dict], title: str) -> str:
    rounds = [r["round"] for r in records]
    return line_chart(Chart(title, "round", "%", [
        Series("mIoU", rounds, [_pct(r.get("miou")) for r in records], SERIES_COLOURS[0]),
        Series("pixel accuracy", rounds, [_pct(r.get("pixel_accuracy")) for r in records], SERIES_COLOURS[1]),
    ]))


def rounds_table(records: list[dict]) -> str:
    phases = [p for p in PHASES if any(p in r.get("phases", {}) for r in records)]
    rows = []
    for r in records:
        times = [r["phases"][p]["seconds"] if p in r.get("phases", {}) else None for p in phases]
        peak = max((v.get("peak_gb") or 0.0 for v in r.get("phases", {}).values()), default=None)
        rows.append([r["round"], r.get("new_pixels"), r.get("labelled"), r.get("void_answers"), _pct(r.get("miou")),
                     _pct(r.get("pixel_accuracy")), *times, peak])
    return table(["round", "new picks", "labelled", "void", "mIoU (%)", "pixel acc. (%)",
                  *(f"{p} (s)" for p in phases), "peak memory (GB)"], rows)


def times_table(records: list[dict]) -> str:
    """Seconds per phase summed over the rounds, and their share of the run's time."""
    totals = Counter()
    for r in records:
        for phase, v in r.get("phases", {}).items():
            totals[phase] += v["seconds"]
    whole = sum(totals.values()) or 1.0
    return table(["phase", "seconds (all rounds)", "share (%)"],
                 [[p, float(s), 100 * s / whole] for p, s in totals.items()] + [["all", float(whole), 100.0]])


def per_class_table(records: list[dict], classes: list[str], palette: list[list[int]]) -> str:
    first, last = records[0].get("per_class_iou") or {}, records[-1].get("per_class_iou") or {}
    rows = []
    for name, rgb in zip(classes, palette, strict=False):
        a, b = _pct(first.get(name)), _pct(last.get(name))
        rows.append([Raw(swatch(rgb) + esc(name)), a, b, None if a is None or b is None else b - a])
    return table(["class", f"IoU round {records[0]['round']} (%)", f"IoU round {records[-1]['round']} (%)",
                  "change (pp)"], rows)


def class_mix(labels: PixelLabels, classes: list[str], palette: list[list[int]]) -> str:
    """The picks per class (void included), overall as bars and per round as a table."""
    names = [*classes, "void"]
    colours = ["#{:02x}{:02x}{:02x}".format(*c) for c in palette] + [VOID_COLOUR]

    def index(c: int) -> int:
        return len(classes) if c == IGNORE else c

    overall = Counter(index(c) for c in labels.cls.tolist())
    bars = [(names[i], overall[i], colours[i]) for i in range(len(names)) if overall[i]]
    rounds = sorted(set(labels.round.tolist()))
    per_round = {r: Counter(index(c) for c in labels.cls[labels.round == r].tolist()) for r in rounds}
    rows = [[Raw(swatch(palette[i]) + esc(names[i]) if i < len(classes) else esc("void")),
             *(per_round[r][i] for r in rounds), overall[i]] for i in range(len(names)) if overall[i]]
    return (bar_chart(f"picks per class ({len(labels)} in all)", bars) +
            table(["class", *(f"round {r}" for r in rounds), "all"], rows))


def _markers(labels: PixelLabels, image: int, latest: int) -> list[Marker]:
    mine = (labels.image == image).nonzero().flatten().tolist()
    return [Marker(int(labels.y[j]), int(labels.x[j]), VOID if int(labels.cls[j]) == IGNORE else ANSWERED,
                   int(labels.cls[j]), int(labels.round[j]) == latest) for j in mine]


def previews(run_dir: Path, config: ExperimentConfig, meta, train, test, labels: PixelLabels, latest: int,
             count: int, predictions: bool, progress: Progress | None) -> str:
    """Training images with their picks (the latest round's first) and test images, each with the
    ground truth and, when the run has a head and `predictions`, the head's prediction."""
    predict = _predictor(run_dir, config, meta, train, test, progress) if predictions else None
    new = labels.image[labels.round == latest].unique().tolist()
    shown = (new + [i for i in range(len(train.names)) if i not in new])[:count]
    cards = []
    for i in shown:
        cards.append(card("TRAINING image", train.names[i], [
            ("picks", with_markers(train.images[i].numpy(), _markers(labels, i, latest), meta.palette)),
            ("prediction", class_map(predict("train", i), meta.palette) if predict else None),
            ("ground truth", class_map(train.masks[i], meta.palette))]))
    for i in range(min(count, len(test.names))):
        cards.append(card(f"TEST image ({config.eval_split} split, never picked from)", test.names[i], [
            ("image", with_markers(test.images[i].numpy(), [], meta.palette)),
            ("prediction", class_map(predict("test", i), meta.palette) if predict else None),
            ("ground truth", class_map(test.masks[i], meta.palette))], test=True))
    note = ("Predictions: the head of the last finished round (head.pt) on the run's backbone."
            if predict else "No predictions: " + ("the run has no head.pt yet." if predictions else "--no-predictions."))
    return (legend(meta.classes, meta.palette, marker_legend()) + f'<p class="note">{esc(note)}</p>'
            + f'<div class="cards">{"".join(cards)}</div>')


def _predictor(run_dir: Path, config: ExperimentConfig, meta, train, test, progress: Progress | None):
    """split, image -> (S, S) class ids under the run's head.pt; None when there is no head."""
    from sparseseg.head.mlp import build_head
    from sparseseg.loop.engine import Engine

    path = Path(run_dir) / "head.pt"
    if not path.exists():
        return None
    engine = Engine(config, meta.classes, default_size=meta.size)
    # the run's own split names seed the noise, so the features (and predictions) are the run's
    stores = engine.stores({config.train_split: train.images, config.eval_split: test.images},
                           evaluation=[config.eval_split])
    state = torch.load(path, map_location=engine.device, weights_only=True)
    head = build_head(stores[config.train_split].dim, len(meta.classes), config.head).to(engine.device)
    try:
        head.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise SparsesegError(f"{path}: does not fit the run's config ({str(exc).splitlines()[0]})") from None
    head.eval()
    names = {"train": config.train_split, "test": config.eval_split}
    done = Counter()

    def predict(split: str, image: int) -> torch.Tensor:
        out = engine.predict(head, stores[names[split]], image)
        done[split] += 1
        if progress:
            progress(f"predicting {split}", done[split], done[split])
        return out

    return predict


def run_page(run_dir: Path, count: int = 4, predictions: bool = True, progress: Progress | None = None) -> Page:
    """The report of a run directory."""
    from sparseseg.data.dataset import load_meta
    from sparseseg.loop.experiment import load_splits

    run_dir = Path(run_dir)
    config, records, meta_json = load_run(run_dir)
    if not records:
        raise SparsesegError(f"{run_dir / 'rounds.jsonl'}: no finished round yet; nothing to report")
    meta = load_meta(config.data)
    classes, palette = list(meta.classes), [list(c) for c in meta.palette]
    train, test = load_splits(config)  # the evaluation split as the run had it (a carved val split too)
    labels = PixelLabels.read_csv(run_dir / "labels.csv", train.names).upto(records[-1]["round"])
    last = records[-1]
    page = Page(f"Run {run_dir.name}: {config.strategy.name}, seed {config.seed}",
                f"{meta.name} at {meta.size}x{meta.size}; {len(records)}/{config.rounds} rounds; "
                f"{meta_json.get('budget_per_round', '?')} picks per round; evaluated on the {config.eval_split} split; "
                f"final mIoU {100 * last['miou']:.2f}%; backbone {config.backbone.name}; {run_dir.resolve()}")
    labelled = line_chart(Chart("labelled pixels", "round", "pixels", [
        Series("labelled", [r["round"] for r in records], [r.get("labelled") for r in records], SERIES_COLOURS[2])]))
    page.add("Learning curves", f'<div class="charts">{curves_chart(records, "after each round")}{labelled}</div>')
    page.add("Rounds", rounds_table(records))
    page.add("Per-class IoU", per_class_table(records, classes, palette))
    page.add("Class mix of the picks", class_mix(labels, classes, palette))
    page.add("Time per phase", times_table(records))
    page.add("Previews", previews(run_dir, config, meta, train, test, labels, last["round"], count, predictions,
                                  progress))
    return page
