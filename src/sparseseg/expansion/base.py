"""Pixel-to-region expansion: the interface every backend implements (`Expander.propose`: clicks of
one image -> proposals), and the geometry every SAM backend shares.

A SAM backend only encodes an image and decodes point prompts (`SamExpander.embed`, `.decode`);
everything that decides *where* a prompt lands and *which* pixels a mask covers lives here, once,
for every backend:

    working image (H, W)  --resize longest side to L-->  (h', w')  --pad bottom/right-->  (L, L)

SAM takes a point as a pixel index of the resized frame and adds 0.5 itself to reach the pixel's
centre (its prompt encoder: `points + 0.5`). Pixel (y, x) of the working image covers
[x, x + 1) x [y, y + 1); its centre (x + 0.5, y + 0.5) maps to ((x + 0.5) w'/W, (y + 0.5) h'/H) in
the resized frame, so the index handed to SAM is that minus 0.5 (`pixel_to_model`). Padding is at
the bottom and right, so it moves no coordinate. `model_to_pixel` is the inverse (floor of the
centre scaled back); the tests map every pixel both ways.

Masks come back at low resolution over the padded (L, L) frame: upsampled to (L, L), cropped to
(h', w'), upsampled to (H, W) (bilinear, align_corners=False), thresholded at logit 0, as both
official implementations do (`masks_to_image`).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MASK_THRESHOLD = 0.0  # logits above it are inside the mask (SAM's own threshold)
POINTS_PER_CALL = 64  # prompts decoded per forward pass: bounds the low-resolution mask memory


# ---------------------------------------------------------------------------- geometry
def resized_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """(h', w') of an (H, W) image resized so its longest side is `longest`, rounded as SAM rounds."""
    scale = longest * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def pixel_to_model(ys: np.ndarray, xs: np.ndarray, height: int, width: int, longest: int) -> np.ndarray:
    """(n, 2) prompt coordinates (x, y) in SAM's resized frame, pixel-index convention, for pixels (y, x).

    SAM's prompt encoder adds 0.5 to these, which lands on the centre of the pixel's footprint.
    """
    new_h, new_w = resized_shape(height, width, longest)
    px = (np.asarray(xs, dtype=np.float64) + 0.5) * new_w / width - 0.5
    py = (np.asarray(ys, dtype=np.float64) + 0.5) * new_h / height - 0.5
    return np.stack([px, py], axis=-1)


def model_to_pixel(points: np.ndarray, height: int, width: int, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """The working-image pixels (ys, xs) that prompt coordinates (n, 2) of `pixel_to_model` fall in."""
    new_h, new_w = resized_shape(height, width, longest)
    points = np.asarray(points, dtype=np.float64)
    xs = np.floor((points[..., 0] + 0.5) * width / new_w).astype(np.int64)
    ys = np.floor((points[..., 1] + 0.5) * height / new_h).astype(np.int64)
    return ys, xs


def masks_to_image(low_res: torch.Tensor, height: int, width: int, longest: int) -> torch.Tensor:
    """(n, K, m, m) low-resolution mask logits over the padded frame -> (n, K, H, W) bool masks."""
    new_h, new_w = resized_shape(height, width, longest)
    full = F.interpolate(low_res.float(), (longest, longest), mode="bilinear", align_corners=False)
    full = full[..., :new_h, :new_w]
    return F.interpolate(full, (height, width), mode="bilinear", align_corners=False) > MASK_THRESHOLD


# ---------------------------------------------------------------------------- choosing a mask
@dataclass(frozen=True)
class Choice:
    """What became of one click: its best proposal, and whether that proposal is kept as a region."""

    kept: bool
    score: float  # the best proposal's predicted IoU, clamped to [0, 1]
    mask: np.ndarray | None  # (H, W) bool when kept


def clamp_score(value: float) -> float:
    """Predicted IoU clamped to [0, 1]: SAM's IoU head is trained towards IoUs but is not bounded,
    so tau = 0 keeps every best mask and tau > 1 keeps none."""
    return float(min(1.0, max(0.0, value)))


def choose(masks: np.ndarray, scores: np.ndarray, tau: float) -> Choice:
    """Keep the highest-scoring proposal if its (clamped) predicted IoU is >= tau, else none.

    Args:
        masks: (K, H, W) bool proposals of one click.
        scores: (K,) their predicted IoUs.
        tau: the threshold; ties between proposals go to the first.
    """
    best = int(np.argmax(scores))
    score = clamp_score(float(scores[best]))
    if score >= tau:
        return Choice(True, score, np.asarray(masks[best], dtype=bool))
    return Choice(False, score, None)


# ---------------------------------------------------------------------------- the interface
@dataclass
class Proposals:
    """A backend's answer to one image's clicks: (n, K, H, W) bool masks and (n, K) scores (SAM: its
    K = 3 proposals and their predicted IoUs; superpixels: K = 1, score 1)."""

    masks: np.ndarray
    scores: np.ndarray


class Expander(ABC):
    """Anything that turns the clicks of one image into region proposals (SAM, superpixels).

    Subclasses set `name`, recorded with every region: which model and settings produced it.
    """

    name: str

    @abstractmethod
    def propose(self, image: np.ndarray, ys: np.ndarray, xs: np.ndarray, image_id: int | None = None) -> Proposals:
        """Proposals for the clicks (ys[i], xs[i]) of one (H, W, 3) uint8 image, masks at (H, W).

        `image_id` indexes the image in the feature store a backend was built with (the feature-space
        backend reads pixel features by it); the others ignore it.
        """


class SamExpander(Expander):
    """A SAM behind one interface: an image encoder run once per image, a prompt decoder per click.

    Subclasses set `name`, `longest` (the side SAM resizes images to) and `device`, and implement
    `embed` and `decode`.
    """

    longest: int
    device: torch.device

    def __init__(self) -> None:
        self._cached: tuple[bytes, Any] | None = None
        self.embeddings_computed = 0  # how many times the image encoder ran (the tests count it)

    @abstractmethod
    def embed(self, image: np.ndarray) -> Any:
        """Run the image encoder on an (H, W, 3) uint8 image (resize, normalise, pad included)."""

    @abstractmethod
    def decode(self, embedding: Any, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 2) prompt coordinates of `pixel_to_model`, one positive point each ->
        ((n, K, m, m) low-resolution logits over the padded frame, (n, K) predicted IoUs)."""

    def embedding(self, image: np.ndarray) -> Any:
        """The image's embedding, computed once and reused while the same image is asked again."""
        key = hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).digest()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.embed(image))
            self.embeddings_computed += 1
        return self._cached[1]

    @torch.no_grad()
    def propose(self, image: np.ndarray, ys: np.ndarray, xs: np.ndarray, image_id: int | None = None) -> Proposals:
        """Every click (ys[i], xs[i]) of one (H, W, 3) uint8 image as one positive point prompt.

        The image is encoded once for all its clicks. Masks are returned at the image's own
        resolution, whatever SAM resized and padded it to.
        """
        height, width = image.shape[:2]
        embedding = self.embedding(image)
        points = torch.as_tensor(pixel_to_model(ys, xs, height, width, self.longest), dtype=torch.float32)
        masks, scores = [], []
        for start in range(0, len(points), POINTS_PER_CALL):
            low, iou = self.decode(embedding, points[start : start + POINTS_PER_CALL].to(self.device))
            for one in low:  # one click at a time: (K, L, L) floats is the largest tensor alive
                masks.append(masks_to_image(one[None].cpu(), height, width, self.longest)[0].numpy())
            scores.append(iou.float().cpu().numpy())
        if not masks:
            return Proposals(np.zeros((0, 0, height, width), dtype=bool), np.zeros((0, 0), dtype=np.float32))
        return Proposals(np.stack(masks), np.concatenate(scores))
