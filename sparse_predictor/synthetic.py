"""Small synthetic model and collect directories, for tests and the throughput benchmark.

The labels are known functions of the normalized inputs, computed here in numpy: MLP
labels ReLU((norm(x) A) B) with rank(A B) = ``rank``, so a linear predictor of rank >=
``rank`` can in principle reach recall 1; head norms softplus(norm(x) C). Each layer's
``att_x`` is the previous layer's plus noise, so drift is measurable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.atomic import write_json_atomic
from engine.config import ModelConfig
from engine.dataset_format import FORMAT_VERSION, MANIFEST, STORAGE_DTYPES, array_path
from engine.shards import expected_shapes, save_shard


def tiny_config(hidden: int = 32, ffn: int = 64, heads: int = 4, layers: int = 3) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        rms_norm_eps=1e-5,
    )


def write_model_dir(path: str | Path, config: ModelConfig, seed: int = 0) -> Path:
    """config.json and one shard per layer (random weights; norm weights around 1)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / "config.json", config.to_hf_dict())
    g = torch.Generator().manual_seed(seed)
    for layer in range(config.num_layers):
        shapes = expected_shapes(config, layer)
        tensors = {name: 0.02 * torch.randn(shape, generator=g) for name, shape in shapes.items()}
        for key in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            tensors[key] = 0.5 + torch.rand(config.hidden_size, generator=g)
        save_shard(path, layer, tensors)
    return path


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return weight * (x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps))


def write_collection(
    path: str | Path,
    model_dir: str | Path,
    layers: list[int],
    rows: int | dict[int, int],
    capacity: int | None = None,
    rank: int = 4,
    dtype: str = "float16",
    tail_value: float = 0.0,
    seed: int = 0,
) -> Path:
    """A collect directory for ``layers`` of the model in ``model_dir`` (see module doc).

    ``rows`` may differ per layer (0 = recorded but empty); rows past it up to
    ``capacity`` are filled with ``tail_value``, standing in for unfilled space."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_model_dir(model_dir)
    h, f, nh = config.hidden_size, config.intermediate_size, config.num_heads
    rows = {layer: rows for layer in layers} if isinstance(rows, int) else rows
    capacity = capacity or max(rows.values())
    rng = np.random.default_rng(seed)
    stream = rng.standard_normal((capacity, h)).astype(np.float32)
    for layer in layers:
        shard = torch.load(Path(model_dir) / f"pytorch_{layer}.pt", weights_only=True)
        w_in = shard["input_layernorm.weight"].numpy()
        w_post = shard["post_attention_layernorm.weight"].numpy()
        mlp_x = stream + 0.3 * rng.standard_normal(stream.shape).astype(np.float32)
        low_rank = rng.standard_normal((h, rank)) @ rng.standard_normal((rank, f)) / np.sqrt(h * rank)
        heads = rng.standard_normal((h, nh)) / np.sqrt(h)
        arrays = {
            "att_x": stream,
            "att_label": np.logaddexp(0.0, rms_norm(stream, w_in, config.rms_norm_eps) @ heads),
            "mlp_x": mlp_x,
            "mlp_label": np.maximum(rms_norm(mlp_x, w_post, config.rms_norm_eps) @ low_rank, 0.0),
        }
        for stem, values in arrays.items():
            _write_mmap(array_path(path, stem, layer), values, rows[layer], dtype, tail_value)
        stream = stream + 0.2 * rng.standard_normal(stream.shape).astype(np.float32)
    manifest = {
        "format": FORMAT_VERSION,
        "dtype": dtype,
        "capacity": capacity,
        "hidden_size": h,
        "intermediate_size": f,
        "num_heads": nh,
        "num_layers": config.num_layers,
        "layers": layers,
        "rows": {str(layer): rows[layer] for layer in layers},
        "full": False,
        "model": {"name": str(model_dir)},
        "input": "synthetic",
    }
    write_json_atomic(path / MANIFEST, manifest)
    return path


def _write_mmap(path: Path, values: np.ndarray, rows: int, dtype: str, tail_value: float) -> None:
    out = np.memmap(path, dtype=STORAGE_DTYPES[dtype], mode="w+", shape=values.shape)
    data = np.array(values, dtype=np.float32)
    data[rows:] = tail_value
    if dtype == "bfloat16":
        out[:] = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        out[:] = data
    out.flush()
