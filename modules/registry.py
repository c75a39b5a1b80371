"""Model type -> its block: the typed options it takes beyond the shards, and its builder.

Swapping a stage's block type never touches the schedule. The options are prepared on the
runner's side (``pipeline/block_options.py``: opening the collector, loading the NPT
checkpoint or the sparse selections), so the blocks import no training code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.config import ModelConfig
from modules.llama import LlamaBlock
from modules.llama_save import LlamaSaveBlock
from modules.llama_sparse import LlamaSparseBlock, SparseSettings
from modules.npt_checkpoint import NPTCheckpoint, load_npt_block

if TYPE_CHECKING:
    from engine.collector import ActivationCollector


@dataclass(frozen=True)
class SaveOptions:
    """llama-save: the collector its blocks record into (None: the stage records none of
    its layers, --collect-layers, and runs them all as plain blocks)."""

    collector: ActivationCollector | None


@dataclass(frozen=True)
class NPTOptions:
    """llama-npt: the checkpoint (loaded and checked against the model) of the NP weights."""

    checkpoint: NPTCheckpoint


@dataclass(frozen=True)
class SparseOptions:
    """llama-sparse: how its blocks select MLP units (mode, sparsity, predictors or thresholds)."""

    settings: SparseSettings


@dataclass(frozen=True)
class BlockSpec:
    """Where one layer's block comes from."""

    model_dir: Path
    config: ModelConfig
    layer_index: int
    dtype: torch.dtype


@dataclass(frozen=True)
class BlockType:
    """One registry entry: the options class its builder takes (None: the shards suffice)."""

    options: type | None
    build: Callable[[BlockSpec, Any], nn.Module]


def _plain(spec: BlockSpec, options: None) -> nn.Module:
    return LlamaBlock.from_shard(spec.model_dir, spec.config, spec.layer_index, spec.dtype)


def _npt(spec: BlockSpec, options: NPTOptions) -> nn.Module:
    """An NPT block where the checkpoint converts this layer, the plain block elsewhere."""
    return load_npt_block(spec.model_dir, spec.config, spec.layer_index, options.checkpoint, spec.dtype)


def _save(spec: BlockSpec, options: SaveOptions) -> nn.Module:
    """A save block where the collector records this layer (--collect-layers), the plain block elsewhere."""
    if options.collector is None or spec.layer_index not in options.collector.layers:
        return _plain(spec, None)
    block = LlamaSaveBlock.from_shard(spec.model_dir, spec.config, spec.layer_index, spec.dtype)
    block.recorder = options.collector
    return block


def _sparse(spec: BlockSpec, options: SparseOptions) -> nn.Module:
    block = LlamaSparseBlock.from_shard(spec.model_dir, spec.config, spec.layer_index, spec.dtype)
    block.use(options.settings.mlp_for(spec.layer_index, block.mlp))
    return block


BLOCK_TYPES: dict[str, BlockType] = {
    "llama": BlockType(None, _plain),
    "llama-save": BlockType(SaveOptions, _save),
    "llama-npt": BlockType(NPTOptions, _npt),
    "llama-sparse": BlockType(SparseOptions, _sparse),
}


def block_type(model_type: str) -> BlockType:
    try:
        return BLOCK_TYPES[model_type]
    except KeyError:
        raise ValueError(f"unknown model type {model_type!r}; known: {', '.join(sorted(BLOCK_TYPES))}") from None


def build_block(model_type: str, spec: BlockSpec, options: Any = None) -> nn.Module:
    """The block of one layer; ``options`` must be the entry's options class (None for plain)."""
    entry = block_type(model_type)
    if not (isinstance(options, entry.options) if entry.options is not None else options is None):
        wanted = entry.options.__name__ if entry.options is not None else "no options"
        raise TypeError(f"{model_type} blocks take {wanted}, got {type(options).__name__}")
    return entry.build(spec, options)
