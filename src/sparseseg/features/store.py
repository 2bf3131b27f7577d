"""Per-pixel multi-scale features, read from native-resolution maps without ever building the
whole (N, H, W, D) tensor.

The paper's feature of pixel x is: every (timestep, block) map upsampled bilinearly to the working
resolution, concatenated over blocks and timesteps, then L2-normalised per pixel. Upsampling a map
with `F.interpolate(mode="bilinear", align_corners=False)` and reading pixel (y, x) is the same as
`F.grid_sample` of the native map at that pixel's centre (align_corners=False, border padding), so
we sample only the pixels we need: a few hundred bytes each instead of H*W*D floats per image.

Noise: sample 0 is the deterministic sample used for training, evaluation and herding; samples
1..M are the eDALD/DALD noise samples and M+1 is the independent z(0). Each (seed, split, image,
sample) gets its own Gaussian noise from a generator seeded by a hash of those four values, and
the backbone sees one image per call (its numerics do not depend on a batch), so a feature never
depends on the order in which images are visited or on what the cache held: caching is only a
speed-up, and a resumed run ends identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from sparseseg.backbones.base import FeatureBackbone
from sparseseg.config import FeatureConfig
from sparseseg.data.dataset import images_to_model_input
from sparseseg.errors import SparsesegError
from sparseseg.seeding import derived_generator

DETERMINISTIC = 0
#: Share of `features.cache_gb` given to the splits that are selected from and trained on: they reuse
#: most (every noise sample of every image across rounds); evaluation splits only need their
#: deterministic maps once per round.
TRAINING_CACHE_SHARE = 0.75


def pixel_grid(ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised grid_sample coordinates of pixel centres, shape (1, 1, n, 2) as (x, y)."""
    gx = (2 * xs.float() + 1) / size - 1
    gy = (2 * ys.float() + 1) / size - 1
    return torch.stack([gx, gy], dim=-1).view(1, 1, -1, 2)


