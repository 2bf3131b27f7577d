"""Strategy comparisons: every strategy x seed (x swept value) as ordinary run directories, then
the paper's tables and curves from them.

Layout of a comparison folder::

    DIR/<strategy>_s<seed>/            a normal run directory (`sparseseg run`)
    DIR/<strategy>_s<seed>.log         its log (subprocess output, or the traceback of a failure)
    DIR/<key>=<value>/<strategy>_s<seed>/   the same, one folder per swept value
    DIR/summary.md, summary.csv, curves.png

Running is resumable: a run whose rounds.jsonl already holds `rounds` lines (under the same
config) is skipped, a partial one resumes where it stopped (Experiment does that), a new one
starts. One failing run is reported and the others go on.

The summary (Table 2 style) is the final-round mIoU, mean ± sample std (n - 1) over seeds. Pairs
`X` / `two_stage_X` (and `X` / `coreset_X`) give Table 1's gain of coverage first, in points and in
percent of the single-stage mIoU. With a fully supervised reference (`sparseseg supervised`),
Table 5's rounds to reach 80% / 90% of its mIoU. With `paper`, the published numbers beside ours.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparseseg import paper
from sparseseg.config import ExperimentConfig, load_config
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write, atomic_write_text
from sparseseg.report import read_rounds

Progress = Callable[[str, int, int], None]
Point = tuple[tuple[str, str], ...]  # swept (key, value) pairs of one grid point; () without a sweep

# Options of their own; a --set or --sweep of these would fight them.
RESERVED_KEYS = {"strategy.name": "--strategies", "seed": "--seeds", "out": "--out"}
TARGETS = (0.8, 0.9)  # fractions of the fully supervised mIoU (Table 5)
# Coverage-first variants of a single-stage score X, in the order their rows appear.
PAIR_PREFIXES = (("two_stage_", "Herding → UC"), ("coreset_", "Core-set → UC"))


# ------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a strategy, a seed and a sweep point, fully configured."""

    strategy: str
    seed: int
    point: Point
    config: ExperimentConfig
    overrides: tuple[str, ...]  # the --set list that turns CONFIG into `config`

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def log(self) -> Path:
        """`<run>.log` beside the run directory (inside it, Experiment would refuse a stray file)."""
        return self.out.with_name(self.out.name + ".log")

    @property
    def name(self) -> str:
        run = f"{self.strategy}_s{self.seed}"
        return f"{point_dir(self.point)}/{run}" if self.point else run


def point_dir(point: Point) -> str:
    """Folder name of a sweep point: `key=value`, several joined by commas."""
    return ",".join(f"{k}={v}" for k, v in point)


