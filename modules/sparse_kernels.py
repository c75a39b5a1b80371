"""Selected-unit MLP kernels: read only the weights a selection keeps.

A gathered copy of the kept rows (``w[idx] @ x``) writes as many bytes as it reads and is
slower than the dense GEMV it replaces. These kernels instead walk the kept rows in place,
one contiguous row per unit, so at batch 1 the work is the bytes of the kept weights:

* ``unit_mlp``: for each kept unit j, ``a = SiLU(gate_j . x) * (up_j . x)``, then
  ``out += a * down_t_j`` (``down_t`` is ``down_proj.weight`` transposed, so that unit's
  column is a contiguous row). Used where units are chosen (oracle, predictor).
* ``thresholded_matmul``: ``(v * (|v| > t)) @ w`` over only the rows of ``w`` that some
  row keeps (TEAL's sparse inputs: columns of gate/up as rows of their transpose, rows of
  ``down_t``).

Rows of a batch share the union of their selections; ``keep`` (or the threshold) drops,
per row, what that row did not select, so a row's result never depends on its neighbours'.

The CPU kernels are compiled by numba for float32, split over the torch thread count.
Other dtypes or devices, or a machine without numba, take torch fallbacks: the same
maths, correct but not faster."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps odd platforms working
    numba = None


def native_kernels_for(weight: torch.Tensor) -> bool:
    """Whether the compiled kernels serve this weight: float32 on the CPU, numba importable."""
    return numba is not None and weight.device.type == "cpu" and weight.dtype == torch.float32


if numba is not None:

    @njit(fastmath=True, nogil=True, cache=True)
    def _unit_mlp_range(x, gate, up, down_t, idx, keep, out, first, last):
        batch, hidden = x.shape
        one = np.float32(1.0)
        for k in range(first, last):
            j = idx[k]
            for b in range(batch):
                if not keep[b, k]:
                    continue
                g = np.float32(0.0)  # float32 accumulators: float64 would halve the SIMD width
                u = np.float32(0.0)
                for h in range(hidden):
                    g += gate[j, h] * x[b, h]
                    u += up[j, h] * x[b, h]
                a = g / (one + np.exp(-g)) * u
                for h in range(hidden):
                    out[b, h] += a * down_t[j, h]

    @njit(fastmath=True, nogil=True, parallel=True, cache=True)
    def _unit_mlp(x, gate, up, down_t, idx, keep, parts):
        batch, hidden = x.shape
        n = idx.shape[0]
        partial = np.zeros((parts, batch, hidden), dtype=np.float32)
        for p in prange(parts):
            _unit_mlp_range(x, gate, up, down_t, idx, keep, partial[p], p * n // parts, (p + 1) * n // parts)
        out = partial[0]
        for p in range(1, parts):
            out += partial[p]
        return out

    @njit(fastmath=True, nogil=True, parallel=True, cache=True)
    def _thresholded_matmul(v, w, threshold, parts):
        batch, rows = v.shape
        width = w.shape[1]
        skipped = np.zeros(batch, dtype=np.int64)
        needed = np.zeros(rows, dtype=np.bool_)
        for b in range(batch):
            for r in range(rows):
                if abs(v[b, r]) > threshold:
                    needed[r] = True
                else:
                    skipped[b] += 1
        idx = np.nonzero(needed)[0]
        n = idx.shape[0]
        # Each thread streams whole kept rows (long contiguous reads) into its own output.
        partial = np.zeros((parts, batch, width), dtype=np.float32)
        for p in prange(parts):
            out = partial[p]
            for k in range(p * n // parts, (p + 1) * n // parts):
                r = idx[k]
                for b in range(batch):
                    c = v[b, r]
                    if abs(c) > threshold:
                        for col in range(width):
                            out[b, col] += c * w[r, col]
        out = partial[0]
        for p in range(1, parts):
            out += partial[p]
        return out, skipped


def _threads() -> int:
    """Kernel threads: torch's setting (per rank under torchrun), within numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def unit_mlp(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """``sum_k keep[:, k] * SiLU(gate[idx[k]] . x) * (up[idx[k]] . x) * down_t[idx[k]]``.

    ``x`` (N, hidden); ``gate``, ``up``, ``down_t`` (ffn, hidden); ``idx`` (K,) kept units;
    ``keep`` (N, K) bool, which of them each row selected. Returns (N, hidden)."""
    if native_kernels_for(gate):
        parts = _threads()
        numba.set_num_threads(parts)
        arrays = (t.contiguous().numpy() for t in (x, gate, up, down_t, idx, keep))
        return torch.from_numpy(_unit_mlp(*arrays, parts))
    act = F.silu(F.linear(x, gate[idx])) * F.linear(x, up[idx])
    return (act * keep.to(act.dtype)) @ down_t[idx]


def thresholded_matmul(
    v: torch.Tensor, w: torch.Tensor, threshold: float, gathered: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v * (|v| > threshold)) @ w`` and how many entries of each row of ``v`` were dropped;
    ``v`` (N, R), ``w`` (R, C). ``gathered`` reads only the rows of ``w`` some row of ``v``
    keeps; otherwise (many rows) it is a masked dense product."""
    if gathered and native_kernels_for(w):
        parts = _threads()
        numba.set_num_threads(parts)
        out, skipped = _thresholded_matmul(v.contiguous().numpy(), w.numpy(), threshold, parts)
        return torch.from_numpy(out), torch.from_numpy(skipped)
    kept = v.abs() > threshold
    return (v * kept) @ w, (~kept).sum(dim=1)
