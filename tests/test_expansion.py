"""SAM pixel-to-region expansion (appendix C.6) on tiny random SAMs: geometry, tau, overlaps, parity
accounting, the simulated loop with resume, the human loop's store and review PNGs, the published figures.

No weights are downloaded: a transformers `SamModel` built from a small config with random weights
runs the real code path (processor, image encoder, prompt encoder, mask decoder, post-processing).
Random weights say nothing about mask quality; these tests check where prompts land, which masks
are kept and what is done with them.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sparseseg.annotate.init import init_project
from sparseseg.annotate.project import Project
from sparseseg.annotate.store import DB_FILE, SCHEMA_VERSION
from sparseseg.compare import Comparison, StrategyResult, plan_comparison, render_markdown
from sparseseg.config import HeadConfig, SamExpansionConfig, dump_config, load_config
from sparseseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from sparseseg.errors import SparsesegError
from sparseseg.expansion.base import choose, masks_to_image, model_to_pixel, pixel_to_model, resized_shape
from sparseseg.expansion.regions import RegionSet, clicked_pixels, expand_clicks, resolve, training_pixels
from sparseseg.expansion.registry import build_expander
from sparseseg.expansion.sam_hf import TransformersSam
from sparseseg.head.mlp import train_head
from sparseseg.labels import IGNORE
from sparseseg.loop.experiment import Experiment
from tests.conftest import answer_first_round, assert_review_shows_regions, save_tiny_adm

transformers = pytest.importorskip("transformers")

SIZE = 32  # working resolution of the synthetic data
SAM_SIDE = 64  # the tiny SAM's input side (the real ones: 1024)


def tiny_sam_model(seed: int = 0):
    """A SamModel with the real architecture at toy width: 64 px input, 16 px patches, 2 ViT layers."""
    config = transformers.SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SAM_SIDE, patch_size=16, global_attn_indexes=[1], window_size=2,
                           num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=SAM_SIDE, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    torch.manual_seed(seed)
    return transformers.SamModel(config).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic scenes, a tiny random ADM, and a tiny random SAM saved as a transformers folder."""
    root = tmp_path_factory.mktemp("expansion")
    make_synthetic(root / "data", n_train=6, n_test=2, size=SIZE, seed=0)
    save_tiny_adm(root / "adm.pt", SIZE)
    tiny_sam_model().save_pretrained(root / "sam")
    return root


@pytest.fixture(scope="module")
def sam():
    return TransformersSam(tiny_sam_model(), "cpu", name="transformers:tiny")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("h,w,longest", [(32, 32, 64), (37, 23, 64), (5, 64, 64), (300, 200, 1024), (2048, 1000, 1024),
                                         (256, 256, 1024)])
