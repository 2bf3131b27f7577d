"""curves.png of a comparison: mIoU per round (Figure 2 style), one panel per sweep point."""

from __future__ import annotations

import math
from pathlib import Path

from sparseseg.compare import paper
from sparseseg.compare.plan import point_dir
from sparseseg.compare.results import TARGETS, Comparison
from sparseseg.compare.stats import mean_std
from sparseseg.io import atomic_write


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
        full = cmp.supervised_miou()
        if full is not None:
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
