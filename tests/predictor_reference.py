"""A saved MLP predictor's test-row metrics recomputed in numpy from the raw collected files,
the split's definition and the layer's shard: the reference the trainer and the study are
checked against, independent of the package's readers, norms and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def rows_of_blocks(definition: dict, blocks: str) -> np.ndarray:
    """The rows a split definition assigns to its listed blocks, recomputed by hand."""
    size, n = definition["block_rows"], definition["num_rows"]
    return np.array([r for b in definition[blocks] for r in range(b * size, min((b + 1) * size, n))], dtype=int)


def collected(data_dir: Path, stem: str, layer: int, width: int) -> np.ndarray:
    """The rows a float16 collection holds for one layer, per its manifest, as float64."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    mm = np.memmap(data_dir / f"{stem}_{layer}.mmap", dtype=np.float16, mode="r")
    return mm.reshape(manifest["capacity"], width)[: manifest["rows"][str(layer)]].astype(np.float64)


def mlp_test_metrics(data_dir: Path, model_dir: Path, checkpoint_path: Path, split: dict) -> dict:
    """``recall``, ``precision`` and ``true_sparsity`` of a saved MLP predictor on its test rows,
    with the rows of each part and the training rows' |labels| (to check its threshold on)."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    layer, shape, source = checkpoint["layer"], checkpoint["shape"], checkpoint["input"]
    test, val = rows_of_blocks(split, "test_blocks"), rows_of_blocks(split, "val_blocks")
    train = np.setdiff1d(np.arange(split["num_rows"]), np.union1d(test, val))
    y = np.abs(collected(data_dir, "mlp_label", layer, shape["out"]))
    x = collected(data_dir, source["stem"], layer, shape["in"])[test]
    norm = torch.load(model_dir / f"pytorch_{layer}.pt", weights_only=True)[source["norm"]].double().numpy()
    xn = norm * x / np.sqrt((x * x).mean(axis=1, keepdims=True) + source["rms_norm_eps"])
    w0, w1 = (checkpoint["state_dict"][k].double().numpy() for k in ("0.weight", "1.weight"))
    predicted, active = xn @ w0.T @ w1.T >= 0, y[test] > checkpoint["threshold"]
    hits = (predicted & active).sum()
    return {
        "recall": hits / active.sum(),
        "precision": hits / predicted.sum(),
        "true_sparsity": 1 - active.mean(),
        "train_rows": train,
        "val_rows": val,
        "test_rows": test,
        "train_labels": y[train],
    }
