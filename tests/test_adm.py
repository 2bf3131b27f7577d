"""ADM reimplementation: conformance with guided-diffusion, checkpoint loading, flags, schedule."""

from __future__ import annotations

import copy
import json
import math
import urllib.error

import numpy as np
import pydantic
import pytest
import torch

from sparseseg.backbones.adm import (
    PRESET_URLS,
    PRESETS,
    ADMBackbone,
    ADMFlags,
    ADMUNet,
    AttentionBlock,
    block_outputs,
    download_preset,
    load_adm,
)
from sparseseg.backbones.base import FeatureBackbone
from sparseseg.backbones.diffusion import NoiseSchedule, linear_betas
from sparseseg.errors import SparsesegError
from tests.conftest import SHARED

FIXTURE = SHARED / "fixtures" / "adm_tiny"
TOL = 1e-4


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def fixture():
    """(config, flags, model, expected arrays) of the guided-diffusion conformance fixture."""
    if not (FIXTURE / "model.pt").is_file():
        pytest.skip(f"conformance fixture not found at {FIXTURE}")
    cfg = json.loads((FIXTURE / "config.json").read_text())
    model, flags = load_adm(FIXTURE / "model.pt", flags=ADMFlags(**cfg["guided_diffusion_flags"]))
    with np.load(FIXTURE / "expected.npz") as npz:
        expected = dict(npz)
    return cfg, flags, model, expected


def tiny_flags(**overrides) -> ADMFlags:
    """Two levels, attention at 16 (downsampling 2) and in the middle: fast and complete."""
    base = dict(
        image_size=32,
        channel_mult="1,2",
        num_channels=32,
        num_res_blocks=1,
        attention_resolutions="16",
        num_head_channels=16,
        learn_sigma=True,
    )
    return ADMFlags(**{**base, **overrides})


def randomized(model: ADMUNet, seed: int = 0) -> ADMUNet:
    """Gives every parameter random values, so zero-initialised branches are exercised too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


# --- conformance with guided-diffusion ----------------------------------------------------------


def test_every_fixture_array_matches(fixture):
    cfg, flags, model, expected = fixture
    x0, noise = torch.from_numpy(expected["x0"]), torch.from_numpy(expected["noise"])
    schedule = NoiseSchedule.named(flags.noise_schedule, flags.diffusion_steps)
    ours = block_outputs(model, schedule, x0, cfg["timesteps"], cfg["blocks"], noise)
    with torch.no_grad():
        for t in cfg["timesteps"]:
            ours[f"out_t{t}"] = model(torch.from_numpy(expected[f"x_t{t}"]), torch.tensor([t])).numpy()

    assert set(ours) == set(expected) - {"x0", "noise"}
    for key, ref in expected.items():
        if key in ours:
            assert ours[key].shape == ref.shape, key
            assert rel_err(ours[key], ref) < TOL, key


def test_backbone_matches_fixture_and_feature_info(fixture):
    cfg, flags, model, expected = fixture
    backbone = ADMBackbone(model, flags, cfg["timesteps"], cfg["blocks"], input_size=cfg["input_size"])
    assert isinstance(backbone, FeatureBackbone)
    maps = backbone.extract(torch.from_numpy(expected["x0"]), torch.from_numpy(expected["noise"]))

    assert [(i.timestep, i.block) for i in backbone.feature_info] == [
        (t, b) for t in cfg["timesteps"] for b in cfg["blocks"]
    ]
    for info, fmap in zip(backbone.feature_info, maps, strict=True):
        size = cfg["input_size"] // info.reduction
        assert fmap.dtype == torch.float32
        assert tuple(fmap.shape) == (1, info.num_chs, size, size)
        assert rel_err(fmap.numpy(), expected[f"block{info.block}_t{info.timestep}"]) < TOL


def test_fixture_flags_are_the_imagenet_preset_at_smaller_width(fixture):
    _, flags, _, _ = fixture
    assert ADMFlags.from_file(FIXTURE / "config.json") == flags  # nested `guided_diffusion_flags`
    assert flags.model_copy(update=dict(num_channels=256, num_head_channels=64)) == PRESETS["imagenet_256"]


def test_mismatching_checkpoint_names_keys(fixture):
    cfg, _, _, _ = fixture
    wide = ADMFlags(**{**cfg["guided_diffusion_flags"], "num_channels": 64})
    with pytest.raises(SparsesegError, match=r"model\.pt .*input_blocks\.0\.0\.weight: checkpoint") as err:
        load_adm(FIXTURE / "model.pt", flags=wide)
    assert "\n" not in str(err.value)
    assert "looks like num_channels=32, learn_sigma=True" in str(err.value)


# --- the UNet against independent references ----------------------------------------------------


@pytest.mark.parametrize("resblock_updown", [True, False])
def test_forward_blocks_equals_hooked_full_forward(resblock_updown):
    model = randomized(ADMUNet(tiny_flags(resblock_updown=resblock_updown)))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    hooked, calls = {}, []

    def recorder(name):
        def hook(_module, _inputs, output):
            hooked[name] = output
            calls.append(name)

        return hook

    handles = [m.register_forward_hook(recorder(i)) for i, m in enumerate(model.output_blocks)]
    handles.append(model.out.register_forward_hook(recorder("out")))
    with torch.no_grad():
        model(x, t)
        calls.clear()
        blocks = model.forward_blocks(x, t, [2, 0])
    for h in handles:
        h.remove()

    assert list(blocks) == [2, 0]
    assert calls == [0, 1, 2], "must stop after the deepest requested block"
    for b, h in blocks.items():
        torch.testing.assert_close(h, hooked[b], rtol=0, atol=0)
        assert h.shape[1] == model.output_block_channels[b]
        assert h.shape[-1] == 32 // model.output_block_reductions[b]


def naive_attention(block: AttentionBlock, x: torch.Tensor, legacy: bool) -> torch.Tensor:
    """guided-diffusion's attention written out head by head, with explicit softmax."""
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(flat))
    heads, ch = block.num_heads, c // block.num_heads
    outs = []
    for h in range(heads):
        if legacy:  # per head: [q_h, k_h, v_h] contiguous
            part = qkv[:, h * 3 * ch : (h + 1) * 3 * ch]
            q, k, v = part[:, :ch], part[:, ch : 2 * ch], part[:, 2 * ch :]
        else:  # q of all heads, then k, then v
            q, k, v = (qkv[:, i * c + h * ch : i * c + (h + 1) * ch] for i in range(3))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
        outs.append(torch.einsum("bts,bcs->bct", w, v))
    return (flat + block.proj_out(torch.cat(outs, dim=1))).reshape(b, c, hh, ww)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_orders_match_naive(legacy):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=not legacy)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(2, 64, 4, 5)
        torch.testing.assert_close(block(x), naive_attention(block, x, legacy), rtol=1e-5, atol=1e-5)