def parse_list(text: str, option: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c']; empty items dropped, duplicates refused."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise SparsesegError(f"{option}: expected a comma-separated list, got {text!r}")
    if len(set(items)) != len(items):
        raise SparsesegError(f"{option} {text!r}: a value is repeated")
    return items


def parse_sweeps(texts: Sequence[str] | None) -> dict[str, list[str]]:
    """['budget_fraction=0.1,0.2'] -> {'budget_fraction': ['0.1', '0.2']}; several make a grid."""
    sweeps: dict[str, list[str]] = {}
    for text in texts or []:
        if "=" not in text:
            raise SparsesegError(f"--sweep {text!r}: expected key=v1,v2,..., for example budget_fraction=0.1,0.2")
        key, values = (part.strip() for part in text.split("=", 1))
        if key in sweeps:
            raise SparsesegError(f"--sweep {key}: given twice; list every value in one --sweep")
        if key in RESERVED_KEYS:
            raise SparsesegError(f"--sweep {key}: use {RESERVED_KEYS[key]} instead")
        sweeps[key] = parse_list(values, f"--sweep {key}")
        for value in sweeps[key]:
            if "/" in value or "," in value:
                raise SparsesegError(f"--sweep {key}: value {value!r} cannot be part of a folder name")
    return sweeps


def plan_comparison(
    config_path: Path,
    strategies: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    overrides: Sequence[str] | None = None,
    sweeps: dict[str, list[str]] | None = None,
) -> list[RunSpec]:
    """Every (sweep point, seed, strategy) run, configured and validated before anything runs.

    Seeds vary slower than strategies, so an interrupted comparison has every strategy's first
    seeds before anyone's last.

    Raises:
        SparsesegError: an unknown strategy, a reserved key in `overrides`, a config that does not
            validate, or a budget_fraction sweep under an explicit `budget`.
    """
    from sparseseg.selection.strategies import STRATEGIES

    overrides, sweeps = list(overrides or []), dict(sweeps or {})
    if not strategies or not seeds:
        raise SparsesegError("--strategies and --seeds need at least one value each")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SparsesegError(f"--strategies: {', '.join(unknown)} not known; choose from {', '.join(sorted(STRATEGIES))}")
    for pair in overrides:
        key = pair.split("=", 1)[0].strip()
        if key in RESERVED_KEYS:
            raise SparsesegError(f"--set {pair}: use {RESERVED_KEYS[key]} instead")
    out = Path(os.path.normpath(Path(out).absolute()))
    keys = list(sweeps)
    specs = []
    for values in itertools.product(*(sweeps[k] for k in keys)):
        point: Point = tuple(zip(keys, values, strict=True))
        folder = out / point_dir(point) if point else out
        for seed in seeds:
            for strategy in strategies:
                run_set = (*overrides, *(f"{k}={v}" for k, v in point), f"strategy.name={strategy}", f"seed={seed}",
                           f"out={folder / f'{strategy}_s{seed}'}")
                config = load_config(config_path, list(run_set))
                if "budget_fraction" in sweeps and config.budget is not None:
                    raise SparsesegError(f"--sweep budget_fraction: {config_path} sets budget={config.budget}, "
                                         "which wins over the fraction; add --set budget=null")
                specs.append(RunSpec(strategy, int(seed), point, config, run_set))
    return specs


# ------------------------------------------------------------------------------------- running
@dataclass
class RunOutcome:
    """What happened to one run: 'skipped' (already finished), 'finished', 'failed', or 'missing'
    (not finished, and not run because only a summary was asked for)."""

    spec: RunSpec
    status: str
    message: str = ""
    seconds: float = 0.0


def run_status(spec: RunSpec) -> tuple[str, str]:
    """('complete' | 'partial' | 'new' | 'stale', why): stale is a finished run of another config."""
    if not (spec.out / "rounds.jsonl").exists():
        return ("partial" if (spec.out / "config.yaml").exists() else "new"), ""
    done = len(read_rounds(spec.out))
    if done < spec.config.rounds:
        return "partial", ""
    try:
        same = load_config(spec.out / "config.yaml") == spec.config
    except SparsesegError as exc:
        return "stale", str(exc)
    if not same:
        return "stale", (f"{spec.out}: holds a finished run with a different config; "
                         "move it away or compare into another --out")
    return "complete", ""


def worker_command(spec: RunSpec, config_path: Path) -> list[str]:
    """The `sparseseg run` command line that performs `spec` in a subprocess."""
    command = [sys.executable, "-m", "sparseseg.cli", "run", str(config_path)]
    for pair in spec.overrides:
        command += ["--set", pair]
    return command


def _worker_env() -> dict[str, str]:
    # One thread per run: N runs of many BLAS/OpenMP threads each on the same cores are far slower
    # than N single-threaded runs. The source folder is prepended so the child imports this copy.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    text = lines[-1] if lines else ""
    return text.removeprefix("error: ")[:300]


def _run_in_process(spec: RunSpec, progress: Progress | None) -> str:
    """Run one experiment here; '' on success, else the error (its traceback goes to the log)."""
    from sparseseg.loop.experiment import Experiment

    try:
        Experiment(spec.config, progress=progress).run()
    except Exception as exc:  # noqa: BLE001 - one failing run must not stop the others
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        with spec.log.open("a") as fh:
            fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.name}\n{traceback.format_exc()}")
        text = " ".join(str(exc).split())
        return text if isinstance(exc, SparsesegError) else f"{type(exc).__name__}: {text}"
    return ""


