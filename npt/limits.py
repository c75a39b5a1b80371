"""Why an NPT layer falls short of its original layer, measured per layer.

The original layer outputs ``y = h + a + MLP(Norm(h + a))``; without its attention it would
output ``h + MLP(Norm(h))``. The difference ``t`` (the attention residual: what the attention
output ``a`` adds, directly and through the MLP) is what the NP update must supply, since
an NPT layer's only path from ``a`` to its output is the update of ``W_in`` at ``Norm(h)``.
Two properties of that update bound how much of ``t`` it can supply:

- it is even in ``a``: ``v_b (v_a . xn)`` is quadratic in ``a``, so ``a`` and ``-a`` give the
  same output, while ``t(a) - t(-a) = y(a) - y(-a)``. The odd part ``(y(a) - y(-a)) / 2`` is
  out of reach of any even function, whatever the rank; its share of t's energy says how much
  of ``t`` behaves that way (on data that holds ``a`` and never ``-a``, a quadratic in ``a``
  can still fit part of a linear term around a mean, so this is a measure, not a hard bound);
- to first order it moves the MLP output within ``J_t W_b``, one r-dimensional subspace of
  the hidden space per token (``J_t`` the MLP's Jacobian in its modulated input rows at that
  token, ``W_b`` the NP component's ``W_b_up``): the share of ``t`` outside that subspace is
  out of reach of these NP weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modules.llama_npt import LlamaNPTBlock
from npt.model import Residuals, ShardModel

#: Tokens per chunk of the per-token subspace projection (bounds its memory: tokens x ffn x r floats).
CHUNK_TOKENS = 32


def silu_derivative(g: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


def update_jacobian(block: LlamaNPTBlock, xn: torch.Tensor) -> torch.Tensor:
    """Per token (rows of ``xn``), the first-order change of the MLP output per unit of the
    NP code: ``W_down diag(d) W_b`` with ``d`` the derivative of ``silu(gate) * up`` in the
    modulated rows; (tokens, hidden, r)."""
    mlp, w_b = block.mlp, block.np.W_b_up.weight
    gate, up = mlp.gate_proj(xn), mlp.up_proj(xn)
    if block.np_target == "gate_up":
        w_gate, w_up = w_b.chunk(2, dim=0)
        rows = (silu_derivative(gate) * up)[:, :, None] * w_gate + F.silu(gate)[:, :, None] * w_up
    else:
        rows = (silu_derivative(gate) * up)[:, :, None] * w_b
    return mlp.down_proj.weight @ rows


def reachable_energy(block: LlamaNPTBlock, xn: torch.Tensor, t: torch.Tensor) -> float:
    """Sum over tokens of |t|^2 projected on that token's span of ``update_jacobian``."""
    total = 0.0
    for xn_part, t_part in zip(xn.split(CHUNK_TOKENS), t.split(CHUNK_TOKENS), strict=True):
        q = torch.linalg.qr(update_jacobian(block, xn_part)).Q  # (tokens, hidden, min(hidden, r))
        total += torch.einsum("nhr,nh->nr", q, t_part).pow(2).sum().item()
    return total


@torch.no_grad()
def attention_residual_limits(
    model: ShardModel, ids: torch.Tensor, cached: Residuals | None = None, max_tokens: int = 128
) -> dict[str, dict[str, float]]:
    """Per NPT layer, on the original input to it, as shares of summed squared norms:
    ``attention_share`` |t|^2 / |y - h|^2 (how much of the layer's change is the attention
    residual), ``odd_share`` |odd|^2 / (|odd|^2 + |even|^2) (t = odd + even in a),
    ``mean_share`` |mean a|^2 / mean |a|^2, ``rank_reach`` the share of |t|^2 inside the
    per-token first-order subspace (on the first ``max_tokens`` tokens), and ``reproduced``
    1 - |NPT output - y|^2 / |t|^2 (what the trained layer supplies; 0 is no better than
    dropping the attention, negative is worse)."""
    ctx, out = model.context(ids), {}
    for i, (x, y) in model.original_layer_io(ids, cached).items():
        block = model.blocks[i]
        a = block.self_attn(block.input_layernorm(x), ctx)
        t = y - (x + block.mlp(block.post_attention_layernorm(x)))
        flipped = x - a + block.mlp(block.post_attention_layernorm(x - a))
        npt_out = block.forward_with_np(x, ctx)[0]
        t_energy, odd = t.pow(2).sum().item(), (y - flipped) / 2
        flat_a = a.flatten(0, 1)
        flat_t, flat_x = t.flatten(0, 1)[:max_tokens], x.flatten(0, 1)[:max_tokens]
        reach = reachable_energy(block, block.post_attention_layernorm(flat_x), flat_t)
        out[str(i)] = {
            "attention_share": t_energy / (y - x).pow(2).sum().item(),
            "odd_share": odd.pow(2).sum().item() / (odd.pow(2).sum() + (t - odd).pow(2).sum()).item(),
            "mean_share": flat_a.mean(0).pow(2).sum().item() / flat_a.pow(2).sum(-1).mean().item(),
            "rank_reach": reach / flat_t.pow(2).sum().item(),
            "reproduced": 1 - (npt_out - y).pow(2).sum().item() / t_energy,
        }
    return out
