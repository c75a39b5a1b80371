"""The static decode step and its options: --compile gives HF generate's tokens with a
bounded number of compiled graphs; the prefill padding with and without length buckets,
the packed prefill's layout and the default micro-batch size match hand counts."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import PROMPTS, hf_greedy, run_infer, write_prompts

from engine.prompts import PromptRequest
from modules.llama import PackedPrompts
from pipeline.generation import (
    Sequence,
    default_micro_batch_size,
    make_micro_batches,
    padding_fraction,
    prefill_chunks,
)
from pipeline.stage import CACHE_LENGTH_STEP


def sequences_of_lengths(lengths: list[int], max_new: int = 4) -> list[Sequence]:
    return [Sequence(i, PromptRequest(i, "x"), list(range(3, 3 + n)), max_new) for i, n in enumerate(lengths)]


def test_packed_prefill_layout_by_hand():
    """Prompts of 2, 3 and 1 tokens left-padded to 3: packed, tokens 0-1, 2-4 and 5; the
    first prompt's tokens sit in cache slots 1 and 2 of row 0, the last one's in slot 2."""
    real = torch.tensor([[False, True, True], [True, True, True], [False, False, True]])
    packed = PackedPrompts.of(real)
    assert packed.bounds == [(0, 2), (2, 5), (5, 6)]
    assert packed.batch_index.tolist() == [0, 0, 1, 1, 1, 2]
    assert packed.slot_index.tolist() == [1, 2, 0, 1, 2, 2]
    assert packed.last_tokens.tolist() == [1, 4, 5]


def test_packed_prefill_of_a_later_chunk_by_hand():
    """The same prompts' rows 1 and 2 as a chunk: their tokens go to rows 1 and 2 of the
    micro-batch's cache, and are packed from 0 within the chunk."""
    real = torch.tensor([[True, True, True], [False, False, True]])
    packed = PackedPrompts.of(real, first_row=1)
    assert packed.bounds == [(0, 3), (3, 4)]
    assert packed.batch_index.tolist() == [1, 1, 1, 2]
    assert packed.slot_index.tolist() == [0, 1, 2, 2]


def test_prefill_chunks_by_hand():
    """Prompts of 5, 4, 2 and 1 tokens, 6 tokens a chunk: 5 | 4 + 2 | 1 (5 + 4 and 4 + 2 + 1
    are over 6). A prompt longer than a chunk is a chunk of its own; no budget, one chunk."""
    assert prefill_chunks([5, 4, 2, 1], 6) == [(0, 1), (1, 3), (3, 4)]
    assert prefill_chunks([9, 1], 6) == [(0, 1), (1, 2)]
    assert prefill_chunks([5, 4, 2, 1], 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert prefill_chunks([5, 4, 2, 1], None) == prefill_chunks([5, 4, 2, 1], 0) == [(0, 4)]


def test_default_micro_batch_size_by_hand():
    """Generating: 10 prompts over 2 stages give 5 a micro-batch, never more than 32.
    Prompt-only: about 512 prompt tokens a micro-batch, from 1 to 32 prompts."""
    assert default_micro_batch_size(sequences_of_lengths([7] * 10), 2) == 5
    assert default_micro_batch_size(sequences_of_lengths([7] * 100), 2) == 32
    assert default_micro_batch_size(sequences_of_lengths([100, 156] * 5, max_new=0), 2) == 4  # 512 / 128
    assert default_micro_batch_size(sequences_of_lengths([2000] * 3, max_new=0), 2) == 1
    assert default_micro_batch_size(sequences_of_lengths([4] * 100, max_new=0), 2) == 32


def test_padding_fraction_with_and_without_length_buckets():
    """Lengths 5, 1, 4, 2 in micro-batches of 2. By length, longest first: (5, 4) and
    (2, 1), padded to 5 and 2: 2 padded slots of 14. In input order: (5, 1) and (4, 2),
    padded to 5 and 4: 6 padded slots of 18."""
    sequences = sequences_of_lengths([5, 1, 4, 2])
    by_length = make_micro_batches(sequences, 2, pad_id=0)
    assert [[len(s.prompt_ids) for s in mb.rows] for mb in by_length] == [[5, 4], [2, 1]]
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
    expected = hand_padding_fraction(sorted(lengths, reverse=True) if not flags else lengths, 2)
    stats_path = tmp_path / "stats.json"
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    extra = ["--max-new-tokens", "3", "--micro-batch-size", "2", "--stats-path", str(stats_path), *flags]
    rows = run_infer(tiny_shard_dir, prompts, tmp_path / "out.jsonl", 1, extra)
    stats = json.loads(stats_path.read_text())
    assert stats["padding_fraction"] == pytest.approx(expected, abs=1e-4)
    assert stats["prefill_chunks"] == 3  # one stage: each of the 3 micro-batches prefills whole
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
