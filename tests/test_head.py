import torch

from sparseseg.config import HeadConfig
from sparseseg.head.mlp import make_head, predict_proba, train_head


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
