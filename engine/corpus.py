"""Turn a corpus into prompt files for collection: DejaVu's c4_train/getdata.py, made repeatable.

    python -m engine.corpus --source gensim-lee --out-dir data/lee --model-name shards/smollm2

writes ``train.jsonl`` and ``validation.jsonl`` (one ``{"id", "prompt", "max_tokens"}`` a line,
``max_tokens`` 0 meaning a prompt-only forward pass) and ``corpus.json`` (source, cut, split,
counts). Documents are cut to what the model reads (special tokens included), exact duplicates
are dropped so that no text sits in both splits, and the split is a seeded hash of each text:
the same input gives the same files on every run and machine.

Python API: ``load_documents`` (texts of a source), ``read_prompts_texts`` (prompts of a
prompts.jsonl), ``cut_to_tokens`` / ``cut_to_words``, ``split_documents``, ``prepare_corpus``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.atomic import write_json_atomic, write_jsonl_atomic
from engine.config import ModelConfig
from engine.corpus_sources import CorpusError, Document, iter_documents, iter_jsonl_texts
from engine.tokenizer import load_tokenizer

DEFAULT_MAX_TOKENS_PER_DOC = 2048  # DejaVu's collection sequence length
#: English prose runs at about 1.3 tokens a word: the cut when no tokenizer is given.
WORDS_PER_TOKEN = 0.75
_WORD = re.compile(r"\S+")


def load_documents(
    source: str, cache_dir: str | Path | None = None, *, one_per_line: bool = False, max_docs: int | None = None
) -> list[str]:
    """The non-empty texts of a source (gensim-lee, gensim-wiki, c4, or a .txt/.jsonl path), stripped, uncut."""
    texts = (d.text.strip() for d in iter_documents(source, cache_dir, one_per_line))
    return list(itertools.islice(filter(None, texts), max_docs))


def read_prompts_texts(path: str | Path) -> list[str]:
    """The prompt strings of a prompts.jsonl, in file order; a bad line is an error naming it."""
    return [text for _, text in iter_jsonl_texts(path)]


def count_tokens(text: str, tokenizer: Any) -> int:
    """Tokens the model reads for this prompt: special tokens (BOS) included, as the engine encodes it."""
    return len(tokenizer(text)["input_ids"])


def cut_to_tokens(text: str, tokenizer: Any, limit: int) -> tuple[str, int]:
    """The longest prefix ending on a token boundary that re-tokenizes to at most ``limit`` tokens, and its count.

    Cut at the character offset of a token's end, so the kept text is the original text (decoding
    could normalise it); re-tokenizing a prefix can merge differently, hence the check and retry.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise CorpusError(f"{type(tokenizer).__name__}: cutting needs a fast tokenizer (token offsets)")
    special = count_tokens("", tokenizer)
    if limit <= special:
        raise CorpusError(f"a limit of {limit} tokens leaves no room beside the {special} special token(s)")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) + special <= limit:
        return text, len(offsets) + special
    for keep in range(limit - special, 0, -1):
        prefix = text[: offsets[keep - 1][1]].rstrip()
        n = count_tokens(prefix, tokenizer)
        if n <= limit:
            return prefix, n
    return "", special  # not reached for real text: its first token alone fits


def cut_to_words(text: str, max_words: int) -> tuple[str, int]:
    """The first ``max_words`` whitespace-separated words, original spacing kept, and the word count."""
    ends = [m.end() for m in itertools.islice(_WORD.finditer(text), max_words + 1)]
    if len(ends) <= max_words:
        return text, len(ends)
    return text[: ends[max_words - 1]], max_words


def _split_key(seed: int, text: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{text}".encode()).digest()


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, validation), each in input order: validation is the documents with the lowest seeded text hash.

    Keyed on the text, not the position, so reordering the input does not move a document, and a
    text (deduplicated beforehand) is wholly in one split. Any positive fraction keeps one document.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction={val_fraction} is not in [0, 1]")
    n_val = min(len(docs), max(1, round(val_fraction * len(docs)))) if val_fraction > 0 else 0
    ranked = sorted(range(len(docs)), key=lambda i: _split_key(seed, docs[i].text))
    in_val = set(ranked[:n_val])
    train = [d for i, d in enumerate(docs) if i not in in_val]
    return train, [d for i, d in enumerate(docs) if i in in_val]


def _token_limit(model_name: str | Path, max_tokens_per_doc: int, max_new_tokens: int) -> int:
    context = ModelConfig.from_model_dir(model_name).max_position_embeddings
    if max_new_tokens >= context:
        raise CorpusError(
            f"{model_name}: max_new_tokens={max_new_tokens} leaves no room in its {context}-token context"
        )
    return min(max_tokens_per_doc, context - max_new_tokens)


