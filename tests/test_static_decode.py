"""The static decode step and its options: --compile gives HF generate's tokens with a
bounded number of compiled graphs, and the prefill padding with and without length
buckets matches a hand count."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import PROMPTS, hf_greedy, run_infer, write_prompts

from engine.prompts import PromptRequest
from pipeline.generation import Sequence, make_micro_batches, padding_fraction
from pipeline.stage import CACHE_LENGTH_STEP


def sequences_of_lengths(lengths: list[int]) -> list[Sequence]:
    return [Sequence(i, PromptRequest(i, "x"), list(range(3, 3 + n)), 4) for i, n in enumerate(lengths)]


def test_padding_fraction_with_and_without_length_buckets():
    """Lengths 5, 1, 4, 2 in micro-batches of 2. By length: (1, 2) and (4, 5), padded to 2
    and 5: 2 padded slots of 14. In input order: (5, 1) and (4, 2), padded to 5 and 4:
    6 padded slots of 18."""
    sequences = sequences_of_lengths([5, 1, 4, 2])
    by_length = make_micro_batches(sequences, 2, pad_id=0)
    assert [[len(s.prompt_ids) for s in mb.rows] for mb in by_length] == [[1, 2], [4, 5]]
    assert padding_fraction(by_length) == pytest.approx(2 / 14)
    in_order = make_micro_batches(sequences, 2, pad_id=0, by_length=False)
    assert [[len(s.prompt_ids) for s in mb.rows] for mb in in_order] == [[5, 1], [4, 2]]
    assert padding_fraction(in_order) == pytest.approx(6 / 18)


def hand_padding_fraction(lengths: list[int], size: int) -> float:
    padded = real = 0
    for start in range(0, len(lengths), size):
        group = lengths[start : start + size]
        padded += max(group) * len(group)
        real += sum(group)
    return 1 - real / padded


@pytest.mark.parametrize("flags", [[], ["--no-length-buckets"]], ids=["buckets", "input-order"])
def test_stats_report_the_padding_fraction(tiny_shard_dir, tiny_model, tmp_path, flags):
    model, tokenizer = tiny_model
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    expected = hand_padding_fraction(sorted(lengths) if not flags else lengths, 2)
    stats_path = tmp_path / "stats.json"
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    extra = ["--max-new-tokens", "3", "--micro-batch-size", "2", "--stats-path", str(stats_path), *flags]
    rows = run_infer(tiny_shard_dir, prompts, tmp_path / "out.jsonl", 1, extra)
    assert json.loads(stats_path.read_text())["padding_fraction"] == pytest.approx(expected, abs=1e-4)
    assert [r["token_ids"] for r in rows] == [hf_greedy(model, tokenizer, p, 3) for p in PROMPTS]


#: Two micro-batches of 2 whose caches pad to one length with 48 new tokens: one decode shape.
SHORT_PROMPTS = ["def fibonacci(n):", "Hello", "The quick brown fox", "Pipeline stages"]


def test_compiled_decode_equals_hf_with_one_graph_per_micro_batch_shape(tiny_shard_dir, tiny_model, tmp_path):
    """48 tokens per prompt, two micro-batches: the decode step compiles once per distinct
    (rows, padded cache length), hand-counted here, never per token or per micro-batch."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny_model
    new_tokens, size = 48, 2
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in SHORT_PROMPTS])
    lengths = sorted(len(tokenizer(p)["input_ids"]) for p in SHORT_PROMPTS)
    groups = [lengths[i : i + size] for i in range(0, len(lengths), size)]
    step = CACHE_LENGTH_STEP
    shapes = {(len(g), -(-(max(g) + new_tokens) // step) * step) for g in groups}
    extra = ["--max-new-tokens", str(new_tokens), "--micro-batch-size", str(size), "--ignore-eos"]
    eager = run_infer(tiny_shard_dir, prompts, tmp_path / "eager.jsonl", 1, extra)
    torch._dynamo.reset()
    counters.clear()
    compiled = run_infer(tiny_shard_dir, prompts, tmp_path / "compiled.jsonl", 1, [*extra, "--compile"])
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert [r["token_ids"] for r in compiled] == [r["token_ids"] for r in eager]
    assert [r["token_ids"] for r in compiled] == [
        hf_greedy(model, tokenizer, p, new_tokens, eos_token_id=None) for p in SHORT_PROMPTS
    ]
    assert len(groups) == 2 and len(shapes) == 1
    assert graphs == len(shapes)
