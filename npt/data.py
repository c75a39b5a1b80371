"""Training and evaluation text: prompt files (JSON lines with "prompt") packed into
fixed-length token windows, so that no batch carries padding."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.prompts import read_prompts


def pack_texts(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize each text, join them with EOS between texts, cut into (N, seq_len) windows;
    the tail shorter than a window is dropped."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate texts with")
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one window of --seq-len {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_windows(path: str | Path, tokenizer, seq_len: int) -> torch.Tensor:
    return pack_texts([r.prompt for r in read_prompts(path)], tokenizer, seq_len)


def batch_indices(num_windows: int, step: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """The windows of a given step: a fresh seeded shuffle each epoch, a pure function of the
    step, so a resumed run sees exactly the batches an uninterrupted one would."""
    batch_size = min(batch_size, num_windows)
    per_epoch = num_windows // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[k * batch_size : (k + 1) * batch_size]