def test_every_pixel_maps_to_sam_and_back_to_itself(h, w, longest):
    ys, xs = (a.reshape(-1) for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    points = pixel_to_model(ys, xs, h, w, longest)
    back_y, back_x = model_to_pixel(points, h, w, longest)
    assert np.array_equal(back_y, ys) and np.array_equal(back_x, xs)
    # SAM adds 0.5 to a prompt: the result is the centre of the pixel's footprint in the resized frame
    new_h, new_w = resized_shape(h, w, longest)
    assert max(new_h, new_w) == longest
    np.testing.assert_allclose(points[:, 0] + 0.5, (xs + 0.5) * new_w / w, atol=1e-9)
    np.testing.assert_allclose(points[:, 1] + 0.5, (ys + 0.5) * new_h / h, atol=1e-9)


@pytest.mark.parametrize("h,w", [(32, 32), (40, 24), (17, 32)])
def test_prompts_reach_the_prompt_encoder_on_the_clicked_pixel(sam, h, w):
    """Through the real processor and model: the point the prompt encoder embeds, mapped back through
    SAM's resize and padding, is the clicked pixel; and the image was resized as the geometry assumes."""
    seen = []
    hook = sam.model.prompt_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_points"].detach().clone()), with_kwargs=True)
    rng = np.random.default_rng(1)
    ys, xs = rng.integers(0, h, 70), rng.integers(0, w, 70)  # more than one decode call (64 per call)
    ys[:4], xs[:4] = [0, h - 1, 0, h - 1], [0, w - 1, w - 1, 0]
    try:
        proposals = sam.propose(_image(h, w), ys, xs)
    finally:
        hook.remove()
    points = torch.cat([p[0, :, 0, :] for p in seen]).double().numpy()
    # the encoder embeds (p + 0.5) / image_size of its padded frame; the padding is bottom-right
    encoded = (points + 0.5) / sam.model.prompt_encoder.input_image_size * SAM_SIDE - 0.5
    back_y, back_x = model_to_pixel(encoded, h, w, SAM_SIDE)
    assert np.array_equal(back_y, ys) and np.array_equal(back_x, xs)
    assert proposals.masks.shape == (70, 3, h, w) and proposals.scores.shape == (70, 3)
    # HF's own processor scales a point given at the pixel's centre-minus-half-a-resized-pixel the same way
    processor = transformers.SamProcessor(image_processor=sam.processor)
    shifted = pixel_to_model(ys[:3], xs[:3], h, w, SAM_SIDE)
    new_h, new_w = resized_shape(h, w, SAM_SIDE)
    original = shifted * [w / new_w, h / new_h]
    got = processor(images=_image(h, w), input_points=[original[:, None, :].tolist()], return_tensors="pt")
    np.testing.assert_allclose(got["input_points"][0, :, 0, :].numpy(), shifted, atol=1e-5)


@pytest.mark.parametrize("h,w", [(32, 32), (32, 16)])
def test_masks_map_back_like_transformers_and_to_the_right_pixels(sam, h, w):
    logits = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = masks_to_image(logits, h, w, SAM_SIDE)
    theirs = sam.processor.post_process_masks([logits], [(h, w)], [resized_shape(h, w, SAM_SIDE)])[0]
    assert torch.equal(ours, theirs)
    # a low-resolution mask covering exactly the footprint of working rows 8..23, cols 4..11 comes back
    # as those pixels (one pixel of bilinear border aside); positive padding never shows
    new_h, new_w = resized_shape(h, w, SAM_SIDE)
    cells = (torch.arange(16) + 0.5) * SAM_SIDE / 16  # centres of low-res cells in the padded frame
    rows = (cells[:, None] * h / new_h >= 8) & (cells[:, None] * h / new_h < 24)
    cols = (cells[None, :] * w / new_w >= 4) & (cells[None, :] * w / new_w < 12)
    box = torch.where(rows & cols, 5.0, -5.0)
    box[:, cells * w / new_w >= w] = 5.0  # the padding, if any, is "inside"
    mask = masks_to_image(box[None, None], h, w, SAM_SIDE)[0, 0]
    want = torch.zeros(h, w, dtype=torch.bool)
    want[8:24, 4:12] = True
    interior = torch.ones(h, w, dtype=torch.bool)
    interior[[7, 8, 23, 24], :] = False
    interior[:, [3, 4, 11, 12]] = False
    interior[:, w - 1] = False
    assert torch.equal(mask[interior], want[interior])


# ---------------------------------------------------------------------------- tau and the embedding cache
def test_tau_zero_always_keeps_and_tau_above_one_never_does(sam):
    images = torch.from_numpy(np.stack([_image(SIZE, SIZE, s) for s in range(3)]))
    image, y, x = torch.tensor([0, 0, 0, 2, 2, 1]), torch.tensor([1, 9, 30, 4, 5, 6]), torch.tensor([2, 20, 31, 0, 5, 7])
    cls = torch.tensor([1, 2, IGNORE, 3, 3, 0])
    before = sam.embeddings_computed
    keep_all = expand_clicks(sam, images, image, y, x, cls, round=1, tau=0.0)
    assert sam.embeddings_computed - before == 3  # one image encoding per image, for all its clicks
    assert keep_all.kept.tolist() == [True, True, False, True, True, True]  # the void click is not expanded
    assert np.isnan(keep_all.score[2]) and (keep_all.score[~np.isnan(keep_all.score)] >= 0).all()
    keep_none = expand_clicks(sam, images, image, y, x, cls, round=1, tau=1.0 + 1e-6)
    assert not keep_none.kept.any() and not keep_none.masks.any()
    np.testing.assert_array_equal(keep_none.score, keep_all.score)
    # the rule itself: best proposal by predicted IoU, clamped to [0, 1]
    masks = np.zeros((3, 2, 2), dtype=bool)
    masks[2, 0, 0] = True
    assert choose(masks, np.array([-0.2, 0.5, 1.3]), 1.0).mask[0, 0]
    assert not choose(masks, np.array([-0.2, 0.5, 1.3]), 1.0001).kept
    assert choose(masks, np.array([-0.5, -0.2, -0.1]), 0.0).kept


# ---------------------------------------------------------------------------- overlaps and training draw
def _regions(size, records):
    """RegionSet from (image, y, x, cls, round, score, mask) records."""
    regions = RegionSet.empty(size)
    for image, y, x, c, r, score, mask in records:
        one = RegionSet(size, *(np.array([v]) for v in (image, y, x, c, r)), np.array([score], dtype=np.float32),
                        np.array([mask is not None]), np.packbits(mask.reshape(-1))[None] if mask is not None
                        else np.zeros((1, (size * size + 7) // 8), dtype=np.uint8))
        regions = regions.concat(one)
    return regions


def test_overlap_rule_and_click_precedence():
    s = 8
    a, b, c = (np.zeros((s, s), dtype=bool) for _ in range(3))
    a[0:5, :] = True  # class 1, score 0.9
    b[3:8, :] = True  # class 2, score 0.8: rows 3-4 contested with a -> unlabelled
    c[0:2, 0:4] = True  # class 1, score 0.95: agrees with a, owns its pixels
    records = [(0, 0, 7, 1, 1, 0.9, a), (0, 7, 0, 2, 1, 0.8, b), (0, 0, 0, 1, 2, 0.95, c),
               (0, 1, 1, 2, 2, float("nan"), None)]  # a click answered 2 inside a and c: keeps its own answer
    regions = _regions(s, records)
    clicks = clicked_pixels(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 7, 0, 1]), torch.tensor([7, 0, 0, 1]), s)
    got = resolve(regions, clicks)
    label = np.full((s, s), -1)
    label[got.y, got.x] = got.cls
    owner = np.full((s, s), -1)
    owner[got.y, got.x] = got.owner
    want = np.full((s, s), -1)
    want[0:3, :], want[5:8, :] = 1, 2
    for y, x in ((0, 7), (7, 0), (0, 0), (1, 1)):
        want[y, x] = -1  # clicked pixels are never region pixels
    assert np.array_equal(label, want)
    assert (owner[0:2, 0:4][want[0:2, 0:4] >= 0] == 2).all() and (owner[2, :] == 0).all() and (owner[5:, 1:] == 1).all()
    # the rule depends on the set of regions, not their order
    perm = [3, 1, 0, 2]
    again = resolve(_regions(s, [records[i] for i in perm]), clicks)
    key = lambda r, regs: sorted(zip(r.y.tolist(), r.x.tolist(), r.cls.tolist(),  # noqa: E731
                                     regs.y[r.owner].tolist(), regs.x[r.owner].tolist(), strict=True))
    assert key(again, _regions(s, [records[i] for i in perm])) == key(got, regions)
    # training draw: at most R pixels of the ones each click owns, sharing w per click
    drawn = training_pixels(got, regions, max_per_click=5, total_weight=2.0, seed=3)
    drawn_owner = owner[drawn.y.numpy(), drawn.x.numpy()]
    for r in range(3):
        assert (drawn_owner == r).sum() == min(5, (got.owner == r).sum())
        assert drawn.weight[torch.from_numpy(drawn_owner == r)].sum().item() == pytest.approx(2.0)
    assert len(set(zip(drawn.y.tolist(), drawn.x.tolist(), strict=True))) == len(drawn)
    same = training_pixels(got, regions, max_per_click=5, total_weight=2.0, seed=3)
    assert torch.equal(same.y, drawn.y) and torch.equal(same.x, drawn.x)
    assert len(training_pixels(got, regions, max_per_click=0, total_weight=2.0, seed=3)) == 0


def test_weighted_head_training_is_seeded_and_checks_its_weights():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=gen), torch.arange(40) % 3
    w = torch.rand(40, generator=gen)
    cfg = HeadConfig(epochs=5)
    one, two = (train_head(x, y, 3, cfg, seed=4, weights=w) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="weights of shape"):
        train_head(x, y, 3, cfg, seed=4, weights=w[:3])


# ---------------------------------------------------------------------------- config and loading
def test_config_keys_defaults_and_errors(world, tmp_path):
    base = [f"data={world / 'data'}", f"backbone.checkpoint={world / 'adm.pt'}"]
    plain = load_config(None, base)
    # a config written before expansion existed (no expansion / sam keys) loads equal to today's
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(dump_config(plain)).items()
                                   if k not in ("expansion", "sam")}))
    assert load_config(old) == plain and plain.expansion == "none" and plain.sam == SamExpansionConfig()
    cfg = load_config(None, [*base, "expansion=sam", "sam.tau=0.5", "sam.checkpoint=sam"])
    assert cfg.expansion == "sam" and cfg.sam.tau == 0.5 and cfg.sam.checkpoint.is_absolute()
    # one --set sam.* serves a sweep over expansion (Table 9's two columns side by side)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"data": str(world / "data"), "backbone": {"checkpoint": str(world / "adm.pt")}}))
    specs = plan_comparison(config, ["two_stage_edald"], [0], tmp_path / "cmp", [f"sam.checkpoint={world / 'sam'}"],
                            {"expansion": ["none", "sam"]})
    assert [(s.point, s.config.expansion) for s in specs] == [((("expansion", "none"),), "none"),
                                                              ((("expansion", "sam"),), "sam")]
    with pytest.raises(SparsesegError, match="sam.hub_id is not used by sam.backend=segment_anything"):
        load_config(None, [*base, "expansion=sam", "sam.backend=segment_anything", "sam.hub_id=x/y"])


