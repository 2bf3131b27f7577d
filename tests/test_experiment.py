"""The simulated loop end to end on a tiny random ADM: files, resume, bad input."""

import json
import shutil

import pytest

from sparseseg.config import load_config
from sparseseg.data.dataset import load_meta, save_meta
from sparseseg.data.synthetic import make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.loop.experiment import Experiment, load_splits
from tests.conftest import save_tiny_adm

SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    make_synthetic(root / "data", n_train=6, n_test=2, size=SIZE, seed=0)
    ckpt = save_tiny_adm(root / "adm.pt", SIZE)
    return root, ckpt


def _config(root, ckpt, out, *extra):
    return load_config(None, [f"data={root / 'data'}", f"out={out}", f"backbone.checkpoint={ckpt}", "rounds=3",
                              "budget=3", "strategy.candidates_per_image=48", "strategy.k_per_image=5",
                              "strategy.noise_samples=2", "head.epochs=20", "preview_images=2", *extra])


@pytest.fixture(scope="module")
def whole(setup):
    """An uninterrupted 3-round two-stage eDALD run."""
    root, ckpt = setup
    return Experiment(_config(root, ckpt, root / "whole")).run()


def test_run_writes_a_complete_run_directory(setup, whole):
    root, _ = setup
    out = root / "whole"
    records = whole
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["labelled"] for r in records] == [3, 6, 9]
    for r in records:
        assert 0 <= r["miou"] <= 1 and set(r["phases"]) == {"select", "train", "evaluate"}
        assert len(r["per_class_iou"]) == 6
    lines = (out / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    for name in ("config.yaml", "meta.json", "labels.csv", "head.pt", "picks/round_03.csv", "previews/round_03.png"):
        assert (out / name).exists(), name
    assert len((out / "labels.csv").read_text().splitlines()) == 1 + 9
    # picks never repeat a pixel
    labels = (out / "labels.csv").read_text().splitlines()[1:]
    assert len({tuple(row.split(",")[:3]) for row in labels}) == 9


def test_resumed_run_ends_identical_to_an_uninterrupted_one(setup, whole):
    root, ckpt = setup
    cut = Experiment(_config(root, ckpt, root / "cut"))
    cut.step()  # round 1 done, then the process "dies" mid round 2:
    with (root / "cut" / "rounds.jsonl").open("a") as fh:
        fh.write('{"round": 2, "tor')  # a torn line must be replayed, not trusted
    resumed = Experiment(_config(root, ckpt, root / "cut"))
    assert resumed.completed == 1
    records = resumed.run()
    assert (root / "cut" / "labels.csv").read_text() == (root / "whole" / "labels.csv").read_text()
    assert [r["miou"] for r in records] == [r["miou"] for r in whole]


@pytest.mark.parametrize("strategy", ["random", "max_herding", "two_stage_entropy"])
def test_other_strategies_run_and_are_seeded(setup, strategy):
    root, ckpt = setup
    a = Experiment(_config(root, ckpt, root / f"{strategy}_a", f"strategy.name={strategy}", "rounds=2")).run()
    b = Experiment(_config(root, ckpt, root / f"{strategy}_b", f"strategy.name={strategy}", "rounds=2")).run()
    assert (root / f"{strategy}_a" / "labels.csv").read_text() == (root / f"{strategy}_b" / "labels.csv").read_text()
    assert [r["miou"] for r in a] == [r["miou"] for r in b]


def test_bad_input_is_one_clear_line_and_keeps_the_run(setup):
    root, ckpt = setup
    out = root / "guarded"
    Experiment(_config(root, ckpt, out, "rounds=1")).run()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SparsesegError, match="different config"):
        Experiment(_config(root, ckpt, out, "rounds=1", "seed=5"))
    # 6 images x K=5 local picks x 0.5 = a pool of 15 < budget 20: refused before any work
    big = root / "big"
    with pytest.raises(SparsesegError, match="larger than the candidate pool of 15"):
        Experiment(_config(root, ckpt, big, "budget=20", "rounds=2"))
    assert not big.exists()
    # a typo fixed before any round finished is not "a different config"
    typo = root / "typo"
    with pytest.raises(SparsesegError, match="checkpoint not found"):
        Experiment(_config(root, ckpt, typo, f"backbone.checkpoint={root / 'missing.pt'}"))
    Experiment(_config(root, ckpt, typo, "rounds=1")).run()
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_validation_split_is_held_out_of_the_training_images(setup):
    root, ckpt = setup
    runs = {seed: Experiment(_config(root, ckpt, root / f"val{seed}", "eval_split=val", "val_fraction=0.34",
                                     f"seed={seed}", "rounds=1", "strategy.name=random"))
            for seed in (0, 1)}
    everything = sorted(p.stem for p in (root / "data" / "train" / "images").iterdir())
    first = runs[0]
    # round(0.34 x 6) = 2 images held out, the other 4 trained on; together the whole train split
    assert len(first.test.names) == 2 and len(first.train.names) == 4
    assert sorted(first.train.names + first.test.names) == everything
    assert not set(first.train.names) & set(first.test.names)
    assert runs[1].test.names == first.test.names  # the run seed does not move the held-out images
    picks = [row.split(",")[0] for row in _run_one(first).splitlines()[1:]]
    assert picks and set(picks) <= set(first.train.names)
    meta = json.loads((root / "val0" / "meta.json").read_text())
    assert meta["dataset"]["eval_split"] == "val" and meta["dataset"]["test_images"] == 2


def test_val_prefixes_on_data_with_its_own_val_split_is_refused(setup, tmp_path):
    root, ckpt = setup
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    shutil.copytree(data / "test", data / "val")
    meta = load_meta(data)
    meta.splits["val"] = meta.splits["test"]
    save_meta(meta, data)
    config = _config(root, ckpt, tmp_path / "run", f"data={data}", "eval_split=val")
    assert load_splits(config)[1].names == load_splits(config.model_copy(update={"eval_split": "test"}))[1].names
    with pytest.raises(SparsesegError, match=r"has a val split of its own, so val_prefixes \['img'\] would hold out"):
        load_splits(config.model_copy(update={"val_prefixes": ["img"]}))


def _run_one(exp):
    exp.run()
    return (exp.run_dir.path / "labels.csv").read_text()
