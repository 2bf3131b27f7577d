"""`prepare folder` on real dataset layouts, built here with Pillow: retinal vessels (DRIVE: .tif
images, .gif masks named `<id>_manual1`, 0/255 and one palette GIF with 0/251, field-of-view masks,
its own train/test split) and EM membranes (PNG masks 0/255). Expected outputs are computed from
the generating arrays with PIL's own resizes, never from our readers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sparseseg.cli import app
from sparseseg.data.dataset import CAMVID_CLASSES, load_meta, load_split
from sparseseg.data.folder import prepare_folder
from sparseseg.data.pairing import Pairing
from sparseseg.data.prepare import prepare_camvid
from sparseseg.data.readers import list_images, read_ignore_mask, read_image, read_mask
from sparseseg.errors import SparsesegError, SparsesegWarning
from sparseseg.scribbles.io import load_scribbles
from tests.conftest import SHARED

SIZE = 16
W, H = 40, 36
runner = CliRunner()


def _one_line(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------- DRIVE-like layout
def _vessels(rng: np.random.Generator) -> np.ndarray:
    """A (H, W) bool vessel tree: a few random lines, about 15% of the pixels."""
    v = np.zeros((H, W), dtype=bool)
    for _ in range(4):
        y = rng.integers(0, H)
        v[y : y + 2, :] = True
        x = rng.integers(0, W)
        v[:, x : x + 2] = True
    return v


def _fov() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - H / 2) ** 2 + (xx - W / 2) ** 2) < (0.45 * min(H, W)) ** 2 * 1.6


def _palette_gif(path: Path, vessel: np.ndarray) -> None:
    """A palette GIF whose vessel pixels are index 251 (white) and background index 0 (black); the
    other entries are colours, so the indices are the values (not a grey image)."""
    im = Image.fromarray(np.where(vessel, 251, 0).astype(np.uint8), mode="P")
    palette = [(7 * i) % 256 for i in range(768)]
    palette[0:3] = [0, 0, 0]
    palette[251 * 3 : 252 * 3] = [255, 255, 255]
    im.putpalette(palette)
    im.save(path, optimize=False)


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("drive") / "DRIVE"
    rng = np.random.default_rng(21)
    truth: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    for split, ids in (("training", [21, 22, 23, 24]), ("test", [1, 2])):
        for folder in ("images", "1st_manual", "mask"):
            (root / split / folder).mkdir(parents=True)
        for i in ids:
            stem = f"{i:02d}_{split}"
            rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / split / "images" / f"{stem}.tif")
            vessel = _vessels(rng)
            manual = root / split / "1st_manual" / f"{i:02d}_manual1.gif"
            if i == 22:
                _palette_gif(manual, vessel)
            else:
                Image.fromarray(np.where(vessel, 255, 0).astype(np.uint8)).save(manual, optimize=False)
            Image.fromarray(np.where(_fov(), 255, 0).astype(np.uint8)).save(
                root / split / "mask" / f"{stem}_mask.gif", optimize=False)
            truth[stem] = ("train" if split == "training" else "test", rgb, vessel)
    (root / "training" / "1st_manual" / "23_manual1.mat").write_bytes(b"MATLAB 5.0 MAT-file")  # a stray file
    return {"root": root, "truth": truth}


def _drive_args(root: Path) -> dict:
    return dict(
        images={"train": root / "training" / "images", "test": root / "test" / "images"},
        masks={"train": root / "training" / "1st_manual", "test": root / "test" / "1st_manual"},
        classes_file=None,
        pairing=Pairing(mask_pattern="{id}_manual1", ignore_pattern="{stem}_mask",
                        image_regex=r"(?P<id>\d+)_(training|test)"),
        ignore_masks={"train": root / "training" / "mask", "test": root / "test" / "mask"},
    )


def _expected_mask(vessel: np.ndarray) -> np.ndarray:
    """Vessel 1, background 0, 255 outside the field of view, then PIL's nearest resize."""
    ids = np.where(vessel, 1, 0).astype(np.uint8)
    ids[~_fov()] = 255
    return np.asarray(Image.fromarray(ids).resize((SIZE, SIZE), Image.NEAREST))