def test_missing_weights_fail_with_one_line_naming_them(world, monkeypatch):
    with pytest.raises(SparsesegError, match=r"nowhere: SAM model folder not found") as info:
        build_expander(SamExpansionConfig(checkpoint=world / "nowhere"))
    assert "\n" not in str(info.value)
    with pytest.raises(SparsesegError, match=r"sam_vit_h.pth: SAM checkpoint not found"):
        build_expander(SamExpansionConfig(backend="segment_anything", checkpoint=world / "sam_vit_h.pth"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparsesegError, match=r"sam.hub_id=sparseseg-test/no-such-sam: cannot load") as info:
        build_expander(SamExpansionConfig(hub_id="sparseseg-test/no-such-sam"))
    assert "\n" not in str(info.value) and "sam.checkpoint" in str(info.value)
    loaded = build_expander(SamExpansionConfig(checkpoint=world / "sam"))  # the saved tiny model loads
    assert loaded.name == f"transformers:{world / 'sam'}" and loaded.longest == SAM_SIDE
    # a run fails before it writes anything
    with pytest.raises(SparsesegError, match="nowhere: SAM model folder not found"):
        Experiment(_config(world, world / "no_sam", f"sam.checkpoint={world / 'nowhere'}"))
    assert not (world / "no_sam").exists()


def test_official_backend_lands_prompts_on_the_clicked_pixel():
    """segment-anything's own model classes at toy width, through our official-backend wrapper."""
    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything is not installed")
    from sparseseg.expansion.sam_official import OfficialSam, _build_module

    modeling = _build_module()
    torch.manual_seed(0)
    net = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(img_size=SAM_SIDE, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                               out_chans=32, use_rel_pos=True, global_attn_indexes=(1,), window_size=2),
        prompt_encoder=modeling.PromptEncoder(embed_dim=32, image_embedding_size=(4, 4),
                                              input_image_size=(SAM_SIDE, SAM_SIDE), mask_in_chans=4),
        mask_decoder=modeling.MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=2,
                                          iou_head_hidden_dim=32, transformer=modeling.TwoWayTransformer(
                                              depth=2, embedding_dim=32, mlp_dim=64, num_heads=2)))
    official = OfficialSam(net, "cpu")
    seen = []
    hook = net.prompt_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["points"][0].detach().clone()), with_kwargs=True)
    ys, xs = np.array([0, 39, 12, 5]), np.array([0, 23, 7, 22])
    proposals = official.propose(_image(40, 24), ys, xs)
    hook.remove()
    back_y, back_x = model_to_pixel(seen[0][:, 0, :].double().numpy(), 40, 24, SAM_SIDE)
    assert np.array_equal(back_y, ys) and np.array_equal(back_x, xs)
    assert proposals.masks.shape == (4, 3, 40, 24) and official.embeddings_computed == 1


