"""backbone.name=transformers: tiny random-weight ResNet, DINOv2 and ConvNeXt models saved with
save_pretrained, loaded through the registry, and checked against the same networks' own
`output_hidden_states=True` forward. CPU only, nothing downloaded."""

import json
import shutil
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    Dinov2Config,
    Dinov2Model,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
)
from typer.testing import CliRunner

from sparseseg.backbones.base import FeatureBackbone
from sparseseg.backbones.registry import BACKBONES, build_backbone
from sparseseg.backbones.transformers_backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TransformersBackbone,
    backbone_model_types,
    default_stages,
    read_normalisation,
    stage_table,
)
from sparseseg.cli import app
from sparseseg.config import BackboneConfig, StrategyConfig, load_config
from sparseseg.data.synthetic import make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.features.store import FeatureStore
from sparseseg.loop.experiment import Experiment
from sparseseg.selection.scores import is_diffusion
from sparseseg.selection.strategies import check_strategy, create_strategy

TINY_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=3)
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8,
                   image_size=32)
# not ImageNet's, so that ignoring the checkpoint's processor settings would show
DINO_MEAN, DINO_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Fresh BatchNorms are identities in eval mode; random statistics make the comparison bite."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> tuple[Path, ResNetForImageClassification]:
    """A classifier checkpoint, laid out like microsoft/resnet-50 (ResNetForImageClassification)."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-resnet"
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(**TINY_RESNET)).eval()
    _randomise_batchnorm(model, 0)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> tuple[Path, Dinov2Model]:
    """A bare Dinov2Model with an image processor file, like facebook/dinov2-small."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-dinov2"
    torch.manual_seed(1)
    model = Dinov2Model(Dinov2Config(**TINY_DINOV2)).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(DINO_MEAN), "image_std": list(DINO_STD)}))
    return folder, model


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _by_hand(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] to [0, 1], then (x - mean) / std: what the image processor does to 0..255 / 255."""
    return ((x + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------
# Maps against the networks' own forward
# ------------------------------------------------------------------------------------------------


def test_resnet_stages_are_the_models_hidden_states(resnet):
    folder, original = resnet
    backbone = build_backbone(BackboneConfig(name="transformers", checkpoint=folder), "cpu", 64)
    assert isinstance(backbone, FeatureBackbone) and isinstance(backbone, TransformersBackbone)
    assert backbone.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    # default: every stage but the stem, at strides 4/8/16/32 with hidden_sizes channels
    assert [(i.block, i.num_chs, i.reduction, i.timestep) for i in backbone.feature_info] == [
        (1, 8, 4, -1), (2, 16, 8, -1), (3, 16, 16, -1), (4, 32, 32, -1)]
    assert [i.num_chs for i in backbone.feature_info] == backbone.model.channels
    assert backbone.input_size == 64 and backbone.normalisation.mean == IMAGENET_MEAN
    x = _images(2, 64)
    maps = backbone.extract(x, None)
    with torch.no_grad():  # the classifier's own ResNetModel, never saved or reloaded
        hidden = original.resnet(_by_hand(x, IMAGENET_MEAN, IMAGENET_STD), output_hidden_states=True).hidden_states
    assert len(hidden) == 5  # the stem (embedder) output, then stages 1-4
    for m, info in zip(maps, backbone.feature_info, strict=True):
        assert m.dtype == torch.float32 and m.shape == (2, info.num_chs, 64 // info.reduction, 64 // info.reduction)
        torch.testing.assert_close(m, hidden[info.block], rtol=1e-4, atol=1e-5)
    # noise is ignored, and images do not influence each other
    again = backbone.extract(x, torch.randn_like(x))
    single = backbone.extract(x[1:], None)
    for a, b, c in zip(maps, again, single, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a[1:], c, rtol=1e-4, atol=1e-5)
    # the stem and one stage, at a size that is a multiple of their largest stride (8) only
    some = build_backbone(BackboneConfig(name="transformers", checkpoint=folder, blocks=(2, 0), input_size=40),
                          "cpu", 64)
    assert [(i.block, i.reduction) for i in some.feature_info] == [(0, 4), (2, 8)]
    with torch.no_grad():
        hidden = original.resnet(_by_hand(_images(1, 40), IMAGENET_MEAN, IMAGENET_STD),
                                 output_hidden_states=True).hidden_states
    for m, block in zip(some.extract(_images(1, 40), None), (0, 2), strict=True):
        torch.testing.assert_close(m, hidden[block], rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training


def test_dinov2_layers_are_the_layernormed_hidden_states(dinov2):
    folder, original = dinov2
    backbone = TransformersBackbone.from_pretrained(folder, default_size=60)
    assert backbone.normalisation.mean == DINO_MEAN and backbone.normalisation.std == DINO_STD
    assert backbone.normalisation.source.endswith("preprocessor_config.json")
    # 4 layers: all four; every map at the patch size, hidden_size channels; 60 rounds to 64
    assert backbone.stages == [1, 2, 3, 4] and backbone.input_size == 64
    assert {(i.num_chs, i.reduction) for i in backbone.feature_info} == {(32, 8)}
    x = _images(2, 64, seed=1)
    maps = backbone.extract(x, None)
    with torch.no_grad():  # Dinov2Backbone applies the final layernorm to each layer, then drops CLS
        hidden = original(_by_hand(x, DINO_MEAN, DINO_STD), output_hidden_states=True).hidden_states
        expected = [original.layernorm(h)[:, 1:].reshape(2, 8, 8, 32).permute(0, 3, 1, 2) for h in hidden]
    assert len(hidden) == 5
    for m, info in zip(maps, backbone.feature_info, strict=True):
        assert m.shape == (2, 32, 8, 8)
        torch.testing.assert_close(m, expected[info.block], rtol=1e-4, atol=1e-4)
    with pytest.raises(SparsesegError, match="input_size 36: must be a positive multiple of 8"):
        TransformersBackbone.from_pretrained(folder, input_size=36)
    # the bf16 autocast path (the CUDA default) also runs on the CPU, close to float32
    fast = TransformersBackbone(backbone.model, fast=True, input_size=64, normalisation=backbone.normalisation)
    for a, b in zip(maps, fast.extract(x, None), strict=True):
        assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max()


def test_classifier_checkpoints_without_the_backbones_stage_norms(tmp_path):
    """ConvNeXt's backbone class adds a LayerNorm per returned stage that classification
    checkpoints lack: they start as plain LayerNorms (weight 1, bias 0)."""
    torch.manual_seed(2)
    original = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                                             num_labels=3)).eval()
    original.save_pretrained(tmp_path / "convnext")
    backbone = TransformersBackbone.from_pretrained(tmp_path / "convnext", input_size=64)
    assert backbone.stages == [1, 2, 3, 4]
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        norm = backbone.model.hidden_states_norms[stage]
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    x = _images(1, 64, seed=2)
    with torch.no_grad():
        hidden = original.convnext(_by_hand(x, IMAGENET_MEAN, IMAGENET_STD), output_hidden_states=True).hidden_states
    for m, info in zip(backbone.extract(x, None), backbone.feature_info, strict=True):
        h = hidden[info.block]
        expected = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), eps=1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(m, expected, rtol=1e-4, atol=1e-4)


def test_documented_layouts_and_defaults():
    """docs/backbones.md: resnet-50 and dinov2-small from their architectures alone (no weights)."""
    resnet50 = stage_table(ResNetConfig())  # the defaults are ResNet-50's
    assert resnet50 == {0: (64, 4), 1: (256, 4), 2: (512, 8), 3: (1024, 16), 4: (2048, 32)}
    assert default_stages(resnet50, ResNetConfig().stage_names) == [1, 2, 3, 4]
    small = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)
    table = stage_table(small)
    assert table == {i: (384, 14) for i in range(13)}
    assert default_stages(table, small.stage_names) == [3, 6, 9, 12]
    names = ["stem"] + [f"stage{i}" for i in range(1, 7)]
    assert default_stages({i: (8, 16) for i in range(7)}, names) == [2, 3, 5, 6]
    # no stem (PVTv2-like names): every stage
    assert default_stages({0: (8, 4), 1: (8, 8)}, ["stage1", "stage2"]) == [0, 1]
    assert {"resnet", "dinov2", "convnext", "swin", "vitdet"} <= set(backbone_model_types())


def test_normalisation_follows_the_processor_file(tmp_path):
    assert read_normalisation(tmp_path).mean == IMAGENET_MEAN  # no file: ImageNet
    path = tmp_path / "preprocessor_config.json"
    # an old feature-extractor file (microsoft/resnet-50 style): no rescale keys, so 1/255
    path.write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": 0.5}))
    norm = read_normalisation(tmp_path)
    assert (norm.scale, norm.mean, norm.std) == (1 / 255, (0.5,) * 3, (0.5,) * 3)
    path.write_text(json.dumps({"do_normalize": False, "do_rescale": True, "rescale_factor": 1 / 255}))
    norm = read_normalisation(tmp_path)
    assert (norm.mean, norm.std) == ((0.0,) * 3, (1.0,) * 3)
    path.write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(SparsesegError, match="preprocessor_config.json: image_mean must be three numbers"):
        read_normalisation(tmp_path)


# ------------------------------------------------------------------------------------------------
# The pipeline: features, strategies, a run, the features command
# ------------------------------------------------------------------------------------------------


def test_feature_store_gives_normalised_pixels_of_the_summed_channels(dinov2):
    backbone = TransformersBackbone.from_pretrained(dinov2[0], stages=[2, 4], input_size=48)
    images = torch.randint(0, 256, (3, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    store = FeatureStore(backbone, images, seed=0, split="train", batch_size=2, map_dtype=torch.float32)
    assert store.dim == 64
    ids, ys, xs = torch.tensor([0, 2, 1, 2]), torch.tensor([0, 19, 7, 3]), torch.tensor([5, 19, 0, 11])
    feats = store.at_pixels(ids, ys, xs)
    assert feats.shape == (4, 64)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(4))
    # the same as upsampling the maps of the resized image by hand
    x = F.interpolate(images.permute(0, 3, 1, 2).float() / 127.5 - 1, size=(48, 48), mode="bilinear",
                      align_corners=False, antialias=True)
    up = [F.interpolate(m, size=(20, 20), mode="bilinear", align_corners=False) for m in backbone.extract(x, None)]
    dense = F.normalize(torch.cat(up, dim=1), dim=1)
    torch.testing.assert_close(feats, dense[ids, :, ys, xs], rtol=1e-4, atol=1e-5)


def test_noise_scores_are_refused_and_dropout_scores_accepted(resnet):
    backbone = build_backbone(BackboneConfig(name="transformers", checkpoint=resnet[0]), "cpu", 32)
    assert not is_diffusion(backbone)
    for name in ("two_stage_edald", "dald", "power_dald"):
        with pytest.raises(SparsesegError, match="needs diffusion noise samples"):
            check_strategy(create_strategy(StrategyConfig(name=name)), backbone, head_dropout=0.1)
    check_strategy(create_strategy(StrategyConfig(name="ebald")), backbone, head_dropout=0.1)
    with pytest.raises(SparsesegError, match="head.dropout"):
        check_strategy(create_strategy(StrategyConfig(name="ebald")), backbone, head_dropout=0.0)


def test_two_rounds_end_to_end(resnet, tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, n_train=4, n_test=2, size=32, seed=0)
    out = tmp_path / "run"
    cfg = load_config(None, [f"data={data}", f"out={out}", "rounds=2", "budget=3", "strategy.name=ebald",
                             "head.dropout=0.2", "head.epochs=10", "strategy.noise_samples=2", "preview_images=1",
                             "backbone.name=transformers", f"backbone.checkpoint={resnet[0]}"])
    records = Experiment(cfg).run()
    assert [r["labelled"] for r in records] == [3, 6] and all(0 <= r["miou"] <= 1 for r in records)
    meta = json.loads((out / "meta.json").read_text())["backbone"]
    assert meta["name"] == "transformers" and meta["weights"] == str(resnet[0])
    assert meta["input_size"] == 32 and meta["feature_dim"] == 8 + 16 + 16 + 32


def test_features_command(resnet, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "resnet.npz"
    result = CliRunner().invoke(app, ["features", "--backbone", "transformers", "--checkpoint", str(resnet[0]),
                                      "--image", str(image), "--size", "64", "--blocks", "1,4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    assert sorted(got.files) == ["stage1", "stage4"] and got["stage4"].shape == (1, 32, 2, 2)
    assert "transformers" in BACKBONES


# ------------------------------------------------------------------------------------------------
# Configuration and wrong weights: one line each
# ------------------------------------------------------------------------------------------------


def test_config_checks(resnet, tmp_path):
    base = [f"data={tmp_path / 'd'}", "backbone.name=transformers"]
    with pytest.raises(SparsesegError, match=r"backbone.checkpoint \(a local transformers folder\) or "
                                             r"backbone.hub_id is required"):
        load_config(None, base)
    with pytest.raises(SparsesegError, match="backbone.timesteps is not used by backbone.name=transformers"):
        load_config(None, [*base, f"backbone.checkpoint={resnet[0]}", "backbone.timesteps=[50]"])
    with pytest.raises(pydantic.ValidationError, match="backbone.timesteps is not used"):
        BackboneConfig(name="transformers", checkpoint=resnet[0], timesteps=(50, 150))
    with pytest.raises(SparsesegError, match="both set: give one transformers model"):
        load_config(None, [*base, "backbone.checkpoint=m", "backbone.hub_id=microsoft/resnet-50"])
    with pytest.raises(SparsesegError, match="backbone.preset is not used"):
        load_config(None, [*base, "backbone.hub_id=microsoft/resnet-50", "backbone.preset=imagenet_256"])
    cfg = load_config(None, [*base, "backbone.hub_id=microsoft/resnet-50", "backbone.blocks=[1,2]"])
    assert cfg.backbone.hub_id == "microsoft/resnet-50" and cfg.backbone.blocks == (1, 2)
    path = tmp_path / "exp.yaml"
    path.write_text("data: d\nbackbone: {name: transformers, checkpoint: models/resnet}\n")
    assert load_config(path).backbone.checkpoint == tmp_path / "models" / "resnet"


def test_wrong_weights_and_settings_give_one_line(resnet, tmp_path, monkeypatch):
    import diffusers

    def build(source, **kw):
        key = "hub_id" if isinstance(source, str) else "checkpoint"
        return build_backbone(BackboneConfig(name="transformers", **{key: source}, **kw), "cpu", 32)

    unet = tmp_path / "unet"
    diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(unet)
    with pytest.raises(SparsesegError, match="unet: a diffusers UNet2DModel; use backbone.name=diffusers") as err:
        build(unet)
    _one_line(err)
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(SparsesegError, match="pipe: a diffusers pipeline, not a transformers model; use backbone.name"):
        build(tmp_path / "pipe")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparsesegError, match="empty: no config.json, not a transformers model folder") as err:
        build(tmp_path / "empty")
    _one_line(err)
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              image_size=16, patch_size=8).save_pretrained(tmp_path / "vit")
    with pytest.raises(SparsesegError, match="vit: model type 'vit' has no AutoBackbone class; backbones with one: "
                                             "beit, .*dinov2, .*resnet, ") as err:
        build(tmp_path / "vit")
    _one_line(err)
    with pytest.raises(SparsesegError, match="missing: transformers model folder not found"):
        build(tmp_path / "missing")
    adm = tmp_path / "adm.pt"
    torch.save({"w": torch.zeros(1)}, adm)
    with pytest.raises(SparsesegError, match="adm.pt: a file, not a transformers model folder .* backbone.name=adm"):
        build(adm)
    with pytest.raises(SparsesegError, match="tiny-resnet: a folder, but backbone.name=adm needs") as err:
        build_backbone(BackboneConfig(name="adm", checkpoint=resnet[0]), "cpu", 32)
    assert "use backbone.name=transformers" in _one_line(err)
    # a config without weights, and weights of another architecture
    (tmp_path / "noweights").mkdir()
    shutil.copy(resnet[0] / "config.json", tmp_path / "noweights")
    with pytest.raises(SparsesegError, match="noweights: cannot load the ResNetBackbone") as err:
        build(tmp_path / "noweights")
    _one_line(err)
    for name, change, what in (("deeper", {"depths": [2, 1, 1, 1]}, r"\d+ missing keys \(encoder.stages.0.layers.1"),
                               ("wider", {"hidden_sizes": [8, 16, 16, 64]}, r"\d+ tensors of another shape")):
        (tmp_path / name).mkdir()
        config = json.loads((resnet[0] / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **change}))
        shutil.copy(resnet[0] / "model.safetensors", tmp_path / name)
        with pytest.raises(SparsesegError, match=f"{name}: the weights do not fit the config: {what}") as err:
            build(tmp_path / name)
        _one_line(err)
    # stages and sizes
    with pytest.raises(SparsesegError, match=r"stages \[5\]: expected distinct indices in 0..4") as err:
        build(resnet[0], blocks=(5,))
    assert "4: stage4 32@1/32" in _one_line(err)
    with pytest.raises(SparsesegError, match="input_size 48: must be a positive multiple of 32"):
        build(resnet[0], input_size=48)
    assert build(resnet[0], blocks=(1, 2), input_size=48).input_size == 48
    with pytest.raises(SparsesegError, match=r"images of shape \(1, 3, 32, 32\): expected \(B, 3, 64, 64\)"):
        build(resnet[0], input_size=64).extract(torch.zeros(1, 3, 32, 32), None)
    # a Hub id with no network (forced offline, so the test never waits on one)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SparsesegError, match="nobody/no-such-resnet: not a local folder and cannot be fetched") as err:
        build("nobody/no-such-resnet")
    assert "backbone.checkpoint" in _one_line(err)
