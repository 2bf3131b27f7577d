"""The simulated active-learning experiment: select, answer from ground truth, retrain, evaluate.

A run directory tells everything about a run:

    config.yaml        the resolved config (a resumed run must match it)
    meta.json          versions, hardware, dataset and backbone summary
    rounds.jsonl       one JSON line per finished round: labels, mIoU, per-class IoU, pixel
                       accuracy, seconds and peak memory of each phase
    picks/round_XX.csv the pixels chosen in round XX (image, y, x, class, round)
    labels.csv         every labelled pixel so far
    previews/round_XX.png  picks and predictions on a few training images
    head.pt            the latest head (state dict + what it was trained on)
    regions/round_XX.npz, .csv  with expansion=sam: each click's SAM region (masks bit-packed),
                       score and whether it was kept, with the model and tau (docs/expansion.md)

A round's line in rounds.jsonl is written last, after its other files: a round without a line is
incomplete and is replayed on resume. Every random draw of round r is seeded by (seed, r, purpose),
so a resumed run ends identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparseseg import __version__
from sparseseg.config import ExperimentConfig, dump_config, load_config
from sparseseg.data.dataset import Split, load_meta, load_split
from sparseseg.device import peak_memory_gb, resolve_device
from sparseseg.errors import SparsesegError
from sparseseg.expansion.regions import (
    RegionSet,
    Resolved,
    TrainingPixels,
    clicked_pixels,
    expand_clicks,
    resolve,
    training_pixels,
)
from sparseseg.features.store import DETERMINISTIC, FeatureStore
from sparseseg.head.mlp import predict_proba, train_head
from sparseseg.io import atomic_write, atomic_write_text, read_jsonl
from sparseseg.labels import IGNORE, PixelLabels
from sparseseg.loop.metrics import ConfusionMatrix
from sparseseg.loop.preview import save_preview
from sparseseg.seeding import derived_generator
from sparseseg.selection.strategies import RoundContext, check_strategy, create_strategy

Progress = Callable[[str, int, int], None]


@dataclass
class StepResult:
    """What one round produced; `record` is the line written to rounds.jsonl."""

    round: int
    record: dict
    done: bool


def load_backbone(config: ExperimentConfig, device: torch.device):
    """The configured backbone (`sparseseg.backbones.registry`). Without `backbone.input_size` it runs
    at the checkpoint's size (ADM: recorded by pretrain, else its flags'; diffusers: `sample_size`),
    else at the dataset's."""
    from sparseseg.backbones.registry import build_backbone

    return build_backbone(config.backbone, device, default_size=load_meta(config.data).size)


def predict_image(head: torch.nn.Module, store: FeatureStore, image: int, tile_pixels: int) -> torch.Tensor:
    """(S, S) predicted class ids of one image of `store`, computed tile by tile."""
    tiles = [predict_proba(head, t).argmax(1) for t in store.image_tiles(image, DETERMINISTIC, tile_pixels)]
    return torch.cat(tiles).view(store.size, store.size)


def evaluate_head(head: torch.nn.Module, store: FeatureStore, masks: torch.Tensor, class_names: list[str],
                  tile_pixels: int, progress: Callable[[int, int], None] | None = None) -> dict:
    """Confusion-matrix mIoU of `head` over every image of `store` against `masks` (N, S, S).

    Shared by the active-learning loop and the fully supervised reference, so both are scored alike.
    """
    cm = ConfusionMatrix(len(class_names), ignore_index=IGNORE)
    for i in range(len(store)):
        cm.update(predict_image(head, store, i, tile_pixels), masks[i])
        if progress:
            progress(i + 1, len(store))
    return cm.to_dict(class_names)


