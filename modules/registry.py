"""Model type -> block builder. Swapping a stage's block type never touches the schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from modules.llama import LlamaBlock
from modules.llama_save import LlamaSaveBlock
from modules.llama_sparse import LlamaSparseBlock


@dataclass
class BlockSpec:
    """Everything a builder may need to make the block of one layer."""

    model_dir: Path
    config: ModelConfig
    layer_index: int
    dtype: torch.dtype
    options: dict = field(default_factory=dict)  # per-type extras, e.g. the collector


def _plain(spec: BlockSpec) -> nn.Module:
    return LlamaBlock.from_shard(spec.model_dir, spec.config, spec.layer_index, spec.dtype)


def _npt(spec: BlockSpec) -> nn.Module:
    """An NPT block where the checkpoint converts this layer, the plain block elsewhere."""
    from npt.checkpoint import load_npt_block

    checkpoint = spec.options["npt_checkpoint"]
    return load_npt_block(spec.model_dir, spec.config, spec.layer_index, checkpoint, spec.dtype)


def _save(spec: BlockSpec) -> nn.Module:
    """A save block where the collector records this layer (--collect-layers), the plain block elsewhere."""
    collector = spec.options.get("collector")
    if collector is None or spec.layer_index not in collector.layers:
        return _plain(spec)
    block = LlamaSaveBlock.from_shard(spec.model_dir, spec.config, spec.layer_index, spec.dtype)
    block.recorder = collector
    return block


def _sparse(spec: BlockSpec) -> nn.Module:
    block = LlamaSparseBlock.from_shard(spec.model_dir, spec.config, spec.layer_index, spec.dtype)
    block.use(spec.options["sparse"].mlp_for(spec.layer_index, block.mlp))
    return block


BUILDERS: dict[str, Callable[[BlockSpec], nn.Module]] = {
    "llama": _plain,
    "llama-save": _save,
    "llama-npt": _npt,
    "llama-sparse": _sparse,
}


def build_block(model_type: str, spec: BlockSpec) -> nn.Module:
    try:
        builder = BUILDERS[model_type]
    except KeyError:
        raise ValueError(f"unknown model type {model_type!r}; known: {', '.join(sorted(BUILDERS))}") from None
    return builder(spec)
