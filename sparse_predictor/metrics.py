"""Honest predictor metrics: fractions pooled over every (token, neuron) pair of the rows
measured (validation rows to pick an epoch, test rows for what is reported), never
DejaVu's averages of counts.

Recall at the 0.5 decision threshold can be bought by predicting more neurons active,
so two threshold-free numbers come with it: recall when the predictor keeps exactly as
many neurons per token as are truly active, and recall when it keeps a fixed top
fraction (the curve; a random predictor scores ``1 - sparsity`` there)."""

from __future__ import annotations

import torch

from modules.llama_sparse import kept_units

#: Sparsities at which the recall-vs-sparsity curve is reported.
SPARSITY_GRID = tuple(round(i * 0.05, 2) for i in range(20))


def ranks_by_logit(logits: torch.Tensor) -> torch.Tensor:
    """Each neuron's place in its token's descending logit order (0 = most likely active)."""
    order = logits.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(logits.shape[1], device=logits.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


class MetricAccumulator:
    """Sums over batches of rows; ``result()`` turns them into fractions."""

    def __init__(self, width: int, grid: tuple[float, ...] = SPARSITY_GRID):
        self.width, self.grid = width, grid
        self.rows = self.true_active = self.predicted_active = self.hits = self.hits_at_true = 0
        #: How many truly active neurons sat at each logit rank: the curve at any
        #: sparsity is a prefix sum of this.
        self.active_rank_counts = torch.zeros(width, dtype=torch.int64)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` (rows, width) from the predictor, ``target`` (rows, width) bool labels."""
        predicted = logits >= 0  # sigmoid(logit) >= 0.5, DejaVu's decision rule
        ranks = ranks_by_logit(logits)
        self.rows += logits.shape[0]
        self.true_active += int(target.sum())
        self.predicted_active += int(predicted.sum())
        self.hits += int((predicted & target).sum())
        self.hits_at_true += int(((ranks < target.sum(dim=1, keepdim=True)) & target).sum())
        self.active_rank_counts += torch.bincount(ranks[target].cpu(), minlength=self.width)

    def result(self) -> dict:
        total = self.rows * self.width
        hits_within = torch.cumsum(self.active_rank_counts, 0).tolist()
        curve = []
        for s in self.grid:
            k = kept_units(self.width, s)
            curve.append(_ratio(hits_within[k - 1] if k > 0 else 0, self.true_active))
        return {
            "recall": _ratio(self.hits, self.true_active),
            "precision": _ratio(self.hits, self.predicted_active),
            "true_sparsity": 1.0 - self.true_active / total,
            "classifier_sparsity": 1.0 - self.predicted_active / total,
            "recall_at_true_sparsity": _ratio(self.hits_at_true, self.true_active),
            "curve": {"sparsity": list(self.grid), "recall": curve},
        }