def test_drive_readers_see_what_was_written(drive):
    manual = drive["root"] / "training" / "1st_manual"
    _, _, vessel = drive["truth"]["21_training"]
    np.testing.assert_array_equal(read_mask(manual / "21_manual1.gif"), np.where(vessel, 255, 0))
    _, _, vessel22 = drive["truth"]["22_training"]
    np.testing.assert_array_equal(read_mask(manual / "22_manual1.gif"), np.where(vessel22, 251, 0))
    colours = read_mask(manual / "22_manual1.gif", colours=True)
    np.testing.assert_array_equal(colours, np.where(vessel22, 0xFFFFFF, 0))
    np.testing.assert_array_equal(read_ignore_mask(drive["root"] / "training" / "mask" / "21_training_mask.gif"),
                                  _fov())
    rgb = drive["truth"]["21_training"][1]
    np.testing.assert_array_equal(np.asarray(read_image(drive["root"] / "training" / "images" / "21_training.tif")),
                                  rgb)


def test_drive_without_pairing_names_the_missing_mask_and_how_to_pair(drive, tmp_path):
    root = drive["root"]
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder({"train": root / "training" / "images", "test": root / "test" / "images"},
                       {"train": root / "training" / "1st_manual", "test": root / "test" / "1st_manual"},
                       None, tmp_path / "out", size=SIZE, value_map="0=background,255=vessel")
    _one_line(excinfo, "1st_manual", "21_training.*", "22_training.*", "holds e.g. 21_manual1.gif", "--mask-pattern",
              "--image-regex")
    assert not (tmp_path / "out").exists()


def test_drive_stray_file_with_the_mask_stem_is_named(drive, tmp_path):
    root = tmp_path / "DRIVE"
    shutil.copytree(drive["root"], root)
    (root / "training" / "1st_manual" / "23_manual1.gif").unlink()
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(**_drive_args(root), out=tmp_path / "out", size=SIZE, value_map="0=background,255=vessel")
    _one_line(excinfo, "23_manual1.*", "23_training.tif", "skipped 23_manual1.mat")


def test_drive_palette_gif_value_is_refused_with_the_values_found(drive, tmp_path):
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(**_drive_args(drive["root"]), out=tmp_path / "out", size=SIZE,
                       value_map="0=background,255=vessel")
    _one_line(excinfo, "22_manual1.gif", "[251]", "values in this mask: [0, 251]", "#ffffff")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value_map", ["0=background,251=vessel,255=vessel", "#000000=background,#ffffff=vessel"])
def test_drive_prepared_with_its_own_split_fov_and_value_map(drive, tmp_path, value_map):
    meta = prepare_folder(**_drive_args(drive["root"]), out=tmp_path / "drive", size=SIZE, value_map=value_map)
    assert meta.name == "DRIVE" and meta.classes == ["background", "vessel"]
    assert meta.splits == {"train": 4, "test": 2}
    for split in ("train", "test"):
        data = load_split(tmp_path / "drive", split)
        assert data.names == sorted(s for s, (sp, _, _) in drive["truth"].items() if sp == split)
        for i, stem in enumerate(data.names):
            _, rgb, vessel = drive["truth"][stem]
            np.testing.assert_array_equal(data.masks[i].numpy(), _expected_mask(vessel))
            expected_rgb = np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.BILINEAR))
            np.testing.assert_array_equal(data.images[i].numpy(), expected_rgb)


