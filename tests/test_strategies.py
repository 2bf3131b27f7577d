"""Every acquisition strategy: scores against baal and hand-worked cases, Core-set against brute
force, the streaming single-stage search against an exhaustive one, seeding and schedules."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import scipy.stats
import torch

from sparseseg.config import HeadConfig, StrategyConfig
from sparseseg.errors import SparsesegError
from sparseseg.features.store import DETERMINISTIC, FeatureStore
from sparseseg.head.mlp import mc_dropout_proba, predict_proba, train_head
from sparseseg.head.predictor import HeadPredictor
from sparseseg.labels import PixelLabels
from sparseseg.selection import uncertainty
from sparseseg.selection.coreset import k_center_greedy
from sparseseg.selection.rules import TopK, balanced_top, power_distribution, power_keys
from sparseseg.selection.scores import SCORES
from sparseseg.selection.strategies import (
    STRATEGIES,
    RoundContext,
    ScheduledStrategy,
    check_strategy,
    create_strategy,
)
from tests.conftest import ToyBackbone

# ---------------------------------------------------------------------------------- scores


def _random_probs(seed: int, s: int = 6, n: int = 40, c: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, n, c, generator=g, dtype=torch.float64) * 2).softmax(dim=-1)


def test_power_bald_distribution_equals_baal():
    stochastics = pytest.importorskip("baal.active.heuristics.stochastics")
    heur = pytest.importorskip("baal.active.heuristics")
    for seed, power in [(0, 1.0), (1, 2.0), (2, 0.5)]:
        p = _random_probs(seed)
        bald = uncertainty.mutual_information(p)
        baal_power = stochastics.PowerSampling(heur.BALD(), query_size=5, temperature=1.0 / power)
        expected = baal_power._make_distribution(heur.BALD().compute_score(p.permute(1, 2, 0).numpy()))
        np.testing.assert_allclose(power_distribution(bald, power).numpy(), expected, atol=1e-6)


def test_power_keys_draw_from_the_powered_distribution():
    # The first pick of Gumbel-top-k is a draw from p ~ score**power: check frequencies.
    scores = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    expected = power_distribution(scores, 2.0).numpy()
    gen = torch.Generator().manual_seed(0)
    first = [int(power_keys(scores, 2.0, gen).argmax()) for _ in range(6000)]
    freq = np.bincount(first, minlength=5) / len(first)
    assert freq[0] == 0  # a zero score is never drawn
    np.testing.assert_allclose(freq, expected, atol=0.02)


def test_balanced_entropy_worked_by_hand_two_classes():
    # samples of P(class 0): 0.2, 0.4, 0.6, 0.8 -> mean 1/2, unbiased variance 0.2/3 for both
    # classes; a = b = m (m (1 - m) / v - 1) = 0.5 (0.25 * 15 - 1) = 1.375; P+ ~ Beta(2.375, 1.375).
    p0 = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    probs = torch.stack([p0, 1 - p0], dim=-1)[:, None, :]
    h_plus = scipy.stats.beta(2.375, 1.375).entropy()
    mjent = 2 * 0.5 * h_plus + math.log(2)  # sum_c m_c h(P_c+) + H, H = log 2
    bal = (mjent + math.log(2)) / (math.log(2) + math.log(2))
    np.testing.assert_allclose(uncertainty.balanced_entropy(probs).numpy(), [bal], atol=1e-9)
    np.testing.assert_allclose(uncertainty.balentacq(probs).numpy(), [1 / bal], atol=1e-9)


def test_balanced_entropy_worked_by_hand_three_classes():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]], dtype=torch.float64)[:, None, :]
    m = probs[:, 0].mean(0).numpy()
    v = probs[:, 0].var(0, correction=1).numpy()
    a = m * (m * (1 - m) / v - 1)
    b = a * (1 - m) / m
    h_plus = np.array([scipy.stats.beta(ai + 1, bi).entropy() for ai, bi in zip(a, b, strict=True)])
    h = scipy.stats.entropy(m)
    bal = ((m * h_plus).sum() + h + math.log(2)) / (h + math.log(2))
    np.testing.assert_allclose(uncertainty.balanced_entropy(probs).numpy(), [bal], atol=1e-9)
    expected = 1 / bal if bal >= 0 else bal
    np.testing.assert_allclose(uncertainty.balentacq(probs).numpy(), [expected], atol=1e-9)


def test_balentacq_of_identical_samples_is_finite_and_negative():
    # No disagreement: the fitted Betas are spikes (tiny variance), h(P+) is very negative, BalEnt
    # < 0, and BalEntAcq keeps it negative: below any pixel with disagreement.
    probs = torch.tensor([[0.6, 0.3, 0.1]] * 4, dtype=torch.float64)[:, None, :]
    bal = uncertainty.balanced_entropy(probs)
    assert torch.isfinite(bal).all() and bal.item() < 0
    assert uncertainty.balentacq(probs).item() == bal.item()
    with pytest.raises(SparsesegError, match="at least 2"):
        uncertainty.balanced_entropy(probs[:1])


def test_mc_dropout_passes_are_seeded_and_differ():
    torch.manual_seed(0)
    feats, labels = torch.randn(60, 12), torch.randint(0, 3, (60,))
    head = train_head(feats, labels, 3, HeadConfig(epochs=3, dropout=0.3), seed=0)
    a = mc_dropout_proba(head, feats[:10], passes=4, seed=7)
    b = mc_dropout_proba(head, feats[:10], passes=4, seed=7)
    assert a.shape == (4, 10, 3) and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    assert not head.training and all(not m.training for m in head.modules())  # back in eval mode
    assert torch.allclose(predict_proba(head, feats[:10]), predict_proba(head, feats[:10]))


# ---------------------------------------------------------------------------------- Core-set


def _brute_k_center(z: torch.Tensor, k: int, labelled: torch.Tensor | None, first: int) -> list[int]:
    """k-center greedy on the full distance matrix, the textbook way."""
    dist = torch.cdist(z, z).pow(2)
    if labelled is not None:
        nearest = torch.cdist(z, labelled).pow(2).min(dim=1).values
        picks = []
    else:
        picks = [first]
        nearest = dist[first].clone()
    while len(picks) < k:
        masked = nearest.clone()
        masked[picks] = -1
        j = int(torch.argmax(masked))
        picks.append(j)
        nearest = torch.minimum(nearest, dist[j])
    return picks


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("with_labelled", [False, True])
def test_k_center_greedy_equals_brute_force(clustered, with_labelled):
    g = torch.Generator().manual_seed(3)
    if clustered:
        centres = torch.randn(4, 8, generator=g, dtype=torch.float64)
        z = centres[torch.randint(4, (150,), generator=g)] + 0.05 * torch.randn(150, 8, generator=g, dtype=torch.float64)
    else:
        z = torch.randn(150, 8, generator=g, dtype=torch.float64)
    labelled = torch.randn(5, 8, generator=g, dtype=torch.float64) if with_labelled else None
    gen = torch.Generator().manual_seed(11)
    first = int(torch.randint(150, (1,), generator=torch.Generator().manual_seed(11)))
    ours = k_center_greedy(z, 40, labelled=labelled, generator=gen, block_size=32).tolist()
    assert ours == _brute_k_center(z, 40, labelled, first)


def test_k_center_greedy_takes_duplicates_once_and_can_take_everything():
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    picks = k_center_greedy(z, 3).tolist()
    assert sorted(picks) == [0, 1, 2] and picks[:2] == [0, 2]
    with pytest.raises(SparsesegError, match="between 0 and the pool size"):
        k_center_greedy(z, 4)


# ---------------------------------------------------------------------------------- rules


def test_topk_streaming_equals_a_full_stable_sort():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 20, (500,), generator=g).double()  # many ties
    items = torch.arange(500)[:, None]
    top = TopK(37)
    for chunk_keys, chunk_items in zip(torch.split(keys, 64), torch.split(items, 64), strict=True):
        top.push(chunk_keys, chunk_items)
    expected = torch.argsort(keys, descending=True, stable=True)[:37]
    assert torch.equal(top.result()[1][:, 0], expected)


# ---------------------------------------------------------------------------------- strategies

SIZE, N = 12, 5


class DiffusionToy(ToyBackbone):
    """The toy backbone presented as a diffusion one (its maps depend on the noise sample)."""

    def __init__(self) -> None:
        super().__init__(input_size=SIZE)
        self.feature_info = [replace(i, timestep=10) for i in self.feature_info]


@pytest.fixture(scope="module")
def world():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    masks = (images[..., 0] // 86).long()  # 3 classes that depend on the image
    store = FeatureStore(DiffusionToy(), images, seed=0, split="train")
    return store, masks


def _labels(masks, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(N * SIZE * SIZE, generator=g)[:n]
    image, y, x = flat // (SIZE * SIZE), (flat % (SIZE * SIZE)) // SIZE, flat % SIZE
    labels = PixelLabels()
    labels.add(image, y, x, masks[image, y, x], 1)
    return labels


def _ctx(store, labels, head, round=2, budget=4, seed=0):
    predictor = HeadPredictor(head) if head is not None else None
    return RoundContext(store, labels, predictor, budget, round, seed, noise_samples=3, tile_pixels=50)


def _head(store, labels, dropout=0.2):
    feats = store.at_pixels(labels.image, labels.y, labels.x)
    return train_head(feats, labels.cls, 3, HeadConfig(epochs=5, dropout=dropout), seed=0)


def _config(name, **kw):
    return StrategyConfig(name=name, candidates_per_image=40, k_per_image=6, pool_ratio=0.5, **kw)


def test_every_strategy_is_seeded_and_picks_new_pixels(world):
    store, masks = world
    labels = _labels(masks)
    head = _head(store, labels)
    taken = set(labels.flat_index(SIZE).tolist())
    for name in sorted(STRATEGIES):
        runs = []
        for seed in (0, 0, 1):
            picks = create_strategy(_config(name)).select(_ctx(store, labels, head, seed=seed))
            runs.append(list(zip(picks.image.tolist(), picks.y.tolist(), picks.x.tolist(), strict=True)))
        assert runs[0] == runs[1], name
        assert len(runs[0]) == 4 and len(set(runs[0])) == 4, name
        flat = {(i * SIZE + y) * SIZE + x for i, y, x in runs[0]}
        assert not flat & taken, name


def test_every_name_of_the_issue_is_registered():
    for name in ("random", "entropy", "margin", "least_confidence", "bald", "dald", "ebald", "edald", "power_bald",
                 "power_dald", "balentacq", "max_herding", "coreset", "two_stage_edald", "two_stage_margin",
                 "coreset_edald"):
        assert name in STRATEGIES


@pytest.mark.parametrize("score", ["entropy", "margin", "edald", "balentacq"])
def test_single_stage_streaming_equals_exhaustive_top_b(world, score):
    store, masks = world
    labels = _labels(masks)
    head = _head(store, labels)
    picks = create_strategy(_config(score)).select(_ctx(store, labels, head, budget=7))
    # exhaustive: every pixel's features at once, scored, labelled ones removed, top 7
    s = SIZE
    flat = torch.arange(N * s * s)
    image, y, x = flat // (s * s), (flat % (s * s)) // s, flat % s
    feats = {k: store.at_pixels(image, y, x, k) for k in range(0, 5)}
    if score in ("entropy", "margin"):
        sc = getattr(uncertainty, score)(predict_proba(head, feats[DETERMINISTIC])[None])
    elif score == "edald":
        probs = torch.stack([predict_proba(head, feats[k]) for k in (1, 2, 3)])
        sc = uncertainty.edald(probs, predict_proba(head, feats[4]))
    else:  # balentacq on a diffusion backbone: the noise samples 1..S
        sc = uncertainty.balentacq(torch.stack([predict_proba(head, feats[k]) for k in (1, 2, 3)]))
    sc[labels.flat_index(s)] = -float("inf")
    expected = torch.argsort(sc, descending=True, stable=True)[:7]
    got = (picks.image * s + picks.y) * s + picks.x
    assert torch.equal(got, expected)


def test_ebald_on_an_ensemble_scores_its_members(world):
    store, masks = world
    labels = _labels(masks)
    feats = store.at_pixels(labels.image, labels.y, labels.x)
    head = train_head(feats, labels.cls, 3, HeadConfig(epochs=5, ensemble=4), seed=0)
    picks = create_strategy(_config("ebald")).select(_ctx(store, labels, head, budget=7))
    # exhaustive reference from each member alone: MI over members 0..2 (S = 3), entropy of member 3
    s = SIZE
    flat = torch.arange(N * s * s)
    z = store.at_pixels(flat // (s * s), (flat % (s * s)) // s, flat % s)
    members = [predict_proba(m, z) for m in head.members]
    sc = uncertainty.edald(torch.stack(members[:3]), members[3])
    sc[labels.flat_index(s)] = -float("inf")
    got = (picks.image * s + picks.y) * s + picks.x
    assert torch.equal(got, torch.argsort(sc, descending=True, stable=True)[:7])


def test_single_stage_first_round_is_random_and_pixel_subsample_is_respected(world):
    store, masks = world
    picks = create_strategy(_config("entropy")).select(_ctx(store, PixelLabels(), None, round=1))
    assert picks.info["first_round"] == "random" and len(picks.image) == 4
    labels = _labels(masks)
    head = _head(store, labels)
    picks = create_strategy(_config("entropy", pixels_per_image=10)).select(_ctx(store, labels, head))
    assert picks.info["scored"] <= N * 10


def test_pixelpick_rule_draws_from_the_top_fraction(world):
    store, masks = world
    labels = _labels(masks)
    head = _head(store, labels)
    picks = create_strategy(_config("margin", top_fraction=0.05)).select(_ctx(store, labels, head))
    kept = picks.info["top_fraction_kept"]
    assert kept == math.ceil(0.05 * (N * SIZE * SIZE - len(labels)))
    flat = torch.arange(N * SIZE * SIZE)
    feats = store.at_pixels(flat // (SIZE * SIZE), (flat % (SIZE * SIZE)) // SIZE, flat % SIZE)
    sc = uncertainty.margin(predict_proba(head, feats)[None])
    sc[labels.flat_index(SIZE)] = -float("inf")
    top = set(torch.argsort(sc, descending=True, stable=True)[:kept].tolist())
    got = ((picks.image * SIZE + picks.y) * SIZE + picks.x).tolist()
    assert set(got) <= top


def test_coreset_two_stage_pool_is_k_center_of_local_picks(world):
    store, masks = world
    labels = _labels(masks)
    strat = create_strategy(_config("coreset"))
    picks = strat.select(_ctx(store, labels, None, round=1))
    assert "sigma" not in picks.info and len(picks.image) == 4


def test_schedule_switches_after_the_given_round(world):
    store, masks = world
    labels = _labels(masks)
    head = _head(store, labels)
    cfg = _config("two_stage_edald", switch_after=2, then="margin")
    strat = create_strategy(cfg)
    assert isinstance(strat, ScheduledStrategy)
    assert strat.select(_ctx(store, labels, head, round=2)).info["strategy"] == "two_stage_edald"
    later = strat.select(_ctx(store, labels, head, round=3))
    assert later.info["strategy"] == "margin"
    margin = create_strategy(_config("margin")).select(_ctx(store, labels, head, round=3))
    assert torch.equal(later.x, margin.x) and torch.equal(later.image, margin.image)
    with pytest.raises(ValueError, match="go together"):
        _config("two_stage_edald", switch_after=2)


def test_strategy_requirements_are_checked_up_front():
    plain, diffusion = ToyBackbone(), DiffusionToy()
    with pytest.raises(SparsesegError, match="head.dropout"):
        check_strategy(create_strategy(_config("bald")), diffusion, head_dropout=0.0)
    with pytest.raises(SparsesegError, match="diffusion noise"):
        check_strategy(create_strategy(_config("two_stage_edald")), plain, head_dropout=0.1)
    check_strategy(create_strategy(_config("ebald")), plain, head_dropout=0.1)
    check_strategy(create_strategy(_config("balentacq")), diffusion, head_dropout=0.0)  # noise samples
    with pytest.raises(SparsesegError, match="head.dropout"):
        check_strategy(create_strategy(_config("balentacq")), plain, head_dropout=0.0)  # MC dropout
    # an ensemble of heads is a sample source too: S members for the MI, one more for eBALD's entropy
    check_strategy(create_strategy(_config("ebald", noise_samples=3)), plain, head_dropout=0.0, head_ensemble=4)
    with pytest.raises(SparsesegError, match="needs 4 head samples .* head.ensemble=3"):
        check_strategy(create_strategy(_config("two_stage_ebald", noise_samples=3)), plain, head_dropout=0.1,
                       head_ensemble=3)
    assert set(SCORES) == {"entropy", "margin", "least_confidence", "bald", "ebald", "dald", "edald",
                           "power_bald", "power_dald", "balentacq"}


def test_balanced_top_is_a_round_robin_over_classes():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    classes = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    # by hand: round 1 takes each class's best in score order (0: item 0, 1: item 3, 2: item 5),
    # round 2 the second best (0: item 1, 1: item 4), round 3 (0: item 2), round 4 (0: item 6)
    assert balanced_top(scores, classes, 7).tolist() == [0, 3, 5, 1, 4, 2, 6]
    assert balanced_top(scores, classes, 4).tolist() == [0, 3, 5, 1]
    one = torch.zeros(7, dtype=torch.long)
    assert balanced_top(scores, one, 3).tolist() == torch.argsort(scores, descending=True)[:3].tolist()
    ties = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert balanced_top(ties, torch.tensor([1, 1, 0, 0]), 4).tolist() == [0, 2, 1, 3]  # ties keep the earlier item


def test_balance_spreads_the_picks_over_predicted_classes(world):
    store, masks = world
    labels = _labels(masks)
    head = _head(store, labels)
    for name in ("two_stage_margin", "max_herding"):
        picks = create_strategy(_config(name, balance="predicted")).select(_ctx(store, labels, head, budget=6))
        assert picks.info["predicted_classes_picked"] == min(3, picks.info["predicted_classes_in_pool"])
        assert len(picks.image) == 6
        s = SIZE
        assert not set(((picks.image * s + picks.y) * s + picks.x).tolist()) & set(labels.flat_index(s).tolist())
    with pytest.raises(ValueError, match="does not combine"):
        _config("two_stage_bald", balance="predicted", power=2.0)
