"""Which neurons and heads count as active: the targets a predictor learns.

SiLU never outputs exact zeros, so unlike OPT's ReLU an MLP neuron of a Llama layer is
"active" only relative to a threshold on |SiLU(gate) * up|. The threshold is one number
per layer, taken from the training rows only, so validation never informs the labels."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from sparse_predictor.data import Collection

#: Up to this many label values (float32, ~256 MB) the quantile is exact over all
#: training rows; beyond it, it is taken over a seeded uniform sample of training rows.
EXACT_QUANTILE_MAX_VALUES = 1 << 26
QUANTILE_READ_ROWS = 1024


def abs_quantile(
    collection: Collection,
    labels: np.memmap,
    rows: np.ndarray,
    q: float,
    seed: int,
    max_values: int = EXACT_QUANTILE_MAX_VALUES,
) -> tuple[float, str]:
    """The ``q`` quantile of |label| over ``rows`` (numpy's linear interpolation), and how
    it was obtained: ``"exact"`` or ``"sampled N of M training rows"``."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"target sparsity must be in [0, 1], got {q}")
    width = labels.shape[1]
    chosen, method = rows, "exact"
    if len(rows) * width > max_values:
        count = max(1, max_values // width)
        chosen = np.sort(np.random.default_rng(seed).choice(rows, size=count, replace=False))
        method = f"sampled {count} of {len(rows)} training rows"
    values = np.empty((len(chosen), width), dtype=np.float32)
    start = 0
    batches = collection.batches([labels], chosen, QUANTILE_READ_ROWS)
    for (block,) in tqdm(batches, total=-(-len(chosen) // QUANTILE_READ_ROWS), desc="threshold", leave=False):
        values[start : start + len(block)] = block.float().abs().numpy()
        start += len(block)
    return float(np.quantile(values, q)), method


def heads_kept(num_heads: int, keep_fraction: float) -> int:
    """Heads labelled important per token (DejaVu's ``int(heads * k)``, at least one)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"--att-keep must be in (0, 1], got {keep_fraction}")
    return max(1, int(num_heads * keep_fraction))


def above_threshold(y: torch.Tensor, threshold: float) -> torch.Tensor:
    return y.abs() > threshold


def top_k(y: torch.Tensor, k: int) -> torch.Tensor:
    target = torch.zeros_like(y, dtype=torch.bool)
    return target.scatter_(1, y.topk(k, dim=1).indices, True)