def test_drive_through_the_cli(drive, tmp_path):
    root = drive["root"]
    out = tmp_path / "drive cli"
    args = ["prepare", "folder", "--out", str(out), "--size", str(SIZE),
            "--train-images", str(root / "training" / "images"), "--test-images", str(root / "test" / "images"),
            "--train-masks", str(root / "training" / "1st_manual"), "--test-masks", str(root / "test" / "1st_manual"),
            "--train-ignore", str(root / "training" / "mask"), "--test-ignore", str(root / "test" / "mask"),
            "--image-regex", r"(?P<id>\d+)_(training|test)", "--mask-pattern", "{id}_manual1",
            "--ignore-pattern", "{stem}_mask", "--name", "drive-vessels"]
    bad = runner.invoke(app, [*args, "--map", "0=background,255=vessel"])
    assert bad.exit_code == 2 and "22_manual1.gif" in bad.output and "[0, 251]" in bad.output, bad.output
    assert "Traceback" not in bad.output and not out.exists()
    ok = runner.invoke(app, [*args, "--map", "#000000=background,#ffffff=vessel"])
    assert ok.exit_code == 0, ok.output
    meta = load_meta(out)
    assert meta.name == "drive-vessels" and meta.splits == {"train": 4, "test": 2}
    assert "map=#000000=background,#ffffff=vessel" in meta.source


# ---------------------------------------------------------------------------- EM-like layout
@pytest.fixture(scope="module")
def em(tmp_path_factory) -> dict:
    """EM membranes: grey PNG images, PNG masks 0 (membrane, ~25%) / 255 (cell interior)."""
    root = tmp_path_factory.mktemp("em")
    rng = np.random.default_rng(5)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    truth = {}
    for i in range(5):
        grey = rng.integers(0, 256, (H, W), dtype=np.uint8)
        membrane = np.zeros((H, W), dtype=bool)
        membrane[::4, :] = True
        membrane[:, rng.integers(0, W)] = True
        Image.fromarray(grey).save(root / "images" / f"slice {i:02d}.png")
        Image.fromarray(np.where(membrane, 0, 255).astype(np.uint8)).save(root / "labels" / f"slice {i:02d}.png")
        truth[f"slice {i:02d}"] = (grey, membrane)
    (root / "classes.txt").write_text("membrane\ncell\n")
    (root / "classes_values.txt").write_text("membrane = 0\ncell = 255\n")
    return {"root": root, "truth": truth}


def test_em_binary_mask_is_refused_with_a_map_to_copy(em, tmp_path):
    root = em["root"]
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(root / "images", root / "labels", root / "classes.txt", tmp_path / "out", size=SIZE)
    _one_line(excinfo, "slice 00.png", "[255]", "values in this mask: [0, 255]", "--map 0=membrane,255=cell")


def test_em_void_id_on_the_larger_class_warns(em, tmp_path):
    root = em["root"]
    with pytest.warns(SparsesegWarning) as record:
        prepare_folder(root / "images", root / "labels", root / "classes.txt", tmp_path / "out", size=SIZE,
                       void_id=255)
    messages = [str(w.message) for w in record]
    assert any("void (mask value(s) [255]) covers" in m and "--map" in m for m in messages), messages
    assert any("cell occur in no mask" in m for m in messages), messages
    # the CLI prints it as a warning and still writes the dataset
    result = runner.invoke(app, ["prepare", "folder", "--images", str(root / "images"), "--masks", str(root / "labels"),
                                 "--classes", str(root / "classes.txt"), "--void-id", "255", "--out",
                                 str(tmp_path / "cli"), "--size", str(SIZE)])
    assert result.exit_code == 0 and "warning:" in result.output and "covers" in result.output, result.output


