"""The NPT study end to end on the tiny model (--quick), one of its perplexities recomputed
with HF's LlamaForCausalLM and the NP update applied by hand in hooks, and the limits'
per-token subspace against autograd's Jacobian. (The gate_up reading of W_in is tested
against a materialized per-token update in test_npt.py.)"""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from test_npt import LAYER, randomize_np
from test_npt_train import SENTENCES, hf_perplexity

from engine.config import ModelConfig
from engine.tokenizer import load_tokenizer
from modules.llama_npt import LlamaNPTBlock, NPTConfig
from modules.npt_checkpoint import NPTCheckpoint
from npt.data import load_windows
from npt.limits import attention_residual_limits, update_jacobian
from npt.model import ShardModel
from npt.study import LOW_LR
from npt.study import main as study_main

SEQ_LEN = 16


@pytest.fixture(scope="module")
def study_dir(tiny_shard_dir, tmp_path_factory):
    """One --quick study, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("npt_study")
    train, val = root / "train.jsonl", root / "val.jsonl"
    lines = [json.dumps({"prompt": f"{s} {SENTENCES[(i + 3) % 8]}"}) for i, s in enumerate(SENTENCES * 4)]
    train.write_text("\n".join(lines) + "\n")
    val.write_text("\n".join(lines[:6]) + "\n")
    argv = ["--model-name", str(tiny_shard_dir), "--out", str(root / "out"), "--data", str(train)]
    argv += ["--val-data", str(val), "--seq-len", str(SEQ_LEN), "--quick", "--copy-to", str(root / "copy")]
    assert study_main(argv) == 0
    return root, argv


def test_quick_study_writes_every_point_and_a_rerun_trains_nothing(study_dir, monkeypatch):
    root, argv = study_dir
    result = json.loads((root / "out" / "study.json").read_text())
    # Four configurations at ranks 4 and 8 (gate), the gate_up reading at rank 4 and rank 8
    # at the low learning rate: each end to end on last1 and on upper_half (1 + 1 point),
    # and layer-wise on upper_half, evaluated on last1 and upper_half (2 points).
    assert len(result["points"]) == 4 * (1 + 1 + 2)
    assert {p["lr"] for p in result["points"]} == {1e-3, LOW_LR}
    assert {p["mode"] for p in result["points"]} == {"layerwise", "end-to-end"}
    assert all(p["ppl_ratio"] > 0 and p["np_parameters"] > 0 for p in result["points"])
    layerwise = ("gate-r4-upper_half", "gate-r8-upper_half", "gate_up-r4-upper_half", "gate-r8-upper_half-lr0.0003")
    assert set(result["limits"]) == {f"layerwise-{name}" for name in layerwise}
    for name in ("study.json", "frontier.png", "limits.png"):
        assert (root / "copy" / name).stat().st_size > 0

    import npt.study

    monkeypatch.setattr(npt.study, "EquivalenceTrainer", None)  # a rerun must not build a trainer
    assert study_main(argv) == 0
    assert json.loads((root / "out" / "study.json").read_text())["points"] == result["points"]


def hf_npt_hooks(hf_model, layer: int, np_state: dict[str, torch.Tensor]):
    """Make HF's decoder layer ``layer`` an NPT layer by hand: its output becomes
    h + down(silu(gate(xn) + v_b (v_a . xn)) * up(xn)), xn = post-norm(h), from its own
    attention output a, with v_a = A D a and v_b = B D a."""
    seen = {}
    hf_layer = hf_model.model.layers[layer]
    w_d, w_a, w_b = np_state["W_down.weight"], np_state["W_a_up.weight"], np_state["W_b_up.weight"]

    def on_input(module, args, kwargs):
        seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def on_attention(module, args, out):
        seen["a"] = out[0] if isinstance(out, tuple) else out

    def on_output(module, args, kwargs, out):
        h, a = seen["h"], seen["a"]
        z = a @ w_d.T
        v_a, v_b = z @ w_a.T, z @ w_b.T
        xn = module.post_attention_layernorm(h)
        gate = module.mlp.gate_proj(xn) + v_b * (v_a * xn).sum(-1, keepdim=True)
        new = h + module.mlp.down_proj(F.silu(gate) * module.mlp.up_proj(xn))
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return [
        hf_layer.register_forward_pre_hook(on_input, with_kwargs=True),
        hf_layer.self_attn.register_forward_hook(on_attention),
        hf_layer.register_forward_hook(on_output, with_kwargs=True),
    ]


def test_a_frontier_perplexity_equals_hf_with_the_update_applied_by_hand(
    study_dir, tiny_shard_dir, tiny_hf_dir, tiny_model
):
    root, _ = study_dir
    hf_model, _ = tiny_model
    result = json.loads((root / "out" / "study.json").read_text())
    point = next(p for p in result["points"] if p["run"] == "end-to-end-gate-r8-last1")
    ckpt = torch.load(root / "out" / "runs" / point["run"] / "npt.pt", weights_only=True)
    (layer,) = point["layers"]
    ids = load_windows(root / "val.jsonl", load_tokenizer(tiny_shard_dir), SEQ_LEN)[:2]

    hooks = hf_npt_hooks(hf_model, layer, ckpt["np_state"][str(layer)])
    try:
        with torch.no_grad():
            logits = hf_model(input_ids=ids).logits
            base_logits = None
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        base_logits = hf_model(input_ids=ids).logits

    def ppl(lg):
        return math.exp(F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())

    assert ppl(logits) != pytest.approx(ppl(base_logits), rel=1e-3), "the update changed nothing: no test"
    assert point["ppl_npt"] == pytest.approx(ppl(logits), rel=1e-4)
    assert result["ppl_base"] == pytest.approx(ppl(base_logits), rel=1e-4)
    assert point["ppl_ratio"] == pytest.approx(ppl(logits) / ppl(base_logits), rel=1e-4)
    # The baseline a trained update must beat: the layer without its attention output.
    cut = hf_perplexity(tiny_hf_dir, ids, cut_attention=(layer,))
    assert result["ratio_without_attention"]["last1"] == pytest.approx(cut / ppl(base_logits), rel=1e-4)


@pytest.mark.parametrize("target", ["gate", "gate_up"])
def test_update_jacobian_equals_autograd(tiny_shard_dir, target):
    config = ModelConfig.from_model_dir(tiny_shard_dir)
    block = LlamaNPTBlock.from_shard(tiny_shard_dir, config, LAYER, npt=NPTConfig(4, layers=(LAYER,), np_target=target))
    randomize_np(block, seed=2)
    xn = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(9))
    w_b = block.np.W_b_up.weight.detach()

    def mlp_output(token: int, code: torch.Tensor) -> torch.Tensor:
        """The MLP output at xn[token] with its W_in rows moved by W_b code (one unit of v_a . xn)."""
        mlp, x = block.mlp, xn[token]
        update = w_b @ code
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if target == "gate_up":
            gate, up = gate + update[: config.intermediate_size], up + update[config.intermediate_size :]
        else:
            gate = gate + update
        return mlp.down_proj(F.silu(gate) * up)

    with torch.no_grad():
        got = update_jacobian(block, xn)
    for token in range(3):
        expected = torch.autograd.functional.jacobian(partial(mlp_output, token), torch.zeros(4))
        torch.testing.assert_close(got[token], expected, atol=1e-5, rtol=1e-4)


def test_limits_of_a_zero_update_and_a_full_rank_update(tiny_shard_dir):
    """A zero update reproduces none of the attention residual (the layer is the original
    without attention); with r >= hidden the first-order subspace is the whole hidden space."""
    config = ModelConfig.from_model_dir(tiny_shard_dir)
    ids = torch.randint(3, config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(6))
    zero = ShardModel.load(tiny_shard_dir, NPTCheckpoint(NPTConfig(4, 0.0, layers=(1, 3)), {}))
    limits = attention_residual_limits(zero, ids)
    assert set(limits) == {"1", "3"}
    for layer in limits.values():
        assert layer["reproduced"] == pytest.approx(0.0, abs=1e-6)
        assert 0 < layer["odd_share"] < 1 and 0 < layer["mean_share"] < 1 and 0 < layer["attention_share"]
    full = ShardModel.load(tiny_shard_dir, NPTCheckpoint(NPTConfig(config.hidden_size, 1.0, layers=(1,)), {}))
    assert attention_residual_limits(full, ids)["1"]["rank_reach"] == pytest.approx(1.0, abs=1e-4)
