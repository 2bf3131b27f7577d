import numpy as np
import pytest
import torch

from sparseseg.config import HeadConfig
from sparseseg.head.mlp import (
    HeadEnsemble,
    balanced_weights,
    build_head,
    head_samples,
    make_head,
    member_seed,
    predict_proba,
    train_head,
)
from sparseseg.head.predictor import HeadPredictor


def test_architecture_follows_the_paper():
    small, large = make_head(6144, 11), make_head(6144, 30)
    assert [m.out_features for m in small if isinstance(m, torch.nn.Linear)] == [128, 32, 11]
    assert [m.out_features for m in large if isinstance(m, torch.nn.Linear)] == [256, 128, 30]
    assert isinstance(small[2], torch.nn.BatchNorm1d)  # Linear, ReLU, BatchNorm


def _blobs(n_per_class, dim=20, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=gen), y


def test_learns_separable_classes_and_is_seeded():
    x, y = _blobs(5)
    cfg = HeadConfig(epochs=60)
    head = train_head(x, y, 3, cfg, seed=1)
    x_test, y_test = _blobs(50, seed=0)
    assert (predict_proba(head, x_test).argmax(1) == y_test).float().mean() > 0.9
    again = train_head(x, y, 3, cfg, seed=1)
    torch.testing.assert_close(predict_proba(head, x_test), predict_proba(again, x_test), rtol=0, atol=0)


def test_works_with_a_single_labelled_pixel():
    x, y = _blobs(1, classes=1)
    head = train_head(x, y, 4, HeadConfig(epochs=5), seed=0)
    probs = predict_proba(head, x)
    assert probs.shape == (1, 4) and torch.allclose(probs.sum(1), torch.ones(1))


def test_an_ensemble_of_one_is_the_single_head():
    x, y = _blobs(5)
    single = train_head(x, y, 3, HeadConfig(epochs=10), seed=4)
    one = train_head(x, y, 3, HeadConfig(epochs=10, ensemble=1), seed=4)
    assert isinstance(one, torch.nn.Sequential)
    for a, b in zip(single.state_dict().values(), one.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_an_ensemble_predicts_the_mean_of_its_members_and_samples_them():
    x, y = _blobs(5)
    cfg = HeadConfig(epochs=10, ensemble=4)
    ens = train_head(x, y, 3, cfg, seed=4)
    assert isinstance(ens, HeadEnsemble) and len(ens.members) == 4 and not ens.training
    # member i is exactly the single head trained with member_seed(4, i), member 0 with the seed itself
    alone = [train_head(x, y, 3, HeadConfig(epochs=10), seed=member_seed(4, i)) for i in range(4)]
    assert member_seed(4, 0) == 4 and len({member_seed(4, i) for i in range(4)}) == 4
    for member, ref in zip(ens.members, alone, strict=True):
        for a, b in zip(member.state_dict().values(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    x_test, _ = _blobs(20, seed=9)
    # independent reference: numpy softmax of each member's logits, averaged
    logits = [ref(x_test).detach().double().numpy() for ref in alone]
    soft = [np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
            for z in logits]
    np.testing.assert_allclose(predict_proba(ens, x_test).double().numpy(), np.mean(soft, axis=0), atol=1e-6)
    samples = HeadPredictor(ens).sample_proba(x_test, 3, seed=0)
    assert samples.shape == (3, len(x_test), 3)
    np.testing.assert_allclose(samples.double().numpy(), np.stack(soft[:3]), atol=1e-6)
    assert HeadPredictor(ens).can_sample and not HeadPredictor(alone[0]).can_sample


def test_an_ensemble_round_trips_through_its_state_dict():
    x, y = _blobs(5)
    cfg = HeadConfig(epochs=5, ensemble=3)
    ens = train_head(x, y, 3, cfg, seed=0)
    again = build_head(x.shape[1], 3, cfg)
    again.load_state_dict(ens.state_dict())
    again.eval()
    assert torch.equal(predict_proba(ens, x), predict_proba(again, x))
    assert head_samples(cfg) == 3 and head_samples(HeadConfig()) == 0 and head_samples(HeadConfig(dropout=0.1)) > 99


def test_balanced_weights_give_every_class_the_same_total():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    # by hand: W = 6, K = 3, W_0 = 3, W_1 = 1, W_2 = 2 -> 6 / (3 W_c) = 2/3, 2, 1
    torch.testing.assert_close(balanced_weights(labels), torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0, 1.0, 1.0]))
    w = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.25, 0.25])  # region pixels share a click's weight
    got = balanced_weights(labels, w)
    totals = [float(got[labels == c].sum()) for c in range(3)]
    assert totals == pytest.approx([float(w.sum()) / 3] * 3) and float(got.sum()) == pytest.approx(float(w.sum()))
    assert float(got[4] / got[5]) == pytest.approx(1.0) and float(got[3]) == pytest.approx(float(w.sum()) / 3)
