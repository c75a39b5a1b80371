"""What a predictor is for one layer: its input, its targets, and DejaVu's low-rank net.

The net sees the residual stream normalized exactly as the layer normalizes it before
the projections it predicts (RMSNorm with the layer's own weight), so it learns the
layer's selection rule rather than the norm's rescaling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from engine.shards import load_shard
from modules.llama import RMSNorm
from sparse_predictor.labels import above_threshold, top_k

KINDS = ("mlp", "att")


@dataclass(frozen=True)
class Task:
    """One predictor's data and targets. MLP: active = |SiLU(gate)*up| > ``threshold``;
    attention: active = the ``keep`` heads with the largest output norm."""

    kind: str
    x_stem: str
    label_stem: str
    norm_key: str
    threshold: float | None = None
    keep: int | None = None

    @classmethod
    def mlp(cls, threshold: float, lookahead: bool) -> Task:
        if lookahead:  # predict the MLP from the layer input, before attention has run
            return cls("mlp", "att_x", "mlp_label", "input_layernorm.weight", threshold=threshold)
        return cls("mlp", "mlp_x", "mlp_label", "post_attention_layernorm.weight", threshold=threshold)

    @classmethod
    def att(cls, keep: int) -> Task:
        return cls("att", "att_x", "att_label", "input_layernorm.weight", keep=keep)

    def target(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return above_threshold(y, self.threshold)
        return top_k(y, self.keep)


def low_rank_predictor(in_features: int, rank: int, out_features: int) -> nn.Sequential:
    """DejaVu's predictor: two bias-free linear maps through a rank-``rank`` bottleneck
    (state-dict keys ``0.weight``, ``1.weight`` as in DejaVu's checkpoints)."""
    return nn.Sequential(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=False))


def layer_norm(model_dir: str | Path, layer: int, key: str, config: ModelConfig) -> RMSNorm:
    """The RMSNorm the layer applies to the predictor's input, from the layer's shard."""
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    weight = load_shard(model_dir, layer, config)[key]
    norm.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    return norm
