"""Pixel features sampled from native maps must equal the paper's upsample-concat-normalise."""

import torch
import torch.nn.functional as F

from sparseseg.features.store import FeatureStore
from sparseseg.seeding import derived_seed
from tests.conftest import ToyBackbone


def _dense_reference(backbone, images_uint8, noise):
    """The paper's definition, materialised: upsample every map, concatenate, L2-normalise."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1
    maps = backbone.extract(x, noise)
    size = images_uint8.shape[1]
    up = [F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) for m in maps]
    return F.normalize(torch.cat(up, dim=1), dim=1)  # (B, D, S, S)


def _store(images, cache_gb=1.0, seed=3, map_dtype=torch.float32):
    return FeatureStore(ToyBackbone(input_size=images.shape[1]), images, seed=seed, split="train",
                        cache_gb=cache_gb, batch_size=2, map_dtype=map_dtype)


def test_sampled_pixels_equal_dense_upsampling():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=gen)
    store = _store(images)
    ids = torch.tensor([2, 0, 1, 2, 0, 1, 1])
    ys = torch.tensor([0, 15, 7, 3, 8, 0, 15])
    xs = torch.tensor([0, 15, 3, 9, 1, 15, 0])
    for sample in (0, 2):
        noise = torch.stack([store._noise(i, sample) for i in range(3)])
        dense = _dense_reference(store.backbone, images, noise)
        expected = dense[ids, :, ys, xs]
        got = store.at_pixels(ids, ys, xs, sample)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        tiles = torch.cat(list(store.image_tiles(1, sample, tile_pixels=37)))
        torch.testing.assert_close(tiles, dense[1].flatten(1).T, rtol=1e-5, atol=1e-6)


def test_noise_is_seeded_per_image_and_sample_not_by_order():
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    a, b = _store(images), _store(images)
    ids, ys, xs = torch.tensor([3, 1]), torch.tensor([4, 5]), torch.tensor([6, 7])
    b.at_pixels(torch.tensor([0, 2]), ys, xs, 1)  # visit other images first
    torch.testing.assert_close(a.at_pixels(ids, ys, xs, 1), b.at_pixels(ids, ys, xs, 1))
    assert not torch.allclose(a.at_pixels(ids, ys, xs, 1), a.at_pixels(ids, ys, xs, 2))
    assert derived_seed(0, "train", 1, 1) != derived_seed(0, "test", 1, 1) != derived_seed(1, "train", 1, 1)


def test_cache_is_only_a_speedup():
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    ids, ys, xs = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 2, 1])
    exact = _store(images).at_pixels(ids, ys, xs)
    # a cache that holds everything, one that holds two images, and none: identical features
    per_image = (5 * 16 * 16 + 3 * 8 * 8 + 4 * 4 * 4) * 2  # bytes of one image's float16 maps
    sizes = {"all": 1.0, "some": 2.5 * per_image / 2**30, "none": 0.0}
    results = {}
    for name, gb in sizes.items():
        store = _store(images, cache_gb=gb, map_dtype=torch.float16)
        store.at_pixels(ids, ys, xs)  # fill the cache (or not)
        results[name] = store.at_pixels(ids, ys, xs)
        assert len(store._cache) == {"all": 4, "some": 2, "none": 0}[name]
    torch.testing.assert_close(results["all"], results["none"], rtol=0, atol=0)
    torch.testing.assert_close(results["some"], results["none"], rtol=0, atol=0)
    # float16 maps: equal to float32 features within half precision
    torch.testing.assert_close(results["all"], exact, rtol=2e-3, atol=2e-3)


def test_small_requests_are_remembered_without_rerunning_the_backbone():
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    store = _store(images, cache_gb=0.0)
    store._cache_cap = 1000  # bytes: room for a few pixel features (48 B each), none for maps (6 KB)
    store.pixel_cache_limit = 4
    calls = []
    extract = store.backbone.extract
    store.backbone.extract = lambda x, n: calls.append(len(x)) or extract(x, n)
    ids, ys, xs = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    first = store.at_pixels(ids, ys, xs, sample=1)
    assert sum(calls) == 2 and not store._cache  # images 0 and 2, maps not kept
    torch.testing.assert_close(store.at_pixels(ids, ys, xs, sample=1), first, rtol=0, atol=0)
    assert sum(calls) == 2  # answered from remembered pixels
    store.at_pixels(torch.tensor([0]), torch.tensor([9]), torch.tensor([9]), sample=1)
    assert sum(calls) == 3  # a new pixel of image 0 needs its maps again
    store.at_pixels(torch.zeros(5, dtype=torch.long), torch.arange(5), torch.arange(5), sample=1)
    assert len(store._pixels[(0, 1)]) == 3  # a request above the limit is not remembered


def test_every_noise_sample_of_an_image_comes_from_one_backbone_call():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=gen)
    store = _store(images, cache_gb=1.0)
    calls = []
    extract = store.backbone.extract
    store.backbone.extract = lambda x, n: calls.append(len(x)) or extract(x, n)
    ids, ys, xs = torch.tensor([2, 0, 2, 1]), torch.tensor([1, 2, 3, 15]), torch.tensor([4, 5, 6, 0])
    samples = [1, 2, 3]
    got = torch.empty(len(samples), len(ids), store.dim)
    for idx, feats in store.at_pixels_samples(ids, ys, xs, samples):
        got[:, idx] = feats
    assert calls == [3, 3, 3]  # one call per image, a batch of its three samples
    store.backbone.extract = extract
    # the same features as the paper's definition, sample by sample
    for k, sample in enumerate(samples):
        noise = torch.stack([store._noise(i, sample) for i in range(3)])
        expected = _dense_reference(store.backbone, images, noise)[ids, :, ys, xs]
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)
    # asked again: every pixel is remembered, no backbone call; nothing entered the map cache
    store.backbone.extract = lambda x, n: calls.append(len(x)) or extract(x, n)
    again = torch.empty_like(got)
    for idx, feats in store.at_pixels_samples(ids, ys, xs, samples):
        again[:, idx] = feats
    assert calls == [3, 3, 3] and not store._cache
    torch.testing.assert_close(again, got, rtol=0, atol=0)
