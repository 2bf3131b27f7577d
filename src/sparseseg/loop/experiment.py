"""The simulated active-learning experiment: select, answer from ground truth, retrain, evaluate.

Experiment = the round engine (loop/engine.py) + an oracle that answers from the ground-truth masks
+ a run directory (loop/rundir.py, which lists the files). Every random draw of round r is seeded
by (seed, r, purpose), so a resumed run ends identical to an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from sparseseg.config import VALIDATION, ExperimentConfig
from sparseseg.data.dataset import Split, carve_split, load_meta, load_split
from sparseseg.device import peak_memory_gb
from sparseseg.errors import SparsesegError
from sparseseg.expansion.regions import RegionSet, Resolved, TrainingPixels, expand_clicks
from sparseseg.labels import IGNORE
from sparseseg.loop.engine import Engine
from sparseseg.loop.preview import save_preview
from sparseseg.loop.rundir import RunDirectory

Progress = Callable[[str, int, int], None]


def load_splits(config: ExperimentConfig, progress: Progress | None = None) -> tuple[Split, Split]:
    """The training and evaluation splits of a run, both with masks.

    With `eval_split: val` on a dataset that has no val split, `val_fraction` of the training images
    (chosen by `val_seed` alone), or the images named by `val_prefixes` (whole sequences), are held
    out for evaluation and the rest are trained on, so settings can be chosen without looking at the
    test split.
    """
    def load(split: str) -> Split:
        tick = (lambda done, total: progress(f"loading {split}", done, total)) if progress else None
        data = load_split(config.data, split, progress=tick)
        if data.masks is None:
            raise SparsesegError(f"{config.data}/{split}: no masks; the simulated loop needs ground truth")
        return data

    train = load(config.train_split)
    if config.eval_split == VALIDATION:
        if VALIDATION not in load_meta(config.data).splits:
            return carve_split(train, config.val_fraction, config.val_seed, config.val_prefixes)
        if config.val_prefixes:
            raise SparsesegError(f"{config.data}: has a val split of its own, so val_prefixes {config.val_prefixes} "
                                 "would hold out nothing; drop val_prefixes or evaluate on another split")
    return train, load(config.eval_split)


@dataclass
class StepResult:
    """What one round produced; `record` is the line written to rounds.jsonl."""

    round: int
    record: dict
    done: bool


class Experiment:
    """One strategy, one seed, R rounds, in one run directory (created or resumed)."""

    def __init__(self, config: ExperimentConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress
        self.run_dir = RunDirectory(config)
        self.run_dir.check()
        self.meta = load_meta(config.data)
        self.class_names = list(self.meta.classes)
        self.train, self.test = load_splits(config, progress)
        self.budget = config.budget_for(len(self.train.names))
        self.engine = Engine(config, self.class_names, default_size=self.meta.size)
        self.engine.prepare_strategy(len(self.train.names), self.meta.size, self.budget)
        stores = self.engine.stores({config.train_split: self.train.images, config.eval_split: self.test.images},
                                    evaluation=[config.eval_split])
        self.train_store, self.test_store = stores[config.train_split], stores[config.eval_split]
        if self.engine.expands and self.run_dir.finished_rounds() < config.rounds:
            self.engine.expander(self.train_store)  # a missing SAM fails before any file is written
        self.run_dir.create(self.engine.expands)
        self.records = self.run_dir.read_records()
        self.labels = self.run_dir.read_labels(self.train.names, self.completed)
        self.regions = (self.run_dir.read_regions(self.meta.size, self.completed) if self.engine.expands
                        else RegionSet.empty(self.meta.size))
        self.resolved: Resolved | None = None  # region pixels after the overlap rule (expansion only)
        self.region_training: TrainingPixels | None = None
        self.head = None
        if self.records:
            self._retrain(self.completed)
        self._write_meta()

    @property
    def completed(self) -> int:
        return len(self.records)

    def _write_meta(self) -> None:
        cfg, backbone = self.config, self.engine.backbone
        info = {
            "device": self.engine.device,
            "dataset": {"root": str(cfg.data), "name": self.meta.name, "classes": self.class_names,
                        "size": self.meta.size, "train_images": len(self.train.names),
                        "test_images": len(self.test.names), "eval_split": cfg.eval_split},
            "backbone": {"name": cfg.backbone.name,
                         "weights": str(cfg.backbone.checkpoint or cfg.backbone.hub_id or "shipped with the package"),
                         "input_size": backbone.input_size, "feature_dim": self.train_store.dim,
                         "maps": [vars(i) for i in backbone.feature_info]},
            "budget_per_round": self.budget,
        }
        if self.engine.expands:
            info["expansion"] = self.engine.expansion.record()
        self.run_dir.write_meta(info)

    # ------------------------------------------------------------------ helpers
    def _tick(self, task: str) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None
        return lambda done, total: self.progress(task, done, total)

    @contextmanager
    def _phase(self, timings: dict, name: str) -> Iterator[None]:
        device = self.engine.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        yield
        timings[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_gb": round(peak_memory_gb(device), 3)}

    def _retrain(self, round: int) -> None:
        """The head on every answer of rounds 1..round (and, with expansion, their regions)."""
        regions = self.regions.upto(round) if self.engine.expands else None
        data = self.engine.training_set(self.labels, regions, self.meta.size)
        self.resolved, self.region_training = data.resolved, data.regions
        self.head = self.engine.train_head(self.train_store, data, round)

    def predict(self, image: int) -> torch.Tensor:
        """(S, S) predicted class ids of one training image under the current head."""
        return self.engine.predict(self.head, self.train_store, image)

    def evaluate(self) -> dict:
        """Confusion-matrix mIoU over the whole evaluation split."""
        return self.engine.evaluate(self.head, self.test_store, self.test.masks, self._tick("evaluating"))

    # ------------------------------------------------------------------ the loop
    def step(self) -> StepResult:
        """Run the next round and write its files; returns its record."""
        r = self.completed + 1
        if r > self.config.rounds:
            return StepResult(self.completed, self.records[-1] if self.records else {}, True)
        timings: dict = {}
        # 1. select b pixels (round 1 has no head: coverage alone)
        with self._phase(timings, "select"):
            picks = self.engine.select(self.train_store, self.labels, self.head, self.budget, r, self.progress)
        # 2. the oracle answers from the ground-truth mask (void stays void: budget spent, not trained on)
        answers = self.train.masks[picks.image, picks.y, picks.x].long()
        self.labels.add(picks.image, picks.y, picks.x, answers, r)
        # 2b. with expansion, each answered click is expanded; its kept region inherits the answer
        #     (regions are computed on the training images at the working resolution)
        new_regions = None
        if self.engine.expands:
            with self._phase(timings, "expand"):
                new_regions = expand_clicks(self.engine.expander(self.train_store), self.train.images, picks.image,
                                            picks.y, picks.x, answers, r, self.engine.expansion.tau,
                                            self._tick("expanding"))
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
            expansion = self.engine.expansion
            self.run_dir.write_regions(r, new_regions, expansion.model, expansion.tau, names, classes)
        self.run_dir.write_labels(r, self.labels, names, classes)
        if self.config.preview_images:
            save_preview(self.run_dir.preview_path(r), r, self.labels, self.train.images, self.train.masks,
                         self.meta.palette, self.config.preview_images,
                         self.predict if self.head is not None else None, self.resolved)
        if self.head is not None:
            self.run_dir.write_head({"round": r, "state_dict": self.head.state_dict(), "classes": classes,
                                     "feature_dim": self.train_store.dim})
        self.run_dir.commit(record)
        self.records.append(record)

    def run(self) -> list[dict]:
        """Run (or resume) until the configured number of rounds; returns every round's record."""
        while self.completed < self.config.rounds:
            self.step()
            if self.progress:
                self.progress("rounds", self.completed, self.config.rounds)
        return self.records
