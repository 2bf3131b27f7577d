"""Regions from the image alone (`expansion: superpixel`): no SAM, no weights to download.

A click's region is found by one of three methods (`superpixel.method`):

* **slic**: scikit-image's SLIC (k-means over CIELAB colour and position) on the working-resolution
  image; the region is the superpixel that contains the click.
* **felzenszwalb**: scikit-image's graph-based segmentation (Felzenszwalb and Huttenlocher, 2004);
  likewise the segment that contains the click.
* **feature**: the pixels within `radius` of the click (a square window) whose backbone feature, the
  one the head is trained on, has cosine similarity >= `threshold` with the click's own, and that are
  connected to the click through such pixels.

Connected means through the 8 neighbours of a pixel (Felzenszwalb's segments are 8-connected; SLIC's
are 4-connected, hence 8-connected too), so a region is exactly the click's superpixel. Every
region is then cut to at most `max_pixels`, keeping the pixels nearest the click along the region
(breadth-first over 8-neighbours; of the last ring, the first in raster order), so a huge
segment such as the road gives a local region rather than half the image (`grow`). The clicked
pixel always belongs to its region. These regions carry no confidence: each click gets one proposal
with score 1, kept at tau 0; the overlap rule, the training draw and the files are SAM's
(`sparseseg.expansion.regions`). Nothing is drawn at random.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from sparseseg.config import SuperpixelConfig
from sparseseg.errors import SparsesegError
from sparseseg.expansion.base import Expander, Proposals

if TYPE_CHECKING:
    from sparseseg.features.store import FeatureStore

_EIGHT = ndimage.generate_binary_structure(2, 2)  # 8-connectivity
_KEYS = {  # the settings each method reads, in the order they appear in its name
    "slic": ("n_segments", "compactness", "sigma"),
    "felzenszwalb": ("scale", "sigma", "min_size"),
    "feature": ("threshold", "radius"),
}


def describe(config: SuperpixelConfig, backbone: str | None = None) -> str:
    """The name recorded with every region: method and the settings it reads, e.g.
    'superpixel:slic(n_segments=400,compactness=10,sigma=0.5,max_pixels=1024)'; for `feature`, also
    `backbone` (a tag of the backbone settings: other features give other regions)."""
    settings = ",".join(f"{k}={getattr(config, k):g}" for k in (*_KEYS[config.method], "max_pixels"))
    if config.method == "feature" and backbone is not None:
        settings += f",backbone={backbone}"
    return f"superpixel:{config.method}({settings})"


def grow(allowed: np.ndarray, y: int, x: int, max_pixels: int) -> np.ndarray:
    """The pixels of `allowed` 8-connected to (y, x), nearest first along them, at most `max_pixels`.

    Args:
        allowed: (H, W) bool, the pixels a region may take.
        y, x: the click; it is always in the region, allowed or not.
        max_pixels: the cap. Rings of equal breadth-first distance are taken whole while they fit;
            of the ring that does not fit, its first pixels in raster order.

    Returns:
        (H, W) bool region.
    """
    region = np.zeros(allowed.shape, dtype=bool)
    region[y, x] = True
    count = 1
    while count < max_pixels:
        ring = ndimage.binary_dilation(region, _EIGHT) & allowed & ~region
        n = int(ring.sum())
        if n == 0:
            break
        if count + n > max_pixels:
            region.flat[np.flatnonzero(ring)[: max_pixels - count]] = True
            break
        region |= ring
        count += n
    return region


def segment(image: np.ndarray, config: SuperpixelConfig) -> np.ndarray:
    """(H, W) int segment ids of an (H, W, 3) uint8 image by SLIC or Felzenszwalb (scikit-image)."""
    try:
        from skimage.segmentation import felzenszwalb, slic
    except ImportError:
        raise SparsesegError("expansion=superpixel needs scikit-image (pip install -r requirements.lock)") from None
    if config.method == "slic":
        return slic(image, n_segments=config.n_segments, compactness=config.compactness, sigma=config.sigma,
                    start_label=0, channel_axis=-1)
    if config.method == "felzenszwalb":
        return felzenszwalb(image, scale=config.scale, sigma=config.sigma, min_size=config.min_size, channel_axis=-1)
    raise ValueError(f"superpixel.method={config.method} does not segment the image")


class SuperpixelExpander(Expander):
    """Superpixel or feature-space regions as an `Expander` (module docstring).

    Args:
        config: the `superpixel` section.
        features: method `feature` only: the feature store over the images that will be expanded
            (the run's training images, the project's images); `propose` reads it by `image_id`.
        backbone: method `feature` only: a tag of the backbone settings, part of the name.
    """

    def __init__(self, config: SuperpixelConfig, features: FeatureStore | None = None,
                 backbone: str | None = None) -> None:
        if config.method == "feature" and features is None:
            raise SparsesegError("superpixel.method=feature needs the backbone's features of the images it expands")
        self.config = config
        self.features = features
        self.name = describe(config, backbone)
        self._cached: tuple[bytes, np.ndarray] | None = None
        self.segmentations_computed = 0  # how many times an image was segmented (the tests count it)

    def segments(self, image: np.ndarray) -> np.ndarray:
        """(H, W) segment ids, computed once and reused while the same image is asked again."""
        key = hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).digest()
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, segment(image, self.config))
            self.segmentations_computed += 1
        return self._cached[1]

    def propose(self, image: np.ndarray, ys: np.ndarray, xs: np.ndarray, image_id: int | None = None) -> Proposals:
        height, width = image.shape[:2]
        ys, xs = np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64)
        masks = np.zeros((len(ys), 1, height, width), dtype=bool)
        if len(ys):
            if self.config.method == "feature":
                allowed = self._similar(image_id, ys, xs, height, width)
            else:
                labels = self.segments(image)
                allowed = (labels == labels[y, x] for y, x in zip(ys.tolist(), xs.tolist(), strict=True))
            for i, (y, x, ok) in enumerate(zip(ys.tolist(), xs.tolist(), allowed, strict=True)):
                masks[i, 0] = grow(ok, y, x, self.config.max_pixels)
        return Proposals(masks, np.ones((len(ys), 1), dtype=np.float32))

    def _similar(self, image_id: int | None, ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> list[np.ndarray]:
        """Per click, (H, W) bool: the pixels of its window whose feature is similar enough to its own."""
        from sparseseg.features.store import DETERMINISTIC

        store = self.features
        if image_id is None:
            raise ValueError("superpixel.method=feature: propose needs the image's index in the feature store")
        if (store.size, store.size) != (height, width):
            raise SparsesegError(f"superpixel.method=feature: the feature store's images are {store.size}x{store.size}, "
                                 f"the image to expand is {height}x{width}")
        r = self.config.radius
        windows = [(max(0, y - r), min(height, y + r + 1), max(0, x - r), min(width, x + r + 1))
                   for y, x in zip(ys.tolist(), xs.tolist(), strict=True)]
        # one feature read for the union of the windows (features are L2-normalised: dot = cosine)
        flat = np.unique(np.concatenate([(np.arange(y0, y1)[:, None] * width + np.arange(x0, x1)).ravel()
                                         for y0, y1, x0, x1 in windows]))
        where = np.full(height * width, -1, dtype=np.int64)
        where[flat] = np.arange(len(flat))
        flat_t = torch.from_numpy(flat)
        feats = store.at_pixels(torch.full((len(flat),), int(image_id), dtype=torch.long), flat_t // width,
                                flat_t % width, DETERMINISTIC)
        out = []
        for (y0, y1, x0, x1), y, x in zip(windows, ys.tolist(), xs.tolist(), strict=True):
            ids = (np.arange(y0, y1)[:, None] * width + np.arange(x0, x1)).ravel()
            similarity = feats[torch.from_numpy(where[ids])] @ feats[where[y * width + x]]
            allowed = np.zeros((height, width), dtype=bool)
            allowed[y0:y1, x0:x1] = (similarity >= self.config.threshold).numpy().reshape(y1 - y0, x1 - x0)
            out.append(allowed)
        return out
