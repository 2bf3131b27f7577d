"""The comparison harness: layout, resume, summary arithmetic, sweeps, the supervised reference,
failures, and the published figures, on tiny runs of a random ADM over synthetic scenes."""

import csv
import json
import statistics

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sparseseg.cli import app
from sparseseg.compare import (
    Comparison,
    StrategyResult,
    compare,
    curve_mean,
    paired_difference,
    paper,
    parse_sweeps,
    plan_comparison,
    reach,
    render_markdown,
    rounds_to_reach,
    t_quantile,
    table1_gain,
)
from sparseseg.compare.results import check_supervised
from sparseseg.config import dump_config, load_config
from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.labels import IGNORE
from sparseseg.loop.supervised import read_supervised, sample_dense_pixels, train_supervised
from tests.conftest import save_tiny_adm

runner = CliRunner()
SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config file over 6 + 2 synthetic images and a random 32-channel ADM: a run takes ~2 s."""
    root = tmp_path_factory.mktemp("compare")
    make_synthetic(root / "data", n_train=6, n_test=2, size=SIZE, seed=0)
    save_tiny_adm(root / "adm.pt", SIZE)
    config = root / "tiny.yaml"
    config.write_text("data: data\nbackbone: {checkpoint: adm.pt}\nrounds: 2\nbudget: 2\npreview_images: 0\n"
                      "strategy: {candidates_per_image: 48, k_per_image: 5, noise_samples: 2}\n"
                      "head: {epochs: 20}\n")
    return root, config


@pytest.fixture(scope="module")
def compared(setup):
    """random and max_herding, seeds 0 and 1, in this process."""
    root, config = setup
    out = root / "cmp"
    return out, compare(config, ["random", "max_herding"], [0, 1], out)


def _rounds(path):
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


def test_every_strategy_and_seed_is_a_run_directory_and_a_rerun_skips_them(setup, compared):
    root, config = setup
    out, result = compared
    names = ["random_s0", "max_herding_s0", "random_s1", "max_herding_s1"]  # seeds vary slowest
    assert [o.spec.name for o in result.outcomes] == names
    assert {o.status for o in result.outcomes} == {"finished"}
    for name in names:
        assert [r["round"] for r in _rounds(out / name)] == [1, 2]
    assert [p.name for p in result.files] == ["summary.md", "summary.csv", "curves.png"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    before = {n: (out / n / "rounds.jsonl").stat().st_mtime_ns for n in names}
    again = compare(config, ["random", "max_herding"], [0, 1], out)
    assert {o.status for o in again.outcomes} == {"skipped"}
    assert before == {n: (out / n / "rounds.jsonl").stat().st_mtime_ns for n in names}

    # a run cut after round 1 resumes, and ends as it did uninterrupted
    whole = (out / "random_s1" / "rounds.jsonl").read_text()
    (out / "random_s1" / "rounds.jsonl").write_text(whole.splitlines(keepends=True)[0])
    resumed = compare(config, ["random", "max_herding"], [0, 1], out)
    assert [o.status for o in resumed.outcomes] == ["skipped", "skipped", "finished", "skipped"]
    assert [r["labelled"] for r in _rounds(out / "random_s1")] == [2, 4]
    assert [r["miou"] for r in _rounds(out / "random_s1")] == [json.loads(line)["miou"] for line in whole.splitlines()]


def test_summary_is_the_mean_and_sample_std_of_the_final_rounds(compared):
    out, _ = compared
    rows = {r["strategy"]: r for r in csv.DictReader((out / "summary.csv").open())}
    md = (out / "summary.md").read_text()
    for strategy in ("random", "max_herding"):
        finals = [100 * _rounds(out / f"{strategy}_s{s}")[-1]["miou"] for s in (0, 1)]
        mean, std = np.mean(finals), np.std(finals, ddof=1)
        seconds = np.mean([sum(p["seconds"] for r in _rounds(out / f"{strategy}_s{s}") for p in r["phases"].values())
                           for s in (0, 1)])
        row = rows[strategy]
        assert float(row["miou_mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(row["miou_std"]) == pytest.approx(std, abs=1e-4)
        assert float(row["seconds_per_run"]) == pytest.approx(seconds, abs=0.06)
        assert (row["n_seeds"], row["seeds"], row["labelled"]) == ("2", "0 1", "4")
        assert f"| {strategy} | 2 | 4 | {mean:.2f} ± {std:.2f} |" in md


def test_table1_gain_reproduces_the_papers_printed_gains():
    assert table1_gain(20.0, 25.0) == (5.0, 25.0)  # +5 points = +25% of 20
    for score, ((uc, _), (two, _), pp, pct) in paper.TABLE_1_CAMVID.items():
        got_pp, got_pct = table1_gain(uc, two)
        assert round(got_pp, 2) == pytest.approx(pp), score
        assert round(got_pct, 2) == pytest.approx(pct, abs=0.011), score


def _result(strategy, curves, labelled=None, point=()):
    labelled = labelled or [[2 * (i + 1) for i in range(len(curves[0]))]] * len(curves)
    return StrategyResult(point, strategy, len(curves[0]), seeds=list(range(len(curves))), curves=curves,
                          labelled=labelled, seconds=[1.0] * len(curves), pixels_total=800)


def test_coverage_first_pairs_are_found_by_name_and_rendered_with_the_paper():
    results = [_result("edald", [[10, 20], [10, 20]]), _result("two_stage_edald", [[20, 25], [20, 25]]),
               _result("coreset_edald", [[20, 15], [20, 15]]), _result("random", [[5, 30]])]
    cmp = Comparison(results, [], "camvid", dataset="camvid")
    assert [(s, label, a.strategy, b.strategy) for s, label, a, b in cmp.pairs(())] == [
        ("edald", "Herding → UC", "edald", "two_stage_edald"), ("edald", "Core-set → UC", "edald", "coreset_edald")]
    md = render_markdown(cmp)
    # 20 -> 25: +5.00 points, +25.00%; 20 -> 15: -5.00, -25.00; the paper's row beside ours
    assert "| edald | Herding → UC | 20.00 ± 0.00 | 25.00 ± 0.00 | +5.00 | +25.00 | 25.14 ± 0.57 | 36.12 ± 0.24 " \
           "| +10.98 | +43.68 |" in md
    assert "| edald | Core-set → UC | 20.00 ± 0.00 | 15.00 ± 0.00 | -5.00 | -25.00 |" in md
    assert "| random | 1 | 4 | 30.00 | 25.91 ± 1.23 (Table 2) |" in md  # one seed: no std


def test_rounds_to_reach_worked_example():
    assert rounds_to_reach([10, 30, 45, 50], 45) == 3
    assert rounds_to_reach([10, 30], 45) is None
    res = _result("x", [[10, 30, 45, 50], [20, 41, 44, 52]])  # labelled 2, 4, 6, 8 of 800 pixels
    # fully supervised 50: 80% = 40 is reached in rounds 3 and 2; 90% = 45 in rounds 3 and 4
    at80, at90 = reach(res, 0.8 * 50), reach(res, 0.9 * 50)
    assert (at80.rounds, at80.pixels_pct, at80.reached) == (2.5, pytest.approx(100 * (6 + 4) / 2 / 800), 2)
    assert (at90.rounds, at90.pixels_pct) == (3.5, pytest.approx(100 * (6 + 8) / 2 / 800))
    assert (reach(res, 51).rounds, reach(res, 51).reached, reach(res, 51).seeds) == (None, 1, 2)
    cmp = Comparison([res], [], "synthetic", supervised={"miou": 0.5, "pixels": 10})
    assert "| x | 2.5 | 0.6250% | 3.5 | 0.8750% |" in render_markdown(cmp)
    cmp = Comparison([res], [], "synthetic", supervised={"miou": 0.6, "pixels": 10})  # 80% = 48, 90% = 54
    assert "| x | 4.0 | 1.0000% | not reached (0/2 seeds) |  |" in render_markdown(cmp)


def test_sweep_runs_one_block_per_value(setup):
    root, config = setup
    out = root / "sweep"
    with pytest.raises(SparsesegError, match="budget=null"):  # an explicit budget would win over the fraction
        compare(config, ["random"], [0], out, ["rounds=1"], parse_sweeps(["budget_fraction=0.2,0.5"]))
    result = compare(config, ["random"], [0], out, ["rounds=1", "budget=null"],
                     parse_sweeps(["budget_fraction=0.2,0.5"]))
    assert [o.spec.name for o in result.outcomes] == ["budget_fraction=0.2/random_s0", "budget_fraction=0.5/random_s0"]
    # 6 training images: round(0.2 * 6) = 1 and round(0.5 * 6) = 3 pixels per round
    assert _rounds(out / "budget_fraction=0.2" / "random_s0")[0]["labelled"] == 1
    assert _rounds(out / "budget_fraction=0.5" / "random_s0")[0]["labelled"] == 3
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["budget_fraction"], r["strategy"], r["labelled"]) for r in rows] == [("0.2", "random", "1"),
                                                                                   ("0.5", "random", "3")]
    md = (out / "summary.md").read_text()
    assert md.index("## budget_fraction=0.2") < md.index("## budget_fraction=0.5")
    # two swept keys make a grid; K and M name the folder
    specs = plan_comparison(config, ["random"], [0], out, None,
                            parse_sweeps(["strategy.k_per_image=5,10", "strategy.pool_ratio=0.5"]))
    assert [s.name for s in specs] == ["strategy.k_per_image=5,strategy.pool_ratio=0.5/random_s0",
                                       "strategy.k_per_image=10,strategy.pool_ratio=0.5/random_s0"]
    assert [s.config.strategy.k_per_image for s in specs] == [5, 10]


def test_bad_plans_are_refused_before_anything_runs(setup, tmp_path):
    _, config = setup
    with pytest.raises(SparsesegError, match="entrpy not known; choose from .*random"):
        plan_comparison(config, ["entrpy"], [0], tmp_path)
    with pytest.raises(SparsesegError, match="use --seeds"):
        plan_comparison(config, ["random"], [0], tmp_path, ["seed=3"])
    with pytest.raises(SparsesegError, match="use --strategies"):
        parse_sweeps(["strategy.name=random,margin"])
    with pytest.raises(SparsesegError, match="roundz"):
        plan_comparison(config, ["random"], [0], tmp_path, ["roundz=3"])
    assert not any(tmp_path.iterdir())


def test_supervised_reference_samples_labelled_pixels_and_scores_like_a_run(setup, compared):
    root, config = setup
    masks = torch.tensor([[[IGNORE, 1], [2, 3]], [[IGNORE, IGNORE], [IGNORE, 4]]], dtype=torch.uint8)
    image, y, x, cls = sample_dense_pixels(masks, 2, seed=0)
    assert image.tolist().count(0) == 2 and image.tolist().count(1) == 1  # image 1 has one labelled pixel
    assert (masks[image, y, x].long() == cls).all() and (cls != IGNORE).all()
    assert all(torch.equal(a, b) for a, b in zip(sample_dense_pixels(masks, 2, seed=0), (image, y, x, cls),
                                                  strict=True))

    result = runner.invoke(app, ["supervised", str(config), "--out", str(root / "sup"), "--pixels-per-image", "20"])
    assert result.exit_code == 0, result.output
    sup = read_supervised(root / "sup")
    assert (sup["pixels_per_image"], sup["pixels"], sup["train_images"]) == (20, 120, 6)  # no void in synthetic
    assert 0 <= sup["miou"] <= 1 and len(sup["per_class_iou"]) == 6
    again = train_supervised(load_config(config), 20)
    assert again["miou"] == sup["miou"]  # seeded: the same pixels, the same head

    out, _ = compared
    result = compare(config, ["random", "max_herding"], [0, 1], out, supervised=root / "sup")
    md = (out / "summary.md").read_text()
    assert f"fully supervised {100 * sup['miou']:.2f}%" in md and "| strategy | rounds to 80% |" in md
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert all(r["reached_80"].endswith("/2") for r in rows)
    with pytest.raises(SparsesegError, match="computed with eval_split=test, the comparison uses train"):
        compare(config, ["random"], [0], out, ["eval_split=train"], supervised=root / "sup", run=False)
    # on a validation split carved from the training images, the held-out images must be the same
    val = load_config(config, ["eval_split=val", "val_prefixes=[img_00]"])
    check_supervised({"config": {**sup["config"], "eval_split": "val", "val_prefixes": ["img_00"]}}, val, root / "sup")
    with pytest.raises(SparsesegError, match=r"computed with val_prefixes=\[\], the comparison uses \['img_00'\]"):
        check_supervised({"config": {**sup["config"], "eval_split": "val", "val_prefixes": []}}, val, root / "sup")


def test_a_failing_run_is_reported_and_the_others_finish(setup):
    root, config = setup
    out = root / "failing"
    (out / "random_s1").mkdir(parents=True)
    (out / "random_s1" / "stray.txt").write_text("not a run")  # Experiment refuses such a folder
    result = compare(config, ["random"], [0, 1], out, ["rounds=1"])
    assert [o.status for o in result.outcomes] == ["finished", "failed"]
    bad = result.outcomes[1]
    assert "not empty" in bad.message and "Traceback" in bad.spec.log.read_text()
    assert bad.spec.log == out / "random_s1.log"
    assert "| random | 1 |" in (out / "summary.md").read_text()
    assert "Runs without a finished result: random_s1." in (out / "summary.md").read_text()
    cli = runner.invoke(app, ["compare", str(config), "--strategies", "random", "--seeds", "0,1", "--out", str(out),
                              "--set", "rounds=1"])
    assert cli.exit_code == 1
    assert "random_s1" in cli.output and "random_s1.log" in cli.output


def test_cli_puts_the_papers_figures_beside_ours(setup, compared):
    _, config = setup
    out, _ = compared
    args = ["compare", str(config), "--strategies", "random,max_herding", "--seeds", "0,1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--dataset", "camvid"])
    assert result.exit_code == 0, result.output
    md = (out / "summary.md").read_text()
    assert "25.91 ± 1.23 (Table 2) |" in md and "31.83 (Table 8) |" in md and "PixelPick 29.93 ± 0.12" in md
    rows = {r["strategy"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert (rows["random"]["paper_miou"], rows["random"]["paper_source"]) == ("25.91", "Table 2")
    # --summary-only runs nothing: an unfinished seed is reported, not run, and is no failure
    result = runner.invoke(app, [*args[:5], "0,1,5", *args[6:], "--summary-only"])
    assert result.exit_code == 0, result.output
    assert "not finished: random_s5, max_herding_s5" in result.output and not (out / "random_s5").exists()
    # the synthetic data's meta.json names no dataset of the paper
    result = runner.invoke(app, [*args, "--paper"])
    assert result.exit_code == 2 and "--dataset" in result.output and "synthetic" in result.output


def test_paper_lookups_follow_the_swept_setting():
    assert str(paper.final_miou("camvid", "two_stage_edald")) == "36.12 ± 0.24"
    assert paper.final_miou("camvid", "two_stage_edald", {"budget_fraction": "0.2"}).mean == 40.3
    assert paper.final_miou("camvid", "two_stage_edald",
                            {"strategy.k_per_image": "20", "strategy.pool_ratio": "0.4"}).mean == 38.70
    assert paper.final_miou("camvid", "random", {"budget_fraction": "0.1"}).mean == 25.91
    assert paper.final_miou("camvid", "random", {"budget_fraction": "0.5"}) is None
    assert paper.final_miou("camvid", "two_stage_margin").mean == 32.77  # Table 1 only
    assert paper.final_miou("ade_bed", "max_herding").source == "Table 8"
    assert paper.round_curve("cityscapes", "two_stage_edald")[-1] == 33.34
    assert paper.resolve_dataset("ADE-Bed") == "ade_bed"
    with pytest.raises(SparsesegError, match="choose one of camvid, ade_bed"):
        paper.resolve_dataset("voc")
    # Table 2's averages column, recomputed from its cells
    for name, avg in (("random", 28.14), ("margin", 34.66), ("two_stage_edald", 37.14)):
        assert round(statistics.fmean(m for m, _ in paper.TABLE_2[name].values()), 2) == pytest.approx(avg, abs=0.011)


def test_jobs_run_as_single_threaded_subprocesses(setup, monkeypatch):
    root, config = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the harness must override it for its workers
    out = root / "jobs"
    result = compare(config, ["random", "max_herding"], [0], out, ["rounds=1"], jobs=2)
    assert [o.status for o in result.outcomes] == ["finished", "finished"], [o.message for o in result.outcomes]
    for name in ("random_s0", "max_herding_s0"):
        assert len(_rounds(out / name)) == 1
        assert json.loads((out / name / "meta.json").read_text())["hardware"]["cpu_threads"] == 1
        assert "sparseseg.cli run" in (out / f"{name}.log").read_text()


# ------------------------------------------------------------------ paired seeds against a reference
def test_t_quantiles_match_scipy_and_the_printed_table():
    from scipy.stats import t

    for df in range(1, 31):
        for p in (0.9, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(t.ppf(p, df), rel=1e-12)
    # two-sided 95% critical values as printed in any t table
    for df, printed in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(printed, abs=5e-4)
    with pytest.raises(ValueError, match="df must be at least 1"):
        t_quantile(0.975, 0)


def test_paired_interval_worked_by_hand_and_against_scipy():
    from scipy.stats import ttest_rel

    # differences 1, 2, 3: mean 2, s = 1, s / sqrt(3) = 0.57735, t(0.975, 2) = 4.302653
    # -> 2 ± 2.484138 = [-0.484138, 4.484138]: three wins out of three, and still within seed noise
    got = paired_difference([31.0, 33.0, 35.0], [30.0, 31.0, 32.0])
    assert (got.mean, got.n, got.wins) == (2.0, 3, 3)
    assert (got.low, got.high) == (pytest.approx(-0.484138, abs=1e-6), pytest.approx(4.484138, abs=1e-6))
    assert got.verdict == "within noise"
    # differences 2, 3, 4, 3, 3: mean 3, s = sqrt(0.5), s / sqrt(5) = 0.316228, t(0.975, 4) = 2.776445 -> 3 ± 0.877989
    a, b = [22.0, 23.0, 24.0, 23.0, 23.0], [20.0] * 5
    got = paired_difference(a, b)
    assert (got.low, got.high) == (pytest.approx(2.122011, abs=1e-6), pytest.approx(3.877989, abs=1e-6))
    assert got.verdict == "above"
    ci = ttest_rel(a, b).confidence_interval(0.95)
    assert (got.low, got.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert paired_difference(b, a).verdict == "below" and paired_difference(b, a).wins == 0
    # a NaN on either side drops the pair; one pair has no interval
    one = paired_difference([5.0, float("nan")], [4.0, 1.0])
    assert (one.mean, one.n, one.wins, one.low, one.high, one.verdict) == (1.0, 1, 1, None, None, "")
    assert curve_mean([10.0, 20.0, 60.0]) == 30.0
    with pytest.raises(ValueError, match="2 values for 3"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])


def test_pairs_are_matched_by_seed_not_by_position():
    ref = StrategyResult((), "random", 2, seeds=[0, 1, 2], curves=[[10, 30], [10, 31], [10, 32]],
                         labelled=[[2, 4]] * 3, seconds=[1.0] * 3)
    # x finished seeds 2 and 0 only (in that order): pairs are (35, 32) and (31, 30)
    x = StrategyResult((), "x", 2, seeds=[2, 0], curves=[[20, 35], [20, 31]], labelled=[[2, 4]] * 2, seconds=[1.0] * 2)
    cmp = Comparison([ref, x], [], "synthetic", reference="random")
    (p,) = cmp.paired(())
    assert (p.final.n, p.final.mean, p.final.wins) == (2, 2.0, 2)  # (3 + 1) / 2
    assert p.aulc.mean == pytest.approx(((20 + 35) / 2 - (10 + 32) / 2 + (20 + 31) / 2 - (10 + 30) / 2) / 2)
    # the hand-worked case above, rendered
    y = StrategyResult((), "y", 2, seeds=[0, 1, 2], curves=[[10, 31], [10, 33], [10, 35]], labelled=[[2, 4]] * 3,
                       seconds=[1.0] * 3)
    md = render_markdown(Comparison([ref, y], [], "synthetic", reference="random"))
    assert "| y | 3 | +2.00 | [-0.48, +4.48] | 3/3 | within noise |" in md
    assert "Paired with `random`" not in render_markdown(Comparison([ref, y], [], "synthetic"))


def _fabricate(spec, curve, per_class):
    """A finished run directory written by hand: config.yaml and rounds.jsonl (mIoU as fractions)."""
    spec.out.mkdir(parents=True)
    (spec.out / "config.yaml").write_text(dump_config(spec.config))
    phases = {k: {"seconds": 1.0, "peak_gb": 0.0} for k in ("select", "train", "evaluate")}
    (spec.out / "rounds.jsonl").write_text("".join(json.dumps(
        {"round": r + 1, "strategy": spec.strategy, "seed": spec.seed, "labelled": 2 * (r + 1), "miou": m,
         "per_class_iou": per_class if r == len(curve) - 1 else {}, "phases": phases}) + "\n"
        for r, m in enumerate(curve)))


FABRICATED = {  # strategy -> per seed 0..4: (round 1, round 2) mIoU
    "random": [(0.10, 0.20), (0.12, 0.22), (0.09, 0.18), (0.11, 0.21), (0.10, 0.19)],
    "margin": [(0.11, 0.21), (0.10, 0.21), (0.12, 0.19), (0.10, 0.20), (0.13, 0.22)],
    "two_stage_edald": [(0.15, 0.25), (0.16, 0.26), (0.14, 0.24), (0.15, 0.27), (0.17, 0.25)],
}


def test_tables_from_fabricated_run_directories(setup, tmp_path):
    from scipy.stats import ttest_rel

    _, config = setup
    out = tmp_path / "fab"
    specs = plan_comparison(config, list(FABRICATED), [0, 1, 2, 3, 4], out, ["eval_split=val"])
    for spec in specs:
        s = spec.seed
        per_class = {name: None for name in SYNTHETIC_CLASSES}
        per_class.update(sky=0.50 + 0.01 * s, road=0.30 if s >= 3 else None)  # road absent from seeds 0-2
        _fabricate(spec, FABRICATED[spec.strategy][s], per_class)
    sup = tmp_path / "supervised.json"
    sup.write_text(json.dumps({"miou": 0.5, "pixels": 120}))
    args = ["compare", str(config), "--strategies", ",".join(FABRICATED), "--seeds", "0,1,2,3,4", "--out", str(out),
            "--set", "eval_split=val", "--supervised", str(sup), "--summary-only"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    md = (out / "summary.md").read_text()
    rows = {r["strategy"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert "evaluated on the `val` split" in md and {r["eval_split"] for r in rows.values()} == {"val"}
    ref = np.array([c for c in FABRICATED["random"]]) * 100
    for name in ("margin", "two_stage_edald"):
        mine = np.array(FABRICATED[name]) * 100
        row = rows[name]
        for what, a, b in (("final", mine[:, -1], ref[:, -1]), ("aulc", mine.mean(1), ref.mean(1))):
            ci = ttest_rel(a, b).confidence_interval(0.95)
            assert float(row[f"{what}_diff_mean"]) == pytest.approx(np.mean(a - b), abs=1e-4)
            assert float(row[f"{what}_diff_low"]) == pytest.approx(ci.low, abs=1e-4)
            assert float(row[f"{what}_diff_high"]) == pytest.approx(ci.high, abs=1e-4)
            assert int(row[f"{what}_wins"]) == int(np.sum(a > b))
        assert (row["reference"], row["pairs"]) == ("random", "5")
        assert float(row["aulc_mean"]) == pytest.approx(mine.mean(1).mean(), abs=1e-4)
        assert float(row["pct_of_supervised"]) == pytest.approx(100 * mine[:, -1].mean() / 50, abs=0.01)
    # two-stage eDALD is above random in every seed by more than the noise; margin is not
    assert rows["two_stage_edald"]["final_verdict"] == "above" and rows["margin"]["final_verdict"] == "within noise"
    assert rows["random"]["reference"] == "" and rows["random"]["final_diff_mean"] == ""
    final = np.array(FABRICATED["two_stage_edald"])[:, -1] * 100
    assert f"| two_stage_edald | 5 | 4 | {final.mean():.2f} ± {final.std(ddof=1):.2f} | 50.8% |" in md
    d = final - ref[:, -1]
    assert f"| two_stage_edald | 5 | {d.mean():+.2f} | " in md and "| 5/5 | above |" in md
    # per-class IoU: the mean over the seeds that had the class; never present -> empty
    assert float(rows["random"]["iou_sky"]) == pytest.approx(100 * np.mean([0.50 + 0.01 * s for s in range(5)]))
    assert float(rows["random"]["iou_road"]) == pytest.approx(30.0) and rows["random"]["iou_pole"] == ""
    assert "| sky | 52.00 | 52.00 | 52.00 |" in md and "| pole |  |  |  |" in md

    # another reference, and one that is not compared
    result = runner.invoke(app, [*args, "--reference", "margin"])
    assert result.exit_code == 0, result.output
    rows = {r["strategy"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["random"]["reference"] == "margin" and rows["margin"]["reference"] == ""
    result = runner.invoke(app, [*args, "--reference", "entropy"])
    assert result.exit_code == 2 and "--reference entropy: not among --strategies" in result.output


def test_cli_pairs_real_runs_with_random_seed_by_seed(setup, compared):
    _, config = setup
    out, _ = compared
    result = runner.invoke(app, ["compare", str(config), "--strategies", "random,max_herding", "--seeds", "0,1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    curves = {(n, s): [100 * r["miou"] for r in _rounds(out / f"{n}_s{s}")] for n in ("random", "max_herding")
              for s in (0, 1)}
    d = np.array([curves["max_herding", s][-1] - curves["random", s][-1] for s in (0, 1)])
    half = 12.706205 * d.std(ddof=1) / np.sqrt(2)  # t(0.975, 1) from a printed table
    row = {r["strategy"]: r for r in csv.DictReader((out / "summary.csv").open())}["max_herding"]
    assert float(row["final_diff_mean"]) == pytest.approx(d.mean(), abs=1e-4)
    assert float(row["final_diff_low"]) == pytest.approx(d.mean() - half, abs=1e-3)
    assert float(row["final_diff_high"]) == pytest.approx(d.mean() + half, abs=1e-3)
    assert int(row["final_wins"]) == int((d > 0).sum()) and row["pairs"] == "2"
    md = (out / "summary.md").read_text()
    assert "Paired with `random`" in md and "Paired with `random`" in result.output
    # per-class IoU at the final round, mean over the seeds where the class had an IoU
    last = [_rounds(out / f"max_herding_s{s}")[-1]["per_class_iou"] for s in (0, 1)]
    for name in SYNTHETIC_CLASSES:
        values = [100 * p[name] for p in last if p[name] is not None]
        assert row[f"iou_{name}"] == (f"{np.mean(values):.4f}" if values else "")
