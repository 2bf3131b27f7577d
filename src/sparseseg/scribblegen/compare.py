"""`sparseseg scribblegen compare`: every augmentation scheme, several seeds, one table.

A comparison directory holds `config.yaml` (the experiment config, seed aside), `results.jsonl`
(one record per seed and arm, appended as each seed finishes, so an interrupted comparison
resumes at the first unfinished seed) and `summary.md` (mIoU mean ± sample std over seeds per
arm, and the gain over real scribbles only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from sparseseg.compare import mean_std
from sparseseg.config import ExperimentConfig
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write_text, read_jsonl
from sparseseg.scribblegen.augment import SchemeSpec, evaluate_schemes, standard_schemes

RESULTS = "results.jsonl"
SUMMARY = "summary.md"


def _settings(config: ExperimentConfig, scribbles: Path, synthetic: Sequence[Path], p: float,
              pixels_per_image: int) -> dict:
    """What must not change between a comparison's seeds (checked when resuming)."""
    cfg = config.model_dump(mode="json")
    cfg.pop("seed", None)
    cfg.pop("out", None)
    return {"config": cfg, "scribbles": str(scribbles), "synthetic": [str(s) for s in synthetic], "p": p,
            "pixels_per_image": pixels_per_image}


def read_results(out: Path) -> list[dict]:
    """The records of `out/results.jsonl` ([] when absent); a torn last line is dropped."""
    return read_jsonl(Path(out) / RESULTS)[0]


def summarize_schemes(records: Sequence[dict]) -> str:
    """Markdown: per arm, mIoU (%) mean ± std over seeds, gain over real only, per-seed values; then
    the real-only head's scribble agreement per version of the images."""
    arms: dict[str, list[dict]] = {}
    for r in records:
        arms.setdefault(r["label"], []).append(r)
    base = mean_std([r["miou"] for r in arms.get("real only", [])])[0]
    lines = ["| scheme | synthetic | mIoU (%) | gain (points) | per seed |", "| --- | --- | --- | --- | --- |"]
    for label, rows in arms.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        mean, std = mean_std([r["miou"] for r in rows])
        cell = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
        gain = "" if label == "real only" or base != base else f"{100 * (mean - base):+.2f}"
        names = ", ".join(Path(s).name for s in rows[0]["synthetic"]) or "-"
        per_seed = ", ".join(f"{100 * r['miou']:.2f} (s{r['seed']})" for r in rows)
        lines.append(f"| {label} | {names} | {cell} | {gain} | {per_seed} |")
    agreement = [r["scribble_agreement"] for r in arms.get("real only", []) if r.get("scribble_agreement")]
    if agreement:
        versions = list(agreement[0])
        lines += ["", "Scribble agreement: the share of scribbled pixels that the head trained on real scribbles "
                  "only labels with the scribble's class, in each version of the training images (mean over "
                  "seeds, %). On the synthetic twins it measures how far the generator kept the classes its "
                  "scribbles asked for.", "", "| " + " | ".join(versions) + " |",
                  "| " + " | ".join("---:" for _ in versions) + " |",
                  "| " + " | ".join(f"{100 * mean_std([a[v] for a in agreement])[0]:.1f}" for v in versions) + " |"]
    return "\n".join(lines) + "\n"


def compare_schemes(
    config: ExperimentConfig,
    scribbles: str | Path,
    synthetic: Sequence[str | Path],
    seeds: Sequence[int],
    out: str | Path,
    p: float = 0.5,
    pixels_per_image: int = 64,
    ignore_id: int = 255,
    arms: Sequence[SchemeSpec] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Runs `evaluate_schemes` for every seed (features shared across arms), writes the table.

    Args:
        synthetic: synthetic datasets, from realistic to diverse (low to high lambda).
        arms: default `standard_schemes` of the datasets' folder names.

    Returns:
        The summary path.

    Raises:
        SparsesegError: `out` holds a comparison with other settings, or `evaluate_schemes` fails.
    """
    out, scribbles, synthetic = Path(out), Path(scribbles), [Path(s) for s in synthetic]
    if not seeds:
        raise SparsesegError("no seeds to run")
    arms = list(arms) if arms is not None else standard_schemes([s.name for s in synthetic], config.head.epochs, p)
    settings = _settings(config, scribbles, synthetic, p, pixels_per_image)
    settings_path = out / "config.yaml"
    if settings_path.exists():
        if yaml.safe_load(settings_path.read_text()) != settings:
            raise SparsesegError(f"{settings_path}: this folder holds a comparison with other settings; "
                                 "choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(settings_path, yaml.safe_dump(settings, sort_keys=False))
    records = read_results(out)
    done = {r["seed"] for r in records if r.get("arms") == len(arms)}
    # keep only whole seeds: a torn seed is run again
    records = [r for r in records if r["seed"] in done]
    for seed in seeds:
        if seed in done:
            log(f"seed {seed}: already finished")
            continue
        results = evaluate_schemes(config.model_copy(update={"seed": seed}), scribbles, synthetic, arms,
                                   pixels_per_image, ignore_id, progress=progress)
        for r in results:
            r["arms"] = len(arms)
        records += results
        atomic_write_text(out / RESULTS, "".join(json.dumps(r) + "\n" for r in records))
        log(f"seed {seed}: " + ", ".join(f"{r['label']} {100 * r['miou']:.2f}" for r in results))
    summary = out / SUMMARY
    atomic_write_text(summary, summarize_schemes(records))
    return summary