# ---------------------------------------------------------------------------- the simulated loop
def _config(world, out, *extra):
    return load_config(None, [f"data={world / 'data'}", f"out={out}", f"backbone.checkpoint={world / 'adm.pt'}",
                              "rounds=2", "budget=4", "strategy.name=entropy", "strategy.pixels_per_image=64",
                              "strategy.noise_samples=1", "head.epochs=10", "preview_images=2", "expansion=sam",
                              f"sam.checkpoint={world / 'sam'}", "sam.tau=0", "sam.max_region_pixels=6",
                              "sam.region_weight=2", *extra])


@pytest.fixture(scope="module")
def whole(world):
    return Experiment(_config(world, world / "whole")).run()


def test_run_counts_clicks_and_supervised_pixels_exactly(world, whole):
    out = world / "whole"
    labels = (out / "labels.csv").read_text().splitlines()[1:]
    regions = RegionSet.empty(SIZE)
    for r, record in enumerate(whole, start=1):
        stored, model, tau = RegionSet.load_npz(out / "regions" / f"round_{r:02d}.npz")
        assert model == f"transformers:{world / 'sam'}" and tau == 0.0 and len(stored) == 4
        assert (out / "regions" / f"round_{r:02d}.csv").exists()
        assert record["clicks"] == record["labelled"] == 4 * r  # click parity: one click per selected pixel
        void = stored.cls == IGNORE
        assert not stored.kept[void].any() and stored.kept[~void].all()  # tau = 0; void clicks get no region
        regions = regions.concat(stored)
        rows = [line.split(",") for line in labels if int(line.split(",")[5]) <= r]
        names = sorted(p.stem for p in (world / "data" / "train" / "images").iterdir())
        idx = torch.tensor([names.index(row[0]) for row in rows])
        ys, xs = torch.tensor([int(row[1]) for row in rows]), torch.tensor([int(row[2]) for row in rows])
        resolved = resolve(regions, clicked_pixels(idx, ys, xs, SIZE))
        trainable = sum(int(row[3]) != IGNORE for row in rows)
        assert record["region_pixels"] == len(resolved)
        assert record["supervised_pixels"] == trainable + len(resolved)
        assert record["training_region_pixels"] <= 6 * int(regions.kept.sum())
        assert record["regions"]["kept"] == int(stored.kept.sum()) and "expand" in record["phases"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["expansion"]["tau"] == 0.0 and meta["expansion"]["model"].startswith("transformers:")
    assert Image.open(out / "previews" / "round_02.png").size[0] > 0


def test_a_run_with_expansion_resumes_identically(world, whole):
    cut_dir = world / "cut"
    cut = Experiment(_config(world, cut_dir))
    cut.step()
    with (cut_dir / "rounds.jsonl").open("a") as fh:
        fh.write('{"round": 2, "tor')
    resumed = Experiment(_config(world, cut_dir))
    assert resumed.completed == 1
    records = resumed.run()
    assert (cut_dir / "labels.csv").read_text() == (world / "whole" / "labels.csv").read_text()
    for r in (1, 2):
        a, _, _ = RegionSet.load_npz(cut_dir / "regions" / f"round_{r:02d}.npz")
        b, _, _ = RegionSet.load_npz(world / "whole" / "regions" / f"round_{r:02d}.npz")
        assert all(np.array_equal(getattr(a, k), getattr(b, k), equal_nan=k == "score")
                   for k in ("image", "y", "x", "cls", "round", "score", "kept", "masks"))
    keys = ("miou", "clicks", "supervised_pixels", "training_region_pixels")
    assert [[r[k] for k in keys] for r in records] == [[r[k] for k in keys] for r in whole]


def test_without_expansion_nothing_of_it_is_written(world):
    records = Experiment(_config(world, world / "plain", "expansion=none", "rounds=1")).run()
    assert not (world / "plain" / "regions").exists()
    assert not {"clicks", "supervised_pixels", "regions"} & set(records[0]) and "expand" not in records[0]["phases"]
    assert "expansion" not in json.loads((world / "plain" / "meta.json").read_text())


# ---------------------------------------------------------------------------- the human loop
def test_human_loop_stores_trains_on_and_draws_regions(world, tmp_path):
    root = tmp_path / "proj"
    (tmp_path / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    settings = ["budget=3", "strategy.candidates_per_image=64", "strategy.k_per_image=5", "strategy.noise_samples=1",
                "head.epochs=10", "backbone.device=cpu", "expansion=sam", f"sam.checkpoint={world / 'sam'}",
                "sam.tau=0", "sam.max_region_pixels=5"]
    proj = init_project(root, world / "data" / "train" / "images", tmp_path / "classes.txt", size=SIZE,
                        overrides=settings, backbone={"checkpoint": str(world / "adm.pt")})
    proj.query()
    queries = answer_first_round(proj, SYNTHETIC_CLASSES, tmp_path / "a.csv")
    result = proj.import_file(tmp_path / "a.csv")
    assert result.regions == 2 and result.expansion_error is None  # the skipped click is not expanded
    conn = sqlite3.connect(root / DB_FILE)
    rows = conn.execute("SELECT query_id, model, tau, kept, pixels, mask FROM regions ORDER BY query_id").fetchall()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()
    assert [r[0] for r in rows] == [int(q[0]) for q in queries[1:]]
    assert all(r[1] == f"transformers:{world / 'sam'}" and r[2] == 0.0 and r[3] == 1 for r in rows)
    for r in rows:
        mask = np.asarray(Image.open(io.BytesIO(r[5])))
        assert mask.shape == (SIZE, SIZE) and int(mask.sum()) == r[4]
    trained = proj.train()
    assert trained.pixels == 2 and trained.training_region_pixels <= 10
    assert trained.region_pixels == len(proj.resolved_regions()[1])
    assert proj.expand_regions() == 0 and proj.train().retrained is False  # nothing new: head.pt is current
    status = proj.status()
    assert status["regions"][0]["expanded"] == 2 and status["regions"][0]["kept"] == 2
    # the next round's review PNGs show the regions: they differ from the same picture without them
    second = proj.query()
    resolved = proj.resolved_regions()[1]
    assert len(resolved) > 0  # random SAM weights give large masks
    assert_review_shows_regions(proj, second.round)
    proj.close()


def test_a_version_1_project_database_is_upgraded_in_place(world, tmp_path):
    (tmp_path / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    root = tmp_path / "old"
    init_project(root, world / "data" / "train" / "images", tmp_path / "classes.txt", size=SIZE,
                 backbone={"checkpoint": str(world / "adm.pt")}).close()
    conn = sqlite3.connect(root / DB_FILE)  # make it what version 1 wrote
    conn.execute("DROP TABLE regions")
    conn.execute("DROP TABLE ls_tasks")  # and what version 3 added (docs/annotation.md)
    conn.execute("DROP TABLE ls_links")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    before = [line for line in conn.iterdump()]
    conn.close()
    shutil.copy(root / DB_FILE, tmp_path / "v1.sqlite")
    proj = Project(root)
    assert proj.status()["regions"] == []
    proj.close()
    conn = sqlite3.connect(root / DB_FILE)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    after = list(conn.iterdump())
    conn.close()
    assert set(before) <= set(after) and any("CREATE TABLE regions" in line for line in after)


# ---------------------------------------------------------------------------- the published figures
def test_table_9_with_sam_is_the_paper_figure_of_expansion_runs():
    from sparseseg.compare import paper

    assert paper.final_miou("camvid", "two_stage_edald", expansion="sam").mean == 41.34
    assert paper.final_miou("camvid", "two_stage_edald").mean == 36.12  # unchanged without expansion
    assert paper.final_miou("camvid", "two_stage_edald", {"expansion": "sam"}).source == "Table 9, w/ SAM"
    assert paper.final_miou("camvid", "random", expansion="sam") is None
    assert paper.round_curve("ade_bed", "two_stage_edald", expansion="sam")[0] == 14.00
    assert paper.round_curve("pascal_context", "two_stage_edald", {"expansion": "none"})[-1] == 47.44
    result = StrategyResult((), "two_stage_edald", 2, seeds=[0], curves=[[20.0, 30.0]], labelled=[[2, 4]],
                            seconds=[1.0], expansion="sam", supervised=[[50, 120]])
    text = render_markdown(Comparison([result], [], "camvid", dataset="camvid"))
    assert "| two_stage_edald | 1 | 4 | 120 | 30.00 | 41.34 (Table 9, w/ SAM) |" in text
    # a sweep over expansion: each block gets its own column of Table 9, click-only blocks keep their format
    swept = [StrategyResult((("expansion", e),), "two_stage_edald", 2, seeds=[0], curves=[[20.0, 30.0]],
                            labelled=[[2, 4]], seconds=[1.0], expansion=e, supervised=[[50, 120]] if e == "sam" else [])
             for e in ("none", "sam")]
    text = render_markdown(Comparison(swept, ["expansion"], "camvid", dataset="camvid"))
    assert "| two_stage_edald | 1 | 4 | 30.00 | 36.12 ± 0.24 (Table 2) |" in text
    assert "| two_stage_edald | 1 | 4 | 120 | 30.00 | 41.34 (Table 9, w/ SAM) |" in text
