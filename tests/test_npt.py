"""The NPT block against an independent reference (HF's layer modules, the rank-1 update
materialized per token), gradient isolation, NP parameter counts of the published Llama
shapes, layer selection, and the NP-only checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from modules.llama import LlamaBlock, StepContext, rope_inv_freq
from modules.llama_npt import LlamaNPTBlock, NPComponent, NPTConfig, freeze_all_but_np, parse_convert_layers
from modules.npt_checkpoint import CheckpointError, NPTCheckpoint, load_npt_block
from npt.model import ShardModel
from npt.train import layerwise_loss

LAYER = 2
SEQ = 9


def causal_context(config: ModelConfig, batch: int, length: int) -> StepContext:
    positions = torch.arange(length).expand(batch, length)
    every = torch.ones(batch, length, dtype=torch.bool)
    return StepContext.build(rope_inv_freq(config), positions, every, 0, every, torch.float32)


def randomize_np(block: LlamaNPTBlock, seed: int, scale: float = 0.3) -> None:
    """NP weights large enough that the rank-1 update clearly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.np.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def hf_layer_tensors(hf_model, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Input, attention output (after o_proj) and output of one HF decoder layer, by hooks."""
    seen: dict[str, torch.Tensor] = {}

    def first_tensor(value):
        return value[0] if isinstance(value, tuple) else value

    def on_input(module, args, kwargs):
        seen["input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hf_layer = hf_model.model.layers[layer]
    hooks = [
        hf_layer.register_forward_pre_hook(on_input, with_kwargs=True),
        hf_layer.self_attn.register_forward_hook(lambda m, args, out: seen.update(attn=first_tensor(out))),
        hf_layer.register_forward_hook(lambda m, args, out: seen.update(output=first_tensor(out))),
    ]
    try:
        with torch.no_grad():
            hf_model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


# W_in as seed 003 names it: the gate projection alone, or gate and up stacked (2 ffn rows).
@pytest.mark.parametrize("target", ["gate", "gate_up"])
def test_delta_on_the_fly_equals_materialized_update(tiny_shard_dir, hf_model, target):
    config = ModelConfig.from_model_dir(tiny_shard_dir)
    npt = NPTConfig(np_rank=8, layers=(LAYER,), np_target=target)
    block = LlamaNPTBlock.from_shard(tiny_shard_dir, config, LAYER, npt=npt)
    randomize_np(block, seed=3)
    ids = torch.randint(3, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    seen = hf_layer_tensors(hf_model, ids, LAYER)
    h, a = seen["input"], seen["attn"]

    # Reference: HF's own modules, and W_in + v_b v_a^T built as a (B, T, rows, hidden) tensor.
    hf_layer = hf_model.model.layers[LAYER]
    w_down, w_a, w_b = (getattr(block.np, n).weight.detach() for n in ("W_down", "W_a_up", "W_b_up"))
    v_a, v_b = a @ w_down.T @ w_a.T, a @ w_down.T @ w_b.T
    mlp = hf_layer.mlp
    w_in = mlp.gate_proj.weight if target == "gate" else torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    w_in = w_in + v_b[..., :, None] * v_a[..., None, :]
    with torch.no_grad():
        xn = hf_layer.post_attention_layernorm(h)
        rows = torch.einsum("btfh,bth->btf", w_in, xn)
        gate, up = (rows, mlp.up_proj(xn)) if target == "gate" else rows.chunk(2, dim=-1)
        reference = h + mlp.down_proj(F.silu(gate) * up)
        without_update = h + mlp(xn)
        out, got_a, got_b = block.forward_with_np(h, causal_context(config, *ids.shape))

    assert w_b.shape == (npt.update_size(config.intermediate_size), 8)
    assert (reference - without_update).abs().max() > 1e-2, "the test update is too small to tell anything"
    torch.testing.assert_close(got_a, v_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_b, v_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    # base_forward is the original layer: the equivalence target.
    torch.testing.assert_close(
        block.base_forward(h, causal_context(config, *ids.shape)), seen["output"], atol=1e-5, rtol=1e-5
    )


def test_gradients_reach_only_np_parameters(tiny_shard_dir):
    model = ShardModel.load(tiny_shard_dir, NPTCheckpoint(NPTConfig(np_rank=4, layers=(1, 3)), {}))
    trainable = freeze_all_but_np(model)
    assert len(trainable) == 2 * 3
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    layerwise_loss(model, ids, lambda_reg=0.01).total.backward()
    np_ids = {id(p) for p in trainable}
    for name, p in model.named_parameters():
        if id(p) in np_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


# Published shapes, NP parameters of one layer at r = 64, by hand:
# W_down hidden*r + W_a_up r*hidden + W_b_up r*ffn.
@pytest.mark.parametrize(
    ("hidden", "ffn", "expected"),
    [
        (2048, 8192, 786_432),  # Llama 3.2 1B: 131072 + 131072 + 524288
        (3072, 8192, 917_504),  # Llama 3.2 3B: 196608 + 196608 + 524288
        (4096, 14336, 1_441_792),  # Llama 3 8B: 262144 + 262144 + 917504
    ],
)
def test_np_parameter_count_of_published_configs(hidden, ffn, expected):
    assert sum(p.numel() for p in NPComponent(hidden, ffn, rank=64, init_scale=0.01).parameters()) == expected


@pytest.mark.parametrize(
    ("spec", "num_layers", "expected"),
    [
        ("upper_half", 16, tuple(range(8, 16))),
        ("upper_half", 30, tuple(range(15, 30))),
        ("upper_half", 5, (2, 3, 4)),
        ("lower_half", 16, tuple(range(8))),
        ("all", 4, (0, 1, 2, 3)),
        ("2:5", 16, (2, 3, 4)),
        (":3", 16, (0, 1, 2)),
        ("14:", 16, (14, 15)),
        ("7,1,5", 16, (1, 5, 7)),
        ("3", 16, (3,)),
        ("last2", 30, (28, 29)),
        ("last1", 4, (3,)),
    ],
)
def test_parse_convert_layers(spec, num_layers, expected):
    assert parse_convert_layers(spec, num_layers) == expected


@pytest.mark.parametrize("spec", ["5:2", "0:17", "-1:3", "1,16", "middle", "1,,2", "lower_half", "last0", "last17"])
def test_parse_convert_layers_rejects(spec):
    with pytest.raises(ValueError, match="--convert-layers"):
        parse_convert_layers(spec, 16 if spec != "lower_half" else 1)


def test_checkpoint_round_trip_holds_only_np_parameters(tiny_shard_dir, tmp_path):
    config = ModelConfig.from_model_dir(tiny_shard_dir)
    npt = NPTConfig(np_rank=4, np_init_scale=0.5, layers=(2, 3))
    model = ShardModel.load(tiny_shard_dir, NPTCheckpoint(npt, {}))
    for i, block in model.npt_blocks.items():
        randomize_np(block, seed=i)
    path = tmp_path / "npt.pt"
    NPTCheckpoint.from_model(npt, model.npt_blocks, step=7).save(path)

    raw = torch.load(path, weights_only=True)
    assert {k: set(v) for k, v in raw["np_state"].items()} == {
        "2": {"W_down.weight", "W_a_up.weight", "W_b_up.weight"},
        "3": {"W_down.weight", "W_a_up.weight", "W_b_up.weight"},
    }
    loaded = NPTCheckpoint.load(path)
    assert loaded.config == npt and loaded.step == 7

    ids = torch.randint(3, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, SEQ, config.hidden_size, generator=torch.Generator().manual_seed(4))
    ctx = causal_context(config, 2, SEQ)
    for i in range(config.num_layers):
        block = load_npt_block(tiny_shard_dir, config, i, path)
        assert isinstance(block, LlamaNPTBlock) == (i in npt.layers)
        if i not in npt.layers:
            assert type(block) is LlamaBlock
        with torch.no_grad():
            torch.testing.assert_close(block(x, ctx), model.blocks[i](x, ctx), atol=0, rtol=0)
    reloaded = ShardModel.load(tiny_shard_dir, loaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.hidden_states(ids)[0], model.hidden_states(ids)[0], atol=0, rtol=0)


def test_checkpoint_for_another_model_is_refused(tiny_shard_dir, tmp_path):
    config = ModelConfig.from_model_dir(tiny_shard_dir)
    other = config.replace(intermediate_size=config.intermediate_size * 2)
    npt = NPTConfig(np_rank=4, layers=(1,))
    block = LlamaNPTBlock(other, 1, npt)
    path = tmp_path / "npt.pt"
    NPTCheckpoint.from_model(npt, {1: block}).save(path)
    with pytest.raises(CheckpointError, match=r"layer 1.*W_b_up"):
        load_npt_block(tiny_shard_dir, config, 1, path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        NPTCheckpoint.load(tmp_path / "bad.pt")
