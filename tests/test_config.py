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
