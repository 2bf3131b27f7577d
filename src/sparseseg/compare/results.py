"""The results of a comparison, read from its finished run directories: per strategy and sweep
point, every seed's learning curve, labels, time and final per-class IoU; and what the tables
derive from them (coverage-first pairs, rounds to reach, pairs with the reference)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparseseg.compare import paper
from sparseseg.compare.plan import Point, RunSpec
from sparseseg.compare.rundir import read_rounds, training_pixels
from sparseseg.compare.runner import run_status
from sparseseg.compare.stats import PairedDifference, curve_mean, mean_std, paired_difference, rounds_to_reach
from sparseseg.config import VALIDATION, ExperimentConfig
from sparseseg.errors import SparsesegError

TARGETS = (0.8, 0.9)  # fractions of the fully supervised mIoU (Table 5)
# Coverage-first variants of a single-stage score X, in the order their rows appear.
PAIR_PREFIXES = (("two_stage_", "Herding → UC"), ("coreset_", "Core-set → UC"))


@dataclass
class StrategyResult:
    """Every finished seed of one strategy at one sweep point. mIoU and IoU in percent."""

    point: Point
    strategy: str
    rounds: int
    seeds: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # seeds without a finished run
    curves: list[list[float]] = field(default_factory=list)  # per seed: mIoU (%) after each round
    labelled: list[list[int]] = field(default_factory=list)  # per seed: labelled pixels after each round
    seconds: list[float] = field(default_factory=list)  # per seed: wall time of its rounds
    pixels_total: int | None = None  # training pixels in all, N x S x S (for "% pixels")
    expansion: str = "none"  # the runs' `expansion` ("sam": clicks expanded into SAM regions)
    supervised: list[list[int]] = field(default_factory=list)  # per seed, expansion only: clicks + region pixels
    per_class: list[dict[str, float | None]] = field(default_factory=list)  # per seed: final IoU (%) per class
    eval_split: str | None = None  # the split every round was evaluated on (the config's `eval_split`)

    @property
    def final(self) -> list[float]:
        return [c[-1] for c in self.curves]

    @property
    def mean(self) -> float:
        return mean_std(self.final)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.final)[1]

    @property
    def curve_means(self) -> list[float]:
        """Per seed: the mean mIoU over rounds (area under the learning curve / rounds)."""
        return [curve_mean(c) for c in self.curves]

    def class_means(self) -> dict[str, float | None]:
        """Final-round IoU (%) per class, mean over the seeds where the class had one (None: no seed)."""
        names = list(dict.fromkeys(name for seed in self.per_class for name in seed))
        means = {}
        for name in names:
            got = [v for seed in self.per_class if (v := seed.get(name)) is not None]
            means[name] = statistics.fmean(got) if got else None
        return means


@dataclass
class Reach:
    """Rounds to a target over seeds: the mean when every seed reached it."""

    rounds: float | None
    pixels_pct: float | None  # mean labelled pixels at that round, % of all training pixels
    reached: int
    seeds: int


def reach(result: StrategyResult, target: float) -> Reach:
    """Rounds (mean over seeds) to reach `target` mIoU (%); 'not reached' unless every seed does."""
    hits = [(rounds_to_reach(c, target), lab) for c, lab in zip(result.curves, result.labelled, strict=True)]
    reached = [(r, lab[r - 1]) for r, lab in hits if r is not None]
    if not reached or len(reached) < len(hits):
        return Reach(None, None, len(reached), len(hits))
    pct = None
    if result.pixels_total:
        pct = statistics.fmean(100 * n / result.pixels_total for _, n in reached)
    return Reach(statistics.fmean(r for r, _ in reached), pct, len(reached), len(hits))


@dataclass
class Paired:
    """One strategy against the reference at one sweep point, over the seeds both finished."""

    result: StrategyResult
    final: PairedDifference  # final-round mIoU, strategy - reference (points)
    aulc: PairedDifference  # mean mIoU over rounds (area under the learning curve / rounds), the same


def pair_with(result: StrategyResult, reference: StrategyResult) -> Paired:
    """`result` minus `reference`, seed s against seed s, for the final and the mean-over-rounds mIoU."""
    seeds = [s for s in result.seeds if s in reference.seeds]

    def pick(r: StrategyResult, values: list[float]) -> list[float]:
        return [values[r.seeds.index(s)] for s in seeds]

    return Paired(result, paired_difference(pick(result, result.final), pick(reference, reference.final)),
                  paired_difference(pick(result, result.curve_means), pick(reference, reference.curve_means)))


def collect_results(specs: Sequence[RunSpec]) -> list[StrategyResult]:
    """One StrategyResult per (point, strategy), in plan order, from the finished run directories."""
    results: dict[tuple[Point, str], StrategyResult] = {}
    for spec in specs:
        key = (spec.point, spec.strategy)
        res = results.setdefault(key, StrategyResult(spec.point, spec.strategy, spec.config.rounds,
                                                     expansion=spec.config.expansion,
                                                     eval_split=spec.config.eval_split))
        if run_status(spec)[0] != "complete":
            res.missing.append(spec.seed)
            continue
        records = read_rounds(spec.out)[: spec.config.rounds]
        res.seeds.append(spec.seed)
        res.curves.append([100 * r["miou"] if r.get("miou") is not None else math.nan for r in records])
        res.labelled.append([int(r["labelled"]) for r in records])
        if spec.config.expansion != "none":
            res.supervised.append([int(r.get("supervised_pixels", r["labelled"])) for r in records])
        res.seconds.append(sum(p["seconds"] for r in records for p in r.get("phases", {}).values()))
        res.per_class.append({name: None if v is None else 100 * v
                              for name, v in (records[-1].get("per_class_iou") or {}).items()})
        res.pixels_total = res.pixels_total or training_pixels(spec.out)
    return list(results.values())


@dataclass
class Comparison:
    """What the summary files are made of."""

    results: list[StrategyResult]
    sweep_keys: list[str]
    dataset_name: str  # meta.json's name
    dataset: str | None = None  # the paper's key, when the paper's figures are wanted
    supervised: dict | None = None  # a supervised.json
    supervised_path: Path | None = None
    reference: str | None = None  # the strategy every other one is paired with, seed by seed

    def points(self) -> list[Point]:
        return list(dict.fromkeys(r.point for r in self.results))

    def at(self, point: Point) -> dict[str, StrategyResult]:
        return {r.strategy: r for r in self.results if r.point == point and r.seeds}

    def eval_splits(self) -> list[str]:
        """The evaluation splits of the runs, in order of first appearance (one, unless swept)."""
        return list(dict.fromkeys(r.eval_split for r in self.results if r.eval_split is not None))

    def published(self, result: StrategyResult) -> paper.Published | None:
        if self.dataset is None:
            return None
        return paper.final_miou(self.dataset, result.strategy, dict(result.point), result.expansion)

    def supervised_miou(self) -> float | None:
        """The fully supervised mIoU in percent, when a reference was given."""
        return None if self.supervised is None else 100 * self.supervised["miou"]

    def pct_of_supervised(self, result: StrategyResult) -> float | None:
        """The final mean mIoU as a percentage of the fully supervised mIoU."""
        full = self.supervised_miou()
        if not full or not result.seeds or math.isnan(result.mean):
            return None
        return 100 * result.mean / full

    def expanded(self, point: Point) -> bool:
        """Whether the runs at `point` expand clicks into regions (then the supervised pixels are shown)."""
        return any(r.expansion != "none" for r in self.results if r.point == point)

    def at_paper_defaults(self, point: Point) -> bool:
        """The paper's click-only tables (1, 5) apply: default settings and no expansion."""
        return paper.at_defaults(dict(point)) and not self.expanded(point)

    def pairs(self, point: Point) -> list[tuple[str, str, StrategyResult, StrategyResult]]:
        """(score, label, single-stage result, coverage-first result) for Table 1."""
        here = self.at(point)
        out = []
        for prefix, label in PAIR_PREFIXES:
            for name, res in here.items():
                if name.startswith(prefix) and name[len(prefix):] in here:
                    out.append((name[len(prefix):], label, here[name[len(prefix):]], res))
        return out

    def paired(self, point: Point) -> list[Paired]:
        """Every other strategy against the reference at `point` (empty without a finished reference)."""
        here = self.at(point)
        ref = here.get(self.reference) if self.reference else None
        if ref is None:
            return []
        return [pair_with(r, ref) for name, r in here.items() if name != self.reference]


