"""The head's mask of every image of a split, each rank its contiguous share of the images.

Each rank reads only its images, runs the backbone on them (`loop.engine.predict_image`, the function
every single-process prediction uses, so each mask is the one `sparseseg run` would predict), and
writes one palette PNG per image. What is global is gathered: the pixels predicted per class and,
when the split has masks, the confusion matrix, summed over the ranks into one mIoU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparseseg.backbones.registry import build_backbone
from sparseseg.config import ExperimentConfig
from sparseseg.data.dataset import load_meta, load_split, split_names
from sparseseg.distributed.extract import ShardImages
from sparseseg.distributed.launch import Launch
from sparseseg.errors import SparsesegError
from sparseseg.features.store import build_stores
from sparseseg.head.mlp import build_head
from sparseseg.io import atomic_write, atomic_write_text
from sparseseg.labels import IGNORE
from sparseseg.loop.engine import predict_image
from sparseseg.loop.metrics import ConfusionMatrix
from sparseseg.selection.distributed import partition

Progress = Callable[[str, int, int], None]


def load_head(path: Path, dim: int, num_classes: int, config: ExperimentConfig, device: torch.device) -> torch.nn.Module:
    """A saved head (a run's or a project's head.pt) as `config.head` describes it, in eval mode."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        head = build_head(dim, num_classes, config.head).to(device)
        head.load_state_dict(state["state_dict"])
    except FileNotFoundError:
        raise SparsesegError(f"{path}: head not found") from None
    except (KeyError, RuntimeError, OSError, TypeError) as exc:
        raise SparsesegError(f"{path}: not a head for this config and backbone ({str(exc).splitlines()[0][:200]})") from None
    return head.eval()


def segment_split(config: ExperimentConfig, head_path: Path, out: Path, run: Launch, split: str | None = None,
                  backbone=None, progress: Progress | None = None) -> dict:
    """Write OUT/<image>.png (palette class ids) for every image of `split`; every rank calls it.

    Args:
        config: the run's config (data, seed, backbone, head settings).
        head_path: the head to predict with.
        out: folder for the masks (and summary.json, written by rank 0).
        run: this process's place in the launch.
        split: the split to segment (default: the config's eval_split).
        backbone: a ready `FeatureBackbone` (tests); None builds the config's.
        progress: (task, done, total) callback.

    Returns:
        The summary: images, pixels per class, and mIoU when the split has masks.
    """
    start = time.perf_counter()
    split = split or config.eval_split
    meta = load_meta(config.data)
    names = split_names(config.data, split)
    lo, hi = partition(len(names), run.size, 1)[run.rank]
    if backbone is None:
        backbone = build_backbone(config.backbone, run.device, default_size=meta.size)
    dim = sum(info.num_chs for info in backbone.feature_info)
    head = load_head(Path(head_path), dim, len(meta.classes), config, run.device)
    data = load_split(config.data, split, only=range(lo, hi))
    store = build_stores(backbone, {split: ShardImages(data.images, lo, len(names))}, config.seed, config.features,
                         config.backbone.batch_size, run.device, evaluation=[split], pixel_cache_limit=0)[split]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    palette = [v for rgb in meta.palette for v in rgb]
    counts = torch.zeros(len(meta.classes), dtype=torch.long)
    cm = ConfusionMatrix(len(meta.classes), ignore_index=IGNORE)
    for i in range(lo, hi):
        ids = predict_image(head, store, i, config.features.tile_pixels).cpu()
        counts += torch.bincount(ids.view(-1), minlength=len(meta.classes))
        if data.masks is not None:
            cm.update(ids, data.masks[i - lo])
        mask = Image.fromarray(ids.numpy().astype(np.uint8), mode="P")
        mask.putpalette(palette)
        atomic_write(out / f"{names[i]}.png", lambda tmp, m=mask: m.save(tmp, format="PNG"))
        if progress is not None:
            progress("segmenting", i + 1 - lo, hi - lo)
    counts = run.sum(counts)
    has_masks = run.sum(torch.tensor([0 if data.masks is None or hi == lo else 1])).item() > 0
    cm.matrix = run.sum(cm.matrix)
    summary = {"split": split, "images": len(names), "ranks": run.size, "head": str(head_path),
               "pixels_per_class": dict(zip(meta.classes, counts.tolist(), strict=True)),
               "seconds": round(time.perf_counter() - start, 3)}
    if has_masks:
        summary["metrics"] = cm.to_dict(list(meta.classes))
    if run.main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    run.barrier()
    return summary
