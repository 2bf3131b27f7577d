"""Shared test helpers: the `shared/` folder beside the repo, and small stand-in backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sparseseg.backbones.adm import ADMFlags, ADMUNet
from sparseseg.backbones.base import FeatureInfo

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


class ToyBackbone:
    """A fixed random conv net with maps at reductions 1, 2 and 4: enough to test the feature
    plumbing independently of the ADM. The noise is added to the image, so samples differ."""

    def __init__(self, input_size: int = 16, seed: int = 0, channels: tuple[int, int, int] = (5, 3, 4)) -> None:
        torch.manual_seed(seed)
        self.input_size = input_size
        self.convs = nn.ModuleList([nn.Conv2d(3, c, 3, padding=1) for c in channels])
        self.feature_info = [FeatureInfo(num_chs=c, reduction=r, block=i, timestep=-1)
                             for i, (c, r) in enumerate(zip(channels, (1, 2, 4), strict=True))]

    @torch.no_grad()
    def extract(self, images: torch.Tensor, noise: torch.Tensor | None) -> list[torch.Tensor]:
        x = images if noise is None else images + 0.3 * noise
        return [nn.functional.avg_pool2d(conv(x), info.reduction) if info.reduction > 1 else conv(x)
                for conv, info in zip(self.convs, self.feature_info, strict=True)]


def save_tiny_adm(path: Path, input_size: int) -> Path:
    """A random 32-channel ADM (the ADM-256 architecture, seed 0) saved as a pretrain checkpoint."""
    flags = ADMFlags(image_size=256, num_channels=32, num_head_channels=16, learn_sigma=True, resblock_updown=True,
                     use_scale_shift_norm=True, attention_resolutions="32,16,8")
    torch.manual_seed(0)
    torch.save({"sparseseg_adm": 1, "flags": flags.model_dump(), "model": ADMUNet(flags).state_dict(), "ema": None,
                "input_size": input_size}, path)
    return path


def answer_first_round(proj, classes: list[str], path: Path) -> list[list[str]]:
    """Answer round 1 of a project from a CSV: the first query `unsure`, the others class i % 3.
    Returns the rows of round 1's queries.csv (query_id, image, x, y)."""
    from sparseseg.annotate.layout import round_dir

    queries = [line.split(",") for line in (round_dir(proj.root, 1) / "queries.csv").read_text().splitlines()[1:]]
    path.write_text("query_id,class\n" + f"{queries[0][0]},unsure\n"
                    + "".join(f"{q[0]},{classes[i % 3]}\n" for i, q in enumerate(queries[1:], 1)))
    return queries


def assert_review_shows_regions(proj, round: int) -> None:
    """Each review PNG of `round` differs from the plain crosshair picture exactly when its image has resolved regions."""
    import numpy as np
    from PIL import Image

    from sparseseg.annotate.layout import round_dir
    from sparseseg.annotate.review import crosshair_image
    from sparseseg.data.readers import read_image

    out = round_dir(proj.root, round)
    resolved = proj.resolved_regions()[1]
    names = {r.id: r.name for r in proj.image_rows}
    with_regions = {names[i] for i in resolved.image.tolist()}
    rows = [line.split(",") for line in (out / "queries.csv").read_text().splitlines()[1:]]
    for name in {p.stem for p in (out / "review").iterdir()}:
        rgb = np.asarray(read_image(proj.root / "data" / "train" / "images" / f"{name}.png"))
        plain = np.asarray(crosshair_image(rgb, [(int(q[0]), int(q[3]), int(q[2])) for q in rows if q[1] == name]))
        review = np.asarray(Image.open(out / "review" / f"{name}.png"))
        assert review.shape == plain.shape and np.array_equal(review, plain) != (name in with_regions), name
