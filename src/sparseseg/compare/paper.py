"""The paper's published figures, as data, keyed by dataset and by sparseseg strategy names.

Kim et al., *Diffusion-Driven Two-Stage Active Learning for Low-Budget Semantic Segmentation*.
All mIoUs are in percent, after 10 rounds at b = 0.1 N unless a table says otherwise; (mean, std)
pairs are mean ± std over three runs as printed, a bare float had no std in the paper. Every
table's comment says where it comes from, so a number here can be checked against the paper.

`sparseseg compare --paper` prints these beside our results (`final_miou`, `table1_pair`) and
draws them on the curves (`round_curve`). The paper's columns assume the rest of the config is
the paper's (256x256, ImageNet/LSUN ADM, t = 50/150/250, blocks 5/8/12/17, K = 50, M = 0.5 M0);
only a swept budget, K or M is matched against the paper's sensitivity figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sparseseg.errors import SparsesegError

DATASETS = ("camvid", "ade_bed", "cityscapes", "pascal_context")
DATASET_TITLES = {"camvid": "CamVid", "ade_bed": "ADE-Bed", "cityscapes": "Cityscapes",
                  "pascal_context": "Pascal-Context"}
_ALIASES = {"adebed": "ade_bed", "ade_bedroom": "ade_bed", "pascal": "pascal_context", "pascal_c": "pascal_context",
            "pascalcontext": "pascal_context", "pascal_voc": "pascal_context"}


@dataclass(frozen=True)
class Published:
    """One published mIoU (%) and where it is printed."""

    mean: float
    std: float | None
    source: str

    def __str__(self) -> str:
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")


def _by_dataset(*cells, order: tuple[str, ...] = DATASETS) -> dict:
    return dict(zip(order, cells, strict=True))


# Table 2: mIoU (%) after 10 rounds at b = 0.1 N, mean ± std over 3 runs, DDPM backbone.
TABLE_2: dict[str, dict[str, tuple[float, float]]] = {
    "random": _by_dataset((25.91, 1.23), (17.83, 0.62), (27.13, 1.38), (41.70, 2.08)),
    "entropy": _by_dataset((25.26, 0.36), (23.02, 1.64), (28.62, 1.05), (42.09, 1.99)),
    "margin": _by_dataset((31.27, 1.10), (30.03, 0.37), (32.23, 1.21), (45.11, 2.45)),
    "balentacq": _by_dataset((19.37, 1.10), (17.48, 1.36), (24.04, 2.07), (33.06, 4.18)),
    "edald": _by_dataset((25.14, 0.57), (23.06, 1.29), (29.44, 1.38), (43.05, 0.12)),
    "two_stage_edald": _by_dataset((36.12, 0.24), (31.12, 0.20), (33.34, 0.78), (47.98, 0.41)),
}
# Table 2, DeepLabV3 rows: the published baselines (not strategies of ours; another backbone).
TABLE_2_DEEPLAB: dict[str, dict[str, tuple[float, float]]] = {
    "PixelPick": _by_dataset((29.93, 0.12), (8.35, 0.41), (26.82, 0.14), (26.28, 0.09)),
    "Didari et al.": _by_dataset((22.47, 0.10), (8.66, 0.53), (19.85, 0.07), (28.15, 0.11)),
}

# Table 1 (CamVid only): "UC only" (single stage over every unlabelled pixel) against
# "Herding -> UC" (two_stage_<score>), mean ± std over 3 runs; then the printed gain (pp, %).
TABLE_1_CAMVID: dict[str, tuple[tuple[float, float], tuple[float, float], float, float]] = {
    "entropy": ((25.26, 0.36), (30.77, 0.44), 5.51, 21.81),
    "margin": ((31.27, 1.10), (32.77, 0.75), 1.50, 4.80),
    "bald": ((24.59, 0.97), (22.79, 0.89), -1.80, -7.32),
    "dald": ((23.81, 3.60), (21.05, 1.05), -2.76, -11.59),
    "power_bald": ((30.03, 0.76), (31.57, 0.79), 1.54, 5.13),
    "power_dald": ((31.30, 1.22), (32.00, 0.66), 0.70, 2.24),
    "ebald": ((25.96, 1.92), (32.12, 0.40), 6.16, 23.73),
    "edald": ((25.14, 0.57), (36.12, 0.24), 10.98, 43.68),
}

# Table 8: final-round mIoU of coverage methods, no std. The paper's columns are ADE-Bed, CamVid,
# Cityscapes, Pascal-C (another order than Table 2). DDPM rows are one- and two-stage with eDALD;
# DeepLabV3 rows (another backbone) two-stage with eBALD.
_T8 = ("ade_bed", "camvid", "cityscapes", "pascal_context")
TABLE_8: dict[str, dict[str, dict[str, float]]] = {
    "ddpm": {
        "coreset": _by_dataset(18.49, 16.19, 22.74, 23.27, order=_T8),
        "max_herding": _by_dataset(24.06, 31.83, 25.80, 52.04, order=_T8),
        "coreset_edald": _by_dataset(26.70, 32.95, 32.20, 44.58, order=_T8),
        "two_stage_edald": _by_dataset(31.12, 36.12, 33.34, 47.98, order=_T8),
    },
    "deeplabv3": {
        "coreset": _by_dataset(9.21, 26.49, 30.42, 25.83, order=_T8),
        "max_herding": _by_dataset(9.64, 28.78, 31.05, 28.12, order=_T8),
        "coreset_ebald": _by_dataset(9.53, 26.50, 30.48, 26.70, order=_T8),
        "two_stage_ebald": _by_dataset(9.70, 29.24, 31.45, 28.50, order=_T8),
    },
}

# Table 6: two-stage methods with three backbones (DDPM: eDALD; DeepLabV3 and ViT: eBALD).
TABLE_6: dict[str, dict[str, float]] = {
    "deeplabv3": _by_dataset(29.48, 9.75, 31.64, 28.52),
    "vit": _by_dataset(31.48, 10.80, 32.27, 31.98),
    "ddpm": _by_dataset(36.12, 31.12, 33.34, 47.98),
}
# Table 7: ViT backbone only.
TABLE_7_VIT: dict[str, dict[str, float]] = {
    "margin": _by_dataset(29.52, 9.51, 27.36, 29.43),
    "balentacq": _by_dataset(24.67, 9.81, 21.05, 30.53),
    "two_stage_ebald": _by_dataset(31.48, 10.80, 32.27, 31.98),
}

# Table 9, "w/o SAM" rows: two-stage eDALD mIoU after each of rounds 1..10 (b = 0.1 N).
TABLE_9_CURVES: dict[str, list[float]] = {
    "camvid": [17.90, 18.63, 24.52, 27.00, 28.40, 27.40, 29.50, 32.90, 34.60, 36.10],
    "ade_bed": [12.70, 15.40, 18.70, 22.60, 25.30, 27.10, 28.20, 28.50, 30.20, 31.20],
    "cityscapes": [20.40, 24.20, 26.57, 29.06, 30.01, 30.40, 31.00, 31.80, 31.90, 33.34],
    "pascal_context": [25.80, 29.75, 36.61, 39.89, 41.42, 43.43, 44.33, 45.98, 46.24, 47.44],
}

# Table 9, "w/ SAM" rows: the same, with each click expanded into a SAM region (appendix C.6; strict
# click parity, one positive point per selected pixel): `expansion: sam` runs.
TABLE_9_SAM_CURVES: dict[str, list[float]] = {
    "camvid": [20.51, 28.68, 32.03, 28.74, 31.93, 34.78, 37.75, 36.74, 39.56, 41.34],
    "ade_bed": [14.00, 16.37, 19.94, 24.13, 29.11, 29.58, 30.34, 31.49, 32.43, 31.68],
    "cityscapes": [20.31, 25.85, 27.20, 26.37, 26.55, 27.20, 28.05, 29.83, 33.89, 34.02],
    "pascal_context": [30.42, 38.98, 40.45, 41.90, 42.33, 43.22, 43.48, 44.53, 46.87, 47.71],
}
EXPANSIONS = ("none", "sam")

# Sec. 4.3: fully supervised mIoU of the same head and backbone.
FULLY_SUPERVISED: dict[str, float] = _by_dataset(52.22, 45.58, 43.04, 60.68)

# Table 5: rounds and labelled-pixel fraction (% of all training pixels) to reach 80% / 90% of the
# fully supervised mIoU at b = 0.1 N, for two-stage eDALD in rounds 1-10 then Margin.
TABLE_5: dict[str, dict[float, tuple[int, float]]] = {
    "camvid": {0.8: (19, 0.0031), 0.9: (32, 0.0050)},
    "ade_bed": {0.8: (27, 0.0043), 0.9: (47, 0.0073)},
    "cityscapes": {0.8: (12, 0.0020), 0.9: (28, 0.0044)},
    "pascal_context": {0.8: (11, 0.0018), 0.9: (21, 0.0034)},
}
TABLE_5_SCHEDULE = "two-stage eDALD in rounds 1-10, then Margin"

# Figure 5 (CamVid, two-stage eDALD, 10 rounds), the two settings the text of C.1 gives:
# (K per image, M / M0) -> mIoU. The text calls K = 100 the default; Table 3 and Sec. 4.2 say 50.
FIGURE_5_CAMVID: dict[tuple[int, float], float] = {(100, 0.5): 36.12, (20, 0.4): 38.70}
# Figure 6 (CamVid, two-stage eDALD, round 10) by budget fraction b / N, as the text of C.2 gives them.
FIGURE_6_CAMVID: dict[float, float] = {0.1: 35.7, 0.2: 40.3, 0.5: 43.1, 1.0: 48.9}

SWEEP_KEYS_WITH_FIGURES = ("budget_fraction", "strategy.k_per_image", "strategy.pool_ratio")


def resolve_dataset(name: str) -> str:
    """The paper's key for a dataset name ('CamVid', 'ade-bed' ...), or an error listing the keys."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise SparsesegError(f"dataset {name!r} has no published figures; choose one of {', '.join(DATASETS)}")
    return key


