"""NPT blocks in the pipeline: the same tokens on one stage or two, mixed with plain stages."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import run_infer, write_prompts

from engine.config import ModelConfig
from modules.llama_npt import LlamaNPTBlock, NPTConfig
from npt.checkpoint import NPTCheckpoint

PROMPTS = ["The quick brown fox", "Pipeline parallel inference splits a model", "Hello"]


@pytest.fixture(scope="module")
def npt_checkpoint(tiny_shard_dir, tmp_path_factory):
    """Layers 2 and 3 (the second stage of an even 2-stage split) made neuro-plastic."""
    config = ModelConfig.from_model_dir(tiny_shard_dir)
    npt = NPTConfig(np_rank=4, np_init_scale=1.0, layers=(2, 3))
    torch.manual_seed(1)
    blocks = {i: LlamaNPTBlock(config, i, npt) for i in npt.layers}
    path = tmp_path_factory.mktemp("npt") / "npt.pt"
    NPTCheckpoint.from_model(npt, blocks).save(path)
    return path


def generate(model_dir, tmp_path, nproc, extra):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    rows = run_infer(model_dir, prompts, tmp_path / f"out{nproc}.jsonl", nproc, ["--max-new-tokens", "8", *extra])
    return [r["token_ids"] for r in rows]


def test_npt_tokens_equal_across_stage_counts_and_mixes(tiny_shard_dir, npt_checkpoint, tmp_path):
    npt = ["--npt-checkpoint", str(npt_checkpoint)]
    one_stage = generate(tiny_shard_dir, tmp_path, 1, ["--model-type", "llama-npt", *npt])
    assert generate(tiny_shard_dir, tmp_path, 2, ["--model-type", "llama-npt", *npt]) == one_stage
    mixed = generate(tiny_shard_dir, tmp_path, 2, ["--stage-model-types", "llama,llama-npt", *npt])
    assert mixed == one_stage
    assert generate(tiny_shard_dir, tmp_path, 1, []) != one_stage  # the NP components really act


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
