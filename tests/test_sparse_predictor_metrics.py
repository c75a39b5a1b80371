"""Predictor metrics, labels and loss weights against hand-computed values and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.llama_sparse import kept_units
from sparse_predictor.labels import heads_kept, top_k
from sparse_predictor.metrics import MetricAccumulator
from sparse_predictor.trainer import class_weights


def test_metrics_hand_computed():
    target = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-0.5, 1.0, -2.0, -1.0]])
    acc = MetricAccumulator(4, grid=(0.0, 0.5, 0.75))
    acc.update(logits, target)
    r = acc.result()
    # predicted active (logit >= 0): row 0 {0, 2}, row 1 {1}; truly active: row 0 {0, 1}, row 1 {0}
    assert r["recall"] == pytest.approx(1 / 3)
    assert r["precision"] == pytest.approx(1 / 3)
    assert r["true_sparsity"] == pytest.approx(5 / 8)
    assert r["classifier_sparsity"] == pytest.approx(5 / 8)
    # top-2 of row 0 = {0, 2} (1 hit), top-1 of row 1 = {1} (0 hits)
    assert r["recall_at_true_sparsity"] == pytest.approx(1 / 3)
    # keep 4 -> all 3; keep 2 -> row 0 {0,2}: 1, row 1 {1,0}: 1; keep 1 -> row 0 {0}: 1, row 1 {1}: 0
    assert r["curve"] == {"sparsity": [0.0, 0.5, 0.75], "recall": pytest.approx([1.0, 2 / 3, 1 / 3])}


def numpy_metrics(logits: np.ndarray, target: np.ndarray, grid: tuple[float, ...]) -> dict:
    """Straightforward per-token reference, written independently of the accumulator."""
    predicted = logits >= 0
    order = np.argsort(-logits, axis=1, kind="stable")
    at_true, curve_hits = 0, np.zeros(len(grid))
    for i in range(len(logits)):
        at_true += target[i, order[i, : target[i].sum()]].sum()
        for j, s in enumerate(grid):
            curve_hits[j] += target[i, order[i, : logits.shape[1] - int(np.floor(s * logits.shape[1] + 0.5))]].sum()
    positives = target.sum()
    return {
        "recall": (predicted & target).sum() / positives,
        "precision": (predicted & target).sum() / predicted.sum(),
        "true_sparsity": 1 - target.mean(),
        "classifier_sparsity": 1 - predicted.mean(),
        "recall_at_true_sparsity": at_true / positives,
        "curve": list(curve_hits / positives),
    }


def test_metrics_match_numpy_over_several_batches():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((50, 37)).astype(np.float32)
    target = (logits + rng.standard_normal(logits.shape) > 0.3) & (rng.random(logits.shape) > 0.1)
    acc = MetricAccumulator(37)
    for start in range(0, 50, 16):
        acc.update(torch.from_numpy(logits[start : start + 16]), torch.from_numpy(target[start : start + 16]))
    got = acc.result()
    want = numpy_metrics(logits, target, acc.grid)
    for key in ("recall", "precision", "true_sparsity", "classifier_sparsity", "recall_at_true_sparsity"):
        assert got[key] == pytest.approx(want[key]), key
    assert got["curve"]["recall"] == pytest.approx(want["curve"])


def test_no_active_neurons_gives_null_recall_not_nan():
    acc = MetricAccumulator(3)
    acc.update(torch.tensor([[-1.0, -2.0, -3.0]]), torch.zeros(1, 3, dtype=torch.bool))
    r = acc.result()
    assert r["recall"] is None and r["precision"] is None and r["true_sparsity"] == 1.0


def test_kept_units():
    assert [kept_units(10, s) for s in (0.0, 0.25, 0.5, 0.95)] == [10, 7, 5, 0]


def test_class_weights_follow_dejavu():
    target = torch.tensor([[True, False, False, False]])
    w = 0.25 + 0.005
    assert class_weights(target)[0].tolist() == pytest.approx([1 - w, w, w, w])


def test_top_heads_labels():
    y = torch.tensor([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 0.0]])
    assert top_k(y, 2).tolist() == [[False, True, True, False], [True, False, True, False]]
    assert heads_kept(9, 0.5) == 4 and heads_kept(4, 0.1) == 1
    with pytest.raises(ValueError, match="att-keep"):
        heads_kept(4, 0.0)
