"""Neuro-Plastic Transformer (NPT) block: the attention output modulates the MLP instead of
being added to the residual stream.

A plain Llama layer computes ``h + a + MLP(Norm(h + a))`` with ``a = Attn(Norm(h))``. An
NPT layer turns ``a`` into two vectors per token, ``v_a`` (hidden) and ``v_b`` (ffn), and
runs the MLP with a per-token rank-1 update of its input projection ``W_in``,
``W_in + v_b v_a^T``, on ``Norm(h)``: ``a`` reaches the residual stream only through that
update. The update is never materialized: ``(W_in + v_b v_a^T) xn = W_in xn + v_b (v_a . xn)``.

Seed 003 modulates "W_in" of a GELU MLP; a SwiGLU MLP has two input projections, so
``NPTConfig.np_target`` picks the reading: ``gate`` (W_in = W_gate, v_b has ffn entries) or
``gate_up`` (W_in = [W_gate; W_up] stacked, v_b has 2 ffn entries: one update for both)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.shards import load_shard
from modules.llama import KVCache, LlamaBlock, StepContext

#: Prefix of the NP parameters inside an NPT block's state dict.
NP_PREFIX = "np."

#: The readings of seed 003's "W_in" in a SwiGLU MLP: which input projections the update modulates.
NP_TARGETS = ("gate", "gate_up")

#: Named layer selections accepted by ``parse_convert_layers`` (and ``lastK``: the last K layers).
LAYER_PRESETS = ("all", "upper_half", "lower_half")


@dataclass(frozen=True)
class NPTConfig:
    """Which layers are neuro-plastic, and the shape, init and target of their NP components."""

    np_rank: int = 64
    np_init_scale: float = 0.01
    layers: tuple[int, ...] = ()
    np_target: str = "gate"

    def __post_init__(self) -> None:
        if self.np_target not in NP_TARGETS:
            raise ValueError(f"np_target must be one of {', '.join(NP_TARGETS)}, got {self.np_target!r}")
        if self.np_rank < 1:
            raise ValueError(f"np_rank must be positive, got {self.np_rank}")
        if self.np_init_scale < 0:
            raise ValueError(f"np_init_scale must be non-negative, got {self.np_init_scale}")
        object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    def to_dict(self) -> dict:
        return {
            "np_rank": self.np_rank,
            "np_init_scale": self.np_init_scale,
            "layers": list(self.layers),
            "np_target": self.np_target,
        }

    @classmethod
    def from_dict(cls, d: dict) -> NPTConfig:
        """Checkpoints written before ``np_target`` existed modulate the gate alone."""
        layers = tuple(int(i) for i in d["layers"])
        return cls(int(d["np_rank"]), float(d["np_init_scale"]), layers, d.get("np_target", "gate"))

    def update_size(self, ffn_size: int) -> int:
        """Entries of ``v_b``: the rows of the modulated ``W_in``."""
        return 2 * ffn_size if self.np_target == "gate_up" else ffn_size


def parse_convert_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """``all``, ``upper_half`` (layers n//2 .. n-1), ``lower_half`` (0 .. n//2-1), ``lastK``
    (the last K layers), a half-open range ``a:b`` (either end may be left out) or a list
    ``1,5,7``."""
    spec = spec.strip()
    half = num_layers // 2
    presets = {"all": range(num_layers), "upper_half": range(half, num_layers), "lower_half": range(half)}
    if spec in presets:
        layers = tuple(presets[spec])
    elif spec.startswith("last") and spec[4:].isdigit():
        if not 0 < int(spec[4:]) <= num_layers:
            raise ValueError(f"--convert-layers {spec!r}: the model has {num_layers} layers")
        layers = tuple(range(num_layers - int(spec[4:]), num_layers))
    elif ":" in spec:
        start, _, stop = spec.partition(":")
        try:
            a, b = int(start or 0), int(stop or num_layers)
        except ValueError:
            raise ValueError(f"--convert-layers {spec!r}: a range is a:b with integers") from None
        if not 0 <= a < b <= num_layers:
            raise ValueError(f"--convert-layers {spec!r}: need 0 <= a < b <= {num_layers}")
        layers = tuple(range(a, b))
    else:
        try:
            layers = tuple(sorted({int(part) for part in spec.split(",")}))
        except ValueError:
            raise ValueError(
                f"--convert-layers {spec!r}: expected one of {', '.join(LAYER_PRESETS)}, lastK, a:b, "
                "or a list like 1,5,7"
            ) from None
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"--convert-layers {spec!r}: layers {bad} outside 0..{num_layers - 1}")
    if not layers:
        raise ValueError(f"--convert-layers {spec!r} selects no layer of {num_layers}")
    return layers


class NPComponent(nn.Module):
    """Maps the attention output ``a`` to ``v_a = W_a_up W_down a`` and ``v_b = W_b_up W_down a``
    (``update_size`` entries: the rows of the modulated ``W_in``).

    Init (why): the update ``v_b (v_a . xn)`` is quadratic in ``a``, so no init makes it
    reproduce the attention residual from the start; what the init can do is keep the
    block close to the original MLP and leave every matrix a useful gradient. ``W_down``
    ~ N(0, 1/hidden) keeps the code at the scale of ``a``; ``W_a_up`` ~ N(0, 1/(r hidden))
    makes ``v_a . xn`` of the order of |a|rms * |xn|rms; ``W_b_up`` ~ N(0, s^2/r) with
    ``s = np_init_scale`` makes the gate update start at about ``s`` times that. At
    ``s = 0.01`` the block starts as the original layer without its attention residual
    (plus a 1% perturbation of the gate), and equivalence training grows the update from
    there; ``s = 0`` starts it exactly there, LoRA-style."""

    def __init__(self, hidden_size: int, update_size: int, rank: int, init_scale: float):
        super().__init__()
        self.W_down = nn.Linear(hidden_size, rank, bias=False)
        self.W_a_up = nn.Linear(rank, hidden_size, bias=False)
        self.W_b_up = nn.Linear(rank, update_size, bias=False)
        with torch.no_grad():
            self.W_down.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size))
            self.W_a_up.weight.normal_(0.0, 1.0 / math.sqrt(rank * hidden_size))
            self.W_b_up.weight.normal_(0.0, init_scale / math.sqrt(rank))

    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.W_down(a)
        return self.W_a_up(z), self.W_b_up(z)


class LlamaNPTBlock(LlamaBlock):
    """out = h + down(silu(W_gate xn + v_b (v_a . xn)) * up(xn)), xn = Norm_post(h), where
    (v_a, v_b) = NP(Attn(Norm_in(h))); with ``np_target="gate_up"`` v_b = [v_g; v_u] and the
    up projection becomes ``W_up xn + v_u (v_a . xn)`` too. Norm_post sees the block input
    ``h``, not ``h + a``. The base weights and their shard keys are the plain block's;
    ``np.*`` holds the rest."""

    def __init__(self, config: ModelConfig, layer_index: int, npt: NPTConfig):
        super().__init__(config, layer_index)
        update_size = npt.update_size(config.intermediate_size)
        self.np = NPComponent(config.hidden_size, update_size, npt.np_rank, npt.np_init_scale)
        self.np_target = npt.np_target

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None = None) -> torch.Tensor:
        return self.forward_with_np(x, ctx, cache)[0]

    def forward_with_np(
        self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block output plus ``v_a`` and ``v_b``, which the equivalence loss regularizes."""
        v_a, v_b = self.np(self.self_attn(self.input_layernorm(x), ctx, cache))
        xn = self.post_attention_layernorm(x)
        mlp = self.mlp
        update = v_b * (v_a * xn).sum(-1, keepdim=True)
        if self.np_target == "gate_up":
            update_gate, update_up = update.chunk(2, dim=-1)
            gate, up = mlp.gate_proj(xn) + update_gate, mlp.up_proj(xn) + update_up
        else:
            gate, up = mlp.gate_proj(xn) + update, mlp.up_proj(xn)
        return x + mlp.down_proj(F.silu(gate) * up), v_a, v_b

    def base_forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None = None) -> torch.Tensor:
        """The original layer on the same weights: the target of equivalence training."""
        return super().forward(x, ctx, cache)

    @classmethod
    def from_shard(
        cls,
        model_dir: str | Path,
        config: ModelConfig,
        layer_index: int,
        dtype: torch.dtype = torch.float32,
        *,
        npt: NPTConfig,
        np_state: dict[str, torch.Tensor] | None = None,
    ) -> LlamaNPTBlock:
        """Base weights from the shard, NP weights from ``np_state`` (keys as in
        ``NPComponent``) or, when it is None (a fresh run), from the NP init."""
        if np_state is None:
            update_size = npt.update_size(config.intermediate_size)
            np_state = NPComponent(config.hidden_size, update_size, npt.np_rank, npt.np_init_scale).state_dict()
        with torch.device("meta"):  # no random base init: every base weight comes from the shard
            block = cls(config, layer_index, npt)
        tensors = load_shard(model_dir, layer_index, config)
        block.load_tensors({**tensors, **{NP_PREFIX + k: t for k, t in np_state.items()}})
        return block.to(dtype)


def np_shapes(config: ModelConfig, npt: NPTConfig) -> dict[str, tuple[int, ...]]:
    """The NP tensors of one layer with their shapes, to check a checkpoint against a model."""
    h, rank, update = config.hidden_size, npt.np_rank, npt.update_size(config.intermediate_size)
    return {"W_down.weight": (rank, h), "W_a_up.weight": (h, rank), "W_b_up.weight": (update, rank)}


def freeze_all_but_np(module: nn.Module) -> list[nn.Parameter]:
    """Freeze every base weight under ``module``; return the NP parameters, left trainable,
    in a fixed order (layer by layer) so optimizer state maps back on resume."""
    for p in module.parameters():
        p.requires_grad_(False)
    trainable = [p for m in module.modules() if isinstance(m, NPComponent) for p in m.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    return trainable
