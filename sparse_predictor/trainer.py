"""Train one layer's predictor on rows streamed from disk; keep the best validation epoch,
then measure it on test rows that played no part in either."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine.config import ModelConfig
from modules.llama import RMSNorm
from sparse_predictor.data import Collection, RowSplit
from sparse_predictor.metrics import MetricAccumulator
from sparse_predictor.predictor import Task, layer_norm

#: Metrics a checkpoint may be selected by (DejaVu selects by recall).
SELECT_METRICS = ("recall", "recall_at_true_sparsity")


@dataclass(frozen=True)
class Settings:
    """Optimisation settings. DejaVu used lr 1e-4 for 20 epochs; 1e-3 reaches its plateau
    in fewer epochs on the same low-rank net, and AdamW with weight decay 0.01 as DejaVu."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 1024
    weight_decay: float = 0.01
    #: Stop after this many epochs without a better validation score.
    patience: int = 3
    select_metric: str = "recall"
    device: str = "cpu"
    seed: int = 0


@dataclass
class LayerData:
    """One layer's input and label arrays (mapped, not loaded) and its row split."""

    collection: Collection
    task: Task
    norm: RMSNorm
    x: np.ndarray
    y: np.ndarray
    split: RowSplit

    @classmethod
    def open(
        cls,
        collection: Collection,
        task: Task,
        model_dir: str | Path,
        config: ModelConfig,
        layer: int,
        split: RowSplit,
    ) -> LayerData:
        """Map the layer's arrays for ``task`` and load the norm its input goes through."""
        return cls(
            collection=collection,
            task=task,
            norm=layer_norm(model_dir, layer, task.norm_key, config),
            x=collection.array(task.x_stem, layer),
            y=collection.array(task.label_stem, layer),
            split=split,
        )

    def batches(self, rows: np.ndarray, batch_size: int, device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalized input, bool target) pairs for ``rows``, in their given order."""
        norm = self.norm.to(device)
        for x, y in self.collection.batches([self.x, self.y], rows, batch_size):
            with torch.no_grad():
                inputs = norm(x.to(device).float())
            yield inputs, self.task.target(y.to(device).float())


@dataclass
class LayerResult:
    """The best epoch's weights and validation metrics; ``rows_per_second`` counts training
    rows over training time (streaming from disk included, validation excluded)."""

    state_dict: dict[str, torch.Tensor]
    val_metrics: dict
    epochs_run: int
    best_epoch: int
    rows_per_second: float


def class_weights(target: torch.Tensor) -> torch.Tensor:
    """DejaVu's per-batch class balance: with w = (fraction active) + 0.005, active entries
    weigh 1 - w and inactive ones w, i.e. positives count about negatives/positives times
    as much as negatives (the 0.005 keeps an all-inactive batch from weighing nothing)."""
    w = target.float().mean() + 0.005
    return torch.where(target, 1.0 - w, w)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target.float(), weight=class_weights(target))


def evaluate(predictor: nn.Module, data: LayerData, rows: np.ndarray, settings: Settings) -> dict:
    """Metrics over every one of ``rows`` (see ``metrics.MetricAccumulator``)."""
    predictor.eval()
    acc = MetricAccumulator(predictor[-1].out_features)
    with torch.no_grad():
        for inputs, target in data.batches(rows, settings.batch_size, settings.device):
            acc.update(predictor(inputs), target)
    return acc.result()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def train_layer(predictor: nn.Module, data: LayerData, settings: Settings, name: str) -> LayerResult:
    """AdamW on the class-weighted BCE; after each epoch, validate and keep the best state,
    which ``predictor`` holds on return."""
    if settings.select_metric not in SELECT_METRICS:
        raise ValueError(f"select_metric must be one of {SELECT_METRICS}, got {settings.select_metric!r}")
    if settings.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {settings.epochs}")
    rng = np.random.default_rng(settings.seed)
    predictor.to(settings.device)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = -(-len(data.split.train) // settings.batch_size)
    best: LayerResult | None = None
    best_score, stale, seconds, rows_seen = -1.0, 0, 0.0, 0
    for epoch in range(1, settings.epochs + 1):
        predictor.train()
        order = rng.permutation(data.split.train)
        start = time.perf_counter()
        batches = data.batches(order, settings.batch_size, settings.device)
        for inputs, target in tqdm(batches, total=steps, desc=f"{name} epoch {epoch}/{settings.epochs}", leave=False):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(predictor(inputs), target)
            loss.backward()
            optimizer.step()
        _synchronize(settings.device)
        seconds += time.perf_counter() - start
        rows_seen += len(order)
        metrics = evaluate(predictor, data, data.split.val, settings)
        score = metrics[settings.select_metric] or 0.0
        tqdm.write(
            f"{name} epoch {epoch}: loss {loss.item():.4f} recall {metrics['recall'] or 0:.4f} "
            f"recall@true-sparsity {metrics['recall_at_true_sparsity'] or 0:.4f} "
            f"classifier sparsity {metrics['classifier_sparsity']:.4f}"
        )
        if best is None or score > best_score:
            state = {k: v.detach().cpu().clone() for k, v in predictor.state_dict().items()}
            best, best_score, stale = LayerResult(state, metrics, epoch, epoch, 0.0), score, 0
        else:
            stale += 1
        best.epochs_run = epoch
        if stale >= settings.patience:
            break
    best.rows_per_second = rows_seen / seconds
    predictor.load_state_dict(best.state_dict)
    return best
