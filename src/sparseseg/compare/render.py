"""summary.md and summary.csv of a comparison: per sweep point, the final mIoU (Table 2 style),
the coverage-first gain (Table 1), the rounds to reach the fully supervised mIoU (Table 5), every
strategy paired seed by seed with the reference, and the final IoU per class."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence

from sparseseg.compare import paper
from sparseseg.compare.plan import Point, point_dir
from sparseseg.compare.results import TARGETS, Comparison, Reach, reach
from sparseseg.compare.stats import PairedDifference, mean_std, table1_gain


# ------------------------------------------------------------------------------------- cells
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


def _diff_cells(d: PairedDifference) -> list[str]:
    interval = f"[{d.low:+.2f}, {d.high:+.2f}]" if d.low is not None and d.high is not None else ""
    return [_signed(d.mean), interval, f"{d.wins}/{d.n}", d.verdict]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# ------------------------------------------------------------------------------------- summary.md
def render_markdown(cmp: Comparison) -> str:
    """summary.md: per sweep point, the Table 2 style table, Table 1 pairs, Table 5 rounds, the
    pairs with the reference and the per-class IoU."""
    rounds = sorted({r.rounds for r in cmp.results})
    splits = cmp.eval_splits()
    where = f", evaluated on the `{'`, `'.join(splits)}` split{'s' if len(splits) > 1 else ''}" if splits else ""
    full = cmp.supervised_miou()
    lines = ["# Strategy comparison", "",
             f"Dataset `{cmp.dataset_name}`{where}, {'/'.join(map(str, rounds))} rounds. mIoU in %: the final round's, "
             "mean ± sample standard deviation (n − 1) over seeds (no std with one seed). `mean over rounds`: the "
             "mean mIoU after rounds 1..R (area under the learning curve / R), mean over seeds. `s/run`: mean wall "
             "time of a run's rounds (select + train + evaluate; start-up excluded)."]
    if full is not None:
        lines += ["", f"`% of supervised`: the final mean mIoU as a share of the fully supervised head's {full:.2f}% "
                  f"({cmp.supervised_path})."]
    if cmp.dataset:
        lines += ["", f"`paper`: the published figure for {paper.DATASET_TITLES[cmp.dataset]} under the same "
                  "strategy name (table in brackets), which assumes the rest of the config is the paper's."]
    if any(cmp.expanded(p) for p in cmp.points()):
        lines += ["", "Runs with expansion (`sam`, `superpixel`) expand each click into a region: `labelled` counts "
                  "clicks (the budget), `supervised` the pixels with a label after the last round (clicked pixels "
                  "with a class plus region pixels, mean over seeds); the `paper` figure of `sam` runs is "
                  "Table 9's \"w/ SAM\" column."]
    for point in cmp.points():
        lines += ["", f"## {point_dir(point)}"] if point else []
        lines += _final_markdown(cmp, point)
        lines += _pairs_markdown(cmp, point)
        lines += _reach_markdown(cmp, point)
        lines += _paired_markdown(cmp, point)
        lines += _classes_markdown(cmp, point)
    if cmp.dataset:
        base = "; ".join(f"{name} {_pm(*vals[cmp.dataset])}" for name, vals in paper.TABLE_2_DEEPLAB.items())
        lines += ["", f"The paper's DeepLabV3 baselines (Table 2): {base}."]
    missing = [(r, s) for r in cmp.results for s in r.missing]
    if missing:
        lines += ["", "Runs without a finished result: "
                  + ", ".join(f"{point_dir(r.point) + '/' if r.point else ''}{r.strategy}_s{s}" for r, s in missing)
                  + "."]
    return "\n".join(lines) + "\n"


def _final_markdown(cmp: Comparison, point: Point) -> list[str]:
    sup, full = cmp.expanded(point), cmp.supervised_miou() is not None
    header = ["strategy", "seeds", "labelled", *(["supervised"] if sup else []), "final mIoU (%)",
              *(["% of supervised"] if full else []), *(["paper"] if cmp.dataset else []), "mean over rounds (%)",
              "s/run"]
    lines = ["", _row(header), "| --- |" + " ---: |" * (len(header) - 1)]
    for r in (r for r in cmp.results if r.point == point):
        if r.seeds:
            cells = [r.strategy, str(len(r.seeds)), str(r.labelled[0][-1])]
            if sup:
                cells.append(f"{statistics.fmean(s[-1] for s in r.supervised):.0f}" if r.supervised else "")
            cells.append(_pm(r.mean, r.std))
            if full:
                pct = cmp.pct_of_supervised(r)
                cells.append(f"{pct:.1f}%" if pct is not None else "")
        else:
            cells = [r.strategy, "0", "", *([""] if sup else []), "no finished run", *([""] if full else [])]
        if cmp.dataset:
            cells.append(_paper_cell(cmp.published(r)))
        cells += [_pm(*mean_std(r.curve_means)) if r.seeds else "", _seconds(r.seconds)]
        lines.append(_row(cells))
    return lines


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
        lines.append(_row(cells))
    return lines


def _reach_markdown(cmp: Comparison, point: Point) -> list[str]:
    full = cmp.supervised_miou()
    if full is None:
        return []
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
        lines.append(_row(cells))
    if cmp.dataset and cmp.at_paper_defaults(point):
        t5 = paper.TABLE_5[cmp.dataset]
        lines += ["", f"Paper (Table 5, {paper.TABLE_5_SCHEDULE}, b = 0.1 N): "
                  + ", ".join(f"{int(100 * t)}% in {t5[t][0]} rounds ({t5[t][1]:.4f}% of pixels)" for t in TARGETS)
                  + "."]
    return lines


def _paired_markdown(cmp: Comparison, point: Point) -> list[str]:
    if cmp.reference is None:
        return []
    paired = cmp.paired(point)
    if not paired:
        return ["", f"Paired with `{cmp.reference}`: no finished run of it here, or no other strategy."]
    level = int(round(100 * paired[0].final.level))
    lines = ["", f"Paired with `{cmp.reference}` (seed s against its seed s): Δ = strategy − {cmp.reference} in points "
             f"of mIoU, mean over the seeds both finished, with a {level}% Student t interval "
             "(mean ± t · s / √n, n − 1 degrees of freedom); wins: seeds where the strategy is above. `above` / "
             "`below`: the interval excludes 0; `within noise`: it holds 0. No interval with one pair.", "",
             f"| strategy | pairs | Δ final (pp) | {level}% interval | wins | verdict | Δ mean over rounds (pp) "
             f"| {level}% interval | wins | verdict |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for p in paired:
        lines.append(_row([p.result.strategy, str(p.final.n), *_diff_cells(p.final), *_diff_cells(p.aulc)]))
    return lines


def _classes_markdown(cmp: Comparison, point: Point) -> list[str]:
    here = cmp.at(point)
    means = {name: r.class_means() for name, r in here.items()}
    classes = list(dict.fromkeys(c for m in means.values() for c in m))
    if not classes:
        return []
    lines = ["", "Final-round IoU (%) per class, mean over the seeds where the class has one (empty: in no seed "
             "was the class in the evaluation split or predicted).", "", _row(["class", *here]),
             "| --- |" + " ---: |" * len(here)]
    for c in classes:
        lines.append(_row([c, *(f"{v:.2f}" if (v := means[name].get(c)) is not None else "" for name in here)]))
    return lines


# ------------------------------------------------------------------------------------- summary.csv
CSV_FIELDS = ["strategy", "seeds", "n_seeds", "rounds", "labelled", "miou_mean", "miou_std", "seconds_per_run",
              "uc_only_strategy", "gain_pp", "gain_pct",
              *(f"{name}_{int(100 * t)}" for t in TARGETS for name in ("rounds_to", "pixels_pct_at", "reached")),
              "paper_miou", "paper_std", "paper_source",
              "eval_split", "aulc_mean", "aulc_std", "pct_of_supervised", "reference", "pairs",
              *(f"{what}_{name}" for what in ("final", "aulc")
                for name in ("diff_mean", "diff_low", "diff_high", "wins", "verdict"))]


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def render_csv(cmp: Comparison) -> str:
    """summary.csv: one row per strategy and sweep point; mIoU in %, empty where not applicable;
    then one `iou_<class>` column per class (final round, mean over seeds)."""
    buf = io.StringIO()
    extra = ["expansion", "supervised_pixels"] if any(cmp.expanded(p) for p in cmp.points()) else []
    classes = list(dict.fromkeys(c for r in cmp.results for c in r.class_means()))
    writer = csv.DictWriter(buf, fieldnames=[*cmp.sweep_keys, *CSV_FIELDS, *extra, *(f"iou_{c}" for c in classes)],
                            lineterminator="\n")
    writer.writeheader()
    for point in cmp.points():
        gains = {first.strategy: (single.strategy, *table1_gain(single.mean, first.mean))
                 for _, _, single, first in cmp.pairs(point)}
        paired = {p.result.strategy: p for p in cmp.paired(point)}
        for r in (r for r in cmp.results if r.point == point):
            row = {**dict(point), "strategy": r.strategy, "seeds": " ".join(map(str, r.seeds)),
                   "n_seeds": len(r.seeds), "rounds": r.rounds, "eval_split": r.eval_split or ""}
            if r.seeds:
                aulc, aulc_std = mean_std(r.curve_means)
                row.update(labelled=r.labelled[0][-1], miou_mean=_num(r.mean), miou_std=_num(r.std),
                           seconds_per_run=_num(statistics.fmean(r.seconds), 1), aulc_mean=_num(aulc),
                           aulc_std=_num(aulc_std), pct_of_supervised=_num(cmp.pct_of_supervised(r), 2))
                row.update({f"iou_{c}": _num(v) for c, v in r.class_means().items()})
            if r.strategy in gains:
                base, pp, pct = gains[r.strategy]
                row.update(uc_only_strategy=base, gain_pp=_num(pp), gain_pct=_num(pct))
            if cmp.supervised is not None and r.seeds:
                for t in TARGETS:
                    got = reach(r, t * cmp.supervised_miou())
                    row.update({f"rounds_to_{int(100 * t)}": _num(got.rounds, 2),
                                f"pixels_pct_at_{int(100 * t)}": _num(got.pixels_pct, 6),
                                f"reached_{int(100 * t)}": f"{got.reached}/{got.seeds}"})
            pub = cmp.published(r)
            if pub:
                row.update(paper_miou=_num(pub.mean, 2), paper_std=_num(pub.std, 2), paper_source=pub.source)
            if r.strategy in paired:
                p = paired[r.strategy]
                row.update(reference=cmp.reference, pairs=p.final.n)
                for what, d in (("final", p.final), ("aulc", p.aulc)):
                    row.update({f"{what}_diff_mean": _num(d.mean), f"{what}_diff_low": _num(d.low),
                                f"{what}_diff_high": _num(d.high), f"{what}_wins": d.wins,
                                f"{what}_verdict": d.verdict})
            if extra:
                row["expansion"] = r.expansion
                if r.supervised:
                    row["supervised_pixels"] = _num(statistics.fmean(s[-1] for s in r.supervised), 1)
            writer.writerow(row)
    return buf.getvalue()
