"""Several "nodes" on this machine: torchrun agents meeting at a c10d rendezvous on 127.0.0.1,
one rank each, as launch/run_multinode.sh starts them on real nodes."""

from __future__ import annotations

import json

import pytest
from fault_scenarios import free_port
from pipeline_helpers import hf_greedy, infer_args, start_node, write_prompts

pytestmark = pytest.mark.slow
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Pipeline parallel inference splits", "Hello"]
NEW_TOKENS = 6


def run_nodes(node_args: list[list[str]], tmp_path, timeout: float = 240) -> list[str]:
    """Start one node per argument list, wait for all; returns their stderr."""
    port = free_port()
    logs = [tmp_path / f"node{i}.err" for i in range(len(node_args))]
    procs = [start_node(i, len(node_args), port, args, log) for i, (args, log) in enumerate(zip(node_args, logs))]
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    errors = [log.read_text() for log in logs]
    assert codes == [0] * len(procs), "\n".join(e[-2000:] for e in errors)
    return errors


def test_two_nodes_tokens_equal_hf_generate(tiny_shard_dir, tiny_model, tmp_path):
    model, tokenizer = tiny_model
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "results.jsonl"
    args = infer_args(tiny_shard_dir, prompts, out, ["--max-new-tokens", str(NEW_TOKENS), "--micro-batch-size", "1"])
    run_nodes([args, args], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["token_ids"] for r in rows] == [hf_greedy(model, tokenizer, p, NEW_TOKENS) for p in PROMPTS]
