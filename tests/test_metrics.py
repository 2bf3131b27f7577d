"""ConfusionMatrix: IoU worked by hand, NaN handling, ignore index, and sklearn as an oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparseseg.errors import SparsesegError
from sparseseg.loop.metrics import ConfusionMatrix


def test_hand_worked_three_classes() -> None:
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 0, 1])  # the last pixel is ignored
    # Confusion (rows truth, cols pred):
    #        p0 p1 p2
    #   t0 [  2  1  0 ]
    #   t1 [  0  1  1 ]
    #   t2 [  1  0  3 ]
    # IoU0 = tp / (tp + fp + fn) = 2 / (2 + 1 + 1) = 0.5
    # IoU1 = 1 / (1 + 1 + 1) = 1/3
    # IoU2 = 3 / (3 + 1 + 1) = 0.6
    # mIoU = (0.5 + 1/3 + 0.6) / 3 = 0.47778; pixel accuracy = 6 / 9
    cm = ConfusionMatrix(3)
    cm.update(pred[:4], target[:4])  # accumulating in two batches gives the same matrix
    cm.update(pred[4:].reshape(2, 3), target[4:].reshape(2, 3))
    assert cm.matrix.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert cm.matrix.dtype == torch.int64
    np.testing.assert_allclose(cm.iou().numpy(), [0.5, 1 / 3, 0.6])
    assert cm.miou() == pytest.approx((0.5 + 1 / 3 + 0.6) / 3)
    assert cm.pixel_accuracy() == pytest.approx(6 / 9)
    d = cm.to_dict(["a", "b", "c"])
    assert d["miou"] == pytest.approx(0.477777, abs=1e-6)
    assert d["per_class_iou"] == pytest.approx({"a": 0.5, "b": 1 / 3, "c": 0.6})


def test_absent_class_is_nan_and_excluded() -> None:
    # Class 2 appears in neither prediction nor truth: tp + fp + fn = 0 -> NaN, not 0.
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 0, 1, 3]), torch.tensor([0, 1, 1, 3]))
    # IoU0 = 1/2, IoU1 = 1/2, IoU3 = 1; class 2 NaN
    iou = cm.iou()
    assert math.isnan(iou[2]) and iou[[0, 1, 3]].tolist() == [0.5, 0.5, 1.0]
    assert cm.miou() == pytest.approx(2 / 3)
    assert cm.to_dict(["a", "b", "c", "d"])["per_class_iou"]["c"] is None
    # A class that is only predicted (fp > 0, never true) counts with IoU 0.
    cm.update(torch.tensor([2]), torch.tensor([0]))
    assert cm.iou()[2] == 0.0


def test_ignore_index_excluded() -> None:
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8), torch.tensor([[1, 255], [255, 255]]))
    assert cm.matrix.tolist() == [[0, 0], [0, 1]] and cm.pixel_accuracy() == 1.0
    cm2 = ConfusionMatrix(2, ignore_index=-1)
    cm2.update(torch.tensor([1, 0]), torch.tensor([-1, 0]))
    assert cm2.matrix.tolist() == [[1, 0], [0, 0]]


def test_empty_and_errors() -> None:
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())
    assert cm.to_dict(["a", "b", "c"]) == {
        "miou": None,
        "pixel_accuracy": None,
        "per_class_iou": dict.fromkeys("abc"),
    }
    cm.update(torch.tensor([0]), torch.tensor([255]))  # all ignored: nothing counted, no error
    assert int(cm.matrix.sum()) == 0
    with pytest.raises(SparsesegError, match="target id 3"):
        cm.update(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(SparsesegError, match="predicted id 7"):
        cm.update(torch.tensor([7]), torch.tensor([0]))
    with pytest.raises(SparsesegError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(SparsesegError, match="integer"):
        cm.update(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(SparsesegError):
        cm.to_dict(["a"])
    cm.update(torch.tensor([1]), torch.tensor([1]))
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_matches_sklearn_jaccard() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    c = 6
    target = rng.integers(0, c, 5000)
    pred = np.where(rng.random(5000) < 0.6, target, rng.integers(0, c, 5000))
    target[rng.random(5000) < 0.1] = 255
    keep = target != 255
    cm = ConfusionMatrix(c)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    ref = metrics.jaccard_score(target[keep], pred[keep], labels=list(range(c)), average=None)
    np.testing.assert_allclose(cm.iou().numpy(), ref)
    assert cm.miou() == pytest.approx(float(ref.mean()))
    assert cm.pixel_accuracy() == pytest.approx(metrics.accuracy_score(target[keep], pred[keep]))
