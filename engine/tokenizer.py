"""Tokenizer loading: whatever the converter wrote next to the shards, via transformers."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    """Load the tokenizer of a shard directory, with left padding for batched generation."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{model_dir}: cannot load the tokenizer: {e}") from None
    tokenizer.padding_side = "left"
    return tokenizer