def sample_maps(maps: Sequence[torch.Tensor], ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    """Features of pixels (ys, xs) of one image, as if every map were upsampled to `size`.

    Args:
        maps: native maps of ONE image, each (C_i, h_i, w_i).
        ys, xs: (n,) integer pixel coordinates at the working resolution `size`.

    Returns:
        (n, sum C_i) float32, L2-normalised per pixel.
    """
    grid = pixel_grid(ys, xs, size).to(maps[0].device)
    parts = [
        F.grid_sample(m[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T
        for m in maps
    ]
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def by_image(image_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """A request's pixels grouped by image: (image, positions in the request), images ascending,
    positions in request order."""
    order = torch.argsort(image_ids, stable=True)
    uniq, counts = torch.unique_consecutive(image_ids[order], return_counts=True)
    return list(zip(uniq.tolist(), torch.split(order, counts.tolist()), strict=True))


class FeatureStore:
    """Features of one split's images under a backbone, with a bounded cache of native maps.

    Args:
        backbone: anything implementing `FeatureBackbone`.
        images: (N, S, S, 3) uint8, S = working resolution.
        seed: run seed (fixes every noise sample).
        split: split name, part of the noise seed so train and test noises differ.
        cache_gb: budget of the in-memory caches (native maps and remembered pixel features).
        batch_size: images per request group (the backbone itself sees one image per call).
        device: where the backbone runs.
        map_dtype: precision native maps are kept in. Maps are ALWAYS rounded to it, cached or not,
            so a feature never depends on whether the cache had room (float16 halves the cache).
        pixel_cache_limit: per-image request size up to which pixel features are remembered.
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        images: torch.Tensor,
        seed: int,
        split: str,
        cache_gb: float = 4.0,
        batch_size: int = 4,
        device: str | torch.device = "cpu",
        map_dtype: torch.dtype = torch.float16,
        pixel_cache_limit: int = 256,
    ) -> None:
        self.backbone = backbone
        self.images = images
        self.size = images.shape[1]
        self.seed = seed
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.map_dtype = map_dtype
        self.dim = sum(info.num_chs for info in backbone.feature_info)
        self._cache: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._pixels: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        self.pixel_cache_limit = pixel_cache_limit
        self._cache_bytes = 0
        self._cache_cap = int(cache_gb * 2**30)
        self._labelled: dict[tuple[int, int], torch.Tensor] = {}  # (image, flat pixel) -> deterministic feature

    def __len__(self) -> int:
        return self.images.shape[0]

    # ---------------------------------------------------------------- native maps
    def _noise(self, image: int, sample: int) -> torch.Tensor:
        gen = derived_generator(self.seed, self.split, image, sample)
        s = self.backbone.input_size
        return torch.randn(3, s, s, generator=gen)

    def _model_input(self, image_ids: Sequence[int]) -> torch.Tensor:
        x = images_to_model_input(self.images[list(image_ids)])
        s = self.backbone.input_size
        if s != self.size:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    def _compute(self, pairs: Sequence[tuple[int, int]]) -> list[list[torch.Tensor]]:
        images = self._model_input([i for i, _ in pairs]).to(self.device)
        noise = torch.stack([self._noise(i, s) for i, s in pairs]).to(self.device)
        # One image per backbone call: a convolution's last bits depend on the batch it runs in, and which
        # images share a batch depends on the cache and the request, so batched maps would not be the same
        # on every call (a resumed run would end differently from an uninterrupted one).
        per_image = [self.backbone.extract(images[j : j + 1], noise[j : j + 1]) for j in range(len(pairs))]
        maps = self._checked([torch.cat(parts) for parts in zip(*per_image, strict=True)], [i for i, _ in pairs])
        return [[m[j] for m in maps] for j in range(len(pairs))]

    def _checked(self, maps: list[torch.Tensor], images: Sequence[int]) -> list[torch.Tensor]:
        """Maps rounded to `map_dtype`, refused when not finite (damaged weights, or beyond map_dtype's range)."""
        maps = [m.to(self.map_dtype) for m in maps]
        if not all(bool(torch.isfinite(m).all()) for m in maps):
            raise SparsesegError(f"backbone features of {self.split} image(s) {sorted(set(images))} hold NaN "
                                 f"or infinite values (kept as {self.map_dtype}); is the checkpoint damaged?")
        return maps

    def maps(self, pairs: Sequence[tuple[int, int]]) -> list[list[torch.Tensor]]:
        """Native maps for each (image, sample) pair, requested in groups of `batch_size`, cached while room lasts."""
        out: dict[tuple[int, int], list[torch.Tensor]] = {}
        todo = [p for p in dict.fromkeys(pairs) if p not in self._cache]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for pair, maps in zip(chunk, self._compute(chunk), strict=True):
                out[pair] = maps
                self._remember(pair, maps)
        return [self._cache[p] if p in self._cache else out[p] for p in pairs]

    def _remember(self, pair: tuple[int, int], maps: list[torch.Tensor]) -> None:
        nbytes = sum(m.numel() * m.element_size() for m in maps)
        if self._cache_bytes + nbytes <= self._cache_cap:
            self._cache[pair] = [m.to("cpu") for m in maps]
            self._cache_bytes += nbytes

    def ready(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Maps as `maps` returns them, on the device in float32, ready for `sample_maps`."""
        return [m.to(self.device, torch.float32) for m in maps]

    # ---------------------------------------------------------------- pixel features
    def at_pixels(
        self,
        image_ids: torch.Tensor,
        ys: torch.Tensor,
        xs: torch.Tensor,
        sample: int = DETERMINISTIC,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Features of arbitrary pixels across images: (n, D) float32 on CPU, in input order.

        Small requests (at most `pixel_cache_limit` pixels of an image, such as local picks, the
        pool or labelled pixels) are remembered per (image, sample), so a later round asks the
        UNet again only for images whose requested pixels changed.
        """
        out = torch.empty(len(image_ids), self.dim)
        todo = []
        for img, idx in by_image(image_ids):
            flat = (ys[idx] * self.size + xs[idx]).tolist()
            known = self._pixels.get((img, sample), {})
            if all(f in known for f in flat):
                out[idx] = torch.stack([known[f] for f in flat])
            else:
                todo.append((img, idx, flat))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            maps = self.maps([(img, sample) for img, _, _ in batch])
            for (img, idx, flat), image_maps in zip(batch, maps, strict=True):
                feats = sample_maps(self.ready(image_maps), ys[idx], xs[idx], self.size).cpu()
                out[idx] = feats
                self._remember_pixels((img, sample), flat, feats)
            if progress is not None:
                progress(min(start + self.batch_size, len(todo)), len(todo))
        return out

    def sample_set_maps(self, image: int, samples: Sequence[int]) -> list[list[torch.Tensor]]:
        """Native maps of one image under each of `samples`, from ONE backbone call (a batch of
        len(samples)): the noise-sample features of eDALD / DALD cost one UNet pass per image and
        timestep batch instead of one per sample. Kept out of the map cache, so that the same
        (image, sample) never has maps from calls of different batch sizes (their last bits differ)."""
        images = self._model_input([image]).to(self.device)
        noise = torch.stack([self._noise(image, smp) for smp in samples]).to(self.device)
        maps = self._checked(self.backbone.extract(images.expand(len(samples), -1, -1, -1), noise), [image])
        return [[m[j] for m in maps] for j in range(len(samples))]

    def at_pixels_samples(
        self,
        image_ids: torch.Tensor,
        ys: torch.Tensor,
        xs: torch.Tensor,
        samples: Sequence[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Features of pixels under several noise samples, image by image.

        Yields (positions in the request, (len(samples), n_i, D) features) per image of the request,
        every sample of an image from one `sample_set_maps` call. Memory stays at one image's
        samples. Small requests are remembered as `at_pixels` remembers them, per (image, sample).
        """
        groups = by_image(image_ids)
        for n, (img, idx) in enumerate(groups):
            flat = (ys[idx] * self.size + xs[idx]).tolist()
            known = [self._pixels.get((img, smp), {}) for smp in samples]
            if all(f in k for k in known for f in flat):
                feats = torch.stack([torch.stack([k[f] for f in flat]) for k in known])
            else:
                maps = self.sample_set_maps(img, samples)
                feats = torch.stack([sample_maps(self.ready(m), ys[idx], xs[idx], self.size).cpu() for m in maps])
                for smp, f in zip(samples, feats, strict=True):
                    self._remember_pixels((img, smp), flat, f)
            if progress is not None:
                progress(n + 1, len(groups))
            yield idx, feats

    def labelled_features(self, image_ids: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Deterministic features of labelled pixels, (n, D), remembered outside the cache budget.

        Labelled pixels are few and every round trains on all of them again, so they are kept even
        when the caches are full of noise-sample maps (re-reading them would rerun the backbone).
        """
        keys = list(zip(image_ids.tolist(), (ys * self.size + xs).tolist(), strict=True))
        new = [i for i, key in enumerate(keys) if key not in self._labelled]
        if new:
            idx = torch.tensor(new)
            for key, row in zip([keys[i] for i in new], self.at_pixels(image_ids[idx], ys[idx], xs[idx]), strict=True):
                self._labelled[key] = row
        if not keys:
            return torch.empty(0, self.dim)
        return torch.stack([self._labelled[key] for key in keys])

    def _remember_pixels(self, key: tuple[int, int], flat: list[int], feats: torch.Tensor) -> None:
        if len(flat) > self.pixel_cache_limit:
            return
        known = self._pixels.setdefault(key, {})
        new = [(f, row) for f, row in zip(flat, feats.clone(), strict=True) if f not in known]
        nbytes = len(new) * self.dim * 4
        if self._cache_bytes + nbytes <= self._cache_cap:
            known.update(new)
            self._cache_bytes += nbytes

    def image_tiles(self, image: int, sample: int = DETERMINISTIC, tile_pixels: int = 16384) -> Iterator[torch.Tensor]:
        """Whole-image features in row-major tiles of at most `tile_pixels` pixels, each (n, D).

        Memory stays at one tile (tile_pixels x D floats) however large the image.
        """
        maps = self.ready(self.maps([(image, sample)])[0])
        flat = torch.arange(self.size * self.size)
        for chunk in torch.split(flat, tile_pixels):
            yield sample_maps(maps, chunk // self.size, chunk % self.size, self.size)


def build_stores(
    backbone: FeatureBackbone,
    splits: Mapping[str, torch.Tensor],
    seed: int,
    config: FeatureConfig,
    batch_size: int,
    device: str | torch.device,
    evaluation: Sequence[str] = (),
    pixel_cache_limit: int = 256,
) -> dict[str, FeatureStore]:
    """One FeatureStore per split, sharing the `features.cache_gb` budget.

    The splits that are selected from and trained on share TRAINING_CACHE_SHARE of the budget
    (all of it when there is no evaluation split); the `evaluation` splits share the rest.

    Args:
        backbone: the backbone every store reads.
        splits: split name -> (N, S, S, 3) uint8 images; the name seeds the split's noise.
        seed: run seed.
        config: the `features` settings.
        batch_size: images per request group (the backbone itself sees one image per call).
        device: where the backbone runs.
        evaluation: names among `splits` that are only evaluated on.
        pixel_cache_limit: see FeatureStore (0 when every pixel is read once).
    """
    evaluated = [name for name in splits if name in set(evaluation)]
    trained = [name for name in splits if name not in set(evaluation)]
    share = {name: (TRAINING_CACHE_SHARE if evaluated else 1.0) / len(trained) for name in trained}
    share.update({name: (1 - TRAINING_CACHE_SHARE if trained else 1.0) / len(evaluated) for name in evaluated})
    return {name: FeatureStore(backbone, images, seed, name, config.cache_gb * share[name], batch_size, device,
                               pixel_cache_limit=pixel_cache_limit)
            for name, images in splits.items()}
