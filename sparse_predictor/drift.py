"""How far the residual stream moves between layers, token by token.

DejaVu's lookahead rests on a layer's input staying close to the next layer's input (true
on OPT). Here: the mean cosine similarity of each token's ``att_x`` at layer l with the
same token at layer l+1, with the first recorded layer, and with its own ``mlp_x`` (what
attention changed: the gap a predictor reading the layer input for the MLP must bridge)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparse_predictor.data import Collection

DRIFT_READ_ROWS = 2048


def _cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=1).double().sum().item()


def drift_rows(collection: Collection, layers: list[int], max_rows: int) -> np.ndarray:
    """Up to ``max_rows`` rows, evenly spaced over the rows every layer holds."""
    common = min(collection.rows_of(layer) for layer in layers)
    return np.unique(np.linspace(0, common - 1, min(common, max_rows)).round().astype(np.int64))


def embedding_drift(collection: Collection, max_rows: int) -> dict:
    """``{"rows", "first_layer", "layers": {"<l>": {"cos_next", "cos_first"}}, "gaps"}``.

    ``cos_next`` compares layer l with layer l+1 and is null when l+1 was not recorded;
    ``cos_mlp`` compares layer l's input with its MLP input;
    ``gaps`` lists the consecutive recorded pairs [l, l'] with l' > l + 1 that were skipped."""
    layers = [layer for layer in collection.layers if collection.rows[layer] > 0]
    if not layers:
        return {"rows": 0, "first_layer": None, "layers": {}, "gaps": []}
    rows = drift_rows(collection, layers, max_rows)
    arrays = {layer: collection.array("att_x", layer) for layer in layers}
    mlp_arrays = {layer: collection.array("mlp_x", layer) for layer in layers}
    sums_next = dict.fromkeys(layers, 0.0)
    sums_first = dict.fromkeys(layers, 0.0)
    sums_mlp = dict.fromkeys(layers, 0.0)
    for start in tqdm(range(0, len(rows), DRIFT_READ_ROWS), desc="drift", leave=False):
        chunk = rows[start : start + DRIFT_READ_ROWS]
        first = collection.read(arrays[layers[0]], chunk).float()
        previous, previous_layer = first, layers[0]
        for layer in layers:  # at most three layers' chunks in memory at once
            x = first if layer == layers[0] else collection.read(arrays[layer], chunk).float()
            sums_first[layer] += _cosine_sum(x, first)
            sums_mlp[layer] += _cosine_sum(x, collection.read(mlp_arrays[layer], chunk).float())
            if previous_layer == layer - 1:
                sums_next[previous_layer] += _cosine_sum(previous, x)
            previous, previous_layer = x, layer
    n = len(rows)
    return {
        "rows": n,
        "first_layer": layers[0],
        "layers": {
            str(layer): {
                "cos_next": sums_next[layer] / n if layer + 1 in arrays else None,
                "cos_first": sums_first[layer] / n,
                "cos_mlp": sums_mlp[layer] / n,
            }
            for layer in layers
        },
        "gaps": [[a, b] for a, b in zip(layers, layers[1:], strict=False) if b > a + 1],
    }