def _close(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9


def _number(point: Mapping[str, str], key: str) -> float | None:
    try:
        return float(point[key])
    except (KeyError, ValueError):
        return None


def split_expansion(point: Mapping[str, str], expansion: str) -> tuple[dict[str, str], str]:
    """A swept `expansion` is not a departure from the tables: it picks Table 9's column."""
    point = dict(point)
    return point, point.pop("expansion", expansion)


def at_defaults(point: Mapping[str, str]) -> bool:
    """True when the swept settings are the paper's tables' settings (b = 0.1 N)."""
    for key in point:
        if key == "expansion" and point[key] == "none":
            continue
        value = _number(point, key)
        if key != "budget_fraction" or value is None or not _close(value, 0.1):
            return False
    return True


def final_miou(dataset: str, strategy: str, point: Mapping[str, str] | None = None,
               expansion: str = "none") -> Published | None:
    """The paper's final-round mIoU for a strategy on a dataset, or None when it published none.

    Args:
        dataset: a key of DATASETS.
        strategy: a sparseseg strategy name.
        point: swept settings ({"budget_fraction": "0.2"}, ...); None or {} for the defaults.
        expansion: the runs' `expansion` ("sam": Table 9's "w/ SAM" column); a swept `expansion`
            in `point` wins.

    Tables 2, 1 and 8 are tried in that order (Table 2 has stds for most names); a swept budget
    uses Figure 6, a swept (K, M) Figure 5, for two-stage eDALD on CamVid. With SAM expansion only
    Table 9 has figures (two-stage eDALD at the defaults).
    """
    point, expansion = split_expansion(point or {}, expansion)
    if expansion != "none":
        if expansion == "sam" and strategy == "two_stage_edald" and at_defaults(point):
            return Published(TABLE_9_SAM_CURVES[dataset][-1], None, "Table 9, w/ SAM")
        return None
    if strategy == "two_stage_edald" and dataset == "camvid":
        if set(point) == {"budget_fraction"}:
            value = FIGURE_6_CAMVID.get(_number(point, "budget_fraction"))
            return Published(value, None, "Fig. 6") if value is not None else None
        if set(point) == {"strategy.k_per_image", "strategy.pool_ratio"}:
            k, ratio = _number(point, "strategy.k_per_image"), _number(point, "strategy.pool_ratio")
            for (pk, pr), value in FIGURE_5_CAMVID.items():
                if k is not None and ratio is not None and _close(k, pk) and _close(ratio, pr):
                    return Published(value, None, "Fig. 5")
            return None
    if not at_defaults(point):
        return None
    if strategy in TABLE_2:
        mean, std = TABLE_2[strategy][dataset]
        return Published(mean, std, "Table 2")
    if dataset == "camvid":
        for score, (uc, two, _, _) in TABLE_1_CAMVID.items():
            if strategy in (score, f"two_stage_{score}"):
                mean, std = uc if strategy == score else two
                return Published(mean, std, "Table 1")
    if strategy in TABLE_8["ddpm"]:
        return Published(TABLE_8["ddpm"][strategy][dataset], None, "Table 8")
    return None


def table1_pair(dataset: str, score: str) -> tuple[Published, Published, float, float] | None:
    """Table 1's (UC only, Herding -> UC, gain pp, gain %) for an uncertainty score; CamVid only."""
    if dataset != "camvid" or score not in TABLE_1_CAMVID:
        return None
    (um, us), (tm, ts), pp, pct = TABLE_1_CAMVID[score]
    return Published(um, us, "Table 1"), Published(tm, ts, "Table 1"), pp, pct


def round_curve(dataset: str, strategy: str, point: Mapping[str, str] | None = None,
                expansion: str = "none") -> list[float] | None:
    """The paper's mIoU after each round (Table 9: w/o SAM, or w/ SAM for `expansion="sam"`) for
    two-stage eDALD at the defaults."""
    point, expansion = split_expansion(point or {}, expansion)
    if strategy != "two_stage_edald" or not at_defaults(point):
        return None
    curves = {"none": TABLE_9_CURVES, "sam": TABLE_9_SAM_CURVES}.get(expansion, {})
    return curves.get(dataset)
