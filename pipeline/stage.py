"""One pipeline stage: its modules, and per micro-batch KV caches and positions.

A stage knows nothing of the schedule: it turns a micro-batch step's input (token ids on
the first stage, hidden states elsewhere) into its output (hidden states, or the greedy
token of each row's last position on the last stage)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from modules.llama import KVCache, LlamaEmbeddings, LlamaLMHead, StepContext, rope_inv_freq
from modules.registry import BlockSpec, build_block
from pipeline.plan import StagePlan


@dataclass
class MicroBatchState:
    """What a stage remembers about one micro-batch between its steps."""

    caches: list[KVCache]
    key_valid: torch.Tensor  # (B, cache_len) bool: slots holding real keys
    last_position: torch.Tensor  # (B,) rotary position of the last token seen
    cursor: int  # next free cache slot


class Stage(nn.Module):
    def __init__(
        self,
        plan: StagePlan,
        config: ModelConfig,
        blocks: list[nn.Module],
        embeddings: LlamaEmbeddings | None,
        head: LlamaLMHead | None,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.plan, self.config, self.dtype, self.device = plan, config, dtype, device
        self.blocks = nn.ModuleList(blocks)
        self.embeddings, self.head = embeddings, head
        self.inv_freq = rope_inv_freq(config).to(device)
        self.states: dict[int, MicroBatchState] = {}

    @property
    def input_is_tokens(self) -> bool:
        return self.embeddings is not None

    def _new_state(self, batch: int, cache_len: int) -> MicroBatchState:
        c = self.config
        caches = [KVCache(batch, c.num_kv_heads, cache_len, c.head_dim, self.dtype, self.device) for _ in self.blocks]
        key_valid = torch.zeros(batch, cache_len, dtype=torch.bool, device=self.device)
        last = torch.zeros(batch, dtype=torch.long, device=self.device)
        return MicroBatchState(caches, key_valid, last, 0)

    @torch.inference_mode()
    def forward(self, mb: int, x: torch.Tensor, real: torch.Tensor, cache_len: int | None = None) -> torch.Tensor:
        """Run one step of micro-batch ``mb``. ``real`` (B, T) marks real tokens. A prefill
        step (``cache_len`` given) starts the micro-batch: ``real`` is then the left-padding
        mask. A decode step (T = 1) continues it; ``real`` marks rows still generating."""
        if cache_len is not None:
            state = self.states[mb] = self._new_state(real.shape[0], cache_len)
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        else:
            state = self.states[mb]
            positions = state.last_position[:, None] + 1
        t = real.shape[1]
        start = state.cursor
        state.key_valid[:, start : start + t] = real if cache_len is not None else True
        state.last_position = positions[:, -1]
        state.cursor += t
        ctx = StepContext.build(self.inv_freq, positions, state.key_valid[:, : start + t], start, real, self.dtype)
        h = self.embeddings(x) if self.embeddings is not None else x
        for block, cache in zip(self.blocks, state.caches):
            h = block(h, ctx, cache)
        if self.head is None:
            return h
        return self.head(h[:, -1]).argmax(dim=-1)

    def release(self, mb: int) -> None:
        self.states.pop(mb, None)


def build_stage(
    plan: StagePlan, model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, options=None
) -> Stage:
    """Load only this stage's shard files: its layers, plus embeddings or head at the ends.
    ``options`` are the block type's typed options (see ``modules.registry``)."""
    blocks = [build_block(plan.model_type, BlockSpec(model_dir, config, i, dtype), options) for i in plan.layers]
    embeddings = LlamaEmbeddings.from_shard(model_dir, config, dtype) if plan.is_first else None
    head = LlamaLMHead.from_shard(model_dir, config, dtype) if plan.is_last else None
    return Stage(plan, config, blocks, embeddings, head, dtype, device).to(device)
