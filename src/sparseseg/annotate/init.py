"""`sparseseg init`: a new project folder from a folder of images and a classes file."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from sparseseg.annotate.importers import RESERVED_LABELS, SKIP_LABEL
from sparseseg.annotate.layout import CONFIG_FILE, DATA_DIR, SPLIT
from sparseseg.annotate.project import Project
from sparseseg.annotate.store import DB_FILE, AnnotationStore, ImageRow
from sparseseg.config import ProjectConfig, dump_config, load_config
from sparseseg.data.dataset import DatasetMeta, default_palette, one_line, save_meta
from sparseseg.data.prepare import check_size, prepare_images, staged_output
from sparseseg.data.readers import list_images
from sparseseg.data.values import read_classes_file
from sparseseg.errors import SparsesegError


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # PIL raises many types for a bad file
        raise SparsesegError(f"{path}: unreadable image ({one_line(exc)})") from exc


def init_project(root: Path, images: Path, classes_file: Path, size: int = 256, overrides: list[str] | None = None,
                 backbone: dict | None = None, progress: Callable[[int, int], None] | None = None) -> Project:
    """Create a project: prepared images, project.yaml and a new database with a fresh project id.

    Args:
        root: the project folder to create (must not exist, or be empty).
        images: folder of the images to label (.png/.jpg/...; names = file stems, unique).
        classes_file: one class per line (`name` or `name r g b`); line i is class id i.
        size: working side: images are resized (bilinear, aspect not kept) to size x size.
        overrides: `key=value` settings of ProjectConfig (dotted keys).
        backbone: backbone settings given as options (e.g. {"checkpoint": ...}: an ADM checkpoint unless
            a name is given); None: the ProjectConfig default, the EfficientNet-Lite0 shipped with the
            package, and the strategy that fits it.

    Raises:
        SparsesegError: a non-empty `root`, bad images or classes, a reserved class name, bad settings.
    """
    root = Path(root)
    check_size(size)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SparsesegError(f"{root}: exists and is not an empty folder; choose a new project folder")
    classes, palette = read_classes_file(classes_file)
    for name in classes:
        if name in RESERVED_LABELS:
            raise SparsesegError(f"{classes_file}: class name {name!r} is reserved ({SKIP_LABEL!r} is the "
                                 "skip answer, 'query' marks unanswered CVAT points); rename it")
    if len(classes) > 255:
        raise SparsesegError(f"{classes_file}: {len(classes)} classes; at most 255 fit an 8-bit label map")
    if backbone and "name" not in backbone:  # a checkpoint given as an option is an ADM's
        backbone = {"name": "adm", **backbone}
    config = load_config(None, overrides, {"backbone": backbone} if backbone else None, schema=ProjectConfig,
                         source="project settings")
    problem = config.backbone.missing_problem()
    if problem:
        raise SparsesegError(f"project settings: {problem}")
    if config.backbone.checkpoint is not None and not config.backbone.checkpoint.exists():
        raise SparsesegError(f"{config.backbone.checkpoint}: backbone checkpoint not found")
    if config.expansion == "sam" and config.sam.checkpoint is not None and not config.sam.checkpoint.exists():
        raise SparsesegError(f"{config.sam.checkpoint}: SAM checkpoint not found (sam.checkpoint)")
    by_stem = list_images(Path(images))
    paths = [by_stem[stem] for stem in sorted(by_stem)]
    rows = [ImageRow(i, p.stem, str(p.resolve()), *_image_size(p)) for i, p in enumerate(paths)]
    with staged_output(root) as tmp:
        data = tmp / DATA_DIR
        prepare_images(paths, data / SPLIT, size, progress)
        save_meta(DatasetMeta(name=root.name or "project", classes=classes,
                              palette=palette or default_palette(len(classes)), size=size,
                              splits={SPLIT: len(paths)}, source=f"images={Path(images).resolve()}"), data)
        (tmp / CONFIG_FILE).write_text(dump_config(config), encoding="utf-8")
        AnnotationStore.create(tmp / DB_FILE, str(uuid.uuid4()), classes, rows, size).close()
    return Project(root)
