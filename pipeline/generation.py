"""Greedy-generation bookkeeping on the first rank: sequences, micro-batches, stop rules.

Only rank 0 tokenizes and holds the text; the other ranks see hidden states alone."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from engine.prompts import PromptError, PromptRequest


@dataclass
class Sequence:
    index: int  # position in the input file
    request: PromptRequest
    prompt_ids: list[int]
    max_new: int
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None  # set when stopped by a stop string

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class MicroBatch:
    index: int
    rows: list[Sequence]
    input_ids: torch.Tensor  # (B, T) left-padded prompt ids
    real: torch.Tensor  # (B, T) bool, False on padding
    cache_len: int
    chunks: list[tuple[int, int]]  # the prefill's row ranges [start, stop), pipelined one after another

    @property
    def active(self) -> torch.Tensor:
        return torch.tensor([not s.finished for s in self.rows])


class GenerationRules:
    """When a sequence stops: EOS, its stop strings, its token budget or the context."""

    def __init__(self, tokenizer, eos_ids: set[int], ignore_eos: bool):
        self.tokenizer, self.eos_ids, self.ignore_eos = tokenizer, eos_ids, ignore_eos

    def accept(self, seq: Sequence, token: int) -> None:
        if seq.finished:
            return
        seq.generated.append(token)
        if token in self.eos_ids and not self.ignore_eos:
            seq.finish_reason = "stop"
        elif seq.request.stop and self._cut_at_stop(seq):
            seq.finish_reason = "stop"
        elif len(seq.generated) >= seq.max_new:
            seq.finish_reason = "length"

    def _cut_at_stop(self, seq: Sequence) -> bool:
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        hits = [text.find(s) for s in seq.request.stop if s in text]
        if hits:
            seq.text = text[: min(hits)]
        return bool(hits)

    def text_of(self, seq: Sequence) -> str:
        if seq.text is not None:
            return seq.text
        return self.tokenizer.decode(seq.generated, skip_special_tokens=True)


def make_sequences(
    requests: list[PromptRequest],
    tokenizer,
    default_max_new: int,
    context_len: int,
    source: str,
    truncate: bool = False,
) -> list[Sequence]:
    """Tokenize every prompt. A prompt that does not fit the context is an error naming
    it, or with ``truncate`` keeps its end (room left for its new tokens), with a warning."""
    sequences = []
    for i, request in enumerate(requests):
        where = request.where or source
        ids = tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise PromptError(f"{where}: prompt {request.id!r} is empty after tokenization")
        wanted = default_max_new if request.max_tokens is None else request.max_tokens
        if len(ids) > context_len:
            if not truncate:
                raise PromptError(
                    f"{where}: prompt {request.id!r} has {len(ids)} tokens, longer than the model's context of "
                    f"{context_len} (pass --truncate-prompts to keep its end)"
                )
            keep = max(1, context_len - wanted)
            print(
                f"warning: {where}: prompt {request.id!r} cut from {len(ids)} to its last {keep} tokens",
                file=sys.stderr,
            )
            ids = ids[-keep:]
        seq = Sequence(i, request, ids, min(wanted, context_len - len(ids)))
        if seq.max_new == 0:
            seq.finish_reason = "length"
        sequences.append(seq)
    return sequences


#: Prompt tokens a prompt-only micro-batch aims at. The GEMMs run at their full rate from
#: about 256 rows (BENCHMARKS.md), and more, smaller micro-batches fill and drain the
#: pipeline in a smaller share of the run.
PREFILL_TOKENS = 512


def default_micro_batch_size(sequences: list[Sequence], pp: int) -> int:
    """Generating: the prompts spread over the stages, at most 32 rows, since a decode
    micro-batch reads every weight of a stage once per token. Prompt-only (collection):
    about ``PREFILL_TOKENS`` prompt tokens each, at least one prompt and at most 32."""
    if any(s.max_new for s in sequences):
        return min(32, -(-len(sequences) // pp))
    mean_length = sum(len(s.prompt_ids) for s in sequences) / len(sequences)
    return max(1, min(32, round(PREFILL_TOKENS / mean_length)))


#: Prompt tokens per prefill chunk when there are several stages. The GEMMs keep their full
#: rate down to about 64 rows (BENCHMARKS.md), and the next stage starts on a micro-batch
#: after its first chunk instead of after the whole prefill.
PREFILL_CHUNK_TOKENS = 64


def prefill_chunks(lengths: list[int], tokens: int | None) -> list[tuple[int, int]]:
    """Consecutive rows of at most ``tokens`` prompt tokens each (at least one row each);
    ``None`` or 0: all rows in one chunk."""
    chunks, start, total = [], 0, 0
    for row, length in enumerate(lengths):
        if tokens and row > start and total + length > tokens:
            chunks.append((start, row))
            start, total = row, 0
        total += length
    return [*chunks, (start, len(lengths))]


def make_micro_batches(
    sequences: list[Sequence], size: int, pad_id: int, by_length: bool = True, chunk_tokens: int | None = None
) -> list[MicroBatch]:
    """Group prompts of similar length (less padding), longest first, unless ``by_length``
    is off (input order); then left-pad each group, and split its prefill into chunks of
    ``chunk_tokens`` (see ``prefill_chunks``). Longest first shortens the pipeline's fill:
    while the first stage prefills the second micro-batch, the next stage is busy with the
    longer first one instead of waiting (BENCHMARKS.md, the pp=2 bubble)."""
    ordered = sorted(sequences, key=lambda s: -len(s.prompt_ids)) if by_length else sequences
    batches = []
    for start in range(0, len(ordered), size):
        rows = ordered[start : start + size]
        width = max(len(s.prompt_ids) for s in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, s in enumerate(rows):
            ids[r, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            real[r, width - len(s.prompt_ids) :] = True
        cache_len = width + max(s.max_new for s in rows)
        chunks = prefill_chunks([len(s.prompt_ids) for s in rows], chunk_tokens)
        batches.append(MicroBatch(len(batches), rows, ids, real, cache_len, chunks))
    return batches


def padding_fraction(batches: list[MicroBatch]) -> float:
    """Padded prompt slots over all prompt slots of the micro-batches: cache slots that each
    decode step's attention reads past (prefill packs the prompts and computes none)."""
    slots = sum(mb.real.numel() for mb in batches)
    return 1 - sum(int(mb.real.sum()) for mb in batches) / slots if slots else 0.0
