"""NPT blocks in the pipeline: the same tokens on one stage or two, mixed with plain stages."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from pipeline_helpers import infer_args, run_infer, torchrun, write_prompts

from engine.config import ModelConfig
from modules.llama_npt import LlamaNPTBlock, NPTConfig
from modules.npt_checkpoint import NPTCheckpoint

PROMPTS = ["The quick brown fox", "Pipeline parallel inference splits a model", "Hello"]
NEW_TOKENS = "8"


def make_checkpoint(model_dir, path, layers: tuple[int, ...]):
    """Random NP components (large enough to change the tokens) for ``layers``."""
    config = ModelConfig.from_model_dir(model_dir)
    npt = NPTConfig(np_rank=4, np_init_scale=1.0, layers=layers)
    torch.manual_seed(1)
    blocks = {i: LlamaNPTBlock(config, i, npt) for i in npt.layers}
    NPTCheckpoint.from_model(npt, blocks).save(path)
    return path


@pytest.fixture(scope="module")
def npt_checkpoint(tiny_shard_dir, tmp_path_factory):
    """Layers 2 and 3 (the second stage of an even 2-stage split) made neuro-plastic."""
    return make_checkpoint(tiny_shard_dir, tmp_path_factory.mktemp("npt") / "npt.pt", (2, 3))


@pytest.fixture(scope="module")
def npt_on_both_stages(tiny_shard_dir, tmp_path_factory):
    """Layers 1 and 2: one on each stage of an even 2-stage split."""
    return make_checkpoint(tiny_shard_dir, tmp_path_factory.mktemp("npt") / "npt.pt", (1, 2))


def generate(model_dir, tmp_path, nproc, extra):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    rows = run_infer(
        model_dir, prompts, tmp_path / f"out{nproc}.jsonl", nproc, ["--max-new-tokens", NEW_TOKENS, *extra]
    )
    return [r["token_ids"] for r in rows]


@contextmanager
def npt_maths(model, np_state: dict[int, dict[str, torch.Tensor]]):
    """HF's LlamaForCausalLM with the NPT maths applied by hooks to the layers of ``np_state``:
    the attention output ``a`` no longer reaches the residual stream; it gives
    ``v_a = W_a_up W_down a`` and ``v_b = W_b_up W_down a``, and the gate projection of each
    token becomes the matrix ``W_gate + v_b v_a^T``, materialized here, applied to Norm_post(h)."""
    handles = []
    for i, state in np_state.items():
        layer, vectors = model.model.layers[i], {}

        def take_attention(module, args, output, state=state, vectors=vectors):
            a = output[0]
            code = a @ state["W_down.weight"].T
            vectors["a"], vectors["b"] = code @ state["W_a_up.weight"].T, code @ state["W_b_up.weight"].T
            return (torch.zeros_like(a), *output[1:])

        def updated_gate(module, args, output, vectors=vectors):
            w = module.weight + vectors["b"][..., :, None] * vectors["a"][..., None, :]  # (B, T, ffn, hidden)
            return torch.einsum("btfh,bth->btf", w, args[0])

        handles.append(layer.self_attn.register_forward_hook(take_attention))
        handles.append(layer.mlp.gate_proj.register_forward_hook(updated_gate))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def full_forward_greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """Greedy decoding without a KV cache: every step recomputes the whole sequence."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[-new_tokens:]


def npt_reference(tiny_model, checkpoint, layers) -> list[list[int]]:
    model, tokenizer = tiny_model
    state = {i: s for i, s in NPTCheckpoint.load(checkpoint).np_state.items() if i in layers}
    with npt_maths(model, state):
        return [full_forward_greedy(model, tokenizer, p, int(NEW_TOKENS)) for p in PROMPTS]


def test_npt_tokens_equal_across_stage_counts_and_mixes(tiny_shard_dir, npt_checkpoint, tmp_path):
    npt = ["--npt-checkpoint", str(npt_checkpoint)]
    one_stage = generate(tiny_shard_dir, tmp_path, 1, ["--model-type", "llama-npt", *npt])
    assert generate(tiny_shard_dir, tmp_path, 2, ["--model-type", "llama-npt", *npt]) == one_stage
    mixed = generate(tiny_shard_dir, tmp_path, 2, ["--stage-model-types", "llama,llama-npt", *npt])
    assert mixed == one_stage
    assert generate(tiny_shard_dir, tmp_path, 1, []) != one_stage  # the NP components really act


def test_npt_tokens_on_both_stages_equal_a_full_forward_reference(
    tiny_shard_dir, tiny_model, npt_on_both_stages, tmp_path
):
    """NPT layers 1 and 2 on a 2-stage pipeline (one on each stage): the tokens equal greedy
    decoding over full forward passes of HF's model with the NPT maths hooked in."""
    expected = npt_reference(tiny_model, npt_on_both_stages, (1, 2))
    for one_layer in (1, 2):  # each stage's NPT layer changes the tokens: dropping either would show
        assert npt_reference(tiny_model, npt_on_both_stages, (one_layer,)) != expected
    npt = ["--model-type", "llama-npt", "--npt-checkpoint", str(npt_on_both_stages), "--ignore-eos"]
    assert generate(tiny_shard_dir, tmp_path, 2, npt) == expected


def test_npt_stage_without_checkpoint_is_an_error(tiny_shard_dir, tmp_path, capsys):
    from launch.infer import main

    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    args = [
        "--model-name",
        str(tiny_shard_dir),
        "--infer-data",
        str(prompts),
        "--output-path",
        str(tmp_path / "o.jsonl"),
        "--model-type",
        "llama-npt",
        "--no-progress",
    ]
    assert main(args) != 0
    assert "--npt-checkpoint" in capsys.readouterr().err
    assert main([*args, "--npt-checkpoint", str(tmp_path / "missing.pt")]) != 0
    assert "missing.pt" in capsys.readouterr().err


def test_npt_layers_on_a_stage_of_another_type_are_an_error(tiny_shard_dir, npt_on_both_stages, tmp_path, capsys):
    """Checkpoint layer 1 on stage 0, which runs plain llama: an error naming the layer, the
    stage and its type, before any stage loads; never the layer silently run as the original."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "o.jsonl"
    npt = ["--npt-checkpoint", str(npt_on_both_stages)]
    mixed = infer_args(
        tiny_shard_dir, prompts, out, ["--pp-degree", "2", "--stage-model-types", "llama,llama-npt", *npt]
    )
    result = torchrun(2, mixed, timeout=120)
    assert result.returncode != 0
    for rank in (0, 1):  # every rank finds it, before the process group
        message = f"error (rank {rank}): {npt_on_both_stages}: converts layers [1], which stage 0 (rank 0, layers 0-1)"
        assert f"{message} runs as 'llama', not 'llama-npt'" in result.stderr, result.stderr[-3000:]
    assert not out.exists()


def test_npt_checkpoint_with_no_npt_stage_is_an_error(
    tiny_shard_dir, npt_on_both_stages, tmp_path, capsys, no_model_loading
):
    from launch.infer import main

    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    for model_type in ("llama", "llama-save"):
        extra = [
            "--model-type",
            model_type,
            "--npt-checkpoint",
            str(npt_on_both_stages),
            "--collect-dir",
            str(tmp_path / "c"),
        ]
        assert main(infer_args(tiny_shard_dir, prompts, tmp_path / "o.jsonl", extra)) == 1
        err = capsys.readouterr().err
        assert f"converts layers [1, 2], which stage 0 (rank 0, layers 0-3) runs as '{model_type}'" in err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "c").exists()
