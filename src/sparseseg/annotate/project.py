"""A labelling project on disk: init, query, import, train, predict, status.

Layout of PROJECT/:

    project.yaml            ProjectConfig (backbone, features, strategy, head, seed, budget)
    annotations.sqlite      every query and every answer (store.py; docs/annotation.md)
    data/                   the images, prepared: a sparseseg dataset without masks
      meta.json             classes, palette, size
      train/images/<stem>.png
    rounds/<RRR>/           what `query` exported for round RRR:
      tasks.json            Label Studio tasks (pre-placed keypoints)
      label_config.xml      the matching Label Studio labelling config
      cvat.xml              CVAT for images 1.1 annotations (points labelled "query")
      queries.csv           query_id,image,x,y
      review/<stem>.png     crosshairs on the queried pixels
    head.pt                 the head trained on all answers (retrained when they change)

With `expansion: sam` every answered click is also expanded into a SAM region, stored in the
database's `regions` table with the model and tau that produced it (after `import`, or whenever a
command needs the head); regions are trained on and drawn in the next round's review PNGs.

Only `query` and `import` change the database's queries and answers, each in one transaction. The round's files are
written after its transaction commits; `export` writes them again from the database at any time.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from sparseseg.annotate.config import (
    CONFIG_FILE,
    ProjectConfig,
    dump_project_config,
    load_project_config,
    make_config,
)
from sparseseg.annotate.export import (
    Query,
    cvat_xml,
    label_studio_config,
    label_studio_tasks,
    queries_csv,
    tasks_json,
)
from sparseseg.annotate.importers import RESERVED_LABELS, SKIP_LABEL, ParsedFile, RawAnswer, parse_file
from sparseseg.annotate.review import crosshair_image
from sparseseg.annotate.store import DB_FILE, AnnotationStore, ImageRow, NewAnswer, RegionRow, Snapshot, now
from sparseseg.data.dataset import (
    DatasetMeta,
    default_palette,
    load_meta,
    load_split,
    one_line,
    read_rgb,
    save_meta,
)
from sparseseg.data.prepare import (
    _check_size,
    _Job,
    _run_jobs,
    images_by_stem,
    read_classes_file,
    staged_output,
)
from sparseseg.device import resolve_device
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write, atomic_write_text
from sparseseg.labels import IGNORE, PixelLabels
from sparseseg.seeding import derived_generator

if TYPE_CHECKING:  # heavy modules are imported only by the commands that run the backbone
    from sparseseg.expansion.regions import RegionSet, Resolved, TrainingPixels
    from sparseseg.features.store import FeatureStore

Progress = Callable[[str, int, int], None]
DATA_DIR = "data"
SPLIT = "train"
ROUNDS_DIR = "rounds"
HEAD_FILE = "head.pt"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # np.save(path) would append ".npy" to a temporary name
        np.save(fh, array)


def round_dir(root: Path, round: int) -> Path:
    return Path(root) / ROUNDS_DIR / f"{round:03d}"


REVIEW_TINT = 0.35  # opacity of the class colour over region pixels in review PNGs (the image stays readable)


def _mask_png(mask: np.ndarray) -> bytes:
    """A bool (S, S) mask as 1-bit PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _mask_from_png(data: bytes, size: int) -> np.ndarray:
    """The bool (S, S) mask of `_mask_png` bytes."""
    mask = np.asarray(Image.open(io.BytesIO(data)).convert("1"), dtype=bool)
    if mask.shape != (size, size):
        raise SparsesegError(f"a stored region mask is {mask.shape}, not the project's {size}x{size}")
    return mask