def prepare_corpus(
    source: str,
    out_dir: str | Path,
    *,
    model_name: str | Path | None = None,
    max_tokens_per_doc: int = DEFAULT_MAX_TOKENS_PER_DOC,
    val_fraction: float = 0.1,
    max_docs: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    max_new_tokens: int = 0,
    one_per_line: bool = False,
) -> dict[str, Any]:
    """Read, cut, deduplicate, split and write a corpus; returns what corpus.json holds.

    ``max_docs`` caps the documents kept (after dropping empty and duplicate ones), so a stream
    such as c4 is read only as far as needed.

    With a model, the limit is min(max_tokens_per_doc, context - max_new_tokens) tokens, so prompt
    and continuation fit the model; without one, about as many words (``WORDS_PER_TOKEN``).
    """
    if max_tokens_per_doc < 1 or max_new_tokens < 0 or (max_docs is not None and max_docs < 1):
        raise ValueError("max_tokens_per_doc and max_docs must be positive, max_new_tokens not negative")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction={val_fraction} is not in [0, 1]")
    cut: Callable[[str], tuple[str, int]]
    if model_name is not None:
        unit, limit = "tokens", _token_limit(model_name, max_tokens_per_doc, max_new_tokens)
        cut = functools.partial(cut_to_tokens, tokenizer=load_tokenizer(model_name), limit=limit)
    else:
        unit, limit = "words", max(1, int(max_tokens_per_doc * WORDS_PER_TOKEN))
        cut = functools.partial(cut_to_words, max_words=limit)

    counts = {"read": 0, "empty": 0, "duplicates": 0, "cut": 0}
    seen: set[str] = set()
    docs: list[Document] = []
    lengths: dict[str, int] = {}
    progress = tqdm(iter_documents(source, cache_dir, one_per_line), desc=source, unit="doc", disable=None)
    for doc in progress:
        if max_docs is not None and len(docs) >= max_docs:
            break
        counts["read"] += 1
        text = doc.text.strip()
        if not text:
            counts["empty"] += 1
            continue
        prompt, n = cut(text)
        counts["cut"] += int(prompt != text)
        if prompt in seen:
            counts["duplicates"] += 1
            continue
        seen.add(prompt)
        docs.append(Document(doc.id, prompt))
        lengths[doc.id] = n
    progress.close()

    train, validation = split_documents(docs, val_fraction, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "source": source,
        "model_name": None if model_name is None else str(model_name),
        "cut": {
            "unit": unit,
            "limit": limit,
            "max_tokens_per_doc": max_tokens_per_doc,
            "max_new_tokens": max_new_tokens,
        },
        "split": {"seed": seed, "val_fraction": val_fraction, "key": "sha256(seed, prompt text)"},
        "counts": {**counts, "train": len(train), "validation": len(validation)},
        unit: {
            "train": sum(lengths[d.id] for d in train),
            "validation": sum(lengths[d.id] for d in validation),
            "max": max(lengths.values(), default=0),
        },
    }
    for name, split in (("train", train), ("validation", validation)):
        write_jsonl_atomic(
            out / f"{name}.jsonl", ({"id": d.id, "prompt": d.text, "max_tokens": max_new_tokens} for d in split)
        )
    write_json_atomic(out / "corpus.json", summary)  # last: its presence means the split files are complete
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="gensim-lee, gensim-wiki, c4, or a .txt/.jsonl file")
    parser.add_argument("--out-dir", required=True, help="writes train.jsonl, validation.jsonl, corpus.json")
    parser.add_argument("--model-name", help="shard directory: cut by its tokenizer and context length")
    parser.add_argument("--max-tokens-per-doc", type=int, default=DEFAULT_MAX_TOKENS_PER_DOC)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--max-docs", type=int, help="stop after N documents kept (empty and duplicates skipped)")
    parser.add_argument("--seed", type=int, default=0, help="of the train/validation split")
    parser.add_argument("--cache-dir", help="where the gensim wheel is kept (default ~/.cache/dejavu-llama)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="written as max_tokens (0: prompt only)")
    parser.add_argument("--one-per-line", action="store_true", help=".txt: one document a line, not blank-line blocks")
    args = parser.parse_args(argv)
    try:
        summary = prepare_corpus(
            args.source,
            args.out_dir,
            model_name=args.model_name,
            max_tokens_per_doc=args.max_tokens_per_doc,
            val_fraction=args.val_fraction,
            max_docs=args.max_docs,
            seed=args.seed,
            cache_dir=args.cache_dir,
            max_new_tokens=args.max_new_tokens,
            one_per_line=args.one_per_line,
        )
    except (ValueError, RuntimeError) as e:  # CorpusError, ConfigError, tokenizer loading, bad arguments
        parser.exit(2, f"error: {e}\n")
    print(json.dumps({k: summary[k] for k in ("counts", summary["cut"]["unit"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
