"""The command line as a user runs it: one-line errors, exit codes, and the features command."""

import numpy as np
from typer.testing import CliRunner

from sparseseg.cli import app
from tests.conftest import shared_path

runner = CliRunner()


def test_features_command_reproduces_the_guided_diffusion_fixture(tmp_path):
    fixture = shared_path("fixtures", "adm_tiny")
    expected = np.load(fixture / "expected.npz")
    noise = tmp_path / "noise.npy"
    np.save(noise, expected["noise"])
    out = tmp_path / "feats.npz"
    result = runner.invoke(app, ["features", "--checkpoint", str(fixture / "model.pt"), "--config",
                                 str(fixture / "config.json"), "--image", str(fixture / "input.png"), "--size", "128",
                                 "--timesteps", "50,150,250", "--blocks", "5,8,12,17", "--noise-file", str(noise),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    keys = [k for k in expected.files if k.startswith(("block", "x_t"))]
    assert sorted(got.files) == sorted(keys)
    for key in keys:
        rel = np.linalg.norm(got[key] - expected[key]) / np.linalg.norm(expected[key])
        assert rel < 1e-4, (key, rel)


def test_bad_input_is_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\n")
    result = runner.invoke(app, ["prepare", "folder", "--images", str(tmp_path / "imgs"), "--masks",
                                 str(tmp_path / "masks"), "--classes", str(tmp_path / "classes.txt"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "imgs" in lines[0] and "Traceback" not in result.output

    result = runner.invoke(app, ["features", "--checkpoint", str(tmp_path / "nope.pt"), "--image", "x.png",
                                 "--out", str(tmp_path / "f.npz")])
    assert result.exit_code == 2 and "nope.pt" in result.output


def test_run_rejects_a_config_with_an_unknown_key(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data: d\nbackbone: {checkpoint: a.pt}\nrounds: 2\nroundz: 3\n")
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2 and "roundz" in result.output


def test_list_strategies_filters_by_pattern():
    result = runner.invoke(app, ["list", "strategies", "two_stage_*"])
    assert result.exit_code == 0
    names = result.output.split()
    assert "two_stage_edald" in names and "random" not in names


def test_summarize_averages_seeds_per_strategy(tmp_path):
    import json

    for name, seed, mious in (("a", 0, [0.1, 0.3]), ("a", 1, [0.3, 0.5]), ("b", 0, [0.2])):
        run = tmp_path / f"{name}{seed}"
        run.mkdir()
        phases = {k: {"seconds": 1.0, "peak_gb": 0.1} for k in ("select", "train", "evaluate")}
        run.joinpath("rounds.jsonl").write_text("".join(
            json.dumps({"round": i + 1, "strategy": name, "miou": m, "phases": phases}) + "\n"
            for i, m in enumerate(mious)))
    result = runner.invoke(app, ["summarize", *(str(tmp_path / d) for d in ("a0", "a1", "b0"))])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    # round 1 of a: mean(10, 30) = 20, sample std = 14.14; b: 20 ± 0
    assert rows[0] == "| 1 | 20.00 ± 14.14 | 20.00 ± 0.00 |"
    assert rows[1] == "| 2 | 40.00 ± 14.14 |  |"
