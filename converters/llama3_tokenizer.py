"""Meta's Llama 3 ``tokenizer.model`` (a tiktoken BPE file) as an HF fast tokenizer.

The BPE part is transformers' own ``TikTokenConverter``; the 256 special tokens (ids
128000-128255) are not in the file but in Meta's code, so they are listed here as Meta's
Llama 3.1/3.2 tokenizer defines them, and a BOS token is prepended as HF's Llama 3 does."""

from __future__ import annotations

from pathlib import Path

from converters.checkpoint import ConversionError

#: Llama 3's pre-tokenizer split pattern (Meta's llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
NUM_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = [
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS += [
    f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(LLAMA3_SPECIAL_TOKENS))
]


def convert_llama3_tokenizer(model_file: Path, max_length: int):
    """A ``PreTrainedTokenizerFast`` giving the same ids as Meta's tiktoken tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL_TOKENS)
    try:
        tokenizer = converter.converted()
    except ValueError as e:
        raise ConversionError(f"{model_file}: not a tiktoken BPE file (Llama 3 tokenizer.model): {e}") from None
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
