"""Spearman's rank correlation with a permutation p-value, in numpy (no scipy needed).

With one value per layer (30 at most) the question is whether the ordering of two series
agrees more than chance would; a permutation test answers exactly that without the
t-distribution approximation scipy uses, and is exact for small n."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

#: Up to this many points every permutation is enumerated (8! = 40320); above, a seeded sample.
EXACT_MAX_POINTS = 8
PERMUTATIONS = 100_000


@dataclass(frozen=True)
class Correlation:
    rho: float
    #: Two-sided: the fraction of permutations of ``y`` with a |rho| at least as large.
    p_value: float
    n: int
    method: str

    def to_dict(self) -> dict:
        return {"rho": self.rho, "p_value": self.p_value, "n": self.n, "p_method": self.method}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span (as spearmanr does)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def _rank_correlations(rx: np.ndarray, ry_rows: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``rx`` with each row of ``ry_rows`` (permutations of one vector)."""
    cx, cy = rx - rx.mean(), ry_rows - ry_rows.mean(axis=-1, keepdims=True)
    return (cy @ cx) / (np.linalg.norm(cx) * np.linalg.norm(cy, axis=-1))


def spearman(x, y, permutations: int = PERMUTATIONS, seed: int = 0) -> Correlation:
    """Spearman's rho of paired samples and its two-sided permutation p-value."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-d series of one length, got shapes {x.shape} and {y.shape}")
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(math.nan, math.nan, n, "undefined (fewer than 3 points or a constant series)")
    rx, ry = average_ranks(x), average_ranks(y)
    rho = float(_rank_correlations(rx, ry[None, :])[0])
    tolerance = 1e-12  # permutations tying |rho| must count as "at least as large"
    if n <= EXACT_MAX_POINTS:
        shuffled = ry[np.array(list(itertools.permutations(range(n))))]
        extreme = int((np.abs(_rank_correlations(rx, shuffled)) >= abs(rho) - tolerance).sum())
        return Correlation(rho, extreme / len(shuffled), n, f"exact over all {len(shuffled)} permutations")
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, permutations, 10_000):  # bounded memory
        count = min(10_000, permutations - start)
        shuffled = rng.permuted(np.tile(ry, (count, 1)), axis=1)
        extreme += int((np.abs(_rank_correlations(rx, shuffled)) >= abs(rho) - tolerance).sum())
    return Correlation(rho, (extreme + 1) / (permutations + 1), n, f"{permutations} random permutations (seed {seed})")