def test_imagenet_preset_decoder_shapes_on_meta():
    with torch.device("meta"):
        model = ADMUNet(PRESETS["imagenet_256"])
    picks = [5, 8, 12, 17]
    assert len(model.output_blocks) == 18
    assert [model.output_block_channels[b] for b in picks] == [1024, 512, 256, 256]
    assert [model.output_block_reductions[b] for b in picks] == [8, 4, 2, 1]
    assert model.out[-1].out_channels == 6
    assert PRESETS["lsun_bedroom"].dropout == 0.1


def test_default_channel_mult_per_image_size():
    assert ADMFlags(image_size=512).channel_mults() == (0.5, 1, 1, 2, 2, 4, 4)
    assert ADMFlags(image_size=128).channel_mults() == (1, 1, 2, 3, 4)
    assert ADMFlags(image_size=64, attention_resolutions="32,16,8").attention_downsample_rates() == (2, 4, 8)


# --- checkpoints --------------------------------------------------------------------------------


def test_plain_state_dict_needs_flags(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(ADMUNet(tiny_flags()).state_dict(), path)
    with pytest.raises(SparsesegError, match=r"plain\.pt.*--preset.*--config"):
        load_adm(path)
    model, flags = load_adm(path, flags=tiny_flags())
    assert flags == tiny_flags() and not model.training


def test_pretrain_style_checkpoint_prefers_ema_and_recorded_flags(tmp_path):
    flags = tiny_flags()
    model, ema = randomized(ADMUNet(flags), 1), randomized(ADMUNet(flags), 2)
    path = tmp_path / "run.pt"
    torch.save(
        {
            "sparseseg_adm": 1,
            "flags": flags.model_dump(),
            "input_size": 32,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
        },
        path,
    )
    loaded, loaded_flags = load_adm(path)
    assert loaded_flags == flags
    torch.testing.assert_close(loaded.state_dict(), ema.state_dict(), rtol=0, atol=0)
    backbone = ADMBackbone.from_checkpoint(path, [5], [0, 1])
    assert backbone.input_size == 32
    # Explicit flags override the recorded ones (and here do not fit).
    with pytest.raises(SparsesegError, match="shape mismatches"):
        load_adm(path, flags=tiny_flags(num_channels=64))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_corrupt_checkpoint_names_file(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(SparsesegError, match=r"broken\.pt: cannot read checkpoint"):
        load_adm(path, flags=tiny_flags())
    with pytest.raises(SparsesegError, match="not found"):
        load_adm(tmp_path / "missing.pt", flags=tiny_flags())


def test_download_offline_says_what_to_fetch(tmp_path, monkeypatch):
    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SparsesegError) as err:
        download_preset("imagenet_256", tmp_path)
    message = str(err.value)
    assert PRESET_URLS["imagenet_256"] in message
    assert str(tmp_path / "256x256_diffusion_uncond.pt") in message
    with pytest.raises(SparsesegError, match="lsun_bedroom"):
        download_preset("imagenet", tmp_path)


# --- flags files --------------------------------------------------------------------------------


def test_flags_file_roundtrip_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "flags.yaml"
    yaml_file.write_text(
        "image_size: 256\nnum_channels: 64\nattention_resolutions: [32, 16, 8]\nlearn_sigma: true\n"
    )
    flags = ADMFlags.from_file(yaml_file)
    assert flags.attention_resolutions == "32,16,8" and flags.num_channels == 64
    json_file = tmp_path / "flags.json"
    json_file.write_text(flags.model_dump_json())
    assert ADMFlags.from_file(json_file) == flags


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("num_channel: 32\n", r"flags\.yaml: unknown key 'num_channel'; did you mean 'num_channels'"),
        ("num_channels: lots\n", r"flags\.yaml: key 'num_channels'"),
        ("num_channels: 48\n", r"flags\.yaml: .*multiple of 32"),
        ("image_size: 100\n", r"flags\.yaml: .*image_size=100 has no default"),
        ("[1, 2]\n", r"flags\.yaml: expected a mapping"),
        ("a: [\n", r"flags\.yaml: not valid JSON/YAML"),
    ],
)
def test_bad_flags_file_raises_one_line(tmp_path, text, pattern):
    path = tmp_path / "flags.yaml"
    path.write_text(text)
    with pytest.raises(SparsesegError, match=pattern) as err:
        ADMFlags.from_file(path)
    assert "\n" not in str(err.value)


