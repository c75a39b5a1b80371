"""A whole model in one process, from its shard directory: embeddings -> blocks -> LM head
over full sequences, causal, without a KV cache. Equivalence training and perplexity need
exactly this; generation and multi-process runs go through the pipeline instead."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from modules.llama import LlamaEmbeddings, LlamaLMHead, StepContext, rope_inv_freq
from modules.llama_npt import LlamaNPTBlock
from modules.npt_checkpoint import NPTCheckpoint, load_npt_block

#: Per NPT layer, the (v_a, v_b) of one forward pass.
NPVectors = dict[int, tuple[torch.Tensor, torch.Tensor]]

#: The original model's residual stream over a batch: key i is the input to layer i, key
#: ``num_layers`` the output of the last layer (before the final norm).
Residuals = dict[int, torch.Tensor]


class ShardModel(nn.Module):
    """The base model with the checkpoint's layers as NPT blocks. ``plastic=False`` runs
    those blocks as the original layers, so one set of weights gives both models."""

    def __init__(self, config: ModelConfig, embeddings: LlamaEmbeddings, blocks: list[nn.Module], head: LlamaLMHead):
        super().__init__()
        self.config = config
        self.embeddings, self.blocks, self.head = embeddings, nn.ModuleList(blocks), head
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @classmethod
    def load(cls, model_dir: str | Path, npt: NPTCheckpoint, dtype: torch.dtype = torch.float32) -> ShardModel:
        config = ModelConfig.from_model_dir(model_dir)
        npt.check_fits(config)
        blocks = [load_npt_block(model_dir, config, i, npt, dtype) for i in range(config.num_layers)]
        embeddings = LlamaEmbeddings.from_shard(model_dir, config, dtype)
        return cls(config, embeddings, blocks, LlamaLMHead.from_shard(model_dir, config, dtype))

    @property
    def npt_blocks(self) -> dict[int, LlamaNPTBlock]:
        return {i: b for i, b in enumerate(self.blocks) if isinstance(b, LlamaNPTBlock)}

    def context(self, ids: torch.Tensor) -> StepContext:
        """Causal attention over unpadded sequences starting at position 0."""
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t)
        every = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        return StepContext.build(self.inv_freq, positions, every, 0, every, self.embeddings.embed_tokens.weight.dtype)

    def start(self, ids: torch.Tensor, plastic: bool, cached: Residuals | None) -> tuple[int, torch.Tensor]:
        """Where a forward pass may begin: the highest cached layer below which every block
        runs as in the original model (below the first NPT layer when plastic, anywhere when
        not), else the embeddings at layer 0."""
        limit = min(self.npt_blocks, default=self.config.num_layers) if plastic else self.config.num_layers
        usable = [i for i in (cached or {}) if i <= limit]
        if not usable:
            return 0, self.embeddings(ids)
        return max(usable), cached[max(usable)]

    def hidden_states(
        self, ids: torch.Tensor, plastic: bool = True, cached: Residuals | None = None
    ) -> tuple[torch.Tensor, NPVectors]:
        """Last hidden states (before the LM head) and, when plastic, each NPT layer's v_a, v_b.
        ``cached`` (the original residual stream of these ``ids``) skips the layers it covers."""
        ctx, vectors = self.context(ids), {}
        start, x = self.start(ids, plastic, cached)
        for i in range(start, self.config.num_layers):
            block = self.blocks[i]
            if not isinstance(block, LlamaNPTBlock):
                x = block(x, ctx)
            elif plastic:
                x, v_a, v_b = block.forward_with_np(x, ctx)
                vectors[i] = (v_a, v_b)
            else:
                x = block.base_forward(x, ctx)
        return x, vectors

    def original_layer_io(
        self, ids: torch.Tensor, cached: Residuals | None = None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Input and output of each NPT layer in the original model: the equivalence targets.
        Stops after the last NPT layer, since nothing above it is needed; a layer whose
        output is in ``cached`` is not run."""
        ctx, io = self.context(ids), {}
        start, x = self.start(ids, True, cached)
        for i in range(start, max(self.npt_blocks, default=-1) + 1):
            block = self.blocks[i]
            if cached is not None and i + 1 in cached:
                y = cached[i + 1]
            else:
                y = block.base_forward(x, ctx) if isinstance(block, LlamaNPTBlock) else block(x, ctx)
            if isinstance(block, LlamaNPTBlock):
                io[i] = (x, y)
            x = y
        return io

    @torch.no_grad()
    def residual_stream(self, ids: torch.Tensor, layers: tuple[int, ...]) -> Residuals:
        """The original model's residual stream entering each of ``layers`` (``num_layers``:
        leaving the last layer), for caching."""
        ctx, x, out = self.context(ids), self.embeddings(ids), {}
        for i in range(max(layers) + 1):
            if i in layers:
                out[i] = x
            if i < self.config.num_layers:
                block = self.blocks[i]
                x = block.base_forward(x, ctx) if isinstance(block, LlamaNPTBlock) else block(x, ctx)
        return out
