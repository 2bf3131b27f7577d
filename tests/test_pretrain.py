"""In-domain ADM pre-training: checkpoint format, resume, input errors, learning."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from sparseseg.backbones.adm import ADMBackbone, load_adm
from sparseseg.backbones.pretrain import load_image_folder, pretrain_adm
from sparseseg.errors import SparsesegError

SMALL = dict(size=32, channels=32, batch_size=2, device="cpu", samples=2, sample_steps=2)


@pytest.fixture
def image_dir(tmp_path):
    """Four random images of odd sizes and formats, plus a file that is not an image."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (shape, suffix) in enumerate(
        [((40, 48), ".png"), ((30, 30), ".PNG"), ((64, 50), ".jpg"), ((33, 35), ".bmp")]
    ):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"im{i}{suffix}")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_loads_folder_as_uint8(image_dir):
    data = load_image_folder(image_dir, 16)
    assert data.dtype == torch.uint8 and tuple(data.shape) == (4, 3, 16, 16)


def test_checkpoint_loads_and_resume_continues(image_dir, tmp_path):
    out = tmp_path / "run" / "adm.pt"
    seen = []
    pretrain_adm(image_dir, out, steps=3, progress=lambda s, n, loss: seen.append((s, n)), **SMALL)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["sparseseg_adm"] == 1 and ckpt["step"] == 3 and ckpt["input_size"] == 32
    assert [s for s, _ in ckpt["losses"]] == [3]
    assert (tmp_path / "run" / "adm.pt.losses.csv").read_text().startswith("step,loss\n3,")
    with Image.open(tmp_path / "run" / "adm.pt.samples.png") as grid:  # 2 samples side by side, 1px borders
        assert grid.size == (2 * 34, 34)

    model, flags = load_adm(out)
    assert flags.num_channels == 32 and flags.num_head_channels == 16 and flags.learn_sigma
    torch.testing.assert_close(model.state_dict(), ckpt["ema"], rtol=0, atol=0)
    backbone = ADMBackbone.from_checkpoint(out, [50], [5, 17])
    assert backbone.input_size == 32
    maps = backbone.extract(torch.zeros(1, 3, 32, 32), None)
    assert [tuple(m.shape) for m in maps] == [(1, 128, 4, 4), (1, 32, 32, 32)]

    seen.clear()
    pretrain_adm(image_dir, out, steps=5, progress=lambda s, n, loss: seen.append((s, n)), **SMALL)
    assert seen == [(4, 5), (5, 5)]
    resumed = torch.load(out, weights_only=True)
    assert resumed["step"] == 5
    assert resumed["losses"][:1] == ckpt["losses"] and [s for s, _ in resumed["losses"]] == [3, 5]


def test_same_seed_same_weights(image_dir, tmp_path):
    a = pretrain_adm(image_dir, tmp_path / "a.pt", steps=2, seed=7, **SMALL)
    b = pretrain_adm(image_dir, tmp_path / "b.pt", steps=2, seed=7, **SMALL)
    ema_a, ema_b = (torch.load(p, weights_only=True)["ema"] for p in (a, b))
    torch.testing.assert_close(ema_a, ema_b, rtol=0, atol=0)


def test_resume_refuses_another_setup(image_dir, tmp_path):
    out = tmp_path / "adm.pt"
    pretrain_adm(image_dir, out, steps=1, **SMALL)
    with pytest.raises(SparsesegError, match=r"adm\.pt: holds a run with channels=32, size=32.*resume=False"):
        pretrain_adm(image_dir, out, steps=2, **{**SMALL, "channels": 64})


def test_input_errors_name_the_culprit(tmp_path, image_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SparsesegError, match=r"empty: no images"):
        pretrain_adm(empty, tmp_path / "x.pt", steps=1, **SMALL)
    (image_dir / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(SparsesegError, match=r"broken\.png: cannot read image"):
        load_image_folder(image_dir, 16)
    with pytest.raises(SparsesegError, match="multiple of 32"):
        pretrain_adm(image_dir, tmp_path / "x.pt", steps=1, **{**SMALL, "size": 40})
    with pytest.raises(SparsesegError, match="multiple of 32"):
        pretrain_adm(image_dir, tmp_path / "x.pt", steps=1, **{**SMALL, "channels": 48})


class _TooSlow(Exception):
    pass


def test_loss_decreases_on_flat_colours(tmp_path):
    """Flat-colour images are trivially denoised; skipped where 40 steps would exceed ~20 s."""
    folder = tmp_path / "flat"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128)]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    losses: list[float] = []
    start = time.perf_counter()

    def record(step: int, steps: int, loss: float) -> None:
        losses.append(loss)
        projected = (time.perf_counter() - start) / step * steps
        # Checked at every step: a CPU shared with other jobs can slow down midway.
        if step >= 4 and projected > 20:
            raise _TooSlow(f"{steps} steps would take ~{projected:.0f} s on this CPU now")

    try:
        pretrain_adm(
            folder, tmp_path / "flat.pt", steps=40, lr=1e-3, progress=record, **{**SMALL, "batch_size": 4}
        )
    except _TooSlow as slow:
        pytest.skip(str(slow))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_ddim_sampler_recovers_the_image_an_exact_noise_oracle_implies():
    # A model that predicts exactly the noise separating x_t from one fixed image x0 makes DDIM
    # (eta = 0) land on x0 from any x_T: worked out from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
    from sparseseg.backbones.diffusion import NoiseSchedule

    schedule = NoiseSchedule.named("linear", 1000)
    target = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    abar = torch.from_numpy(schedule.alphas_cumprod).float()

    def oracle(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    out = schedule.ddim_sample(oracle, (2, 3, 8, 8), steps=20, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


def test_defaults_by_size():
    from sparseseg.backbones.pretrain import default_settings

    assert default_settings(32) == (32, 16) and default_settings(64) == (64, 8)
    assert default_settings(96) == (128, 8) and default_settings(512) == (128, 4)
