"""Scribble maps: the PNG reader, the simulator's guarantees, scribbles from a run's clicks, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sparseseg.cli import app
from sparseseg.data.synthetic import make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.expansion.regions import RegionSet
from sparseseg.labels import PixelLabels
from sparseseg.scribbles.from_labels import scribbles_from_labels
from sparseseg.scribbles.io import load_scribbles, read_classes, read_scribble_map, write_scribble_map
from sparseseg.scribbles.simulate import simulate_scribble, thin


def _scene() -> np.ndarray:
    """A 64x64 mask: two big classes, a thin strip, a void band and a tiny speck."""
    m = np.zeros((64, 64), dtype=np.uint8)
    m[:, 32:] = 1
    m[10:14, 5:60] = 2  # a strip 4 px tall crossing both
    m[40:44, :] = 255  # void band
    m[55:57, 10:12] = 3  # 2x2 speck
    return m


def test_png_round_trip_palette_and_grey(tmp_path):
    rng = np.random.default_rng(0)
    scribble = np.full((20, 30), 255, dtype=np.uint8)
    scribble[rng.random((20, 30)) < 0.3] = rng.integers(0, 5, 1)[0]
    scribble[3, 4:9] = 4
    write_scribble_map(tmp_path / "a.png", scribble)
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "P"
    np.testing.assert_array_equal(read_scribble_map(tmp_path / "a.png"), scribble)
    # a grey PNG whose unlabelled id is 0 (ignore id is an option): 0 -> 255, others kept
    grey = np.where(scribble == 255, 0, scribble + 1).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_scribble_map(tmp_path / "g.png", ignore_id=0), np.where(scribble == 255, 255, scribble + 1))


def test_reader_errors_name_the_file(tmp_path):
    Image.fromarray(np.full((4, 4), 7, dtype=np.uint8), mode="L").save(tmp_path / "x.png")
    with pytest.raises(SparsesegError, match=r"x\.png: scribble id\(s\) \[7\] out of range"):
        read_scribble_map(tmp_path / "x.png", num_classes=5)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SparsesegError, match=r"rgb\.png: mask has mode RGB"):
        read_scribble_map(tmp_path / "rgb.png")
    with pytest.raises(SparsesegError, match=r"nope\.png: scribble map missing"):
        load_scribbles(tmp_path, ["nope"], 4)


def test_thin_is_one_pixel_wide_subset():
    m = np.zeros((30, 40), dtype=bool)
    m[5:25, 5:35] = True
    s = thin(m)
    assert s.any() and not (s & ~m).any()
    # no 2x2 block survives thinning of a rectangle
    assert not (s[:-1, :-1] & s[1:, :-1] & s[:-1, 1:] & s[1:, 1:]).any()


def test_simulator_never_labels_another_class_or_void():
    mask = _scene()
    for seed in range(5):
        for width in (1, 3, 7):
            s = simulate_scribble(mask, width=width, length=0.7, seed=seed, min_area=1)
            on = s != 255
            assert on.any()
            np.testing.assert_array_equal(s[on], mask[on])  # never another class, never void
    # every region (class 0, 1, strip 2 and the 2x2 speck 3) gets a scribble when min_area allows
    assert set(np.unique(simulate_scribble(mask, min_area=1))) == {0, 1, 2, 3, 255}
    assert 3 not in set(np.unique(simulate_scribble(mask, min_area=16)))


def test_simulator_is_seeded_and_respects_length_and_width():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 1
    a = simulate_scribble(mask, width=3, length=0.5, seed=3)
    np.testing.assert_array_equal(a, simulate_scribble(mask, width=3, length=0.5, seed=3))
    full = (simulate_scribble(mask, width=1, length=1.0, seed=0) != 255).sum()
    half = (simulate_scribble(mask, width=1, length=0.5, seed=0) != 255).sum()
    assert abs(half - full / 2) <= 2  # width 1: the stroke is the kept skeleton, one pixel per pixel
    wide = (simulate_scribble(mask, width=5, length=0.5, seed=0) != 255).sum()
    assert 4 * half <= wide <= 6 * half  # a 5-pixel brush over a mostly straight stroke
    # the wide stroke stays within 2 pixels of the 1-pixel stroke it was grown from
    thin_stroke = simulate_scribble(mask, width=1, length=0.5, seed=0) != 255
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~thin_stroke)
    assert dist[simulate_scribble(mask, width=5, length=0.5, seed=0) != 255].max() <= 2 * np.sqrt(2)


def test_simulator_rejects_bad_arguments():
    with pytest.raises(SparsesegError, match="width 0"):
        simulate_scribble(np.zeros((8, 8)), width=0)
    with pytest.raises(SparsesegError, match="length 1.5"):
        simulate_scribble(np.zeros((8, 8)), length=1.5)


def test_scribbles_from_clicks_and_regions():
    labels = PixelLabels()
    labels.add(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0]), torch.tensor([2, 255, 1]), 1)
    maps = scribbles_from_labels(labels, 2, 4)
    expected = np.full((2, 4, 4), 255, dtype=np.uint8)
    expected[0, 1, 1], expected[1, 3, 0] = 2, 1  # the void answer stays unlabelled
    np.testing.assert_array_equal(maps, expected)
    # a kept region of the first click scribbles its pixels with the click's class
    region = np.zeros((4, 4), dtype=bool)
    region[0:2, 0:3] = True
    packed = np.packbits(region.reshape(-1))[None]
    regions = RegionSet(4, np.array([0]), np.array([1]), np.array([1]), np.array([2]), np.array([1]),
                        np.array([0.95]), np.array([True]), packed)
    maps = scribbles_from_labels(labels, 2, 4, regions)
    assert (maps[0][region] == 2).all() and (maps[0][~region] == 255).all()


def test_cli_simulate_writes_readable_scribbles(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, n_train=3, n_test=1, size=32, seed=0)
    out = tmp_path / "scr"
    result = CliRunner().invoke(app, ["scribbles", "simulate", str(data), "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert read_classes(out)[:2] == ["sky", "road"]
    from sparseseg.data.dataset import load_split

    train = load_split(data, "train")
    maps = load_scribbles(out, train.names, 32, num_classes=6)
    on = maps != 255
    assert on.any() and (maps[on] == train.masks[on]).all()
    bad = CliRunner().invoke(app, ["scribbles", "simulate", str(tmp_path / "none"), "--out", str(out)])
    assert bad.exit_code == 2 and "meta.json: not found" in bad.output


def test_from_run_uses_finished_rounds_only(tmp_path):
    data = tmp_path / "data"
    meta = make_synthetic(data, n_train=3, n_test=1, size=32, seed=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data: {data}\nbackbone:\n  name: efficientnet_lite0\n")
    (run / "rounds.jsonl").write_text('{"round": 1}\n')  # round 2 never finished
    labels = PixelLabels()
    labels.add(torch.tensor([0, 2]), torch.tensor([3, 4]), torch.tensor([5, 6]), torch.tensor([1, 4]), 1)
    labels.add(torch.tensor([1]), torch.tensor([7]), torch.tensor([8]), torch.tensor([2]), 2)
    from sparseseg.data.dataset import load_split

    names = load_split(data, "train").names
    labels.write_csv(run / "labels.csv", names, meta.classes)
    out = tmp_path / "scr"
    result = CliRunner().invoke(app, ["scribbles", "from-run", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    maps = load_scribbles(out, names, 32)
    assert (maps != 255).sum() == 2 and maps[0, 3, 5] == 1 and maps[2, 4, 6] == 4 and maps[1, 7, 8] == 255