# ---------------------------------------------------------------------------- init
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
        backbone: backbone settings given as options (e.g. {"checkpoint": ...}).

    Raises:
        SparsesegError: a non-empty `root`, bad images or classes, a reserved class name, bad settings.
    """
    root = Path(root)
    _check_size(size)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SparsesegError(f"{root}: exists and is not an empty folder; choose a new project folder")
    classes, palette = read_classes_file(classes_file)
    for name in classes:
        if name in RESERVED_LABELS:
            raise SparsesegError(f"{classes_file}: class name {name!r} is reserved ({SKIP_LABEL!r} is the "
                                 "skip answer, 'query' marks unanswered CVAT points); rename it")
    if len(classes) > 255:
        raise SparsesegError(f"{classes_file}: {len(classes)} classes; at most 255 fit an 8-bit label map")
    config = make_config(overrides, {"backbone": backbone} if backbone else None)
    if config.backbone.name == "adm" and config.backbone.checkpoint is None:
        raise SparsesegError("no backbone: pass --backbone CHECKPOINT (an ADM .pt, e.g. from `sparseseg pretrain`) "
                             "or --set backbone.name=...")
    if config.backbone.checkpoint is not None and not config.backbone.checkpoint.exists():
        raise SparsesegError(f"{config.backbone.checkpoint}: backbone checkpoint not found")
    if config.expansion == "sam" and config.sam.checkpoint is not None and not config.sam.checkpoint.exists():
        raise SparsesegError(f"{config.sam.checkpoint}: SAM checkpoint not found (sam.checkpoint)")
    by_stem = images_by_stem(Path(images))
    paths = [by_stem[stem] for stem in sorted(by_stem)]
    rows = [ImageRow(i, p.stem, str(p.resolve()), *_image_size(p)) for i, p in enumerate(paths)]
    with staged_output(root) as tmp:
        data = tmp / DATA_DIR
        jobs = [_Job(image=p, mask=None, split_dir=data / SPLIT, stem=p.stem) for p in paths]
        _run_jobs(jobs, size, np.empty(0, dtype=np.int32), "", progress)
        save_meta(DatasetMeta(name=root.name or "project", classes=classes,
                              palette=palette or default_palette(len(classes)), size=size,
                              splits={SPLIT: len(paths)}, source=f"images={Path(images).resolve()}"), data)
        (tmp / CONFIG_FILE).write_text(dump_project_config(config), encoding="utf-8")
        AnnotationStore.create(tmp / DB_FILE, str(uuid.uuid4()), classes, rows, size).close()
    return Project(root)


# ---------------------------------------------------------------------------- results
@dataclass
class QueryResult:
    round: int
    queries: int
    coverage_only: bool  # True when no head existed (no trainable answer yet)
    files: list[Path]


@dataclass
class ImportResult:
    format: str
    new: int = 0
    unchanged: int = 0
    replaced: int = 0
    unanswered: int = 0
    skips: int = 0
    already: tuple[int, str, str] | None = None  # (import id, file, time) of an identical earlier import
    import_id: int | None = None
    regions: int = 0  # with expansion: clicks newly expanded by SAM after the import
    expansion_error: str | None = None  # why expansion failed (the answers are imported all the same)


@dataclass
class TrainResult:
    pixels: int
    classes_seen: list[str]
    accuracy: float  # on the training pixels
    retrained: bool
    path: Path
    region_pixels: int = 0  # with expansion: pixels labelled by regions (after the overlap rule)
    training_region_pixels: int = 0  # of them, drawn for training (at most sam.max_region_pixels per click)


@dataclass
class _Features:
    store: FeatureStore
    names: list[str]
    images: torch.Tensor
    device: torch.device


@dataclass
class _Resolved:
    new: list[NewAnswer] = field(default_factory=list)
    replace: list[NewAnswer] = field(default_factory=list)
    unchanged: int = 0
    unanswered: int = 0
    skips: int = 0


# ---------------------------------------------------------------------------- the project
class Project:
    """An existing project folder (see the module docstring for its layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SparsesegError(f"{self.root}: project folder not found (create one with `sparseseg init`)")
        self.config: ProjectConfig = load_project_config(self.root)
        self.store = AnnotationStore(self.root / DB_FILE)
        self.meta = load_meta(self.root / DATA_DIR)
        self.classes = self.store.classes()
        self.image_rows = self.store.images()
        if self.classes != list(self.meta.classes):
            raise SparsesegError(f"{self.root / DATA_DIR / 'meta.json'}: classes differ from the project database's")
        self.size = self.meta.size
        self.project_id = self.store.project_id
        self._features: _Features | None = None
        self._expander = None
        self._images: np.ndarray | None = None

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ features and head
    def features(self, progress: Progress | None = None) -> _Features:
        """The project's images, the backbone and a FeatureStore over them (built once)."""
        if self._features is None:
            from sparseseg.backbones.registry import build_backbone
            from sparseseg.features.store import FeatureStore
            tick = (lambda d, t: progress("loading images", d, t)) if progress else None
            split = load_split(self.root / DATA_DIR, SPLIT, progress=tick)
            if split.names != [r.name for r in self.image_rows]:
                raise SparsesegError(f"{self.root / DATA_DIR / SPLIT / 'images'}: the images differ from the ones "
                                     "the project database lists; do not add or remove images in a project")
            device = resolve_device(self.config.backbone.device)
            backbone = build_backbone(self.config.backbone, device, default_size=self.size)
            cfg = self.config
            store = FeatureStore(backbone, split.images, cfg.seed, SPLIT, cfg.features.cache_gb,
                                 cfg.backbone.batch_size, device)
            self._features = _Features(store, split.names, split.images, device)
        return self._features

    def _trainable(self, snap: Snapshot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, y, x, class) of every answered, non-skip pixel, in query order."""
        rows = [(q.image_id, q.y, q.x, snap.answers[q.id].class_id) for q in snap.queries
                if q.id in snap.answers and snap.answers[q.id].class_id is not None]
        t = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
        return t[:, 0], t[:, 1], t[:, 2], t[:, 3]

    def _fingerprint(self, image, y, x, cls, extra: TrainingPixels | None = None) -> str:
        state = {"pixels": torch.stack([image, y, x, cls]).T.tolist(), "seed": self.config.seed,
                 "head": self.config.head.model_dump(mode="json"), "backbone": self.config.backbone.model_dump(mode="json"),
                 "features": self.config.features.model_dump(mode="json")}
        if extra is not None:  # only with expansion, so heads trained without it keep their fingerprint
            state["regions"] = torch.stack([extra.image, extra.y, extra.x, extra.cls]).T.tolist()
            state["region_weights"] = [round(float(w), 9) for w in extra.weight]
            state["sam"] = self.config.sam.model_dump(mode="json")
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ SAM regions
    def _region_model(self) -> tuple[str, float]:
        from sparseseg.expansion.registry import describe

        return describe(self.config.sam), self.config.sam.tau

    def expand_regions(self, progress: Progress | None = None) -> int:
        """Expand every answered (non-skip) click that has no region under the configured (model, tau)
        yet; returns how many were added. Does nothing without `expansion: sam`.

        Raises:
            SparsesegError: SAM cannot be loaded (a missing checkpoint, a Hub id without internet).
        """
        if self.config.expansion != "sam":
            return 0
        from sparseseg.expansion.base import choose

        model, tau = self._region_model()
        snap = self.store.snapshot()
        done = self.store.regions(model, tau)
        todo = [q for q in snap.queries if q.id in snap.answers and snap.answers[q.id].class_id is not None
                and q.id not in done]
        if not todo:
            return 0
        expander = self._sam()
        images = self._working_images()
        rows = []
        by_image: dict[int, list] = {}
        for q in todo:
            by_image.setdefault(q.image_id, []).append(q)
        for n, (image_id, qs) in enumerate(sorted(by_image.items()), start=1):
            proposals = expander.propose(images[image_id], np.array([q.y for q in qs]), np.array([q.x for q in qs]))
            for j, q in enumerate(qs):
                choice = choose(proposals.masks[j], proposals.scores[j], tau)
                mask = _mask_png(choice.mask) if choice.kept else None
                pixels = int(choice.mask.sum()) if choice.kept else 0
                rows.append(RegionRow(q.id, expander.name, tau, choice.score, choice.kept, pixels, mask))
            if progress:
                progress("expanding (SAM)", n, len(by_image))
        with self.store.write():
            return self.store.add_regions(rows)

    def _sam(self):
        if self._expander is None:
            from sparseseg.expansion.registry import build_expander
            self._expander = build_expander(self.config.sam, resolve_device(self.config.backbone.device))
        return self._expander

    def _working_images(self) -> np.ndarray:
        """(N, S, S, 3) uint8 project images (what SAM sees; its masks come back at this size)."""
        if self._images is None:
            if self._features is not None:
                self._images = self._features.images.numpy()
            else:
                self._images = load_split(self.root / DATA_DIR, SPLIT).images.numpy()
        return self._images

    def _region_set(self, snap: Snapshot) -> RegionSet:
        """The stored regions of the current answers under the configured (model, tau), each with its
        click's current class, in query order."""
        from sparseseg.expansion.regions import RegionSet

        model, tau = self._region_model()
        stored = self.store.regions(model, tau)
        rows = [(q, stored[q.id]) for q in snap.queries if q.id in stored and q.id in snap.answers
                and snap.answers[q.id].class_id is not None]
        regions = RegionSet.empty(self.size)
        if not rows:
            return regions
        width = regions.masks.shape[1]
        masks = np.zeros((len(rows), width), dtype=np.uint8)
        for i, (_, r) in enumerate(rows):
            if r.kept and r.mask is not None:
                masks[i] = np.packbits(_mask_from_png(r.mask, self.size).reshape(-1))
        ints = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
        return RegionSet(self.size, ints([q.image_id for q, _ in rows]), ints([q.y for q, _ in rows]),
                         ints([q.x for q, _ in rows]), ints([snap.answers[q.id].class_id for q, _ in rows]),
                         ints([q.round for q, _ in rows]), np.asarray([r.score for _, r in rows], dtype=np.float32),
                         np.asarray([r.kept for _, r in rows], dtype=bool), masks)

    def resolved_regions(self, snap: Snapshot | None = None) -> tuple[RegionSet, Resolved] | None:
        """The stored regions and their pixels after the overlap rule (every queried pixel, answered,
        skipped or pending, counts as clicked); None without `expansion: sam`."""
        if self.config.expansion != "sam":
            return None
        from sparseseg.expansion.regions import clicked_pixels, resolve

        snap = snap or self.store.snapshot()
        regions = self._region_set(snap)
        ids = [torch.tensor([getattr(q, k) for q in snap.queries], dtype=torch.long) for k in ("image_id", "y", "x")]
        return regions, resolve(regions, clicked_pixels(*ids, self.size))

    def head(self, snap: Snapshot | None = None, progress: Progress | None = None) -> tuple[torch.nn.Module | None, TrainResult | None]:
        """The head trained on every non-skip answer: head.pt when it is current, else trained and saved.

        Returns (None, None) when no answer can be trained on yet.
        """
        from sparseseg.features.store import DETERMINISTIC
        from sparseseg.head.mlp import make_head, predict_proba, train_head

        snap = snap or self.store.snapshot()
        image, y, x, cls = self._trainable(snap)
        if len(cls) == 0:
            return None, None
        feats = self.features(progress)
        extra, region_pixels = None, 0
        if self.config.expansion == "sam":
            from sparseseg.expansion.regions import training_pixels

            self.expand_regions(progress)
            regions, resolved = self.resolved_regions(snap)
            sam = self.config.sam
            extra = training_pixels(resolved, regions, sam.max_region_pixels, sam.region_weight, self.config.seed)
            region_pixels = len(resolved)
        fingerprint = self._fingerprint(image, y, x, cls, extra)
        path = self.root / HEAD_FILE
        z = feats.store.at_pixels(image, y, x, DETERMINISTIC)
        head, retrained = None, False
        if path.exists():
            try:
                saved = torch.load(path, map_location=feats.device, weights_only=True)
                if saved.get("fingerprint") == fingerprint:
                    head = make_head(feats.store.dim, len(self.classes), self.config.head.hidden,
                                     dropout=getattr(self.config.head, "dropout", 0.0)).to(feats.device)
                    head.load_state_dict(saved["state_dict"])
                    head.eval()
            except Exception:  # an unreadable or outdated head.pt is simply retrained
                head = None
        if head is None:
            seed = int(derived_generator(self.config.seed, "head", len(cls)).initial_seed())
            if extra is None:
                head = train_head(z, cls, len(self.classes), self.config.head, seed, feats.device)
            else:  # clicks weigh 1, each click's drawn region pixels share sam.region_weight
                z_all = torch.cat([z, feats.store.at_pixels(extra.image, extra.y, extra.x, DETERMINISTIC)])
                weights = torch.cat([torch.ones(len(cls)), extra.weight])
                head = train_head(z_all, torch.cat([cls, extra.cls]), len(self.classes), self.config.head, seed,
                                  feats.device, weights=weights)
            state = {"fingerprint": fingerprint, "state_dict": head.state_dict(), "classes": self.classes,
                     "feature_dim": feats.store.dim, "pixels": len(cls), "trained_at": now()}
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            retrained = True
        accuracy = float((predict_proba(head, z).argmax(1) == cls).float().mean())
        seen = sorted({self.classes[c] for c in cls.tolist()})
        return head, TrainResult(len(cls), seen, accuracy, retrained, path, region_pixels,
                                 len(extra) if extra is not None else 0)

    # ------------------------------------------------------------------ query
    def query(self, budget: int | None = None, force: bool = False, progress: Progress | None = None) -> QueryResult:
        """Select the next `budget` pixels, record them as one round, and export the round's files.

        Pixels already queried (answered, skipped or pending) are never chosen again. With pending
        queries the round is refused unless `force`: answers usually change what is worth asking.

        Raises:
            SparsesegError: pending queries without `force`, a budget the strategy cannot meet, or
                another command changed the project while the pixels were being selected.
        """
        from sparseseg.selection.strategies import RoundContext, check_strategy, create_strategy

        snap = self.store.snapshot()
        pending = snap.pending()
        if pending and not force:
            rounds = ", ".join(str(r) for r in sorted({q.round for q in pending}))
            raise SparsesegError(
                f"{self.root}: {len(pending)} queried pixel(s) of round(s) {rounds} have no answer yet; import "
                "their answers first (sparseseg import), or pass --force to query more now (pending pixels stay "
                "pending and are never queried again)"
            )
        n = len(self.image_rows)
        budget = budget if budget is not None else self.config.budget_for(n)
        if budget < 1:
            raise SparsesegError(f"--budget {budget}: must be at least 1")
        free = n * self.size * self.size - len(snap.queries)
        if budget > free:
            raise SparsesegError(f"--budget {budget} is larger than the {free} pixels never queried")
        strategy = create_strategy(self.config.strategy)
        strategy.check_budget(n, self.size, budget)
        feats = self.features(progress)
        check_strategy(strategy, feats.store.backbone, getattr(self.config.head, "dropout", 0.0))
        head, _ = self.head(snap, progress)
        round = snap.next_round
        ctx = RoundContext(feats.store, self._queried_labels(snap), head, budget, round, self.config.seed,
                           self.config.features.noise_samples, progress, tile_pixels=self.config.features.tile_pixels)
        picks = strategy.select(ctx)
        pixels = list(zip(picks.image.tolist(), picks.y.tolist(), picks.x.tolist(), strict=True))
        info = {**picks.info, "coverage_only": head is None, "pending_before": len(pending)}
        with self.store.write():
            ids = self.store.add_round(snap.revision, round, self.config.strategy.name, budget,
                                       bool(pending), json.loads(json.dumps(info, default=float)), pixels)
        return QueryResult(round, len(ids), head is None, self.export_round(round))

    def _queried_labels(self, snap: Snapshot) -> PixelLabels:
        """Every queried pixel as a label: its class when answered, IGNORE when skipped or pending.

        The strategy excludes them all from its candidates and counts them as covered.
        """
        cls = [snap.answers[q.id].class_id if q.id in snap.answers and snap.answers[q.id].class_id is not None
               else IGNORE for q in snap.queries]
        labels = PixelLabels()
        for round in sorted({q.round for q in snap.queries}):
            idx = [i for i, q in enumerate(snap.queries) if q.round == round]
            qs = [snap.queries[i] for i in idx]
            labels.add(torch.tensor([q.image_id for q in qs]), torch.tensor([q.y for q in qs]),
                       torch.tensor([q.x for q in qs]), torch.tensor([cls[i] for i in idx]), round)
        return labels

    # ------------------------------------------------------------------ export
    def round_queries(self, round: int) -> list[Query]:
        names = {r.id: r.name for r in self.image_rows}
        snap = self.store.snapshot()
        queries = [Query(q.id, names[q.image_id], q.y, q.x) for q in snap.queries if q.round == round]
        if not queries:
            known = ", ".join(str(r.round) for r in snap.rounds) or "none yet"
            raise SparsesegError(f"{self.root}: round {round} has no queries (rounds: {known})")
        return queries

    def export_round(self, round: int) -> list[Path]:
        """Write (again) round `round`'s files from the database; returns their paths."""
        queries = self.round_queries(round)
        out = round_dir(self.root, round)
        (out / "review").mkdir(parents=True, exist_ok=True)
        palette = self.meta.palette
        ids = {r.name: r.id for r in self.image_rows}
        files = {
            "tasks.json": tasks_json(label_studio_tasks(self.project_id, round, self.size, queries, self.config.image_url)),
            "label_config.xml": label_studio_config(self.classes, palette),
            "cvat.xml": cvat_xml(self.project_id, round, self.size, self.classes, palette, queries, ids),
            "queries.csv": queries_csv(queries),
        }
        paths = []
        for name, text in files.items():
            atomic_write_text(out / name, text)
            paths.append(out / name)
        by_image: dict[str, list[tuple[int, int, int]]] = {}
        for q in queries:
            by_image.setdefault(q.image, []).append((q.id, q.y, q.x))
        regions = self.resolved_regions()  # with expansion: the regions so far, tinted under the crosshairs
        for name, points in sorted(by_image.items()):
            rgb = np.asarray(read_rgb(self.root / DATA_DIR / SPLIT / "images" / f"{name}.png"))
            if regions is not None:
                from sparseseg.expansion.regions import tint_regions

                rgb = tint_regions(rgb, regions[1], ids[name], palette, alpha=REVIEW_TINT)
            picture = crosshair_image(rgb, points)
            atomic_write(out / "review" / f"{name}.png", lambda tmp, p=picture: p.save(tmp, format="PNG"))
            paths.append(out / "review" / f"{name}.png")
        return paths

    # ------------------------------------------------------------------ import
    def import_file(self, path: Path, format: str | None = None, replace: bool = False,
                    annotator: str = "") -> ImportResult:
        """Store the answers of an exported file: all of them, or none (with a one-line reason).

        Importing a file whose bytes were imported before changes nothing. An answer that differs
        from a query's stored answer is refused unless `replace` (the old answer is kept, marked
        not current).
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SparsesegError(f"{path}: cannot read ({exc.strerror})") from None
        sha = hashlib.sha256(data).hexdigest()
        parsed = parse_file(path, data, self.size, format)  # the file's own problems, before the database
        other = parsed.project_ids - {self.project_id}
        if other:
            raise SparsesegError(f"{path}: made for project {sorted(other)[0]}, but this project is {self.project_id} "
                                 "(a file from another project?)")
        with self.store.write():
            earlier = self.store.find_import(sha)
            if earlier is not None:
                return ImportResult(parsed.format, already=tuple(earlier))
            resolved = self._resolve(path, parsed, self.store.snapshot(), replace, annotator)
            import_id = self.store.add_import(sha, str(path.resolve()), parsed.format, resolved.new, resolved.replace,
                                              resolved.unchanged, resolved.unanswered)
        result = ImportResult(parsed.format, len(resolved.new), resolved.unchanged, len(resolved.replace),
                              resolved.unanswered, resolved.skips, import_id=import_id)
        if self.config.expansion == "sam":  # after the commit: a SAM problem never loses an import
            try:
                result.regions = self.expand_regions()
            except SparsesegError as exc:
                result.expansion_error = str(exc)
        return result

    def _resolve(self, path: Path, parsed: ParsedFile, snap: Snapshot, replace: bool, annotator: str) -> _Resolved:
        """Check every raw answer against the queries, classes and stored answers; nothing is written here."""
        class_ids = {name: i for i, name in enumerate(self.classes)}
        image_ids = {r.name: r.id for r in self.image_rows}
        names = {r.id: r.name for r in self.image_rows}
        by_id = {q.id: q for q in snap.queries}
        by_pixel = {(q.image_id, q.y, q.x): q for q in snap.queries}
        stamp = now()
        decided: dict[int, tuple[int | None, RawAnswer]] = {}  # query id -> (class id, first answer)
        unanswered: set[int] = set()

        def fail(raw: RawAnswer, problem: str) -> SparsesegError:
            return SparsesegError(f"{path}: {raw.where}: {problem}")

        for raw in parsed.answers:
            # 1. which query: by pixel when the file gives one (the claimed query id must agree), else by id
            if raw.image is not None:
                if raw.image not in image_ids:
                    raise fail(raw, f"image {raw.image!r} is not in this project (a file from another project?)")
                if not (0 <= raw.y < self.size and 0 <= raw.x < self.size):
                    raise fail(raw, f"pixel (y={raw.y}, x={raw.x}) is outside the {self.size}x{self.size} image")
                query = by_pixel.get((image_ids[raw.image], raw.y, raw.x))
                if query is None:
                    moved = by_id.get(raw.query_id) if raw.query_id is not None else None
                    hint = (f"; query {moved.id} is at (y={moved.y}, x={moved.x}): was the point moved?"
                            if moved is not None and names[moved.image_id] == raw.image else "")
                    raise fail(raw, f"pixel (y={raw.y}, x={raw.x}) of image {raw.image!r} was never queried{hint}")
                if raw.query_id is not None and raw.query_id != query.id:
                    raise fail(raw, f"says query {raw.query_id} but lies on the pixel of query {query.id}")
            else:
                query = by_id.get(raw.query_id)
                if query is None:
                    raise fail(raw, f"query {raw.query_id} does not exist in this project")
            # 2. which class
            if raw.label is None:
                unanswered.add(query.id)
                continue
            if raw.label == SKIP_LABEL:
                class_id = None
            elif raw.label in class_ids:
                class_id = class_ids[raw.label]
            else:
                raise fail(raw, f"class {raw.label!r} is not in the project (classes: {', '.join(self.classes)}; "
                                f"{SKIP_LABEL!r} = cannot tell)")
            # 3. one file, one answer per query
            if query.id in decided:
                first_class, first = decided[query.id]
                if first_class != class_id:
                    raise fail(raw, f"query {query.id} is answered {self._label(first_class)!r} in {first.where} "
                                    f"and {self._label(class_id)!r} here; resolve the disagreement first")
                continue
            decided[query.id] = (class_id, raw)
        # 4. against the stored answers
        out = _Resolved(unanswered=len(unanswered - set(decided) - set(snap.answers)))
        for query_id, (class_id, raw) in decided.items():
            answer = NewAnswer(query_id, class_id, raw.annotator or annotator, raw.time or stamp)
            current = snap.answers.get(query_id)
            if current is None:
                out.new.append(answer)
            elif current.class_id == class_id:
                out.unchanged += 1
                continue
            elif replace:
                out.replace.append(answer)
            else:
                q = by_id[query_id]
                raise fail(raw, f"query {query_id} (image {names[q.image_id]!r}, y={q.y}, x={q.x}) is already "
                                f"answered {self._label(current.class_id)!r} (import {current.import_id}); this file "
                                f"says {self._label(class_id)!r}: pass --replace to record the new answer")
            out.skips += class_id is None
        return out

    def _label(self, class_id: int | None) -> str:
        return SKIP_LABEL if class_id is None else self.classes[class_id]

    # ------------------------------------------------------------------ train, predict
    def train(self, progress: Progress | None = None) -> TrainResult:
        """Train (or confirm) the head on every non-skip answer and save head.pt."""
        _, result = self.head(progress=progress)
        if result is None:
            raise SparsesegError(f"{self.root}: no answer to train on yet (only skips, or nothing imported)")
        return result

    def predict(self, out: Path, confidence: bool = False, original_size: bool = False,
                progress: Progress | None = None) -> list[Path]:
        """Write a palette PNG mask per image (and, with `confidence`, the top class probability).

        Masks are S x S (the working size), or each image's original size with `original_size`
        (nearest for the mask, bilinear for the confidence PNG; the .npy stays S x S).
        """
        from sparseseg.features.store import DETERMINISTIC
        from sparseseg.head.mlp import predict_proba

        head, _ = self.head(progress=progress)
        if head is None:
            raise SparsesegError(f"{self.root}: no answer to train on yet, so nothing to predict with")
        feats = self.features(progress)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        palette = [v for rgb in self.meta.palette for v in rgb]
        written = []
        for i, row in enumerate(self.image_rows):
            tiles = feats.store.image_tiles(i, DETERMINISTIC, self.config.features.tile_pixels)
            probs = torch.cat([predict_proba(head, t) for t in tiles])
            top, ids = probs.max(1)
            mask = Image.fromarray(ids.view(self.size, self.size).numpy().astype(np.uint8), mode="P")
            mask.putpalette(palette)
            conf = top.view(self.size, self.size).numpy().astype(np.float32)
            conf_png = Image.fromarray(np.round(conf * 255).astype(np.uint8), mode="L")
            if original_size:
                mask = mask.resize((row.width, row.height), Image.Resampling.NEAREST)
                conf_png = conf_png.resize((row.width, row.height), Image.Resampling.BILINEAR)
            atomic_write(out / f"{row.name}.png", lambda tmp, m=mask: m.save(tmp, format="PNG"))
            written.append(out / f"{row.name}.png")
            if confidence:
                atomic_write(out / f"{row.name}_confidence.png", lambda tmp, c=conf_png: c.save(tmp, format="PNG"))
                atomic_write(out / f"{row.name}_confidence.npy", lambda tmp, c=conf: _save_npy(tmp, c))
                written += [out / f"{row.name}_confidence.png", out / f"{row.name}_confidence.npy"]
            if progress:
                progress("predicting", i + 1, len(self.image_rows))
        return written

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        """Rounds with queried / answered / skipped / pending counts, and the class histogram."""
        snap = self.store.snapshot()
        rounds = []
        for r in snap.rounds:
            qs = [q for q in snap.queries if q.round == r.round]
            answered = [snap.answers[q.id] for q in qs if q.id in snap.answers]
            skipped = sum(a.class_id is None for a in answered)
            rounds.append({"round": r.round, "created_at": r.created_at, "strategy": r.strategy,
                           "coverage_only": bool(r.info.get("coverage_only", False)), "forced": r.forced,
                           "queried": len(qs), "answered": len(answered) - skipped, "skipped": skipped,
                           "pending": len(qs) - len(answered)})
        counts = Counter(a.class_id for a in snap.answers.values())
        head = self.root / HEAD_FILE
        return {
            "project": str(self.root), "project_id": self.project_id, "images": len(self.image_rows),
            "size": self.size, "classes": self.classes, "rounds": rounds,
            "totals": {k: sum(r[k] for r in rounds) for k in ("queried", "answered", "skipped", "pending")},
            "class_histogram": {name: counts.get(i, 0) for i, name in enumerate(self.classes)},
            "skipped": counts.get(None, 0),
            "imports": self.store.imports(),
            "head": str(head) if head.exists() else None,
            "expansion": self.config.expansion,
            "regions": self.store.region_counts(),
        }
