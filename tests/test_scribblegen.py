"""ScribbleGen: encodings, conditioning dropout, guidance, encode ratio, training/resume, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparseseg.backbones.diffusion import NoiseSchedule
from sparseseg.backbones.pretrain import pretrain_flags
from sparseseg.config import BackboneConfig, ExperimentConfig, HeadConfig
from sparseseg.data.dataset import load_split
from sparseseg.errors import SparsesegError
from sparseseg.scribblegen.adm import (
    ScribbleADM,
    conditional_loss,
    drop_condition,
    encode_and_denoise,
    encode_scribbles,
    generate_datasets,
    guided_eps,
    load_generator,
    null_condition,
    start_timestep,
    train_scribblegen,
)
from sparseseg.scribblegen.augment import (
    REAL,
    SchemeSpec,
    current_dataset,
    epoch_sources,
    evaluate_scheme,
    evaluate_schemes,
    standard_schemes,
)
from sparseseg.scribblegen.compare import compare_schemes, read_results
from sparseseg.scribbles.io import write_classes, write_scribble_map

C = 3


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = ScribbleADM(pretrain_flags(32), C).eval()
    # the zero-initialised output layer would make every prediction 0: randomise it so that
    # conditional and unconditional predictions really differ
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.05)
    return model


def _scribbles(b: int = 2, s: int = 32) -> torch.Tensor:
    m = torch.full((b, s, s), 255, dtype=torch.uint8)
    m[:, 1:3, :] = 0
    m[:, s - 3 : s - 1, 1 : s // 2] = 2
    m[0, s // 2, s // 2] = 1
    return m


def test_one_hot_encoding_and_null():
    cond = encode_scribbles(_scribbles(), C)
    assert cond.shape == (2, C + 1, 32, 32)
    assert torch.equal(cond.sum(1), torch.ones(2, 32, 32))  # exactly one channel per pixel
    assert cond[0, 1, 16, 16] == 1 and cond[0, C, 0, 0] == 1 and cond[0, 0, 2, 3] == 1
    null = null_condition(cond)
    assert torch.equal(null, encode_scribbles(torch.full((2, 32, 32), 255, dtype=torch.uint8), C))
    with pytest.raises(SparsesegError, match=r"scribble ids \[7\] out of range for 3 classes"):
        encode_scribbles(torch.full((1, 2, 2), 7), C)


def test_conditioning_dropout_rate():
    cond = encode_scribbles(_scribbles(1, 4).expand(20000, 4, 4), C)
    gen = torch.Generator().manual_seed(0)
    out, dropped = drop_condition(cond, 0.1, gen)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # binomial sd 0.002
    assert torch.equal(out[dropped], null_condition(cond[dropped]))
    assert torch.equal(out[~dropped], cond[~dropped])
    # and inside the training loss: count the null encodings the network actually receives
    seen = []

    def spy(x, t, c):
        seen.append((c[:, -1] == 1).flatten(1).all(1))
        return torch.zeros_like(x).requires_grad_()

    schedule = NoiseSchedule.named("linear", 1000)
    x0, small = torch.zeros(64, 3, 4, 4), encode_scribbles(_scribbles(1, 4).expand(64, 4, 4), C)
    for _ in range(100):
        conditional_loss(spy, schedule, x0, small, 0.25, gen)
    assert abs(torch.cat(seen).float().mean().item() - 0.25) < 0.02


def test_guidance_formula(tiny_model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 10])
    cond = encode_scribbles(_scribbles(), C)
    with torch.no_grad():
        eps_c = tiny_model(x, t, cond)[:, :3]
        eps_u = tiny_model(x, t, null_condition(cond))[:, :3]
        assert (eps_c - eps_u).abs().max() > 1e-4  # the scribble input matters
        torch.testing.assert_close(guided_eps(tiny_model, x, t, cond, 1.0), eps_c)  # w = 1: purely conditional
        torch.testing.assert_close(guided_eps(tiny_model, x, t, cond, 0.0), eps_u, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(guided_eps(tiny_model, x, t, cond, 2.5), eps_u + 2.5 * (eps_c - eps_u),
                                   atol=1e-5, rtol=1e-4)


def test_encode_ratio_semantics(tiny_model):
    schedule = NoiseSchedule.named("linear", 1000)
    assert [start_timestep(schedule, r) for r in (0, 0.3, 1)] == [0, 300, 999]
    with pytest.raises(SparsesegError, match="encode ratio 1.5"):
        start_timestep(schedule, 1.5)
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(1, 3, 32, 32, generator=g)
    cond = encode_scribbles(_scribbles(1), C)
    calls = []

    def eps(x, t):
        calls.append(int(t[0]))
        return guided_eps(tiny_model, x, t, cond, 2.0)

    assert torch.equal(encode_and_denoise(schedule, eps, a, 0.0, noise, steps=4), a)  # lambda 0: the input itself
    assert calls == []
    full_a = encode_and_denoise(schedule, eps, a, 1.0, noise, steps=4)
    assert calls[0] == 999 and calls[-1] == 0 and len(calls) == 4
    full_b = encode_and_denoise(schedule, eps, b, 1.0, noise, steps=4)
    assert torch.equal(full_a, full_b)  # lambda 1: pure noise start, the input does not matter
    calls.clear()
    half_a = encode_and_denoise(schedule, eps, a, 0.5, noise, steps=4)
    assert calls[0] == 500 and calls[-1] == 0
    assert not torch.allclose(half_a, encode_and_denoise(schedule, eps, b, 0.5, noise, steps=4))


def _pairs(tmp_path, n: int = 3, size: int = 40):
    rng = np.random.default_rng(0)
    images, scribbles = tmp_path / "images", tmp_path / "scribbles"
    images.mkdir()
    scribbles.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"im{i}.png")
        s = np.full((size, size), 255, dtype=np.uint8)
        s[5:9, 3:30] = i % C
        write_scribble_map(scribbles / f"im{i}.png", s)
    write_classes(scribbles, ["a", "b", "c"])
    return images, scribbles


def test_trains_resumes_and_generates(tmp_path):
    images, scribbles = _pairs(tmp_path)
    out = tmp_path / "gen.pt"
    seen = []
    small = dict(size=32, channels=32, batch_size=2, device="cpu", samples=2, sample_steps=2)
    train_scribblegen(images, scribbles, out, steps=2, progress=lambda s, n, loss: seen.append(s), **small)
    assert seen == [1, 2]
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["sparseseg_scribblegen"] == 1 and ckpt["step"] == 2 and ckpt["classes"] == ["a", "b", "c"]
    assert ckpt["p_uncond"] == 0.1 and ckpt["model"]["unet.input_blocks.0.0.weight"].shape[1] == 3 + C + 1
    assert (tmp_path / "gen.pt.losses.csv").read_text().startswith("step,loss\n2,")
    with Image.open(tmp_path / "gen.pt.samples.png") as grid:  # 2 rows of real | scribble | synthetic
        assert grid.size == (3 * 34, 2 * 34)
    seen.clear()
    train_scribblegen(images, scribbles, out, steps=3, progress=lambda s, n, loss: seen.append(s), **small)
    assert seen == [3] and torch.load(out, weights_only=True)["step"] == 3
    with pytest.raises(SparsesegError, match="another size, width or class list"):
        train_scribblegen(images, scribbles, out, steps=4, **{**small, "size": 64})

    model, info = load_generator(out)
    assert info["input_size"] == 32 and model.num_classes == C
    folders = generate_datasets(out, images, scribbles, tmp_path / "syn", lambdas=(0.0, 1.0), guidance=2.0,
                                steps=2, batch_size=2, device="cpu")
    assert [f.name for f in folders] == ["lambda_0.00", "lambda_1.00"]
    real = load_split(folders[0], "train")
    fake = load_split(folders[1], "train")
    assert real.names == fake.names == ["im0", "im1", "im2"]
    from sparseseg.backbones.pretrain import load_image_folder

    assert torch.equal(real.images, load_image_folder(images, 32).permute(0, 2, 3, 1))  # lambda 0: unchanged
    assert not torch.equal(fake.images, real.images)
    assert torch.equal(real.masks, fake.masks)  # each synthetic image keeps the scribble it came from
    first = np.asarray(Image.open(scribbles / "im0.png")).copy()
    expected = np.asarray(Image.fromarray(first).resize((32, 32), Image.NEAREST))
    np.testing.assert_array_equal(real.masks[0].numpy(), expected)
    with Image.open(folders[1] / "samples.png") as grid:
        assert grid.size == (3 * 34, 3 * 34)


def test_init_from_an_unconditional_adm_starts_as_that_adm(tmp_path):
    from tests.conftest import save_tiny_adm

    base_path = save_tiny_adm(tmp_path / "base.pt", 32)
    from sparseseg.backbones.adm import load_adm

    base, flags = load_adm(base_path)
    torch.nn.init.normal_(base.out[-1].weight, std=0.05)  # a non-zero output, so the check can fail
    model = ScribbleADM(flags, C).eval()
    model.load_unconditional(base)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])
    with torch.no_grad():
        expected = base(x, t)
        for scribble in (_scribbles(), torch.full((2, 32, 32), 255, dtype=torch.uint8)):
            torch.testing.assert_close(model(x, t, encode_scribbles(scribble, C)), expected, rtol=0, atol=0)
    # through training: the checkpoint adopts the base architecture and its width is checked
    images, scribbles = _pairs(tmp_path)
    out = train_scribblegen(images, scribbles, tmp_path / "g.pt", steps=1, size=32, batch_size=2, device="cpu",
                            samples=0, init=base_path)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["flags"] == flags.model_dump()
    assert ckpt["model"]["unet.input_blocks.0.0.weight"].shape[1] == 3 + C + 1
    with pytest.raises(SparsesegError, match="has 32 base channels, not --channels 64"):
        train_scribblegen(images, scribbles, tmp_path / "h.pt", steps=1, size=32, channels=64, init=base_path)


# ------------------------------------------------------------------------------------ schemes


def test_schemes_pick_the_right_images():
    assert [s.tolist() for s in epoch_sources("none", 0, 3, 0)] == [[REAL] * 3]
    assert [s.tolist() for s in epoch_sources("append", 4, 3, 2)] == [[REAL] * 3, [0] * 3, [1] * 3]
    assert [s.tolist() for s in epoch_sources("synthetic", 4, 3, 2)] == [[0] * 3, [1] * 3]
    # sample: each real image replaced with probability p, twin drawn uniformly among datasets
    draws = np.concatenate([epoch_sources("sample", e, 100, 2, p=0.3, seed=1)[0] for e in range(50)])
    assert abs((draws != REAL).mean() - 0.3) < 0.03
    assert abs((draws == 0).mean() - (draws == 1).mean()) < 0.03
    assert np.array_equal(epoch_sources("sample", 7, 100, 2, p=0.3, seed=1)[0],
                          epoch_sources("sample", 7, 100, 2, p=0.3, seed=1)[0])  # replayable
    with pytest.raises(SparsesegError, match="needs at least one synthetic dataset"):
        epoch_sources("append", 0, 3, 0)


def test_curriculum_switches_at_the_start_epochs():
    starts = [2, 5, 9]
    assert [current_dataset(e, starts) for e in range(11)] == [REAL, REAL, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    for epoch in range(11):
        (plan,) = epoch_sources("curriculum", epoch, 200, 3, p=1.0, starts=starts)
        assert set(plan.tolist()) == {current_dataset(epoch, starts)}  # p = 1: every image from the current set
    (plan,) = epoch_sources("curriculum", 6, 2000, 3, p=0.5, starts=starts)
    assert set(plan.tolist()) == {REAL, 1} and abs((plan == 1).mean() - 0.5) < 0.05
    with pytest.raises(SparsesegError, match="one start epoch per synthetic dataset"):
        epoch_sources("curriculum", 0, 3, 3, starts=[0, 1])
    with pytest.raises(SparsesegError, match="ascending"):
        epoch_sources("curriculum", 0, 3, 2, starts=[4, 1])


def test_evaluate_scheme_trains_on_scribbles_and_twins(tmp_path):
    from sparseseg.data.dataset import save_meta
    from sparseseg.data.synthetic import make_synthetic
    from sparseseg.scribbles.simulate import simulate_dataset
    from tests.conftest import ToyBackbone

    data = tmp_path / "data"
    meta = make_synthetic(data, n_train=4, n_test=2, size=32, seed=0)
    simulate_dataset(data, tmp_path / "scr", width=3, length=0.5, seed=0)
    # a "synthetic" dataset at another size: the real images downsized, scribbles alike
    twin = tmp_path / "twin"
    (twin / "train" / "images").mkdir(parents=True)
    for f in sorted((data / "train" / "images").glob("*.png")):
        Image.open(f).resize((16, 16)).save(twin / "train" / "images" / f.name)
    save_meta(type(meta)(name="twin", classes=meta.classes, palette=meta.palette, size=16, splits={"train": 4}), twin)
    config = ExperimentConfig(data=data, backbone=BackboneConfig(name="efficientnet_lite0", device="cpu"),
                              head=HeadConfig(epochs=3))
    results = {}
    for scheme, kwargs in (("none", {}), ("append", {}), ("curriculum", {"starts": [1], "p": 1.0})):
        results[scheme] = evaluate_scheme(config, tmp_path / "scr", [twin] if scheme != "none" else [], scheme,
                                          pixels_per_image=16, backbone=ToyBackbone(16), **kwargs)
        assert 0 <= results[scheme]["miou"] <= 1 and results[scheme]["pixels"] > 0
    assert results["none"]["pixels"] == results["append"]["pixels"]  # the same scribbled pixels
    assert results["append"]["miou"] != results["none"]["miou"] or results["append"]["per_class_iou"] != \
        results["none"]["per_class_iou"]
    bad = tmp_path / "empty"
    bad.mkdir()
    with pytest.raises(SparsesegError, match="scribble map missing"):
        evaluate_scheme(config, bad, backbone=ToyBackbone(16))


def test_standard_schemes_follow_the_paper():
    arms = standard_schemes(["lambda_0.30", "lambda_0.60", "lambda_1.00"], epochs=90, p=0.5)
    assert [(a.label, a.scheme, a.datasets) for a in arms] == [
        ("real only", "none", ()),
        ("fixed lambda_0.30", "sample", (0,)), ("fixed lambda_0.60", "sample", (1,)),
        ("fixed lambda_1.00", "sample", (2,)),
        ("uniform lambda", "sample", (0, 1, 2)),
        ("adaptive lambda", "curriculum", (0, 1, 2)),
        ("append", "append", (0, 1, 2)),
    ]
    assert arms[5].starts == (0, 30, 60)  # realistic first, diverse later, evenly spaced
    assert [a.label for a in standard_schemes([], 10)] == ["real only"]


def _scheme_setup(tmp_path):
    from sparseseg.data.dataset import save_meta
    from sparseseg.data.synthetic import make_synthetic
    from sparseseg.scribbles.simulate import simulate_dataset

    data = tmp_path / "data"
    meta = make_synthetic(data, n_train=4, n_test=2, size=32, seed=0)
    simulate_dataset(data, tmp_path / "scr", width=3, length=0.5, seed=0)
    twins = []
    for k, flip in enumerate((False, True)):  # two "synthetic" datasets: the real images, one flipped
        twin = tmp_path / f"twin{k}"
        (twin / "train" / "images").mkdir(parents=True)
        for f in sorted((data / "train" / "images").glob("*.png")):
            image = Image.open(f)
            (image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image).save(twin / "train" / "images" / f.name)
        save_meta(type(meta)(name=twin.name, classes=meta.classes, palette=meta.palette, size=32,
                             splits={"train": 4}), twin)
        twins.append(twin)
    config = ExperimentConfig(data=data, backbone=BackboneConfig(name="efficientnet_lite0", device="cpu"),
                              head=HeadConfig(epochs=3))
    return config, tmp_path / "scr", twins


def test_scribble_agreement_counts_pixels_labelled_with_their_scribble_class():
    from sparseseg.scribblegen.augment import scribble_agreement

    labels = torch.tensor([0, 1, 1, 0, 1])
    one_hot = torch.nn.functional.one_hot(labels, 2).float()
    half = one_hot.clone()
    half[:2] = 1 - half[:2]  # two of five pixels look like the other class
    features = torch.stack([one_hot, 1 - one_hot, half])  # real, a swapped twin, a partly kept twin
    shares = scribble_agreement(torch.nn.Identity(), features, labels, chunk=2)  # the head: argmax of the features
    assert shares == [1.0, 0.0, 3 / 5]


def test_evaluate_schemes_shares_features_but_matches_separate_runs(tmp_path):
    from tests.conftest import ToyBackbone

    config, scr, twins = _scheme_setup(tmp_path)
    arms = [SchemeSpec("real only", "none"), SchemeSpec("second", "append", (1,)),
            SchemeSpec("curr", "curriculum", (0, 1), 1.0, (1, 2))]
    together = evaluate_schemes(config, scr, twins, arms, pixels_per_image=16, backbone=ToyBackbone(16))
    alone = [evaluate_scheme(config, scr, [], "none", pixels_per_image=16, backbone=ToyBackbone(16)),
             evaluate_scheme(config, scr, [twins[1]], "append", pixels_per_image=16, backbone=ToyBackbone(16)),
             evaluate_scheme(config, scr, twins, "curriculum", 1.0, [1, 2], pixels_per_image=16,
                             backbone=ToyBackbone(16))]
    for a, b in zip(together, alone, strict=True):
        assert a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"]
    assert together[1]["synthetic"] == [str(twins[1])]
    assert list(together[0]["scribble_agreement"]) == ["real", "twin0", "twin1"]
    # twin0 holds the real images themselves: the same features, so the same agreement
    assert together[0]["scribble_agreement"]["twin0"] == together[0]["scribble_agreement"]["real"]
    # flipped twins give other features at the scribbled pixels, so training on them changes the head
    assert together[1]["per_class_iou"] != together[0]["per_class_iou"]
    with pytest.raises(SparsesegError, match="dataset index out of range"):
        evaluate_schemes(config, scr, twins[:1], arms, backbone=ToyBackbone(16))


def test_compare_schemes_table_resume_and_settings(tmp_path, monkeypatch):
    import statistics

    from sparseseg.scribblegen import compare as compare_module
    from tests.conftest import ToyBackbone

    config, scr, twins = _scheme_setup(tmp_path)
    monkeypatch.setattr("sparseseg.scribblegen.augment.build_backbone", lambda cfg, device, default_size: ToyBackbone(16))
    out = tmp_path / "cmp"
    summary = compare_schemes(config, scr, twins, [0, 1], out, pixels_per_image=16, log=lambda m: None)
    records = read_results(out)
    assert sorted({(r["seed"], r["label"]) for r in records}) == sorted(
        (s, a.label) for s in (0, 1) for a in standard_schemes(["twin0", "twin1"], 3))
    text = summary.read_text()
    for label in ("real only", "uniform lambda", "adaptive lambda"):
        values = [100 * r["miou"] for r in records if r["label"] == label]
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" in row
    # resuming: finished seeds are not run again; other settings are refused
    calls = []
    monkeypatch.setattr(compare_module, "evaluate_schemes", lambda *a, **k: calls.append(a) or [])
    compare_schemes(config, scr, twins, [0, 1], out, pixels_per_image=16, log=lambda m: None)
    assert calls == []
    with pytest.raises(SparsesegError, match="other settings"):
        compare_schemes(config, scr, twins, [0], out, pixels_per_image=8, log=lambda m: None)
    monkeypatch.undo()
    # the command line: the same table from a config file
    from typer.testing import CliRunner

    from sparseseg.cli import app

    monkeypatch.setattr("sparseseg.scribblegen.augment.build_backbone", lambda cfg, device, default_size: ToyBackbone(16))
    yaml_path = tmp_path / "exp.yaml"
    yaml_path.write_text(f"data: {config.data}\nbackbone:\n  name: efficientnet_lite0\n  device: cpu\n"
                         "head:\n  epochs: 3\n")
    r = CliRunner().invoke(app, ["scribblegen", "compare", str(yaml_path), "--scribbles", str(scr), "--synthetic",
                                 ",".join(map(str, twins)), "--seeds", "0", "--out", str(tmp_path / "cli"),
                                 "--pixels-per-image", "16"])
    assert r.exit_code == 0, r.output
    assert "| adaptive lambda | twin0, twin1 |" in r.output and (tmp_path / "cli" / "summary.md").exists()
    assert "| real | twin0 | twin1 |" in r.output


def test_cli_train_then_generate(tmp_path):
    from typer.testing import CliRunner

    from sparseseg.cli import app

    images, scribbles = _pairs(tmp_path, n=2)
    ckpt = tmp_path / "g.pt"
    r = CliRunner().invoke(app, ["scribblegen", "train", "--images", str(images), "--scribbles", str(scribbles),
                                 "--out", str(ckpt), "--size", "32", "--channels", "32", "--steps", "1",
                                 "--batch-size", "2", "--samples", "0", "--p-uncond", "0.2"])
    assert r.exit_code == 0, r.output
    assert torch.load(ckpt, weights_only=True)["p_uncond"] == 0.2
    r = CliRunner().invoke(app, ["scribblegen", "generate", "--checkpoint", str(ckpt), "--images", str(images),
                                 "--scribbles", str(scribbles), "--out", str(tmp_path / "o"), "--lambdas", "0.5",
                                 "--guidance", "1.5", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert len(load_split(tmp_path / "o" / "lambda_0.50", "train")) == 2
    r = CliRunner().invoke(app, ["scribblegen", "generate", "--checkpoint", str(ckpt), "--images", str(images),
                                 "--scribbles", str(scribbles), "--out", str(tmp_path / "o"), "--lambdas", "1.2"])
    assert r.exit_code == 2 and "--lambdas: 1.2 is outside [0, 1]" in r.output


# ------------------------------------------------------------------------------------ ControlNet
def _tiny_sd(num_classes: int = C):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sparseseg.scribblegen.controlnet import ControlNetParts, make_controlnet, schedule_from_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                        sample_size=16)
    schedule = schedule_from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    return ControlNetParts(vae.eval().requires_grad_(False), unet.eval().requires_grad_(False),
                           make_controlnet(unet, vae, num_classes).eval(), schedule)


def _prompt_embeddings(prompts: list[str]) -> torch.Tensor:
    """Stand-in text encoder: a fixed random (5, 16) embedding per distinct prompt."""
    return torch.stack([torch.randn(5, 16, generator=torch.Generator().manual_seed(sum(map(ord, p))))
                        for p in prompts])


def test_controlnet_prompt_and_schedule():
    from diffusers import DDPMScheduler

    from sparseseg.scribblegen.controlnet import schedule_from_config, scribble_prompt

    s = np.full((4, 4), 255)
    assert scribble_prompt(s, ["a", "b", "c"]) == "a high-quality, detailed, and professional image"
    s[0, 0], s[1, 1] = 2, 0
    assert scribble_prompt(s, ["sky", "road", "car"]) == "a high-quality, detailed, and professional image of sky, car"
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    reference = DDPMScheduler(**config)
    np.testing.assert_allclose(schedule_from_config(config).alphas_cumprod, reference.alphas_cumprod.double().numpy(),
                               rtol=1e-6)


def test_controlnet_starts_as_the_base_unet_and_guides():
    parts = _tiny_sd()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, text = torch.tensor([10, 700]), _prompt_embeddings(["x", "y"])
    cond = encode_scribbles(_scribbles(2, 16), C)
    with torch.no_grad():
        base = parts.unet(z, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(parts.eps(z, t, text, cond), base)  # zero convolutions: no effect yet
        for m in parts.controlnet.modules():  # as if trained: the residuals now depend on the scribble
            if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
                torch.nn.init.normal_(m.weight, std=0.02)
        eps_c, eps_u = parts.eps(z, t, text, cond), parts.eps(z, t, text, null_condition(cond))
        assert (eps_c - eps_u).abs().max() > 1e-4
        torch.testing.assert_close(parts.guided_eps(z, t, text, cond, 1.0), eps_c)
        torch.testing.assert_close(parts.guided_eps(z, t, text, cond, 3.0), eps_u + 3 * (eps_c - eps_u),
                                   atol=1e-5, rtol=1e-4)


def test_controlnet_encode_ratio_train_and_resume(tmp_path):
    from sparseseg.scribblegen.controlnet import generate_controlnet, train_controlnet

    parts = _tiny_sd()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    others = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    scr = _scribbles(2, 16)
    args = dict(classes=["a", "b", "c"], encode_prompts=_prompt_embeddings, guidance=2.0, steps=3, seed=5)
    assert np.array_equal(generate_controlnet(parts, images, scr, encode_ratio=0.0, **args),
                          images.permute(0, 2, 3, 1).numpy())  # lambda 0: the input itself
    np.testing.assert_array_equal(generate_controlnet(parts, images, scr, encode_ratio=1.0, **args),
                                  generate_controlnet(parts, others, scr, encode_ratio=1.0, **args))
    half = generate_controlnet(parts, images, scr, encode_ratio=0.5, **args)
    assert not np.array_equal(half, generate_controlnet(parts, others, scr, encode_ratio=0.5, **args))

    unet_before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    cn_before = {k: v.clone() for k, v in parts.controlnet.state_dict().items()}
    out = tmp_path / "cn"
    seen = []
    train_controlnet(parts, images, scr, ["a", "b", "c"], _prompt_embeddings, out, steps=2, batch_size=2, lr=1e-3,
                     progress=lambda s, n, loss: seen.append(s))
    assert seen == [1, 2] and (out / "controlnet" / "config.json").is_file()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["classes"] == ["a", "b", "c"]
    assert (out / "losses.csv").read_text().startswith("step,loss\n2,")
    assert all(torch.equal(v, parts.unet.state_dict()[k]) for k, v in unet_before.items())  # frozen
    assert any(not torch.equal(v, parts.controlnet.state_dict()[k]) for k, v in cn_before.items())  # trained
    seen.clear()
    train_controlnet(parts, images, scr, ["a", "b", "c"], _prompt_embeddings, out, steps=3, batch_size=2, lr=1e-3,
                     progress=lambda s, n, loss: seen.append(s))
    assert seen == [3] and torch.load(out / "state.pt", weights_only=True)["step"] == 3


def test_controlnet_cli_on_a_local_stable_diffusion_folder(tmp_path):
    import json

    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from typer.testing import CliRunner

    from sparseseg.cli import app

    # a tiny Stable Diffusion folder in the diffusers layout, random weights, a 58-token vocabulary
    base = tmp_path / "sd"
    parts = _tiny_sd()
    parts.vae.save_pretrained(base / "vae")
    parts.unet.save_pretrained(base / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(base / "scheduler")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz,-":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=12).save_pretrained(
        base / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(base / "text_encoder")

    images, scribbles = _pairs(tmp_path, n=2, size=20)
    trained = tmp_path / "cn"
    r = CliRunner().invoke(app, ["scribblegen", "controlnet-train", "--base", str(base), "--images", str(images),
                                 "--scribbles", str(scribbles), "--out", str(trained), "--size", "16", "--steps", "1",
                                 "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["scribblegen", "controlnet-generate", "--base", str(base), "--controlnet",
                                 str(trained), "--images", str(images), "--scribbles", str(scribbles), "--out",
                                 str(tmp_path / "o"), "--lambdas", "0,0.5", "--steps", "2"])
    assert r.exit_code == 0, r.output
    zero, half = load_split(tmp_path / "o" / "lambda_0.00", "train"), load_split(tmp_path / "o" / "lambda_0.50", "train")
    assert zero.images.shape == (2, 16, 16, 3) and not torch.equal(zero.images, half.images)
    assert torch.equal(zero.masks, half.masks)
    r = CliRunner().invoke(app, ["scribblegen", "controlnet-train", "--base", str(tmp_path), "--images", str(images),
                                 "--scribbles", str(scribbles), "--out", str(trained)])
    assert r.exit_code == 2 and "vae: not found" in r.output
