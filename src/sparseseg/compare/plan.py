"""Planning a comparison: every (sweep point, seed, strategy) run, configured and validated before
anything runs, so a misspelt name or key costs nothing."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sparseseg.config import ExperimentConfig, load_config
from sparseseg.errors import SparsesegError

Point = tuple[tuple[str, str], ...]  # swept (key, value) pairs of one grid point; () without a sweep

# Options of their own; a --set or --sweep of these would fight them.
RESERVED_KEYS = {"strategy.name": "--strategies", "seed": "--seeds", "out": "--out"}
DEFAULT_REFERENCE = "random"  # the baseline every strategy is paired with, when it is compared


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


def resolve_reference(strategies: Sequence[str], reference: str | None) -> str | None:
    """The strategy every other one is paired with, seed by seed.

    Args:
        strategies: the compared strategies.
        reference: the one asked for; None picks `random` when it is compared, else no reference.

    Raises:
        SparsesegError: `reference` is given but not among `strategies`.
    """
    if reference is None:
        return DEFAULT_REFERENCE if DEFAULT_REFERENCE in strategies else None
    if reference not in strategies:
        raise SparsesegError(f"--reference {reference}: not among --strategies ({', '.join(strategies)}); "
                             "add it there or choose one of them")
    return reference


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
