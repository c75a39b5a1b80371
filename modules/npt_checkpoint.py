"""The NPT checkpoint ``<out>/npt.pt``: only the NP parameters of each converted layer, the
NPT config, and the training state for resuming. The base model stays in its shard
directory, so a checkpoint is megabytes, not the model again."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.atomic import atomic_write
from engine.config import ModelConfig
from engine.shards import ShardError, check_shapes, load_untrusted
from modules.llama import LlamaBlock
from modules.llama_npt import LlamaNPTBlock, NPTConfig, np_shapes

CHECKPOINT_NAME = "npt.pt"
FORMAT = "npt-checkpoint-v1"


class CheckpointError(RuntimeError):
    """An NPT checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


@dataclass
class NPTCheckpoint:
    """What rebuilds the NPT layers on top of a shard directory, and resumes their training."""

    config: NPTConfig
    #: layer index -> NP tensors of that layer, keyed as in ``NPComponent``'s state dict.
    np_state: dict[int, dict[str, torch.Tensor]]
    step: int = 0
    optimizer: dict | None = None
    #: JSON-able record of how it was trained (arguments, model dir), for the logs.
    meta: dict = field(default_factory=dict)
    #: Where it was read from, for error messages.
    source: str = "NPT checkpoint"

    @classmethod
    def from_model(cls, config: NPTConfig, blocks: dict[int, LlamaNPTBlock], **training) -> NPTCheckpoint:
        """Snapshot the NP parameters of ``blocks`` (a copy, detached, on CPU)."""
        state = {i: {k: t.detach().cpu().clone() for k, t in b.np.state_dict().items()} for i, b in blocks.items()}
        return cls(config, state, **training)

    def save(self, path: str | Path) -> None:
        """Atomically: a crash or a full disk never leaves half a checkpoint, nor a temporary file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "npt_config": self.config.to_dict(),
            "np_state": {str(i): s for i, s in self.np_state.items()},
            "step": self.step,
            "optimizer": self.optimizer,
            "meta": self.meta,
        }
        with atomic_write(path, "wb") as f:
            torch.save(payload, f)

    @classmethod
    def load(cls, path: str | Path) -> NPTCheckpoint:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no NPT checkpoint there")
        payload = load_untrusted(path, "the NPT checkpoint", CheckpointError, mmap=False)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an NPT checkpoint (expected format {FORMAT!r})")
        config = NPTConfig.from_dict(payload["npt_config"])
        np_state = {int(i): s for i, s in payload["np_state"].items()}
        if set(np_state) != set(config.layers):
            raise CheckpointError(f"{path}: holds layers {sorted(np_state)}, its config says {list(config.layers)}")
        return cls(config, np_state, payload["step"], payload["optimizer"], payload["meta"], str(path))

    def check_fits(self, model: ModelConfig) -> None:
        """Fail naming the layer and tensor when the checkpoint was trained for another model."""
        if self.config.layers and self.config.layers[-1] >= model.num_layers:
            raise CheckpointError(
                f"{self.source}: converts layer {self.config.layers[-1]}, the model has {model.num_layers} layers"
            )
        for i, state in self.np_state.items():
            try:
                check_shapes(f"{self.source} (layer {i})", state, np_shapes(model, self.config))
            except ShardError as e:
                raise CheckpointError(str(e)) from None


def load_npt_block(
    model_dir: str | Path,
    config: ModelConfig,
    layer_index: int,
    npt_checkpoint: NPTCheckpoint | str | Path,
    dtype: torch.dtype = torch.float32,
) -> LlamaBlock:
    """The block of one layer for a pipeline stage: an NPT block with the checkpoint's NP
    weights when the checkpoint converts ``layer_index``, else the plain block. Pass a
    loaded ``NPTCheckpoint`` when building many layers, to read the file once. A layer the
    config converts but that has no NP state yet (a fresh run) gets the NP init."""
    ckpt = npt_checkpoint if isinstance(npt_checkpoint, NPTCheckpoint) else NPTCheckpoint.load(npt_checkpoint)
    if layer_index not in ckpt.config.layers:
        return LlamaBlock.from_shard(model_dir, config, layer_index, dtype)
    ckpt.check_fits(config)
    return LlamaNPTBlock.from_shard(
        model_dir, config, layer_index, dtype, npt=ckpt.config, np_state=ckpt.np_state.get(layer_index)
    )
