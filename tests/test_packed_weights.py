"""Packed CPU weights: the packed product equals a numpy recomputation, only the linear
layers of a block's packable parts are packed, and a run with or without packing gives HF
generate's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_helpers import hf_greedy, write_prompts
from torch import nn

from engine.config import ModelConfig
from modules.llama import LlamaBlock
from modules.llama_sparse import LlamaSparseBlock, SparseSettings
from modules.packed_linear import PackedLinear, pack_linears, packing_available
from pipeline.runner import run
from pipeline.settings import RunSettings

pytestmark = pytest.mark.skipif(
    not packing_available(torch.device("cpu"), torch.float32), reason="this torch has no oneDNN"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (16, 1, 96), (3, 37, 96)], ids=["one-row", "decode", "prefill"])
def test_packed_linear_equals_numpy(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    x = torch.randn(shape)
    want = x.double().numpy() @ linear.weight.double().detach().numpy().T
    if bias:
        want += linear.bias.double().detach().numpy()

    got = PackedLinear(linear)(x)

    assert got.shape == (*shape[:-1], 200)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_pack_linears_replaces_the_linear_layers_only(tiny_shard_dir):
    config = ModelConfig.from_model_dir(tiny_shard_dir)
    block = LlamaBlock.from_shard(tiny_shard_dir, config, 0)
    norms = (block.input_layernorm, block.post_attention_layernorm)
    norm_weight = block.input_layernorm.weight.detach().clone()
    mapped = block.input_layernorm.weight.untyped_storage().data_ptr()  # in the shard file's memory map

    assert pack_linears(block) == 7  # q, k, v, o, gate, up, down
    assert not any(type(m) is nn.Linear for m in block.modules())
    assert (block.input_layernorm, block.post_attention_layernorm) == norms
    # copied out of the map, so the map (and the packed-away weights' pages) can be released
    assert block.input_layernorm.weight.untyped_storage().data_ptr() != mapped
    assert torch.equal(block.input_layernorm.weight, norm_weight)
    block = LlamaBlock.from_shard(tiny_shard_dir, config, 1)
    sparse = LlamaSparseBlock.from_block(block, config, SparseSettings("oracle", 0.5))
    assert sparse.packable_parts() == [block.self_attn]  # its MLP slices the dense weights


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "row-major"])
def test_a_run_gives_hf_tokens_with_and_without_packing(tiny_shard_dir, tiny_model, tmp_path, packed):
    model, tokenizer = tiny_model
    prompts_text = ["The quick brown fox", "Hello", "Pipeline parallel inference splits the layers"]
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts_text])
    settings = RunSettings(
        model_dir=tiny_shard_dir, infer_data=prompts, max_new_tokens=8, packed_weights=packed, progress=False
    )

    result = run(settings)

    assert [r["token_ids"] for r in result.rows] == [hf_greedy(model, tokenizer, p, 8) for p in prompts_text]
    layers = ModelConfig.from_model_dir(tiny_shard_dir).num_layers
    assert result.stats["ranks"][0]["packed_linears"] == (7 * layers + 1 if packed else 0)  # + the LM head
