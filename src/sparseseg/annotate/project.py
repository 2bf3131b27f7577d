"""A labelling project on disk: query, import, train, predict, status (the layout: annotate/layout.py).

Project = the round engine (loop/engine.py) + the SQLite store of queries and answers (store.py) +
the exporters (export.py, review.py). `sparseseg init` (init.py) creates the folder.

With expansion every answered click is also expanded into a region, stored in the database's
`regions` table with the model and tau that produced it (after `import`, or whenever a command
needs the head); regions are trained on and drawn in the next round's review PNGs.

Only `query` and `import` change the database's queries and answers, each in one transaction. The
round's files are written after its transaction commits; `export` writes them again from the
database at any time.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from sparseseg.annotate.answers import resolve_answers
from sparseseg.annotate.export import (
    Query,
    cvat_xml,
    label_studio_config,
    label_studio_tasks,
    queries_csv,
    tasks_json,
)
from sparseseg.annotate.importers import parse_file
from sparseseg.annotate.layout import (
    DATA_DIR,
    HEAD_FILE,
    SPLIT,
    STRATEGY_CACHE_FILE,
    load_project_config,
    round_dir,
)
from sparseseg.annotate.regions import expand_new_clicks, stored_regions
from sparseseg.annotate.review import crosshair_image
from sparseseg.annotate.store import DB_FILE, AnnotationStore, Snapshot, now
from sparseseg.config import ProjectConfig
from sparseseg.data.dataset import load_meta, load_split
from sparseseg.data.readers import read_image
from sparseseg.errors import SparsesegError
from sparseseg.io import atomic_write, atomic_write_text
from sparseseg.labels import IGNORE, PixelLabels

if TYPE_CHECKING:  # heavy modules are imported only by the commands that run the backbone
    from sparseseg.expansion.regions import RegionSet, Resolved
    from sparseseg.features.store import FeatureStore
    from sparseseg.loop.engine import Engine, TrainingSet
    from sparseseg.selection.strategies import Strategy

Progress = Callable[[str, int, int], None]
REVIEW_TINT = 0.35  # opacity of the class colour over region pixels in review PNGs (the image stays readable)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # np.save(path) would append ".npy" to a temporary name
        np.save(fh, array)


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
    regions: int = 0  # with expansion: clicks newly expanded after the import
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


# ---------------------------------------------------------------------------- the project
class Project:
    """An existing project folder (see annotate/layout.py for its layout)."""

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
        self._engine: Engine | None = None
        self._features: FeatureStore | None = None
        self._images: np.ndarray | None = None

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ engine and features
    def engine(self, progress: Progress | None = None) -> tuple[Engine, FeatureStore]:
        """The round engine (the backbone loaded) and a FeatureStore over the project's images, built once."""
        if self._engine is None:
            from sparseseg.loop.engine import Engine

            tick = (lambda d, t: progress("loading images", d, t)) if progress else None
            split = load_split(self.root / DATA_DIR, SPLIT, progress=tick)
            if split.names != [r.name for r in self.image_rows]:
                raise SparsesegError(f"{self.root / DATA_DIR / SPLIT / 'images'}: the images differ from the ones "
                                     "the project database lists; do not add or remove images in a project")
            engine = Engine(self.config, self.classes, default_size=self.size)
            self._features = engine.stores({SPLIT: split.images})[SPLIT]
            self._images = split.images.numpy()
            self._engine = engine
        return self._engine, self._features

    def _working_images(self) -> np.ndarray:
        """(N, S, S, 3) uint8 project images (what the expander sees; its masks come back at this size)."""
        if self._images is None:
            self._images = load_split(self.root / DATA_DIR, SPLIT).images.numpy()
        return self._images

    def _queried_labels(self, snap: Snapshot) -> PixelLabels:
        """Every queried pixel as a label: its class when answered, IGNORE when skipped or pending.

        The strategy excludes them all from its candidates and counts them as covered; the overlap
        rule keeps them all out of regions; the head trains on the answered ones.
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

    # ------------------------------------------------------------------ regions
    @property
    def expands(self) -> bool:
        return self.config.expansion != "none"

    def _region_model(self) -> tuple[str, float]:
        from sparseseg.expansion.registry import expansion_of

        expansion = expansion_of(self.config)
        return expansion.model, expansion.tau

    def expand_regions(self, progress: Progress | None = None) -> int:
        """Expand every answered (non-skip) click that has no region under the configured (model, tau)
        yet; returns how many were added. Does nothing without expansion.

        Raises:
            SparsesegError: the expander cannot be loaded (a missing checkpoint, a Hub id without internet).
        """
        if not self.expands:
            return 0
        return expand_new_clicks(self.store, self._expander, self._working_images, *self._region_model(), progress)

    def _expander(self):
        from sparseseg.expansion.registry import expansion_of

        expansion = expansion_of(self.config)
        if self._engine is not None or expansion.needs_features:  # regions grown in feature space need the backbone
            engine, features = self.engine()
            return engine.expander(features)
        from sparseseg.device import resolve_device

        return expansion.build(resolve_device(self.config.backbone.device))

    def resolved_regions(self, snap: Snapshot | None = None) -> tuple[RegionSet, Resolved] | None:
        """The stored regions and their pixels after the overlap rule (every queried pixel, answered,
        skipped or pending, counts as clicked); None without expansion."""
        if not self.expands:
            return None
        from sparseseg.expansion.regions import clicked_pixels, resolve

        snap = snap or self.store.snapshot()
        regions = stored_regions(self.store, snap, self.size, *self._region_model())
        ids = [torch.tensor([getattr(q, k) for q in snap.queries], dtype=torch.long) for k in ("image_id", "y", "x")]
        return regions, resolve(regions, clicked_pixels(*ids, self.size))

    # ------------------------------------------------------------------ the head
    def _fingerprint(self, data: TrainingSet) -> str:
        c = data.clicks
        state = {"pixels": torch.stack([c.image, c.y, c.x, c.cls]).T.tolist(), "seed": self.config.seed,
                 "head": self.config.head.model_dump(mode="json"), "backbone": self.config.backbone.model_dump(mode="json"),
                 "features": self.config.features.model_dump(mode="json")}
        if data.regions is not None:  # only with expansion, so heads trained without it keep their fingerprint
            extra = data.regions
            state["regions"] = torch.stack([extra.image, extra.y, extra.x, extra.cls]).T.tolist()
            state["region_weights"] = [round(float(w), 9) for w in extra.weight]
            state[self.config.expansion] = getattr(self.config, self.config.expansion).model_dump(mode="json")
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def head(self, snap: Snapshot | None = None, progress: Progress | None = None) -> tuple[torch.nn.Module | None, TrainResult | None]:
        """The head trained on every non-skip answer: head.pt when it is current, else trained and saved.

        It is seeded by the engine's head seed rule with the latest round that has an answer.
        Returns (None, None) when no answer can be trained on yet.
        """
        from sparseseg.head.mlp import build_head, predict_proba

        snap = snap or self.store.snapshot()
        labels = self._queried_labels(snap)
        if not labels.trainable().any():
            return None, None
        engine, store = self.engine(progress)
        regions = None
        if self.expands:
            self.expand_regions(progress)
            regions = stored_regions(self.store, snap, self.size, *self._region_model())
        data = engine.training_set(labels, regions, self.size)
        fingerprint = self._fingerprint(data)
        path = self.root / HEAD_FILE
        head, retrained = None, False
        if path.exists():
            try:
                saved = torch.load(path, map_location=engine.device, weights_only=True)
                if saved.get("fingerprint") == fingerprint:
                    head = build_head(store.dim, len(self.classes), self.config.head).to(engine.device)
                    head.load_state_dict(saved["state_dict"])
                    head.eval()
            except Exception:  # an unreadable or outdated head.pt is simply retrained
                head = None
        if head is None:
            head = engine.train_head(store, data, data.last_round)
            state = {"fingerprint": fingerprint, "state_dict": head.state_dict(), "classes": self.classes,
                     "feature_dim": store.dim, "pixels": len(data.clicks), "trained_at": now()}
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            retrained = True
        cls = data.clicks.cls
        accuracy = float((predict_proba(head, engine.click_features(store, data)).argmax(1) == cls).float().mean())
        seen = sorted({self.classes[c] for c in cls.tolist()})
        return head, TrainResult(len(cls), seen, accuracy, retrained, path,
                                 len(data.resolved) if data.resolved is not None else 0,
                                 len(data.regions) if data.regions is not None else 0)

    # ------------------------------------------------------------------ query
    def query(self, budget: int | None = None, force: bool = False, progress: Progress | None = None) -> QueryResult:
        """Select the next `budget` pixels, record them as one round, and export the round's files.

        Pixels already queried (answered, skipped or pending) are never chosen again. With pending
        queries the round is refused unless `force`: answers usually change what is worth asking.

        Raises:
            SparsesegError: pending queries without `force`, a budget the strategy cannot meet, or
                another command changed the project while the pixels were being selected.
        """
        snap = self.store.snapshot()
        if snap.rounds and not self._round_exported(snap.rounds[-1].round):
            # A query killed after recording its round but before writing the round's files: finish that one,
            # so that running the command again ends as if it had never stopped.
            last = snap.rounds[-1]
            files = self.export_round(last.round)
            count = sum(q.round == last.round for q in snap.queries)
            return QueryResult(last.round, count, bool(last.info.get("coverage_only")), files)
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
        engine, store = self.engine(progress)
        strategy = engine.prepare_strategy(n, self.size, budget)
        self._load_strategy_cache(strategy)
        head, _ = self.head(snap, progress)
        round = snap.next_round
        picks = engine.select(store, self._queried_labels(snap), head, budget, round, progress)
        self._save_strategy_cache(strategy)
        pixels = list(zip(picks.image.tolist(), picks.y.tolist(), picks.x.tolist(), strict=True))
        info = {**picks.info, "coverage_only": head is None, "pending_before": len(pending)}
        with self.store.write():
            ids = self.store.add_round(snap.revision, round, self.config.strategy.name, budget,
                                       bool(pending), json.loads(json.dumps(info, default=float)), pixels)
        return QueryResult(round, len(ids), head is None, self.export_round(round))

    def _strategy_fingerprint(self) -> str:
        """What a cached strategy state holds for: every setting, the images and their size."""
        text = json.dumps([self.config.model_dump(mode="json"), [r.name for r in self.image_rows], self.size])
        return hashlib.sha256(text.encode()).hexdigest()

    def _load_strategy_cache(self, strategy: Strategy) -> None:
        """Restore what the strategy kept from the last query (the local picks: most of a round's
        time on the CPU), unless the settings or the images changed since; a damaged file is only a
        cache, so it is recomputed."""
        path = self.root / STRATEGY_CACHE_FILE
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(cached, dict) and cached.get("fingerprint") == self._strategy_fingerprint():
            try:
                strategy.load_state_dict(cached.get("state", {}))
            except (TypeError, ValueError, KeyError):
                strategy.load_state_dict({})

    def _save_strategy_cache(self, strategy: Strategy) -> None:
        state = strategy.state_dict()
        if state:
            atomic_write_text(self.root / STRATEGY_CACHE_FILE,
                              json.dumps({"fingerprint": self._strategy_fingerprint(), "state": state}))

    # ------------------------------------------------------------------ export
    def round_queries(self, round: int) -> list[Query]:
        names = {r.id: r.name for r in self.image_rows}
        snap = self.store.snapshot()
        queries = [Query(q.id, names[q.image_id], q.y, q.x) for q in snap.queries if q.round == round]
        if not queries:
            known = ", ".join(str(r.round) for r in snap.rounds) or "none yet"
            raise SparsesegError(f"{self.root}: round {round} has no queries (rounds: {known})")
        return queries

    def _round_exported(self, round: int) -> bool:
        """Whether every file `export_round` writes for `round` is there."""
        out = round_dir(self.root, round)
        images = {q.image for q in self.round_queries(round)}
        return (all((out / name).is_file() for name in ("tasks.json", "label_config.xml", "cvat.xml", "queries.csv"))
                and all((out / "review" / f"{name}.png").is_file() for name in images))

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
            rgb = np.asarray(read_image(self.root / DATA_DIR / SPLIT / "images" / f"{name}.png"))
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
            resolved = resolve_answers(path, parsed, self.store.snapshot(), self.classes, self.image_rows,
                                       self.size, replace, annotator)
            import_id = self.store.add_import(sha, str(path.resolve()), parsed.format, resolved.new, resolved.replace,
                                              resolved.unchanged, resolved.unanswered)
        result = ImportResult(parsed.format, len(resolved.new), resolved.unchanged, len(resolved.replace),
                              resolved.unanswered, resolved.skips, import_id=import_id)
        if self.expands:  # after the commit: an expander problem never loses an import
            try:
                result.regions = self.expand_regions()
            except SparsesegError as exc:
                result.expansion_error = str(exc)
        return result

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
        head, _ = self.head(progress=progress)
        if head is None:
            raise SparsesegError(f"{self.root}: no answer to train on yet, so nothing to predict with")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        palette = [v for rgb in self.meta.palette for v in rgb]
        written = []
        for i, row in enumerate(self.image_rows):
            ids, top = self.predicted(head, i, progress)
            mask = Image.fromarray(ids.numpy().astype(np.uint8), mode="P")
            mask.putpalette(palette)
            conf = top.numpy().astype(np.float32)
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

    def predicted(self, head: torch.nn.Module, image: int, progress: Progress | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, S) predicted class ids and (S, S) top-class probabilities of project image `image`."""
        from sparseseg.features.store import DETERMINISTIC
        from sparseseg.head.mlp import predict_proba

        _, store = self.engine(progress)
        tiles = store.image_tiles(image, DETERMINISTIC, self.config.features.tile_pixels)
        top, ids = torch.cat([predict_proba(head, t) for t in tiles]).max(1)
        return ids.view(self.size, self.size), top.view(self.size, self.size)

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
