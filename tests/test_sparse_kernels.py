"""Selected-unit MLP maths against HF's LlamaMLP with the same units zeroed, and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP as HFLlamaMLP

from engine.config import ModelConfig
from modules.llama import LlamaMLP
from modules.llama_sparse import MAX_GATHERED_ROWS, OracleMLP, PredictedMLP, TealMLP, kept_units
from modules.sparse_kernels import thresholded_matmul, unit_mlp

HIDDEN, FFN = 48, 160


def hf_mlp(dtype: torch.dtype, seed: int = 0) -> HFLlamaMLP:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=4)
    mlp = HFLlamaMLP(config).to(dtype)
    return mlp.eval().requires_grad_(False)


def zeroed_copy(mlp: HFLlamaMLP, units: torch.Tensor) -> HFLlamaMLP:
    """HF's MLP with every unit outside ``units`` removed: its gate/up rows and down column zeroed."""
    copy = hf_mlp(mlp.gate_proj.weight.dtype)
    copy.load_state_dict(mlp.state_dict())
    dropped = torch.ones(FFN, dtype=torch.bool)
    dropped[units] = False
    copy.gate_proj.weight[dropped] = 0
    copy.up_proj.weight[dropped] = 0
    copy.down_proj.weight[:, dropped] = 0
    return copy


def ours(mlp: HFLlamaMLP) -> LlamaMLP:
    """The engine's MLP holding HF's weights."""
    config = ModelConfig(vocab_size=8, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=1, num_heads=1,
                         num_kv_heads=1, head_dim=HIDDEN)  # fmt: skip
    module = LlamaMLP(config).to(mlp.gate_proj.weight.dtype)
    module.load_state_dict(mlp.state_dict())
    return module.requires_grad_(False)


# float32 takes the compiled kernels, float64 the torch fallback: both must be right.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 5])
def test_unit_mlp_equals_hf_mlp_with_other_units_zeroed(dtype, rows):
    mlp = hf_mlp(dtype)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, HIDDEN, generator=gen, dtype=dtype)
    own = [torch.randperm(FFN, generator=gen)[: 40 + 7 * r] for r in range(rows)]  # each row its own units
    union = torch.unique(torch.cat(own))
    keep = torch.stack([torch.isin(union, units) for units in own])
    down_t = mlp.down_proj.weight.t().contiguous()
    got = unit_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, down_t, union, keep)
    for r in range(rows):
        want = zeroed_copy(mlp, own[r])(x[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, gathered", [(torch.float32, True), (torch.float64, True), (torch.float32, False)])
def test_thresholded_matmul_equals_numpy(dtype, gathered):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(30, 70, generator=gen, dtype=dtype)
    v = torch.randn(3, 30, generator=gen, dtype=dtype)
    v[:, :10] = 0.01  # rows of w no row needs
    v[1, 12] = 0.2  # below the threshold in one row only
    v[0, 12] = 3.0
    out, skipped = thresholded_matmul(v, w, 0.5, gathered)
    kept = np.abs(v.double().numpy()) > 0.5
    want = np.where(kept, v.double().numpy(), 0) @ w.double().numpy()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    assert skipped.tolist() == (~kept).sum(axis=1).tolist()


def silu(a: np.ndarray) -> np.ndarray:
    return a / (1 + np.exp(-a))


def numpy_weights(mlp: HFLlamaMLP) -> tuple[np.ndarray, ...]:
    return tuple(m.weight.double().numpy() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))


@pytest.mark.parametrize("rows", [1, 3, MAX_GATHERED_ROWS + 4])  # one row, a union, a masked dense step
def test_oracle_keeps_each_tokens_top_units(rows):
    mlp = hf_mlp(torch.float32)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(7))
    sparsity = 0.6
    got = OracleMLP(ours(mlp), sparsity).compute(x, x)
    gate, up, down = numpy_weights(mlp)
    act = silu(x.double().numpy() @ gate.T) * (x.double().numpy() @ up.T)
    k = kept_units(FFN, sparsity)
    assert k == 64
    top = np.argsort(-np.abs(act), axis=1)[:, :k]
    masked = np.zeros_like(act)
    np.put_along_axis(masked, top, np.take_along_axis(act, top, axis=1), axis=1)
    np.testing.assert_allclose(got.numpy(), masked @ down.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, MAX_GATHERED_ROWS + 4])
def test_predicted_mlp_keeps_the_predictors_top_units(rows):
    mlp = hf_mlp(torch.float32)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(rows, HIDDEN, generator=gen)
    x_layer = torch.randn(rows, HIDDEN, generator=gen)
    net = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 8, bias=False), torch.nn.Linear(8, FFN, bias=False))
    sparsity = 0.75
    for lookahead, source in ((False, x), (True, x_layer)):
        got = PredictedMLP(ours(mlp), sparsity, net.requires_grad_(False), lookahead).compute(x, x_layer)
        logits = source.double().numpy() @ net[0].weight.double().numpy().T @ net[1].weight.double().numpy().T
        top = np.argsort(-logits, axis=1)[:, : kept_units(FFN, sparsity)]
        for r in range(rows):
            want = zeroed_copy(mlp, torch.from_numpy(top[r]))(x[r : r + 1])
            torch.testing.assert_close(got[r : r + 1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, MAX_GATHERED_ROWS + 4])
def test_teal_skips_small_inputs_and_activations(rows):
    mlp = hf_mlp(torch.float32)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(5))
    t_in, t_act = 0.5, 0.02
    teal = TealMLP(ours(mlp), 0.5, t_in, t_act)
    got = teal.compute(x, x)
    gate, up, down = numpy_weights(mlp)
    xs = x.double().numpy()
    xs = np.where(np.abs(xs) > t_in, xs, 0)
    act = silu(xs @ gate.T) * (xs @ up.T)
    act = np.where(np.abs(act) > t_act, act, 0)
    np.testing.assert_allclose(got.numpy(), act @ down.T, rtol=1e-4, atol=1e-5)
    skipped = (xs == 0).mean(axis=1) * 2 / 3 + (act == 0).mean(axis=1) / 3
    assert teal.meter.mean == pytest.approx(skipped.mean())
    assert 0.2 < teal.meter.mean < 0.9  # the thresholds really skip work here
