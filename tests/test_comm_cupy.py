"""The cupy_nccl backend: refused up front where it cannot run; on two GPUs, the same
tokens as torch_nccl."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from pipeline_helpers import infer_args, run_infer, write_prompts

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Pipeline parallel inference splits", "Hello"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("world_size", [1, 2])
def test_refused_without_cuda_at_any_world_size(
    tiny_shard_dir, tmp_path, monkeypatch, capsys, no_model_loading, world_size
):
    """Before any process group or model: a message, not a silent run on the CPU."""
    from launch.infer import main

    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(world_size - 1))
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    out = tmp_path / "out.jsonl"
    assert main(infer_args(tiny_shard_dir, prompts, out, ["--dist-backend", "cupy_nccl"])) == 1
    err = capsys.readouterr().err
    assert f"error (rank {world_size - 1}): --dist-backend cupy_nccl needs CUDA" in err, err
    assert not out.exists()


def test_refused_without_cupy(monkeypatch):
    from engine.comm_cupy import check_cupy_nccl

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(ValueError, match=r"cupy_nccl needs cupy with NCCL \(pip install 'dejavu-llama\[gpu\]'"):
        check_cupy_nccl()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy (the gpu extra)")
def test_cupy_nccl_tokens_equal_torch_nccl(tiny_shard_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    runs = {}
    for backend in ("torch_nccl", "cupy_nccl"):
        extra = ["--dist-backend", backend, "--max-new-tokens", "8", "--micro-batch-size", "1"]
        rows = run_infer(tiny_shard_dir, prompts, tmp_path / f"{backend}.jsonl", 2, extra)
        runs[backend] = [row["token_ids"] for row in rows]
    assert runs["cupy_nccl"] == runs["torch_nccl"]
    assert all(len(tokens) > 0 for tokens in runs["cupy_nccl"])
