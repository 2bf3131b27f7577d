"""SAM through the official `segment-anything` package: vit_b / vit_l / vit_h checkpoints from a local
.pth file, or downloaded from their official addresses (needs internet) into torch's hub cache.

Only the model (`segment_anything.modeling`, `build_sam`) is used; resizing, prompt coordinates and
mask post-processing are `sparseseg.expansion.base`'s, identical to the package's `SamPredictor`
(PIL bilinear resize of the longest side, `Sam.preprocess` to normalise and pad, bilinear mask
upsampling). The package's `__init__` also imports its predictor, which needs torchvision; without
torchvision the model modules are loaded on their own, which needs only torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparseseg.config import SamExpansionConfig
from sparseseg.errors import SparsesegError, one_line
from sparseseg.expansion.base import SamExpander, resized_shape

DOWNLOAD_TIMEOUT_S = 60
# The checkpoints' official download addresses (the segment-anything README's "Model Checkpoints").
CHECKPOINT_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}


def model_type_of(config: SamExpansionConfig) -> str:
    """sam.model_type, else the type in the checkpoint's file name (sam_vit_h_4b8939.pth), else vit_b."""
    if config.model_type is not None:
        return config.model_type
    if config.checkpoint is not None:
        found = re.search(r"vit_[blh]", Path(config.checkpoint).name)
        if found:
            return found.group(0)
    return "vit_b"


def source_of(config: SamExpansionConfig) -> str:
    """The file the segment_anything backend loads (or downloads)."""
    return str(config.checkpoint) if config.checkpoint is not None else CHECKPOINT_URLS[model_type_of(config)]


def _build_module():
    """`segment_anything.build_sam`, importing the package normally when it can."""
    try:
        return importlib.import_module("segment_anything.build_sam")
    except ModuleNotFoundError as exc:
        if exc.name == "segment_anything":
            raise SparsesegError("sam.backend=segment_anything needs the segment-anything package "
                                 "(pip install -r requirements.lock)") from None
        if exc.name != "torchvision":
            raise
    # The package __init__ failed on torchvision (its predictor's transforms); the model modules
    # need only torch. Import them under a bare stand-in package, then drop the stand-in so a later
    # `import segment_anything` still runs the real __init__.
    spec = importlib.util.find_spec("segment_anything")
    stand_in = types.ModuleType("segment_anything")
    stand_in.__path__ = list(spec.submodule_search_locations)
    previous = sys.modules.get("segment_anything")
    sys.modules["segment_anything"] = stand_in
    try:
        return importlib.import_module("segment_anything.build_sam")
    finally:
        if previous is None:
            sys.modules.pop("segment_anything", None)
        else:
            sys.modules["segment_anything"] = previous


class OfficialSam(SamExpander):
    """A `segment_anything.modeling.Sam` as a `SamExpander`.

    Args:
        sam: a Sam model (from `build_sam`, or built small in tests).
        device: where it runs.
        name: recorded with every region it produces.
    """

    def __init__(self, sam, device: torch.device | str = "cpu", name: str = "segment_anything") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.sam = sam.to(self.device).eval()
        self.name = name
        self.longest = int(sam.image_encoder.img_size)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        new_h, new_w = resized_shape(image.shape[0], image.shape[1], self.longest)
        resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
        return self.sam.image_encoder(self.sam.preprocess(x))  # preprocess: normalise, pad bottom-right

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.ones(len(points), 1, dtype=torch.int, device=self.device)  # 1 = a positive point
        sparse, dense = self.sam.prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
        return self.sam.mask_decoder(image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=True)


def _download(model_type: str) -> Path:
    url = CHECKPOINT_URLS[model_type]
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:  # a timeout, so that a machine without internet fails at once instead of hanging
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh, 1 << 20)
    except Exception as exc:  # URLError offline, HTTPError, a full disk ...
        tmp.unlink(missing_ok=True)
        raise SparsesegError(f"{url}: cannot download the SAM {model_type} checkpoint ({one_line(exc)[:200]}); "
                             "without internet, download it on a connected machine and set sam.checkpoint") from None
    tmp.replace(path)
    return path


def load_official_sam(config: SamExpansionConfig, device: torch.device | str) -> OfficialSam:
    """Build the configured SAM and load its checkpoint; one-line errors for a missing or wrong file."""
    model_type = model_type_of(config)
    if config.checkpoint is not None:
        path = Path(config.checkpoint)
        if not path.is_file():
            raise SparsesegError(f"{path}: SAM checkpoint not found (sam.checkpoint; an official sam_vit_*.pth)")
    build = _build_module()
    if config.checkpoint is None:
        path = _download(model_type)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SparsesegError(f"{path}: unreadable SAM checkpoint ({one_line(exc)[:200]})") from None
    sam = build.sam_model_registry[model_type](checkpoint=None)
    try:
        sam.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise SparsesegError(f"{path}: not a SAM {model_type} checkpoint ({one_line(exc)[:120]}); set sam.model_type "
                             "to the file's architecture (vit_b, vit_l or vit_h)") from None
    return OfficialSam(sam, device, name=f"segment_anything:{model_type}:{source_of(config)}")