def test_em_map_and_classes_file_values_agree(em, tmp_path):
    root = em["root"]
    with_map = prepare_folder(root / "images", root / "labels", None, tmp_path / "a", size=SIZE,
                              value_map="0=membrane,255=cell")
    in_file = prepare_folder(root / "images", root / "labels", root / "classes_values.txt", tmp_path / "b", size=SIZE)
    both = prepare_folder(root / "images", root / "labels", root / "classes.txt", tmp_path / "c", size=SIZE,
                          value_map="0=membrane,255=cell")
    assert with_map.classes == in_file.classes == both.classes == ["membrane", "cell"]
    for split in ("train", "test"):
        data = load_split(tmp_path / "a", split)
        for i, stem in enumerate(data.names):
            grey, membrane = em["truth"][stem]
            expected = np.asarray(Image.fromarray(np.where(membrane, 0, 1).astype(np.uint8)).resize(
                (SIZE, SIZE), Image.NEAREST))
            np.testing.assert_array_equal(data.masks[i].numpy(), expected)
            expected_rgb = np.asarray(Image.fromarray(grey).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
            np.testing.assert_array_equal(data.images[i].numpy(), expected_rgb)
        for other in ("b", "c"):
            for p in (tmp_path / "a" / split / "masks").iterdir():
                assert p.read_bytes() == (tmp_path / other / split / "masks" / p.name).read_bytes()


def test_em_split_file_and_pairs_file(em, tmp_path):
    root = em["root"]
    labels = tmp_path / "labels"
    labels.mkdir()
    pairs = ["image,mask"]
    for i, stem in enumerate(sorted(em["truth"])):
        shutil.copyfile(root / "labels" / f"{stem}.png", labels / f"label-{i}.png")
        pairs.append(f"{stem}.png,label-{i}.png" if i % 2 else f"{stem},label-{i}")
    (tmp_path / "pairs.csv").write_text("\n".join(pairs) + "\n")
    (tmp_path / "split.tsv").write_text("# image\tsplit\nslice 00.png\ttest\nslice 01\ttrain\nslice 02\ttrain\n"
                                        "slice 03\tval\nslice 04\ttrain\n")
    meta = prepare_folder(root / "images", labels, None, tmp_path / "out", size=SIZE,
                          value_map="0=membrane,255=cell", pairing=Pairing(pairs_file=tmp_path / "pairs.csv"),
                          split_file=tmp_path / "split.tsv", name="em")
    assert meta.splits == {"train": 3, "val": 1, "test": 1} and meta.name == "em"
    assert load_split(tmp_path / "out", "val").names == ["slice 03"]
    reference = prepare_folder(root / "images", root / "labels", None, tmp_path / "ref", size=SIZE,
                               value_map="0=membrane,255=cell", split_file=tmp_path / "split.tsv")
    assert reference.splits == meta.splits
    for p in (tmp_path / "ref").rglob("*.png"):
        assert p.read_bytes() == (tmp_path / "out" / p.relative_to(tmp_path / "ref")).read_bytes()
    # a split file that leaves an image out, names an unknown one, or a bad split
    for text, needle in (("slice 00,train\n", "no split for image(s) slice 01.png"),
                         ("slice 09,train\n", "image 'slice 09' is not in the images folder"),
                         ("slice 00,my split\n", "split name 'my split'")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(SparsesegError) as excinfo:
            prepare_folder(root / "images", root / "labels", None, tmp_path / "x", size=SIZE,
                           value_map="0=membrane,255=cell", split_file=tmp_path / "bad.csv")
        _one_line(excinfo, "bad.csv", needle)


# ---------------------------------------------------------------------------- options and errors
def test_bad_options_are_refused_before_reading(em, tmp_path):
    root = em["root"]
    cases = [
        (dict(value_map="0=membrane,0=cell"), "value 0 is mapped to both 'membrane' and 'cell'"),
        (dict(value_map="0=membrane,#ffffff=cell"), "mixes colour"),
        (dict(value_map="zero=membrane"), "'zero' is neither an integer"),
        (dict(value_map="0"), "is not VALUE=NAME"),
        (dict(pairing=Pairing(mask_pattern="{id}_mask")), "unknown field {id}"),
        (dict(pairing=Pairing(mask_pattern="mask")), "names every image's file the same"),
        (dict(pairing=Pairing(image_regex="(unclosed")), "not a regular expression"),
        (dict(pairing=Pairing(image_regex=r"(?P<n>\d+)", mask_pattern="{n}")), "does not match --image-regex"),
        (dict(value_map="0=membrane,255=cell", void_id=255), "--void-id 255: --map maps value 255 to class 'cell'"),
    ]
    for kwargs, needle in cases:
        kwargs = {"value_map": "0=membrane,255=cell", **kwargs}
        with pytest.raises(SparsesegError) as excinfo:
            prepare_folder(root / "images", root / "labels", None, tmp_path / "out", size=SIZE, **kwargs)
        _one_line(excinfo, needle)
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(root / "images", root / "labels", root / "classes.txt", tmp_path / "out", size=SIZE,
                       value_map="0=membrane,255=nucleus")
    _one_line(excinfo, "'nucleus' is not in", "classes.txt")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(root / "images", root / "labels", root / "classes_values.txt", tmp_path / "out", size=SIZE,
                       value_map="0=membrane,255=cell")
    _one_line(excinfo, "classes_values.txt", "keep one")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(root / "images", root / "labels", None, tmp_path / "out", size=SIZE)
    _one_line(excinfo, "no classes")
    assert not (tmp_path / "out").exists()


def test_colour_masks_need_a_colour_map(tmp_path):
    """CamVid-style colour masks: refused by value, read by colour from the classes file."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    road, car, void = (128, 64, 128), (64, 0, 128), (0, 0, 0)
    ids = rng.integers(0, 3, (H, W))
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "images" / f"f{i}.jpg")
        Image.fromarray(np.array([road, car, void], dtype=np.uint8)[ids]).save(tmp_path / "masks" / f"f{i}.png")
    (tmp_path / "classes.txt").write_text("road 128 64 128\ncar 64 0 128\n")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "classes.txt", tmp_path / "out", size=SIZE)
    _one_line(excinfo, "f0.png", "mode RGB", "3 colours", "#804080", "--map '#rrggbb=NAME")
    (tmp_path / "colours.txt").write_text("road 128 64 128 = #804080\ncar 64 0 128 = #400080  # cars\nvoid = #000000\n")
    meta = prepare_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "colours.txt", tmp_path / "out",
                          size=SIZE)
    assert meta.classes == ["road", "car"] and meta.palette == [list(road), list(car)]
    data = load_split(tmp_path / "out", "train")
    expected = np.asarray(Image.fromarray(np.array([0, 1, 255], dtype=np.uint8)[ids]).resize((SIZE, SIZE),
                                                                                            Image.NEAREST))
    np.testing.assert_array_equal(data.masks[0].numpy(), expected)


def test_sixteen_bit_masks_and_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(1)
    values = np.array([0, 1000, 65535], dtype=np.uint16)
    for i in range(2):
        img = rng.integers(0, 65536, (H, W), dtype=np.uint16)
        Image.fromarray(img).save(tmp_path / "images" / f"s{i}.tif")
        mask = values[rng.integers(0, 3, (H, W))]
        Image.fromarray(mask).save(tmp_path / "masks" / f"s{i}.png")
        np.testing.assert_array_equal(read_mask(tmp_path / "masks" / f"s{i}.png"), mask)
        # 16 -> 8 bits by v / 257, rounded half up: an independent integer computation
        expected = np.floor(img.astype(np.float64) / 257 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "images" / f"s{i}.tif"))[..., 1], expected)
    meta = prepare_folder(tmp_path / "images", tmp_path / "masks", None, tmp_path / "out", size=SIZE,
                          value_map="0=a,1000=b,65535=void")
    assert meta.classes == ["a", "b"]


def test_ignore_mask_of_another_size_is_named(em, tmp_path):
    root = em["root"]
    (tmp_path / "fov").mkdir()
    for stem in em["truth"]:
        Image.fromarray(np.full((H, W), 255, dtype=np.uint8)).save(tmp_path / "fov" / f"{stem}.bmp")
    Image.fromarray(np.full((H, W + 1), 255, dtype=np.uint8)).save(tmp_path / "fov" / "slice 03.bmp")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(root / "images", root / "labels", None, tmp_path / "out", size=SIZE,
                       value_map="0=membrane,255=cell", ignore_masks=tmp_path / "fov")
    _one_line(excinfo, "slice 03.bmp", "ignore mask is 41x36", "40x36")


def test_two_masks_with_one_stem_are_ambiguous(em, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(em["root"] / "labels", labels)
    shutil.copyfile(labels / "slice 01.png", labels / "slice 01.gif")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(em["root"] / "images", labels, None, tmp_path / "out", size=SIZE, value_map="0=m,255=c")
    _one_line(excinfo, "2 masks named slice 01.*", "slice 01.gif, slice 01.png")


def test_grey_palette_gif_is_read_by_grey_level(tmp_path):
    """A GIF of a grey mask may store white at any palette index: the grey level is the value."""
    index = np.zeros((6, 5), dtype=np.uint8)
    index[2:4] = 251
    im = Image.fromarray(index, mode="P")
    palette = [v for g in range(256) for v in (g, g, g)]
    palette[251 * 3 : 252 * 3] = [255, 255, 255]
    im.putpalette(palette)
    im.save(tmp_path / "m.gif", optimize=False)
    assert Image.open(tmp_path / "m.gif").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.gif"), np.where(index == 251, 255, 0))


def test_list_images_skips_hidden_and_other_files(tmp_path):
    Image.new("RGB", (3, 3)).save(tmp_path / "a.webp")
    Image.new("RGB", (3, 3)).save(tmp_path / "b.ppm")
    Image.new("RGB", (3, 3)).save(tmp_path / "._a.png")  # macOS resource fork: not an image
    (tmp_path / "notes.txt").write_text("x")
    assert sorted(list_images(tmp_path)) == ["a", "b"]
    Image.new("RGB", (3, 3)).save(tmp_path / "a.png")
    with pytest.raises(SparsesegError, match="two images share the stem 'a'"):
        list_images(tmp_path)


def test_scribble_maps_in_any_readable_format(tmp_path):
    scribble = np.full((8, 8), 255, dtype=np.uint8)
    scribble[3, 1:6] = 2
    Image.fromarray(scribble).save(tmp_path / "a.bmp")
    Image.fromarray(scribble).save(tmp_path / "b.tif")
    (tmp_path / "c.svg").write_text("<svg/>")
    out = load_scribbles(tmp_path, ["a", "b"], 8, num_classes=3)
    np.testing.assert_array_equal(out[0].numpy(), scribble)
    np.testing.assert_array_equal(out[1].numpy(), scribble)
    with pytest.raises(SparsesegError, match=r"c\.png: scribble map missing .*skipped c\.svg"):
        load_scribbles(tmp_path, ["c"], 8)


# ---------------------------------------------------------------------------- CamVid
@pytest.mark.skipif(not (SHARED / "data" / "camvid" / "train").is_dir(), reason="CamVid not available")
def test_camvid_through_prepare_folder_equals_prepare_camvid(tmp_path):
    """The SegNet CamVid layout given as kept split folders gives the same bytes as `prepare camvid`."""
    camvid = SHARED / "data" / "camvid"
    src = tmp_path / "CamVid"
    for split, n in (("train", 3), ("test", 2)):
        names = sorted(p.name for p in (camvid / split).iterdir() if p.suffix == ".png")[:n]
        for folder in (split, f"{split}annot"):
            (src / folder).mkdir(parents=True)
            for name in names:
                shutil.copyfile(camvid / folder / name, src / folder / name)
    prepare_camvid(src, tmp_path / "a", size=SIZE)
    (tmp_path / "classes.txt").write_text("\n".join(CAMVID_CLASSES) + "\n")
    meta = prepare_folder({"train": src / "train", "test": src / "test"},
                          {"train": src / "trainannot", "test": src / "testannot"},
                          tmp_path / "classes.txt", tmp_path / "b", size=SIZE, void_id=11)
    assert meta.classes == CAMVID_CLASSES and meta.splits == {"train": 3, "test": 2}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 10
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