def summarize_comparison(
    specs: Sequence[RunSpec], dataset: str | None = None, supervised: Path | None = None,
    reference: str | None = None,
) -> Comparison:
    """Read the finished runs of a plan; `dataset` (a paper key) adds the published figures,
    `reference` (a planned strategy) the paired differences.

    Raises:
        SparsesegError: no run of the plan has finished, or `supervised` is for other data.
    """
    from sparseseg.data.dataset import load_meta
    from sparseseg.loop.supervised import read_supervised

    results = collect_results(specs)
    if not any(r.seeds for r in results):
        raise SparsesegError(f"{specs[0].out.parent}: no finished run to summarize")
    config = specs[0].config
    sup = None
    if supervised is not None:
        sup = read_supervised(supervised)
        check_supervised(sup, config, supervised)
    sweep_keys = [k for k, _ in specs[0].point]
    return Comparison(results, sweep_keys, load_meta(config.data).name, dataset, sup,
                      Path(supervised) if supervised is not None else None, reference)


def paper_dataset(config: ExperimentConfig) -> str:
    """The paper's key for the dataset named in the data's meta.json."""
    from sparseseg.data.dataset import load_meta

    name = load_meta(config.data).name
    try:
        return paper.resolve_dataset(name)
    except SparsesegError:
        raise SparsesegError(f"--paper: {config.data}/meta.json names the dataset {name!r}, for which the paper "
                             f"has no figures; add --dataset with one of {', '.join(paper.DATASETS)}") from None


def check_supervised(sup: dict, config: ExperimentConfig, path: Path) -> None:
    """The reference must score the same data split with the same backbone."""
    theirs = sup.get("config") or {}
    mine = config.model_dump(mode="json")
    keys = ["data", "eval_split", "backbone.checkpoint"]
    if mine["eval_split"] == VALIDATION:  # which training images are held out
        keys += ["val_fraction", "val_seed", "val_prefixes"]
    for key in keys:
        section, _, name = key.rpartition(".")
        a = (theirs.get(section) or {}).get(name) if section else theirs.get(name)
        b = mine[section][name] if section else mine[name]
        if a is not None and a != b:
            raise SparsesegError(f"--supervised {path}: computed with {key}={a}, the comparison uses {b}")