def test_flags_are_frozen():
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        PRESETS["imagenet_256"].num_channels = 3  # type: ignore[misc]


# --- backbone arguments -------------------------------------------------------------------------


def test_backbone_rejects_bad_arguments():
    flags = tiny_flags()
    model = ADMUNet(flags)
    with pytest.raises(SparsesegError, match=r"0\.\.3"):
        ADMBackbone(model, flags, [50], [4], input_size=32)
    with pytest.raises(SparsesegError, match=r"0\.\.999"):
        ADMBackbone(model, flags, [1000], [0], input_size=32)
    with pytest.raises(SparsesegError, match="multiple of 2"):
        ADMBackbone(model, flags, [50], [0], input_size=33)
    backbone = ADMBackbone(model, flags, [50], [0], input_size=32)
    with pytest.raises(SparsesegError, match=r"expected \(B, 3, 32, 32\)"):
        backbone.extract(torch.zeros(1, 3, 16, 16), None)


def test_backbone_default_noise_is_fixed_and_shared():
    flags = tiny_flags()
    backbone = ADMBackbone(randomized(ADMUNet(flags)), flags, [50, 100], [0, 2], input_size=32)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    first, second = backbone.extract(images, None), backbone.extract(images, None)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Batched timesteps give the same maps as one timestep at a time.
    single = ADMBackbone(backbone.model, flags, [100], [0, 2], input_size=32).extract(images, None)
    torch.testing.assert_close(single[0], first[2], rtol=1e-5, atol=1e-5)


# --- noise schedule -----------------------------------------------------------------------------


def test_linear_schedule_and_q_sample():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas[0] == 1e-4 and math.isclose(betas[-1], 0.02)
    assert math.isclose(linear_betas(250)[-1], 0.08)
    schedule = NoiseSchedule(betas)
    acp = np.cumprod(1 - betas)
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 50, 999])
    ref = torch.stack(
        [
            float(np.sqrt(acp[i])) * x0[j] + float(np.sqrt(1 - acp[i])) * noise[j]
            for j, i in enumerate(t.tolist())
        ]
    )
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), ref, rtol=0, atol=0)
    torch.testing.assert_close(schedule.q_sample(x0, 50, noise)[1], ref[1], rtol=0, atol=0)
    with pytest.raises(SparsesegError, match="0..999"):
        schedule.q_sample(x0, 1000, noise)


