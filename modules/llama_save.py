"""Save mode: the plain Llama block's maths, plus recording what sparse predictors learn from.

Per layer and real token it records (DejaVu's names): ``att_x`` the layer input before
its norm, ``att_label`` each head's output L2 norm before ``o_proj``, ``mlp_x`` the
residual stream entering the MLP before its norm, ``mlp_label`` SiLU(gate) * up."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from modules.llama import KVCache, LlamaBlock, StepContext


class LlamaSaveBlock(LlamaBlock):
    compilable = False  # records through the host every step

    def __init__(self, config: ModelConfig, layer_index: int, recorder=None):
        super().__init__(config, layer_index)
        self.recorder = recorder  # anything with record(layer, rows, **arrays), e.g. ActivationCollector

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None = None) -> torch.Tensor:
        heads = self.self_attn.heads(self.input_layernorm(x), ctx, cache)
        h = x + self.self_attn.o_proj(heads.flatten(2))
        act = self.mlp.activation(self.post_attention_layernorm(h))
        self.recorder.record(
            self.layer_index,
            ctx.real_rows,
            att_x=x,
            att_label=heads.float().norm(dim=-1),
            mlp_x=h,
            mlp_label=act,
        )
        return h + self.mlp.down_proj(act)
