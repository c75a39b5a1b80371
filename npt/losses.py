"""The equivalence objective: fidelity to the original layer plus a small-update penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fidelity(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the NPT output and the original model's."""
    return F.mse_loss(output.float(), target.float())


def regularizer(v_a: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """|v_a|^2 + |v_b|^2, mean over tokens: keeps the per-token updates small and balances
    the scale that ``v_b v_a^T`` leaves free between its two factors."""
    return (v_a.float().pow(2).sum(-1) + v_b.float().pow(2).sum(-1)).mean()


def delta_norm(v_a: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """Per-token Frobenius norm of the rank-1 update, ||v_b v_a^T||_F = |v_b| |v_a|."""
    return v_a.float().norm(dim=-1) * v_b.float().norm(dim=-1)
