"""A seeded synthetic street-scene generator for demos and tests (pure NumPy).

Every image is a random layout of sky, road, buildings, trees, poles and cars. Classes differ by
texture as well as colour (cloud noise, lane dashes, window grids, leafy noise, metal
gradients, saturated car bodies with windows and wheels), colours are jittered per image, poles
are 1-3 px wide and cars can be a few pixels: segmentation is learnable but not trivial. The
output uses the prepared-dataset format of `dataset.py`; the same seed gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sparseseg.data.dataset import IGNORE_INDEX, DatasetMeta, save_meta
from sparseseg.data.prepare import PNG_COMPRESS_LEVEL, staged_output
from sparseseg.errors import SparsesegError

SYNTHETIC_CLASSES = ["sky", "road", "building", "tree", "pole", "car"]
SKY, ROAD, BUILDING, TREE, POLE, CAR = range(len(SYNTHETIC_CLASSES))
# CamVid's colours for the same classes, so overlays look familiar.
SYNTHETIC_PALETTE = [
    [128, 128, 128],
    [128, 64, 128],
    [128, 0, 0],
    [128, 128, 0],
    [192, 192, 128],
    [64, 0, 128],
]
_SPLIT_IDS = {"train": 0, "test": 1}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random (cells+1)^2 grid upsampled bilinearly to size^2."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size)
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # (size, cells+1)
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    """A colour moved by up to `amount` per channel."""
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene: (size, size, 3) uint8 image and (size, size) uint8 label map."""
    s = size / 64.0  # scale for feature sizes designed at 64 px (poles stay 1-3 px on purpose)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size, 3), dtype=np.float32)
    lab = np.full((size, size), SKY, dtype=np.uint8)
    horizon = int(size * rng.uniform(0.35, 0.58))

    # Sky: vertical blue gradient with soft clouds.
    top, bottom = _jitter(rng, (70, 120, 200), 25), _jitter(rng, (175, 200, 230), 20)
    g = (yy / max(horizon, 1)).clip(0, 1)[..., None]
    img[:] = top * (1 - g) + bottom * g
    clouds = _smooth_noise(rng, size, 4) ** 2 * rng.uniform(0.2, 0.6)
    img += (255 - img) * clouds[..., None]

    # Road: grey asphalt with grain, darker patches, and dashed lane lines converging on the horizon.
    below = yy >= horizon
    asphalt = _jitter(rng, (105, 105, 110), 20)
    grain = rng.normal(0, 9, (size, size, 1)) + (_smooth_noise(rng, size, 6)[..., None] - 0.5) * 30
    img[below] = (asphalt + grain)[below]
    lab[below] = ROAD
    depth = ((yy - horizon) / max(size - horizon, 1)).clip(0, 1)  # 0 at horizon, 1 at bottom
    vx = size * rng.uniform(0.3, 0.7)
    dash = max(2, int(rng.integers(3, 6) * s))
    for slope in rng.choice([-1.4, -0.6, 0.0, 0.6, 1.4], size=int(rng.integers(1, 4)), replace=False):
        cx = vx + slope * (yy - horizon)
        half = 0.3 + 1.2 * depth * s
        line = below & (np.abs(xx - cx) <= half) & (((yy - horizon) // dash) % 2 == 0)
        img[line] = _jitter(rng, (225, 225, 210), 15)

    # Buildings: blocks standing on the horizon, window grids, shading.
    x = int(rng.integers(-8, 1) * s)
    families = [(150, 70, 55), (200, 185, 150), (120, 120, 125), (90, 110, 140)]
    while x < size:
        w = int(size * rng.uniform(0.12, 0.35))
        if rng.random() < 0.8:
            x0, x1 = max(x, 0), min(x + w, size)
            y0 = int(size * rng.uniform(0.04, 0.9 * horizon / size)) if horizon > 6 else 0
            block = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < horizon)
            wall = _jitter(rng, families[int(rng.integers(len(families)))], 25)
            shade = 1.0 - 0.25 * ((yy - y0) / max(horizon - y0, 1))[..., None]
            px, py = max(3, int(rng.integers(3, 7) * s)), max(3, int(rng.integers(4, 8) * s))
            window = ((xx - x0) % px < px // 2) & ((yy - y0) % py < py // 2) & ((yy - y0) >= py // 2)
            glass = (
                _jitter(rng, (50, 60, 75), 20) if rng.random() < 0.7 else _jitter(rng, (230, 220, 160), 20)
            )
            tex = np.where(window[..., None], glass, wall * shade) + rng.normal(0, 4, (size, size, 1))
            img[block] = tex[block]
            lab[block] = BUILDING
        x += w

    # Trees: leafy blobs (a few overlapping discs) on short trunks near the horizon.
    for _ in range(int(rng.integers(1, 4))):
        cx = size * rng.uniform(0, 1)
        r = size * rng.uniform(0.06, 0.15)
        cy = horizon - r * rng.uniform(0.6, 1.3)
        trunk = (np.abs(xx - cx) <= max(1.0, 0.12 * r)) & (yy >= cy) & (yy < horizon + 0.1 * r)
        blob = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(3, 6))):
            ox, oy, rr = rng.normal(0, 0.45 * r), rng.normal(0, 0.35 * r), r * rng.uniform(0.5, 0.9)
            blob |= (xx - cx - ox) ** 2 + (yy - cy - oy) ** 2 <= rr**2
        leaves = _jitter(rng, (60, 110, 45), 25) * (0.7 + 0.6 * _smooth_noise(rng, size, 12)[..., None])
        leaves = leaves + rng.normal(0, 18, (size, size, 1))
        img[trunk] = (_jitter(rng, (90, 65, 40), 15) + rng.normal(0, 6, (size, size, 1)))[trunk]
        img[blob] = leaves[blob]
        lab[trunk | blob] = TREE

    # Poles: 1-3 px wide, tall, metallic vertical gradient, standing in front of the horizon.
    for _ in range(int(rng.integers(1, 4))):
        width = int(rng.integers(1, 4))
        x0 = int(rng.integers(0, size - width + 1))
        y0 = int(size * rng.uniform(0.03, 0.8 * horizon / size))
        y1 = min(size, int(horizon + (size - horizon) * rng.uniform(0.05, 0.35)) + 1)
        pole = (xx >= x0) & (xx < x0 + width) & (yy >= y0) & (yy < y1)
        metal = _jitter(rng, (70, 70, 75), 30)
        light = (1.1 - 0.4 * ((yy - y0) / max(y1 - y0, 1)))[..., None]
        img[pole] = (metal * light)[pole]
        lab[pole] = POLE
        if rng.random() < 0.5:  # a lamp arm, so pole shapes are not all plain bars
            arm_len = int(rng.integers(2, 7) * s)
            side = 1 if rng.random() < 0.5 else -1
            xa0, xa1 = sorted(
                (x0 + (width if side > 0 else 0), x0 + (width if side > 0 else 0) + side * arm_len)
            )
            arm = (xx >= xa0) & (xx < xa1) & (yy >= y0) & (yy < y0 + 1 + (width > 1))
            img[arm] = metal
            lab[arm] = POLE

    # Cars: on the road, larger when nearer, drawn far to near; body, window band, wheels.
    cars = sorted(rng.uniform(0.15, 1.0, int(rng.integers(1, 4))))
    for d in cars:
        yb = int(horizon + d * (size - horizon - 1))
        w = max(4.0, size * (0.08 + 0.22 * d) * rng.uniform(0.8, 1.2))
        h = w * rng.uniform(0.4, 0.55)
        x0 = size * rng.uniform(-0.05, 0.95)
        yt = yb - h
        rel_y = (yy - yt) / h
        inset = np.where(rel_y < 0.45, 0.18 * w * (0.45 - rel_y) / 0.45, 0.0)  # sloped roof
        body = (yy > yt) & (yy <= yb) & (xx >= x0 + inset) & (xx < x0 + w - inset)
        if not body.any():
            continue
        hue = rng.random()
        paint = np.array(
            [255 * (0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3))) * rng.uniform(0.6, 1.0) for k in range(3)],
            dtype=np.float32,
        )
        tex = paint * (1.05 - 0.3 * rel_y.clip(0, 1))[..., None] + rng.normal(0, 3, (size, size, 1))
        window = body & (rel_y > 0.12) & (rel_y < 0.42)
        wheels = (
            body
            & (rel_y > 0.8)
            & ((np.abs(xx - x0 - 0.22 * w) < 0.1 * w) | (np.abs(xx - x0 - 0.78 * w) < 0.1 * w))
        )
        img[body] = tex[body]
        img[window] = _jitter(rng, (60, 75, 95), 20)
        img[wheels] = _jitter(rng, (25, 25, 25), 10)
        lab[body] = CAR

    # Whole-image photometric jitter, then sensor noise.
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-12, 12, 3)
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lab


