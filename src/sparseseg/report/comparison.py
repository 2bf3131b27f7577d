"""The report of a comparison folder (`sparseseg compare`): its run directories are found on disk,
read by `sparseseg.compare` (whose tables, paired differences included, are shown as compare
writes them: nothing is recomputed here), plus the curves, the class mix of every strategy's picks,
the time per phase and each strategy's last preview."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from PIL import Image

from sparseseg.compare import mean_std, render_markdown, resolve_reference, summarize, summarize_comparison
from sparseseg.compare.plan import Point, RunSpec, point_dir
from sparseseg.config import load_config
from sparseseg.errors import SparsesegError
from sparseseg.loop.rundir import ROUNDS_FILE, round_file
from sparseseg.report.charts import SERIES_COLOURS, Chart, Series, line_chart
from sparseseg.report.page import Page, esc, img, legend, markdown_html, table
from sparseseg.report.previews import marker_legend


def _point(name: str) -> Point:
    """'budget_fraction=0.2,seed_x=1' -> (('budget_fraction', '0.2'), ('seed_x', '1'))."""
    return tuple(tuple(part.split("=", 1)) for part in name.split(","))  # type: ignore[return-value]


def find_runs(folder: Path) -> list[RunSpec]:
    """Every run directory of a comparison folder: DIR/<run>/ and DIR/<key=value>/<run>/.

    Raises:
        SparsesegError: a run directory whose config says it lives elsewhere (a moved folder).
    """
    folder = Path(folder)
    candidates = [(p.parent, ()) for p in sorted(folder.glob(f"*/{ROUNDS_FILE}"))]
    candidates += [(p.parent, _point(p.parent.parent.name)) for p in sorted(folder.glob(f"*=*/*/{ROUNDS_FILE}"))]
    specs = []
    for run_dir, point in candidates:
        if not (run_dir / "config.yaml").exists():
            continue
        config = load_config(run_dir / "config.yaml")
        if Path(config.out).resolve() != run_dir.resolve():
            raise SparsesegError(f"{run_dir / 'config.yaml'}: says out={config.out}; the comparison was moved: report "
                                 "it where it was made, or run `sparseseg compare` again into the new folder")
        specs.append(RunSpec(config.strategy.name, config.seed, point, config, ()))
    order = {s: i for i, s in enumerate(dict.fromkeys(s.strategy for s in specs))}
    return sorted(specs, key=lambda s: (s.point, s.seed, order[s.strategy]))


def is_comparison(folder: Path) -> bool:
    return bool(list(Path(folder).glob(f"*/{ROUNDS_FILE}")) or list(Path(folder).glob(f"*=*/*/{ROUNDS_FILE}")))


def comparison_page(folder: Path, reference: str | None = None) -> Page:
    """The report of a comparison folder; `reference` as `sparseseg compare --reference` (default random)."""
    from sparseseg.data.dataset import load_meta

    folder = Path(folder)
    specs = find_runs(folder)
    if not specs:
        raise SparsesegError(f"{folder}: no run directory inside; is it a comparison folder?")
    strategies = list(dict.fromkeys(s.strategy for s in specs))
    cmp = summarize_comparison(specs, reference=resolve_reference(strategies, reference))
    meta = load_meta(specs[0].config.data)
    seeds = sorted({s.seed for s in specs})
    page = Page(f"Comparison {folder.name}", f"{meta.name}: {', '.join(strategies)}; seeds {', '.join(map(str, seeds))}"
                f"; {len(specs)} run directories; {folder.resolve()}")
    colours = {name: SERIES_COLOURS[i % len(SERIES_COLOURS)] for i, name in enumerate(strategies)}
    charts = []
    for point in cmp.points():
        series = []
        for name, r in cmp.at(point).items():
            per_round = [mean_std([c[i] for c in r.curves]) for i in range(min(len(c) for c in r.curves))]
            series.append(Series(f"{name} (n={len(r.seeds)})", list(range(1, len(per_round) + 1)),
                                 [m for m, _ in per_round], colours[name], band=[s for _, s in per_round]))
        charts.append(line_chart(Chart(f"mIoU, mean ± std over seeds{' — ' + point_dir(point) if point else ''}",
                                       "round", "mIoU (%)", series)))
    page.add("Learning curves", f'<div class="charts">{"".join(charts)}</div>')
    page.add("Tables (as sparseseg compare writes them)", markdown_html(render_markdown(cmp)))
    page.add("Class mix of the picks", _class_mix(specs, list(meta.classes), meta.palette))
    page.add("Per round and time per phase (sparseseg summarize)", markdown_html(summarize([s.out for s in specs])))
    page.add("Previews", _previews(specs, meta))
    return page


def _class_mix(specs: list[RunSpec], classes: list[str], palette) -> str:
    """Share (%) of each strategy's picks per class, all seeds and rounds together (void included)."""
    counts: dict[str, Counter] = {}
    for s in specs:
        labels = s.out / "labels.csv"
        if labels.exists():
            with labels.open(newline="") as fh:
                counts.setdefault(s.strategy, Counter()).update(row["class"] for row in csv.DictReader(fh))
    names = [*classes, "void"]
    rows = []
    for strategy, c in counts.items():
        total = sum(c.values()) or 1
        rows.append([strategy, sum(c.values()), *(100 * c[n] / total for n in names)])
    headers = ["strategy", "picks", *(f"{n} (%)" for n in names)]
    return legend(classes, palette) + table(headers, rows)


def _previews(specs: list[RunSpec], meta) -> str:
    """Each strategy's last preview (`previews/round_XX.png`) of its first seed, as the run drew it."""
    cards, seen = [], set()
    for s in specs:
        if s.strategy in seen:
            continue
        rounds = len((s.out / ROUNDS_FILE).read_text().splitlines())
        path = s.out / round_file("previews", rounds, "png")
        if path.exists():
            seen.add(s.strategy)
            with Image.open(path) as picture:
                cards.append(f'<div class="card"><div><span class="tag">{esc(s.strategy)}</span> seed {s.seed}, '
                             f'round {rounds}: training images</div>{img(picture.convert("RGB"), path.name)}</div>')
    if not cards:
        return '<p class="note">No previews: the runs were made with preview_images: 0.</p>'
    key = legend(meta.classes, meta.palette, marker_legend()[:3])
    note = ('<p class="note">Columns: picks (this round\'s ringed in white, earlier grey, void black), the head\'s '
            "prediction, the ground truth.</p>")
    return key + note + f'<div class="cards">{"".join(cards)}</div>'