def test_training_loss_uses_epsilon_channels_and_generator():
    schedule = NoiseSchedule.named("linear", 1000)
    x0 = torch.zeros(4, 3, 8, 8)

    def zero_model(x, t):  # predicts 0 noise, and junk in the variance channels
        return torch.cat([torch.zeros_like(x), torch.full_like(x, 100.0)], dim=1)

    loss = schedule.training_loss(zero_model, x0, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    torch.randint(0, 1000, (4,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(loss, noise.pow(2).mean())
    assert NoiseSchedule.named("cosine", 1000).betas.max() <= 0.999
    with pytest.raises(SparsesegError, match="linear, cosine"):
        NoiseSchedule.named("quadratic", 1000)


# --- fast path: fused attention, bf16 autocast, channels_last, torch.compile --------------------

# bf16 keeps 8 significant bits: each rounding of an activation or weight is off by up to
# 2^-9 ≈ 2e-3 relative, and ~40 layers of such roundings accumulate like a random walk to about
# sqrt(40) x 2e-3 ≈ 1.3e-2 (measured on the fixture: 1.3e-2 to 1.7e-2). 3e-2 leaves a factor two.
BF16_TOL = 3e-2


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_attention_impl_matches_naive(legacy):
    torch.manual_seed(1)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=not legacy)
    block.impl = "legacy"
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(2, 64, 4, 5)
        torch.testing.assert_close(block(x), naive_attention(block, x, legacy), rtol=1e-5, atol=1e-5)


def test_sdpa_and_legacy_attention_agree_in_float32(fixture):
    cfg, flags, model, expected = fixture
    x_t = torch.from_numpy(expected["x_t150"])
    try:
        with torch.no_grad():
            model.set_attention("legacy")
            legacy = model.forward_blocks(x_t, 150, cfg["blocks"])
            model.set_attention("sdpa")
            sdpa = model.forward_blocks(x_t, 150, cfg["blocks"])
    finally:
        model.set_attention("sdpa")
    for b in cfg["blocks"]:
        torch.testing.assert_close(sdpa[b], legacy[b], rtol=1e-5, atol=1e-5)
    with pytest.raises(SparsesegError, match="sdpa, legacy"):
        model.set_attention("flash")


def test_fast_path_matches_fixture_within_bf16_tolerance(fixture):
    cfg, flags, model, expected = fixture
    x0, noise = torch.from_numpy(expected["x0"]), torch.from_numpy(expected["noise"])
    exact = ADMBackbone(model, flags, cfg["timesteps"], cfg["blocks"], input_size=cfg["input_size"])
    fast = ADMBackbone(copy.deepcopy(model), flags, cfg["timesteps"], cfg["blocks"],
                       input_size=cfg["input_size"], fast=True)  # bf16 autocast works on CPU too
    assert (exact.fast, exact.attention, fast.fast, fast.attention) == (False, "legacy", True, "sdpa")
    assert fast.model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    errors = []
    for info, fmap in zip(fast.feature_info, fast.extract(x0, noise), strict=True):
        assert fmap.dtype == torch.float32
        errors.append(rel_err(fmap.numpy(), expected[f"block{info.block}_t{info.timestep}"]))
    assert max(errors) < BF16_TOL, errors
    assert min(errors) > 1e-4, "the fast path did not run in bf16"
    # The exact path is untouched by the fast one (separate copies of the weights).
    for info, fmap in zip(exact.feature_info, exact.extract(x0, noise), strict=True):
        assert rel_err(fmap.numpy(), expected[f"block{info.block}_t{info.timestep}"]) < TOL


def test_compile_option_wraps_the_forward(monkeypatch):
    flags = tiny_flags()
    model = randomized(ADMUNet(flags))
    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = ADMBackbone(model, flags, [50, 100], [0, 2], input_size=32, fast=True)
    wrapped = ADMBackbone(model, flags, [50, 100], [0, 2], input_size=32, fast=True, compile=True)
    assert len(compiled) == 1 and compiled[0] == model.forward_blocks
    for a, b in zip(plain.extract(images, None), wrapped.extract(images, None), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(SparsesegError, match="compile=True needs the fast path"):
        ADMBackbone(model, flags, [50], [0], input_size=32, fast=False, compile=True)
