"""Sparse Llama block: the MLP computes only the units a selection keeps.

DejaVu masked the MLP's output after computing all of it, so it saved nothing. Here a
selection decides, per token, which work to skip, and decode steps (a few rows) really
skip it through ``modules.sparse_kernels``. Steps of many rows (a prefill) compute the
same selection as a masked dense product: their union of selections would be nearly
dense anyway, and the masked product gives every token exactly its own selection.

Three ways to select, at a target sparsity S (the fraction of the MLP's weights skipped):

* ``oracle``: the top (1 - S) units of |SiLU(gate) * up| per token, computed densely:
  the accuracy upper bound of unit selection, no speed-up by construction.
* ``predictor``: DejaVu's low-rank predictor of each layer, keeping the top (1 - S)
  units by logit; its cost is part of every step.
* ``teal``: training-free magnitude thresholds (TEAL, Liu et al. 2024): input channels
  of gate/up with |x| below one threshold and units with |SiLU(gate) * up| below another
  are skipped; thresholds are calibrated per layer for S.

Selections are plain tensors and small modules handed in by the caller; nothing here
knows how predictors are trained or thresholds calibrated."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from modules.llama import KVCache, LlamaBlock, LlamaMLP, StepContext
from modules.sparse_kernels import thresholded_matmul, unit_mlp

SPARSE_MODES = ("oracle", "predictor", "teal")

#: Steps with more rows than this run as a masked dense product (see the module doc).
MAX_GATHERED_ROWS = 16


def kept_units(width: int, sparsity: float) -> int:
    """Units kept per token at a sparsity: ``sparsity * width`` dropped, rounded half up
    (never Python's half-to-even), the rest kept by score."""
    return width - math.floor(sparsity * width + 0.5)


def check_sparsity(value: float, flag: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{flag} must be in [0, 1), got {value}")
    return value


class SparsityMeter:
    """Running mean of the fraction of MLP weights skipped per token. A tensor sum stays a
    tensor (on its device: no host sync per step) until ``mean`` is read."""

    def __init__(self):
        self.skipped: torch.Tensor | float = 0.0
        self.tokens = 0

    def add(self, skipped: torch.Tensor | float, tokens: int) -> None:
        """``skipped``: the fractions of ``tokens`` tokens, summed."""
        self.skipped = self.skipped + skipped
        self.tokens += tokens

    @property
    def mean(self) -> float:
        return float(self.skipped) / self.tokens if self.tokens else 0.0


def _union(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The units any row kept, and for each row which of those it kept itself."""
    idx = mask.any(dim=0).nonzero().squeeze(1)
    return idx, mask[:, idx]


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, F) bool: each row's ``k`` highest scores."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(k, dim=1, sorted=False).indices, True)


class SparseMLP(nn.Module):
    """Base of the selections: the meter of skipped weights. ``forward(x, x_layer)`` takes
    the MLP input (normalized) and the layer's normalized input (what a lookahead
    predictor reads), both (..., hidden); ``compute`` sees them as (N, hidden) rows."""

    def __init__(self, sparsity: float):
        super().__init__()
        check_sparsity(sparsity, "--mlp-sparsity")
        self.meter = SparsityMeter()

    def forward(self, x: torch.Tensor, x_layer: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        return self.compute(x.reshape(-1, width), x_layer.reshape(-1, width)).view(x.shape)

    def compute(self, x: torch.Tensor, x_layer: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseMLP(SparseMLP):
    """Sparsity 0: the plain MLP itself, so every mode then gives the plain block's numbers."""

    def __init__(self, mlp: LlamaMLP):
        super().__init__(0.0)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, x_layer: torch.Tensor) -> torch.Tensor:
        self.meter.add(0.0, x[..., 0].numel())
        return self.mlp(x)


class OracleMLP(SparseMLP):
    """The true top units of |SiLU(gate) * up|, from a dense computation."""

    def __init__(self, mlp: LlamaMLP, sparsity: float):
        super().__init__(sparsity)
        self.mlp = mlp
        self.k = kept_units(mlp.up_proj.out_features, sparsity)

    def compute(self, x: torch.Tensor, x_layer: torch.Tensor) -> torch.Tensor:
        act = self.mlp.activation(x)
        self.meter.add((1 - self.k / act.shape[-1]) * len(x), len(x))
        return self.mlp.down_proj(act * _top_mask(act.abs(), self.k))


def _unit_rows(mlp: LlamaMLP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate (F, H), up (F, H) and down transposed (F, H): a unit's weights are three rows."""
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach().t().contiguous()


class PredictedMLP(SparseMLP):
    """Units chosen by a low-rank predictor's logits, from the MLP input or, with
    ``lookahead``, from the layer input (before attention has run)."""

    def __init__(self, mlp: LlamaMLP, sparsity: float, predictor: nn.Module, lookahead: bool):
        super().__init__(sparsity)
        gate, up, down_t = _unit_rows(mlp)
        self.register_buffer("gate", gate, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("down_t", down_t, persistent=False)
        self.k = kept_units(gate.shape[0], sparsity)
        self.register_buffer("keep_all", torch.ones(1, self.k, dtype=torch.bool), persistent=False)
        self.predictor, self.lookahead = predictor, lookahead

    def compute(self, x: torch.Tensor, x_layer: torch.Tensor) -> torch.Tensor:
        self.meter.add((1 - self.k / self.gate.shape[0]) * len(x), len(x))
        logits = self.predictor(x_layer if self.lookahead else x)
        if x.shape[0] == 1:  # one row: its own units, sorted for a forward walk through memory
            idx = logits[0].topk(self.k, sorted=False).indices.sort().values
            return unit_mlp(x, self.gate, self.up, self.down_t, idx, self.keep_all)
        mask = _top_mask(logits, self.k)
        if x.shape[0] <= MAX_GATHERED_ROWS:
            return unit_mlp(x, self.gate, self.up, self.down_t, *_union(mask))
        act = F.silu(F.linear(x, self.gate)) * F.linear(x, self.up)
        return (act * mask) @ self.down_t


class TealMLP(SparseMLP):
    """TEAL: skip gate/up input channels with |x| <= ``input_threshold`` and units with
    |SiLU(gate) * up| <= ``act_threshold``."""

    def __init__(self, mlp: LlamaMLP, sparsity: float, input_threshold: float, act_threshold: float):
        super().__init__(sparsity)
        gate, up, down_t = _unit_rows(mlp)
        # Skipping an input channel skips a column of gate and of up: store them as rows.
        self.register_buffer("gate_up_t", torch.cat([gate, up]).t().contiguous(), persistent=False)
        self.register_buffer("down_t", down_t, persistent=False)
        self.input_threshold, self.act_threshold = input_threshold, act_threshold

    def compute(self, x: torch.Tensor, x_layer: torch.Tensor) -> torch.Tensor:
        hidden, width = self.gate_up_t.shape[0], self.down_t.shape[0]
        gathered = x.shape[0] <= MAX_GATHERED_ROWS
        gate_up, skipped_inputs = thresholded_matmul(x, self.gate_up_t, self.input_threshold, gathered)
        gate, up = gate_up.split(width, dim=-1)
        out, skipped_units = thresholded_matmul(F.silu(gate) * up, self.down_t, self.act_threshold, gathered)
        self.meter.add((skipped_inputs.sum() / hidden * (2 / 3) + skipped_units.sum() / width / 3), len(x))
        return out


@dataclass
class LayerPredictor:
    """One layer's MLP predictor; a ``lookahead`` one reads the layer input, not the MLP's."""

    net: nn.Module
    lookahead: bool


@dataclass
class SparseSettings:
    """How a stage's sparse blocks select: the mode, the MLP sparsity and, per layer, the
    predictor (``predictor`` mode) or the (input, activation) thresholds (``teal`` mode)."""

    mode: str
    mlp_sparsity: float
    predictors: dict[int, LayerPredictor] = field(default_factory=dict)
    thresholds: dict[int, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in SPARSE_MODES:
            raise ValueError(f"unknown sparse mode {self.mode!r}; known: {', '.join(SPARSE_MODES)}")
        check_sparsity(self.mlp_sparsity, "--mlp-sparsity")

    def mlp_for(self, layer: int, mlp: LlamaMLP) -> SparseMLP:
        if self.mlp_sparsity == 0:
            return DenseMLP(mlp)
        if self.mode == "oracle":
            return OracleMLP(mlp, self.mlp_sparsity)
        if self.mode == "teal":
            return TealMLP(mlp, self.mlp_sparsity, *self.thresholds[layer])
        predictor = self.predictors[layer]
        net = predictor.net.to(mlp.gate_proj.weight.dtype)
        return PredictedMLP(mlp, self.mlp_sparsity, net, predictor.lookahead)


class LlamaSparseBlock(LlamaBlock):
    """The plain block with its MLP computed by a ``SparseMLP``."""

    compilable = False  # selections index by data-dependent sizes

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__(config, layer_index)
        self.sparse_mlp: SparseMLP | None = None

    @classmethod
    def from_block(cls, block: LlamaBlock, config: ModelConfig, settings: SparseSettings) -> LlamaSparseBlock:
        """A sparse block over a loaded plain block's modules (shared, not copied), so one
        loaded model serves every mode and sparsity of an evaluation."""
        with torch.device("meta"):  # placeholders, replaced by the plain block's modules
            sparse = cls(config, block.layer_index)
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            setattr(sparse, name, getattr(block, name))
        sparse.use(settings.mlp_for(block.layer_index, block.mlp))
        return sparse

    def packable_parts(self) -> list[nn.Module]:
        return [self.self_attn]  # the sparse MLPs slice the dense MLP's weights

    def use(self, sparse_mlp: SparseMLP) -> None:
        """Compute the MLP with ``sparse_mlp``; drop the dense weights unless it reads them."""
        self.sparse_mlp = sparse_mlp
        if not any(m is self.mlp for m in sparse_mlp.modules()):
            self.mlp = None

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None = None) -> torch.Tensor:
        x_layer = self.input_layernorm(x)
        h = x + self.self_attn(x_layer, ctx, cache)
        return h + self.sparse_mlp(self.post_attention_layernorm(h), x_layer)