def make_synthetic(
    out: Path, n_train: int = 48, n_test: int = 24, size: int = 64, seed: int = 0
) -> DatasetMeta:
    """Write a seeded synthetic street-scene dataset in the prepared format.

    Args:
        out: the dataset folder to write (replaced if it already is a sparseseg dataset).
        n_train: number of training images.
        n_test: number of test images.
        size: image side in pixels.
        seed: master seed; image i of split s uses its own stream derived from (seed, s, i), so
            changing n_train does not change the test images.

    Returns:
        The written DatasetMeta (classes sky, road, building, tree, pole, car).

    Raises:
        SparsesegError: non-positive counts, a size below 16, a negative seed, or an unsafe `out`.
    """
    if n_train < 1 or n_test < 1:
        raise SparsesegError(f"make_synthetic: n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if size < 16:
        raise SparsesegError(f"make_synthetic: size must be >= 16, got {size}")
    if seed < 0:
        raise SparsesegError(f"make_synthetic: seed must be >= 0, got {seed}")
    out = Path(out)
    counts = {"train": n_train, "test": n_test}
    with staged_output(out) as tmp:
        for split, n in counts.items():
            (tmp / split / "images").mkdir(parents=True)
            (tmp / split / "masks").mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
                image, label = _scene(rng, size)
                stem = f"{split}_{i:05d}"
                Image.fromarray(image).save(
                    tmp / split / "images" / f"{stem}.png", compress_level=PNG_COMPRESS_LEVEL
                )
                Image.fromarray(label).save(
                    tmp / split / "masks" / f"{stem}.png", compress_level=PNG_COMPRESS_LEVEL
                )
        meta = DatasetMeta(
            name="synthetic",
            classes=list(SYNTHETIC_CLASSES),
            palette=[list(c) for c in SYNTHETIC_PALETTE],
            size=size,
            ignore_index=IGNORE_INDEX,
            splits=counts,
            source=f"sparseseg.data.synthetic(seed={seed})",
        )
        save_meta(meta, tmp)
    return meta
