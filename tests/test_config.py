from pathlib import Path

import pytest

from sparseseg.config import ExperimentConfig, dump_config, load_config
from sparseseg.errors import SparsesegError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_round_trip_and_overrides(tmp_path):
    path = _write(tmp_path, "data: data/camvid\nbackbone:\n  checkpoint: adm.pt\nrounds: 3\n")
    cfg = load_config(path, ["strategy.name=random", "head.lr=0.01", "backbone.timesteps=[10, 20]"])
    assert cfg.rounds == 3 and cfg.strategy.name == "random" and cfg.head.lr == 0.01
    assert cfg.backbone.timesteps == (10, 20)
    # relative paths are resolved against the config file's folder
    assert cfg.data == tmp_path / "data" / "camvid" and cfg.backbone.checkpoint == tmp_path / "adm.pt"
    again = _write(tmp_path, dump_config(cfg))
    assert load_config(again) == cfg


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    path = _write(tmp_path, "data: d\nbackbone: {checkpoint: a.pt}\nstrategy: {k_per_imag: 5}\n")
    with pytest.raises(SparsesegError, match=r"exp.yaml: strategy.k_per_imag"):
        load_config(path)


def test_bad_override_and_missing_checkpoint(tmp_path):
    with pytest.raises(SparsesegError, match="expected key=value"):
        load_config(None, ["rounds"])
    with pytest.raises(SparsesegError, match="backbone.checkpoint is required"):
        load_config(None, ["data=d"])


def test_budget_default_is_a_tenth_of_the_images():
    cfg = ExperimentConfig(data=Path("d"), backbone={"checkpoint": "a.pt"})
    assert cfg.budget_for(367) == 37 and cfg.budget_for(4) == 1
    assert cfg.model_copy(update={"budget": 5}).budget_for(367) == 5


def test_the_default_strategy_fits_the_backbone():
    from sparseseg.config import ProjectConfig

    def cfg(*sets):
        return load_config(None, ["data=d", *sets])

    adm = cfg("backbone.checkpoint=a.pt")
    assert (adm.strategy.name, adm.head.dropout) == ("two_stage_edald", 0.0)  # the paper's, on a diffusion UNet
    cnn = cfg("backbone.name=efficientnet_lite0")
    assert (cnn.strategy.name, cnn.head.dropout, cnn.head.ensemble) == ("two_stage_ebald", 0.1, 1)
    ens = cfg("backbone.name=efficientnet_lite0", "head.ensemble=6")
    assert (ens.strategy.name, ens.head.dropout, ens.head.ensemble) == ("two_stage_ebald", 0.0, 6)
    chosen = cfg("backbone.name=efficientnet_lite0", "strategy.name=two_stage_margin")
    assert (chosen.strategy.name, chosen.head.dropout) == ("two_stage_margin", 0.0)  # a named strategy stays as given
    assert load_config(None, schema=ProjectConfig).backbone.name == "efficientnet_lite0"
    project = load_config(None, ["backbone.device=cpu"], schema=ProjectConfig)  # a partial section keeps the default
    assert (project.backbone.name, project.strategy.name) == ("efficientnet_lite0", "two_stage_ebald")
    again = load_config(None, [f"{k}={v}" for k, v in (("strategy.name", "random"),)], schema=ProjectConfig)
    assert (again.strategy.name, again.head.dropout) == ("random", 0.0)


def test_the_fast_preset_fills_only_what_is_not_given(tmp_path):
    from sparseseg.config import FAST_PRESET

    exact = load_config(None, ["data=d", "backbone.name=efficientnet_lite0"])
    fast = load_config(None, ["data=d", "backbone.name=efficientnet_lite0", "strategy.preset=fast"])
    assert exact.strategy.candidates_per_image == 10000 and fast.strategy.candidates_per_image == 2048
    assert {k: getattr(fast.strategy, k) for k in FAST_PRESET} == FAST_PRESET
    # everything else stays the exact default's, and a setting given explicitly wins over the preset
    assert fast.strategy.model_copy(update={"preset": "exact", "candidates_per_image": 10000}) == exact.strategy
    mine = load_config(None, ["data=d", "strategy.preset=fast", "strategy.candidates_per_image=512",
                              "backbone.name=efficientnet_lite0"])
    assert mine.strategy.candidates_per_image == 512
    # the saved config says both the preset and what it set, and reads back the same
    assert load_config(_write(tmp_path, dump_config(fast))) == fast
    with pytest.raises(SparsesegError, match="strategy.preset"):
        load_config(None, ["data=d", "backbone.name=efficientnet_lite0", "strategy.preset=quick"])