class Experiment:
    """One strategy, one seed, R rounds, in one run directory (created or resumed)."""

    def __init__(self, config: ExperimentConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.device = resolve_device(config.backbone.device)
        self._check_run_dir()
        self.meta = load_meta(config.data)
        self.class_names = list(self.meta.classes)
        self.train = self._load(config.train_split, need_masks=True)
        self.test = self._load(config.eval_split, need_masks=True)
        self.budget = config.budget_for(len(self.train.names))
        self.strategy = create_strategy(config.strategy)
        self.strategy.check_budget(len(self.train.names), self.meta.size, self.budget)
        self.backbone = load_backbone(config, self.device)
        check_strategy(self.strategy, self.backbone, config.head.dropout)
        self.expander = None
        if config.expansion == "sam" and not self._finished_on_disk():
            from sparseseg.expansion.registry import build_expander

            self.expander = build_expander(config.sam, self.device)  # a missing SAM fails before any file is written
        feat = config.features
        # Most reuse is on the training side (noise samples of every image); the evaluation split
        # only needs its deterministic maps.
        self.train_store = FeatureStore(self.backbone, self.train.images, config.seed, config.train_split,
                                        feat.cache_gb * 0.75, config.backbone.batch_size, self.device)
        self.test_store = FeatureStore(self.backbone, self.test.images, config.seed, config.eval_split,
                                       feat.cache_gb * 0.25, config.backbone.batch_size, self.device)
        self._create_run_dir()
        self.records = self._read_records()
        self.labels = self._read_labels()
        self.regions = self._read_regions()
        self.resolved: Resolved | None = None  # region pixels after the overlap rule (expansion only)
        self.region_training: TrainingPixels | None = None
        self.head = None
        self._label_feats = torch.empty(0, self.train_store.dim)
        if self.records:
            self._retrain(self.completed)
        self._write_meta()

    # ------------------------------------------------------------------ run directory
    @property
    def completed(self) -> int:
        return len(self.records)

    def _check_run_dir(self) -> None:
        """Refuse a directory that holds other files, or finished rounds of another config."""
        path = self.out / "config.yaml"
        if path.exists():
            finished = (self.out / "rounds.jsonl").exists() and (self.out / "rounds.jsonl").stat().st_size > 0
            if finished and load_config(path) != self.config:
                raise SparsesegError(
                    f"{path}: this run directory holds a run with a different config; "
                    "resume it with the same config or choose another out directory"
                )
        elif self.out.exists() and any(self.out.iterdir()):
            raise SparsesegError(f"{self.out}: directory is not empty and holds no sparseseg run; choose another out")

    def _finished_on_disk(self) -> bool:
        """Whether the run directory already holds every round (then SAM need not be loaded)."""
        return len(read_jsonl(self.out / "rounds.jsonl")[0]) >= self.config.rounds  # a torn line is unfinished

    def _create_run_dir(self) -> None:
        """Written only once data and backbone have loaded, so a typo leaves no stale config behind."""
        (self.out / "picks").mkdir(parents=True, exist_ok=True)
        (self.out / "previews").mkdir(exist_ok=True)
        if self.config.expansion == "sam":
            (self.out / "regions").mkdir(exist_ok=True)
        atomic_write_text(self.out / "config.yaml", dump_config(self.config))

    def _load(self, split: str, need_masks: bool) -> Split:
        data = load_split(self.config.data, split, progress=self._tick(f"loading {split}"))
        if need_masks and data.masks is None:
            raise SparsesegError(f"{self.config.data}/{split}: no masks; the simulated loop needs ground truth")
        return data

    def _read_records(self) -> list[dict]:
        path = self.out / "rounds.jsonl"
        records, torn = read_jsonl(path)  # a torn last line is an unfinished round: replay it
        if torn:  # drop the torn tail so the next append starts a clean line
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def _read_labels(self) -> PixelLabels:
        path = self.out / "labels.csv"
        if not path.exists():
            return PixelLabels()
        return PixelLabels.read_csv(path, self.train.names).upto(self.completed)

    def _read_regions(self) -> RegionSet:
        """The regions of every finished round (expansion only; empty otherwise)."""
        regions = RegionSet.empty(self.meta.size)
        if self.config.expansion != "sam":
            return regions
        for r in range(1, self.completed + 1):
            regions = regions.concat(RegionSet.load_npz(self.out / "regions" / f"round_{r:02d}.npz")[0])
        return regions

    def _write_meta(self) -> None:
        info = {
            "sparseseg_version": __version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "hardware": {
                "platform": platform.platform(),
                "cpu": platform.processor() or platform.machine(),
                "cpu_threads": torch.get_num_threads(),
                "device": str(self.device),
                "cuda": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            },
            "dataset": {"root": str(self.config.data), "name": self.meta.name, "classes": self.class_names,
                        "size": self.meta.size, "train_images": len(self.train.names),
                        "test_images": len(self.test.names)},
            "backbone": {"name": self.config.backbone.name,
                         "weights": str(self.config.backbone.checkpoint or self.config.backbone.hub_id
                                        or "shipped with the package"),
                         "input_size": self.backbone.input_size, "feature_dim": self.train_store.dim,
                         "maps": [vars(i) for i in self.backbone.feature_info]},
            "budget_per_round": self.budget,
        }
        if self.config.expansion == "sam":
            from sparseseg.expansion.registry import describe

            info["expansion"] = {"method": "sam", "model": describe(self.config.sam),
                                 **self.config.sam.model_dump(mode="json")}
        atomic_write_text(self.out / "meta.json", json.dumps(info, indent=2))

    # ------------------------------------------------------------------ helpers
    def _tick(self, task: str) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None
        return lambda done, total: self.progress(task, done, total)

    @contextmanager
    def _phase(self, timings: dict, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        timings[name] = {"seconds": round(time.perf_counter() - start, 3),
                         "peak_gb": round(peak_memory_gb(self.device), 3)}

    def _update_label_features(self) -> None:
        """Extract features of newly labelled pixels only; earlier ones are kept."""
        new = slice(len(self._label_feats), len(self.labels))
        if new.start == new.stop:
            return
        lab = self.labels
        feats = self.train_store.at_pixels(lab.image[new], lab.y[new], lab.x[new], DETERMINISTIC)
        self._label_feats = torch.cat([self._label_feats, feats])

    def _retrain(self, round: int) -> None:
        self._update_label_features()
        keep = self.labels.trainable()
        if not keep.any():
            self.head = None
            return
        seed = int(derived_generator(self.config.seed, "head", round).initial_seed())
        if self.config.expansion != "sam":
            self.head = train_head(self._label_feats[keep], self.labels.cls[keep], len(self.class_names),
                                   self.config.head, seed, self.device)
            return
        # Regions: the overlap rule over every round's regions, then at most R pixels per click,
        # sharing weight w (docs/expansion.md). Their features are read afresh each round.
        sam = self.config.sam
        lab = self.labels
        regions = self.regions.upto(round)
        self.resolved = resolve(regions, clicked_pixels(lab.image, lab.y, lab.x, self.meta.size))
        self.region_training = extra = training_pixels(self.resolved, regions, sam.max_region_pixels,
                                                       sam.region_weight, self.config.seed)
        feats = self._label_feats[keep]
        if len(extra):
            feats = torch.cat([feats, self.train_store.at_pixels(extra.image, extra.y, extra.x, DETERMINISTIC)])
        weights = torch.cat([torch.ones(int(keep.sum())), extra.weight])
        self.head = train_head(feats, torch.cat([lab.cls[keep], extra.cls]), len(self.class_names),
                               self.config.head, seed, self.device, weights=weights)

    def predict(self, store: FeatureStore, image: int) -> torch.Tensor:
        """(S, S) predicted class ids of one image, computed tile by tile."""
        return predict_image(self.head, store, image, self.config.features.tile_pixels)

    def evaluate(self) -> dict:
        """Confusion-matrix mIoU over the whole evaluation split."""
        return evaluate_head(self.head, self.test_store, self.test.masks, self.class_names,
                             self.config.features.tile_pixels, self._tick("evaluating"))

    # ------------------------------------------------------------------ the loop
    def step(self) -> StepResult:
        """Run the next round and write its files; returns its record."""
        r = self.completed + 1
        if r > self.config.rounds:
            return StepResult(self.completed, self.records[-1] if self.records else {}, True)
        timings: dict = {}
        # 1. select b pixels (round 1 has no head: coverage alone)
        with self._phase(timings, "select"):
            ctx = RoundContext(self.train_store, self.labels, self.head, self.budget, r, self.config.seed,
                               self.config.features.noise_samples, self.progress, self.config.features.tile_pixels)
            picks = self.strategy.select(ctx)
        # 2. the oracle answers from the ground-truth mask (void stays void: budget spent, not trained on)
        answers = self.train.masks[picks.image, picks.y, picks.x].long()
        self.labels.add(picks.image, picks.y, picks.x, answers, r)
        # 2b. with expansion, each answered click is one SAM point prompt; its kept region inherits the
        #     answer (regions are computed on the training images at the working resolution)
        new_regions = None
        if self.config.expansion == "sam":
            with self._phase(timings, "expand"):
                new_regions = expand_clicks(self.expander, self.train.images, picks.image, picks.y, picks.x, answers,
                                            r, self.config.sam.tau, self._tick("expanding"))
            self.regions = self.regions.upto(r - 1).concat(new_regions)
        # 3. retrain the head on every labelled pixel (features of new ones extracted once)
        with self._phase(timings, "train"):
            self._retrain(r)
        # 4. evaluate on the whole evaluation split
        with self._phase(timings, "evaluate"):
            metrics = self.evaluate() if self.head is not None else {"miou": 0.0, "pixel_accuracy": 0.0}
        record = {
            "round": r,
            "strategy": self.config.strategy.name,
            "seed": self.config.seed,
            "new_pixels": len(picks.image),
            "labelled": len(self.labels),
            "trainable": int(self.labels.trainable().sum()),
            "void_answers": int((answers == IGNORE).sum()),
            **self._expansion_counts(new_regions),
            **metrics,
            "selection": picks.info,
            "phases": timings,
        }
        self._write_round(r, record, new_regions)
        return StepResult(r, record, r >= self.config.rounds)

    def _expansion_counts(self, new: RegionSet | None) -> dict:
        """Click parity in numbers: clicks spent, and pixels supervised by clicks and regions together."""
        if new is None:
            return {}
        region_pixels = len(self.resolved) if self.resolved is not None else 0
        trainable = int(self.labels.trainable().sum())
        expanded = ~np.isnan(new.score)
        return {
            "clicks": len(self.labels),
            "supervised_pixels": trainable + region_pixels,
            "region_pixels": region_pixels,
            "training_region_pixels": len(self.region_training) if self.region_training is not None else 0,
            "regions": {"expanded": int(expanded.sum()), "kept": int(new.kept.sum()),
                        "mean_score": round(float(new.score[expanded].mean()), 4) if expanded.any() else None,
                        "kept_pixels": int(new.pixels().sum())},
        }

    def _write_round(self, r: int, record: dict, new_regions: RegionSet | None = None) -> None:
        names, classes = self.train.names, self.class_names
        if new_regions is not None:
            path = self.out / "regions" / f"round_{r:02d}.npz"
            new_regions.save_npz(path, self.expander.name, self.config.sam.tau)
            new_regions.write_csv(path.with_suffix(".csv"), names, classes)
        self.labels.subset(self.labels.round == r).write_csv(self.out / "picks" / f"round_{r:02d}.csv", names, classes)
        self.labels.write_csv(self.out / "labels.csv", names, classes)
        if self.config.preview_images:
            save_preview(self.out / "previews" / f"round_{r:02d}.png", self, r)
        if self.head is not None:
            state = {"round": r, "state_dict": self.head.state_dict(), "classes": self.class_names,
                     "feature_dim": self.train_store.dim}
            atomic_write(self.out / "head.pt", lambda tmp: torch.save(state, tmp))
        with (self.out / "rounds.jsonl").open("a") as fh:  # the commit point of the round
            fh.write(json.dumps(record) + "\n")
        self.records.append(record)

    def run(self) -> list[dict]:
        """Run (or resume) until the configured number of rounds; returns every round's record."""
        while self.completed < self.config.rounds:
            self.step()
            if self.progress:
                self.progress("rounds", self.completed, self.config.rounds)
        return self.records

