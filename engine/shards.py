"""The shard directory: one ``pytorch_*.pt`` file per pipeline piece, plus a manifest.

A stage reads only the files it owns, so a rank's memory holds its share of the model.
Files are read with ``weights_only=True`` (never unpickle code) and memory-mapped."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

EMBEDDINGS = "embs"
LM_HEAD = "lm_head"
MANIFEST = "manifest.json"

#: Tensor names inside each shard file, with their shapes as functions of the config.
LAYER_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


class ShardError(RuntimeError):
    """A shard file is missing, truncated, or holds the wrong tensors."""


def shard_filename(piece: int | str) -> str:
    """``pytorch_embs.pt``, ``pytorch_<i>.pt`` or ``pytorch_lm_head.pt``."""
    return f"pytorch_{piece}.pt"


def expected_shapes(config, piece: int | str) -> dict[str, tuple[int, ...]]:
    """The tensors a shard file must hold, so a wrong file fails loudly at load time."""
    h, v = config.hidden_size, config.vocab_size
    if piece == EMBEDDINGS:
        return {"embed_tokens.weight": (v, h)}
    if piece == LM_HEAD:
        return {"norm.weight": (h,), "lm_head.weight": (v, h)}
    ffn, q, kv = config.intermediate_size, config.q_size, config.kv_size
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (ffn, h), (ffn, h), (h, ffn), (h,), (h,)]
    return dict(zip(LAYER_KEYS, shapes))


def load_shard(model_dir: str | Path, piece: int | str, config=None) -> dict[str, torch.Tensor]:
    """Load one shard file; with ``config``, check every tensor's presence and shape."""
    path = Path(model_dir) / shard_filename(piece)
    if not path.is_file():
        raise ShardError(f"{path}: shard file is missing")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, pickle.UnpicklingError) as e:
        raise ShardError(f"{path}: cannot read shard file (truncated or corrupt?): {e}") from None
    if config is not None:
        check_shapes(path, tensors, expected_shapes(config, piece))
    return tensors


def check_shapes(path: Path | str, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if name not in tensors:
            raise ShardError(f"{path}: tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise ShardError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_shard(directory: str | Path, piece: int | str, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """Write one shard file; returns its manifest entry (size and sha256)."""
    path = Path(directory) / shard_filename(piece)
    torch.save({k: t.contiguous() for k, t in tensors.items()}, path)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest (is {model_dir} a converted shard directory?)") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: invalid JSON: {e}") from None


def verify_manifest(model_dir: str | Path, names: list[str] | None = None) -> list[str]:
    """Return one message per file (all, or only ``names``) whose size or sha256 differs
    from the manifest."""
    listed = read_manifest(model_dir)["files"]
    problems = [f"{Path(model_dir) / name}: not listed in {MANIFEST}" for name in names or () if name not in listed]
    for name, entry in listed.items():
        path = Path(model_dir) / name
        if names is not None and name not in names:
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: size {path.stat().st_size}, manifest says {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


def write_json_atomic(path: str | Path, data: object) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
