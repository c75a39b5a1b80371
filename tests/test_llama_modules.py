"""The blocks, loaded from converted shard files, against HF ``LlamaForCausalLM``: logits of
left-padded batches, and incremental decoding with the KV cache against the full forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from modules.llama import KVCache, LlamaBlock, LlamaEmbeddings, LlamaLMHead, StepContext, rope_inv_freq

PROMPT_LENGTHS = (7, 3, 5)
DECODE_STEPS = 4
ATOL = 1e-4


class ShardModel:
    """Embeddings, every block and the head of a shard directory, run as one stage."""

    def __init__(self, shard_dir, dtype=torch.float32):
        self.config, self.dtype = ModelConfig.from_model_dir(shard_dir), dtype
        self.embeddings = LlamaEmbeddings.from_shard(shard_dir, self.config, dtype)
        self.blocks = [LlamaBlock.from_shard(shard_dir, self.config, i, dtype) for i in range(self.config.num_layers)]
        self.head = LlamaLMHead.from_shard(shard_dir, self.config, dtype)
        self.inv_freq = rope_inv_freq(self.config)

    def step(self, ids, positions, key_valid, start, caches=None):
        real = key_valid[:, start:]
        if caches is not None:  # attention reads the whole cache: no key past the step is valid
            key_valid = F.pad(key_valid, (0, caches[0].k.shape[2] - key_valid.shape[1]))
        ctx = StepContext.build(self.inv_freq, positions, key_valid, start, real, self.dtype)
        x = self.embeddings(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if caches is None else caches[i])
        return self.head(x)

    def caches(self, batch: int, length: int) -> list[KVCache]:
        c = self.config
        return [KVCache(batch, c.num_kv_heads, length, c.head_dim, self.dtype, "cpu") for _ in self.blocks]


def left_padded_batch(vocab: int, lengths=PROMPT_LENGTHS, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of different lengths, left-padded, each followed by ``extra`` tokens."""
    gen = torch.Generator().manual_seed(1)
    width = max(lengths) + extra
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n - extra :] = torch.randint(3, vocab, (n + extra,), generator=gen)
        mask[row, width - n - extra :] = 1
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions as HF generate computes them: real tokens count from 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def hf_logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits


@pytest.fixture(scope="module")
def tiny_hf_model(tiny_hf_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["tiny", "smollm"])
def models(request):
    """(shard model, HF reference) for the tiny Llama 3.2-shaped model and SmolLM2."""
    if request.param == "tiny":
        return ShardModel(request.getfixturevalue("tiny_shard_dir")), request.getfixturevalue("tiny_hf_model")
    return ShardModel(request.getfixturevalue("smollm_shard_dir")), request.getfixturevalue("smollm_hf_model")


def test_full_forward_matches_hf(models):
    ours, hf = models
    ids, mask = left_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        logits = ours.step(ids, positions_of(mask), mask.bool(), 0)
    real = mask.bool()
    torch.testing.assert_close(logits[real], hf_logits(hf, ids, mask)[real], atol=ATOL, rtol=0)


def test_incremental_decoding_matches_hf_full_forward(models):
    """Prefill the prompts into the KV cache, then feed the next tokens one at a time: every
    step's logits equal HF's forward over the whole sequence at that position."""
    ours, hf = models
    ids, mask = left_padded_batch(ours.config.vocab_size, extra=DECODE_STEPS)
    expected = hf_logits(hf, ids, mask)
    prompt_width = ids.shape[1] - DECODE_STEPS
    positions, key_valid = positions_of(mask), mask.bool()
    caches = ours.caches(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        prefill = ours.step(ids[:, :prompt_width], positions[:, :prompt_width], key_valid[:, :prompt_width], 0, caches)
        real = key_valid[:, :prompt_width]
        torch.testing.assert_close(prefill[real], expected[:, :prompt_width][real], atol=ATOL, rtol=0)
        for t in range(prompt_width, ids.shape[1]):
            logits = ours.step(ids[:, t : t + 1], positions[:, t : t + 1], key_valid[:, : t + 1], t, caches)
            torch.testing.assert_close(logits[:, 0], expected[:, t], atol=ATOL, rtol=0, msg=f"decode position {t}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_matches_hf_in_the_same_dtype(tiny_shard_dir, tiny_hf_dir, tiny_hf_model, dtype):
    """The float32 shards cast to ``dtype`` give HF's logits in that dtype, not float32's: the
    engine rounds where HF rounds (RMSNorm in float32, RoPE tables cast, ...). Half precision
    moves HF's own logits by about one step of the dtype; ours must stay far closer than that."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=dtype).eval()
    ids, mask = left_padded_batch(tiny_hf_model.config.vocab_size)
    with torch.no_grad():
        logits = ShardModel(tiny_shard_dir, dtype).step(ids, positions_of(mask), mask.bool(), 0)
    real = mask.bool()
    assert logits.dtype == dtype
    same_dtype = hf_logits(hf, ids, mask)[real].float()
    rounding = (same_dtype - hf_logits(tiny_hf_model, ids, mask)[real]).abs().max()
    assert rounding > 0, "half precision changed nothing: the comparison below would be empty"
    assert (logits[real].float() - same_dtype).abs().max() <= rounding / 4