def run_comparison(
    specs: Sequence[RunSpec],
    config_path: Path,
    jobs: int = 1,
    progress: Progress | None = None,
    on_outcome: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every spec that is not finished yet; returns one outcome per spec, in spec order.

    Args:
        specs: from `plan_comparison`.
        config_path: the CONFIG they were planned from (subprocesses load it again).
        jobs: 1 runs in this process (progress of each round reaches `progress`); N > 1 runs N
            `sparseseg run` subprocesses at once, one CPU thread each, output to `<run>.log`.
        progress: `(task, done, total)`; task "runs" counts finished, skipped and failed runs.
        on_outcome: called as each run is skipped, finishes or fails.
    """
    if jobs < 1:
        raise SparsesegError(f"--jobs {jobs}: must be at least 1")
    outcomes: dict[int, RunOutcome] = {}

    def record(i: int, outcome: RunOutcome) -> None:
        outcomes[i] = outcome
        if on_outcome:
            on_outcome(outcome)
        if progress:
            progress("runs", len(outcomes), len(specs))

    todo = []
    for i, spec in enumerate(specs):
        state, why = run_status(spec)
        if state == "complete":
            record(i, RunOutcome(spec, "skipped", "already finished"))
        elif state == "stale":
            record(i, RunOutcome(spec, "failed", why))
        else:
            todo.append(i)
    if jobs == 1:
        for i in todo:
            start = time.perf_counter()
            error = _run_in_process(specs[i], progress)
            record(i, RunOutcome(specs[i], "failed" if error else "finished", error, time.perf_counter() - start))
    else:
        _run_subprocesses(specs, todo, config_path, jobs, record)
    return [outcomes[i] for i in range(len(specs))]


def _run_subprocesses(specs, todo, config_path, jobs, record) -> None:
    pending = list(reversed(todo))
    running: dict[int, tuple[subprocess.Popen, io.TextIOWrapper, float]] = {}
    env = _worker_env()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.pop()
                spec = specs[i]
                spec.log.parent.mkdir(parents=True, exist_ok=True)
                command = worker_command(spec, config_path)
                log = spec.log.open("a")
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
                running[i] = (proc, log, time.perf_counter())
            for i, (proc, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[i]
                spec = specs[i]
                seconds = time.perf_counter() - start
                if proc.returncode == 0:
                    record(i, RunOutcome(spec, "finished", "", seconds))
                else:
                    why = _last_line(spec.log) or f"exit code {proc.returncode}"
                    record(i, RunOutcome(spec, "failed", why, seconds))
            time.sleep(0.05)
    finally:  # interrupted (Ctrl-C): stop the children; their finished rounds are kept
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, log, _ in running.values():
            proc.wait()
            log.close()


# ------------------------------------------------------------------------------------- results
@dataclass
class StrategyResult:
    """Every finished seed of one strategy at one sweep point. mIoU in percent."""

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

    @property
    def final(self) -> list[float]:
        return [c[-1] for c in self.curves]

    @property
    def mean(self) -> float:
        return mean_std(self.final)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.final)[1]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def table1_gain(uc_only: float, coverage_first: float) -> tuple[float, float]:
    """Table 1's gain of coverage first: (points, percent of the single-stage mIoU)."""
    points = coverage_first - uc_only
    return points, 100 * points / uc_only if uc_only else math.nan


def rounds_to_reach(curve: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose mIoU is at least `target`, None if none is."""
    for r, value in enumerate(curve, start=1):
        if value >= target:
            return r
    return None


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


def _run_totals(run: Path) -> int | None:
    try:
        dataset = json.loads((run / "meta.json").read_text())["dataset"]
        return int(dataset["train_images"]) * int(dataset["size"]) ** 2
    except (OSError, KeyError, TypeError, ValueError):
        return None


def collect_results(specs: Sequence[RunSpec]) -> list[StrategyResult]:
    """One StrategyResult per (point, strategy), in plan order, from the finished run directories."""
    results: dict[tuple[Point, str], StrategyResult] = {}
    for spec in specs:
        key = (spec.point, spec.strategy)
        res = results.setdefault(key, StrategyResult(spec.point, spec.strategy, spec.config.rounds,
                                                     expansion=spec.config.expansion))
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
        res.pixels_total = res.pixels_total or _run_totals(spec.out)
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

    def points(self) -> list[Point]:
        return list(dict.fromkeys(r.point for r in self.results))

    def at(self, point: Point) -> dict[str, StrategyResult]:
        return {r.strategy: r for r in self.results if r.point == point and r.seeds}

    def published(self, result: StrategyResult) -> paper.Published | None:
        if self.dataset is None:
            return None
        return paper.final_miou(self.dataset, result.strategy, dict(result.point), result.expansion)

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


def summarize_comparison(
    specs: Sequence[RunSpec], dataset: str | None = None, supervised: Path | None = None
) -> Comparison:
    """Read the finished runs of a plan; `dataset` (a paper key) adds the published figures.

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
        _check_supervised(sup, config, supervised)
    sweep_keys = [k for k, _ in specs[0].point]
    return Comparison(results, sweep_keys, load_meta(config.data).name, dataset, sup,
                      Path(supervised) if supervised is not None else None)


def _paper_dataset(config: ExperimentConfig) -> str:
    """The paper's key for the dataset named in the data's meta.json."""
    from sparseseg.data.dataset import load_meta

    name = load_meta(config.data).name
    try:
        return paper.resolve_dataset(name)
    except SparsesegError:
        raise SparsesegError(f"--paper: {config.data}/meta.json names the dataset {name!r}, for which the paper "
                             f"has no figures; add --dataset with one of {', '.join(paper.DATASETS)}") from None


def _check_supervised(sup: dict, config: ExperimentConfig, path: Path) -> None:
    """The reference must score the same data split with the same backbone."""
    theirs = sup.get("config") or {}
    mine = config.model_dump(mode="json")
    for key in ("data", "eval_split", "backbone.checkpoint"):
        section, _, name = key.rpartition(".")
        a = (theirs.get(section) or {}).get(name) if section else theirs.get(name)
        b = mine[section][name] if section else mine[name]
        if a is not None and a != b:
            raise SparsesegError(f"--supervised {path}: computed with {key}={a}, the comparison uses {b}")


# ------------------------------------------------------------------------------------- rendering
def _pm(mean: float, std: float | None) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _signed(value: float) -> str:
    return "" if math.isnan(value) else f"{value:+.2f}"


def _paper_cell(pub: paper.Published | None) -> str:
    return f"{pub} ({pub.source})" if pub else ""


def _seconds(values: Sequence[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if mean < 100 else f"{mean:.0f}"


def _reach_cells(r: Reach) -> list[str]:
    if r.rounds is None:
        return [f"not reached ({r.reached}/{r.seeds} seeds)", ""]
    pct = f"{r.pixels_pct:.4f}%" if r.pixels_pct is not None else ""
    return [f"{r.rounds:.1f}", pct]


def render_markdown(cmp: Comparison) -> str:
    """summary.md: per sweep point, the Table 2 style table, Table 1 pairs and Table 5 rounds."""
    rounds = sorted({r.rounds for r in cmp.results})
    lines = ["# Strategy comparison", "",
             f"Dataset `{cmp.dataset_name}`, {'/'.join(map(str, rounds))} rounds. mIoU in %: the final round's, "
             "mean ± sample standard deviation (n − 1) over seeds (no std with one seed). `s/run`: mean wall "
             "time of a run's rounds (select + train + evaluate; start-up excluded)."]
    if cmp.dataset:
        lines += ["", f"`paper`: the published figure for {paper.DATASET_TITLES[cmp.dataset]} under the same "
                  "strategy name (table in brackets), which assumes the rest of the config is the paper's."]
    if any(cmp.expanded(p) for p in cmp.points()):
        lines += ["", "Runs with `expansion: sam` expand each click into a SAM region: `labelled` counts clicks "
                  "(the budget), `supervised` the pixels with a label after the last round (clicked pixels "
                  "with a class plus region pixels, mean over seeds); their `paper` figure is Table 9's "
                  "\"w/ SAM\" column."]
    for point in cmp.points():
        here = [r for r in cmp.results if r.point == point]
        lines += ["", f"## {point_dir(point)}"] if point else []
        sup = cmp.expanded(point)
        lines += ["", "| strategy | seeds | labelled |" + (" supervised |" if sup else "") + " final mIoU (%) |"
                  + (" paper |" if cmp.dataset else "") + " s/run |",
                  "| --- | ---: | ---: |" + (" ---: |" if sup else "") + " ---: |" + (" ---: |" if cmp.dataset else "")
                  + " ---: |"]
        for r in here:
            if r.seeds:
                cells = [r.strategy, str(len(r.seeds)), str(r.labelled[0][-1])]
                if sup:
                    cells.append(f"{statistics.fmean(s[-1] for s in r.supervised):.0f}" if r.supervised else "")
                cells.append(_pm(r.mean, r.std))
            else:
                cells = [r.strategy, "0", "", *([""] if sup else []), "no finished run"]
            if cmp.dataset:
                cells.append(_paper_cell(cmp.published(r)))
            cells.append(_seconds(r.seconds))
            lines.append("| " + " | ".join(cells) + " |")
        lines += _pairs_markdown(cmp, point)
        lines += _reach_markdown(cmp, point)
    if cmp.dataset:
        base = "; ".join(f"{name} {_pm(*vals[cmp.dataset])}" for name, vals in paper.TABLE_2_DEEPLAB.items())
        lines += ["", f"The paper's DeepLabV3 baselines (Table 2): {base}."]
    missing = [(r, s) for r in cmp.results for s in r.missing]
    if missing:
        lines += ["", "Runs without a finished result: "
                  + ", ".join(f"{point_dir(r.point) + '/' if r.point else ''}{r.strategy}_s{s}" for r, s in missing)
                  + "."]
    return "\n".join(lines) + "\n"


def _pairs_markdown(cmp: Comparison, point: Point) -> list[str]:
    pairs = cmp.pairs(point)
    if not pairs:
        return []
    with_paper = cmp.dataset is not None and any(paper.table1_pair(cmp.dataset, s) for s, *_ in pairs)
    lines = ["", "Coverage first (Table 1 style): gain = coverage-first − single-stage mean, in points and in "
             "% of the single-stage mean.", "",
             "| uncertainty | pipeline | UC only | coverage → UC | gain (pp) | gain (%) |"
             + (" paper UC only | paper Herding → UC | paper gain (pp) | paper gain (%) |" if with_paper else ""),
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: | ---: |" if with_paper else "")]
    for score, label, single, first in pairs:
        pp, pct = table1_gain(single.mean, first.mean)
        cells = [score, label, _pm(single.mean, single.std), _pm(first.mean, first.std), _signed(pp), _signed(pct)]
        if with_paper:
            at_defaults = label.startswith("Herding") and cmp.at_paper_defaults(point)
            pub = paper.table1_pair(cmp.dataset, score) if at_defaults else None
            cells += [str(pub[0]), str(pub[1]), _signed(pub[2]), _signed(pub[3])] if pub else ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reach_markdown(cmp: Comparison, point: Point) -> list[str]:
    if cmp.supervised is None:
        return []
    full = 100 * cmp.supervised["miou"]
    pub = f"; paper: {paper.FULLY_SUPERVISED[cmp.dataset]:.2f}" if cmp.dataset else ""
    lines = ["", f"Rounds to reach the fully supervised mIoU (Table 5 style): fully supervised {full:.2f}% "
             f"({cmp.supervised.get('pixels', '?')} training pixels, {cmp.supervised_path}{pub}); targets "
             + ", ".join(f"{int(100 * t)}% = {t * full:.2f}" for t in TARGETS)
             + ". Rounds are the mean over seeds of the first round at or above the target; % pixels is the "
             "labelled share of all training pixels then.", "",
             "| strategy | " + " | ".join(f"rounds to {int(100 * t)}% | % pixels at {int(100 * t)}%" for t in TARGETS)
             + " |", "| --- |" + " ---: |" * (2 * len(TARGETS))]
    for r in cmp.at(point).values():
        cells = [r.strategy] + [c for t in TARGETS for c in _reach_cells(reach(r, t * full))]
        lines.append("| " + " | ".join(cells) + " |")
    if cmp.dataset and cmp.at_paper_defaults(point):
        t5 = paper.TABLE_5[cmp.dataset]
        lines += ["", f"Paper (Table 5, {paper.TABLE_5_SCHEDULE}, b = 0.1 N): "
                  + ", ".join(f"{int(100 * t)}% in {t5[t][0]} rounds ({t5[t][1]:.4f}% of pixels)" for t in TARGETS)
                  + "."]
    return lines


CSV_FIELDS = ["strategy", "seeds", "n_seeds", "rounds", "labelled", "miou_mean", "miou_std", "seconds_per_run",
              "uc_only_strategy", "gain_pp", "gain_pct",
              *(f"{name}_{int(100 * t)}" for t in TARGETS for name in ("rounds_to", "pixels_pct_at", "reached")),
              "paper_miou", "paper_std", "paper_source"]


def render_csv(cmp: Comparison) -> str:
    """summary.csv: one row per strategy and sweep point; mIoU in %, empty where not applicable."""
    buf = io.StringIO()
    extra = ["expansion", "supervised_pixels"] if any(cmp.expanded(p) for p in cmp.points()) else []
    writer = csv.DictWriter(buf, fieldnames=[*cmp.sweep_keys, *CSV_FIELDS, *extra], lineterminator="\n")
    writer.writeheader()

    def num(value: float | None, digits: int = 4) -> str:
        return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    for point in cmp.points():
        gains = {first.strategy: (single.strategy, *table1_gain(single.mean, first.mean))
                 for _, _, single, first in cmp.pairs(point)}
        for r in (r for r in cmp.results if r.point == point):
            row = {**dict(point), "strategy": r.strategy, "seeds": " ".join(map(str, r.seeds)),
                   "n_seeds": len(r.seeds), "rounds": r.rounds}
            if r.seeds:
                row.update(labelled=r.labelled[0][-1], miou_mean=num(r.mean), miou_std=num(r.std),
                           seconds_per_run=num(statistics.fmean(r.seconds), 1))
            if r.strategy in gains:
                base, pp, pct = gains[r.strategy]
                row.update(uc_only_strategy=base, gain_pp=num(pp), gain_pct=num(pct))
            if cmp.supervised is not None and r.seeds:
                for t in TARGETS:
                    got = reach(r, t * 100 * cmp.supervised["miou"])
                    row.update({f"rounds_to_{int(100 * t)}": num(got.rounds, 2),
                                f"pixels_pct_at_{int(100 * t)}": num(got.pixels_pct, 6),
                                f"reached_{int(100 * t)}": f"{got.reached}/{got.seeds}"})
            pub = cmp.published(r)
            if pub:
                row.update(paper_miou=num(pub.mean, 2), paper_std=num(pub.std, 2), paper_source=pub.source)
            if extra:
                row["expansion"] = r.expansion
                if r.supervised:
                    row["supervised_pixels"] = num(statistics.fmean(s[-1] for s in r.supervised), 1)
            writer.writerow(row)
    return buf.getvalue()


def plot_curves(cmp: Comparison, path: Path) -> None:
    """curves.png: mIoU per round, one line per strategy with a ±1 std band, one panel per sweep
    point; the paper's final values (round 10) as open markers and its Table 9 curve dashed; the
    fully supervised mIoU and its 80% / 90% as grey lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = cmp.points()
    cols = min(3, len(points))
    rows = math.ceil(len(points) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    names = list(dict.fromkeys(r.strategy for r in cmp.results))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for ax, point in zip(axes.flat, points, strict=False):
        for name, r in cmp.at(point).items():
            xs = list(range(1, r.rounds + 1))
            per_round = [mean_std([c[i] for c in r.curves]) for i in range(r.rounds)]
            mean = [m for m, _ in per_round]
            std = [s or 0.0 for _, s in per_round]
            ax.plot(xs, mean, marker="o", ms=3, color=colours[name], label=f"{name} (n={len(r.seeds)})")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=colours[name], alpha=0.2, lw=0)
            if cmp.dataset:
                curve = paper.round_curve(cmp.dataset, name, dict(point), r.expansion)
                if curve:
                    column = ", w/ SAM" if paper.split_expansion(dict(point), r.expansion)[1] == "sam" else ""
                    ax.plot(range(1, len(curve) + 1), curve, ls="--", lw=1, color=colours[name],
                            label=f"{name}, paper (Table 9{column})")
                pub = cmp.published(r)
                if pub:
                    ax.errorbar([10], [pub.mean], yerr=[pub.std] if pub.std else None, fmt="*", ms=11, mfc="none",
                                color=colours[name], capsize=3, label=f"{name}, paper ({pub.source})")
        if cmp.supervised is not None:
            full = 100 * cmp.supervised["miou"]
            ax.axhline(full, color="0.4", lw=1, label="fully supervised")
            for t in TARGETS:
                ax.axhline(t * full, color="0.6", lw=0.8, ls=":")
        ax.set_title(point_dir(point) or cmp.dataset_name)
        ax.set_xlabel("round")
        ax.set_ylabel("mIoU (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(points):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_summary(cmp: Comparison, out: Path) -> list[Path]:
    """Write summary.md, summary.csv and curves.png into `out` (each atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.md", out / "summary.csv", out / "curves.png"]
    atomic_write_text(paths[0], render_markdown(cmp))
    atomic_write_text(paths[1], render_csv(cmp))
    plot_curves(cmp, paths[2])
    return paths


# ------------------------------------------------------------------------------------- all of it
@dataclass
class CompareResult:
    outcomes: list[RunOutcome]
    comparison: Comparison | None  # None when no run has finished
    files: list[Path]

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def compare(
    config_path: Path,
    strategies: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    overrides: Sequence[str] | None = None,
    sweeps: dict[str, list[str]] | None = None,
    jobs: int = 1,
    paper_figures: bool = False,
    dataset: str | None = None,
    supervised: Path | None = None,
    run: bool = True,
    progress: Progress | None = None,
    on_outcome: Callable[[RunOutcome], None] | None = None,
) -> CompareResult:
    """Plan, run what is not finished (unless `run` is False), then write the summary files.

    Args:
        paper_figures: put the paper's published figures beside ours; the dataset is `dataset`
            when given (which implies it), else the name in the data's meta.json.
        supervised: a supervised.json (or its folder) for the rounds-to-reach table.
        run: False only summarizes what has finished; unfinished runs are 'missing'.

    Failed runs do not stop the others; they are in the result and the summary lists them.
    """
    specs = plan_comparison(config_path, strategies, seeds, out, overrides, sweeps)
    if dataset is not None:
        dataset = paper.resolve_dataset(dataset)
    elif paper_figures:
        dataset = _paper_dataset(specs[0].config)
    if supervised is not None:  # a bad path should fail before hours of runs, not after
        from sparseseg.loop.supervised import read_supervised

        _check_supervised(read_supervised(supervised), specs[0].config, supervised)
    if run:
        outcomes = run_comparison(specs, config_path, jobs, progress, on_outcome)
    else:
        outcomes = []
        for spec in specs:
            state, why = run_status(spec)
            status = {"complete": "skipped", "stale": "failed"}.get(state, "missing")
            outcomes.append(RunOutcome(spec, status, why or f"not finished ({state})"))
    if not any(run_status(s)[0] == "complete" for s in specs):
        return CompareResult(outcomes, None, [])
    cmp = summarize_comparison(specs, dataset, supervised)
    return CompareResult(outcomes, cmp, write_summary(cmp, Path(out)))
