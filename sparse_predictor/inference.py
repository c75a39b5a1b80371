"""What sparse inference takes from this package: trained predictors, loaded per layer, and
TEAL thresholds calibrated on a collect directory. Both are checked against the model
before any generation, and both come out as plain modules and numbers for the blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.collect_manifest import read_manifest
from engine.config import ModelConfig
from engine.dataset_format import model_fingerprint
from engine.shards import load_untrusted
from modules.llama_sparse import LayerPredictor
from sparse_predictor.data import Collection
from sparse_predictor.predictor import layer_norm, low_rank_predictor

#: Rows sampled per layer to calibrate TEAL's thresholds (quantiles of a million values).
CALIBRATION_ROWS = 2048


class SparseSetupError(ValueError):
    """Predictors or calibration data that are missing or do not fit the model."""


def load_predictors(predictor_dir: str | Path, layers: list[int], config: ModelConfig) -> dict[int, LayerPredictor]:
    """``mlp_layer_<l>.pt`` of every layer in ``layers``, as written by ``sparse_predictor.train``."""
    predictors = {}
    for layer in layers:
        path = Path(predictor_dir) / f"mlp_layer_{layer}.pt"
        if not path.is_file():
            raise SparseSetupError(
                f"{path}: no MLP predictor for layer {layer} (train it: python -m sparse_predictor.train "
                f"--kind mlp --layers {layer} ...)"
            )
        checkpoint = load_untrusted(path, "a predictor checkpoint", SparseSetupError, mmap=False)
        try:
            shape, stem, state = checkpoint["shape"], checkpoint["input"]["stem"], checkpoint["state_dict"]
        except (KeyError, TypeError) as e:
            raise SparseSetupError(f"{path}: not a predictor checkpoint (no {e})") from None
        want = {"in": config.hidden_size, "out": config.intermediate_size}
        if checkpoint.get("kind") != "mlp" or any(shape.get(k) != v for k, v in want.items()):
            raise SparseSetupError(
                f"{path}: a {checkpoint.get('kind')} predictor of shape {shape['in']} -> {shape['out']}, but layer "
                f"{layer} of this model needs an MLP predictor {want['in']} -> {want['out']} (another model's?)"
            )
        net = low_rank_predictor(shape["in"], shape["rank"], shape["out"])
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise SparseSetupError(f"{path}: {e}") from None
        predictors[layer] = LayerPredictor(net.eval().requires_grad_(False), lookahead=stem == "att_x")
    return predictors


def teal_thresholds(
    collect_dir: str | Path, model_dir: str | Path, config: ModelConfig, layers: list[int], sparsity: float
) -> dict[int, tuple[float, float]]:
    """Per layer, the ``sparsity`` quantiles of |MLP input| (after the layer's norm) and of
    |SiLU(gate) * up|, over rows sampled evenly from the collection: TEAL's thresholds."""
    collection = Collection.open(collect_dir)
    _check_same_model(collection, Path(model_dir))
    thresholds = {}
    for layer in layers:
        rows = collection.rows_of(layer)
        sample = np.unique(np.linspace(0, rows - 1, min(rows, CALIBRATION_ROWS)).astype(np.int64))
        norm = layer_norm(model_dir, layer, "post_attention_layernorm.weight", config)
        with torch.no_grad():
            x = norm(collection.read(collection.array("mlp_x", layer), sample).float())
        act = collection.read(collection.array("mlp_label", layer), sample).float()
        thresholds[layer] = (_abs_quantile(x, sparsity), _abs_quantile(act, sparsity))
    return thresholds


def _abs_quantile(values: torch.Tensor, q: float) -> float:
    return float(np.quantile(values.abs().numpy(), q))


def _check_same_model(collection: Collection, model_dir: Path) -> None:
    """The collection's model, by the content of its config (as resuming a collection checks)."""
    manifest = read_manifest(collection.directory)
    collected = manifest.get("model", {})
    if collected.get("config_sha256") != model_fingerprint(model_dir)["config_sha256"]:
        raise SparseSetupError(
            f"{collection.directory}: collected from {collected.get('path', 'an unknown model')}, not from "
            f"{model_dir} (--sparse-calibration needs a collection of the same model)"
        )
