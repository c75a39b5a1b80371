"""llama.cpp GGUF files: memory-mapped by gguf's reader, dequantized to float32 one tensor
at a time, q/k rows returned from llama.cpp's interleaved rotary layout to HF's."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from converters.checkpoint import READ_ERRORS, ConversionError, NameTable, RotaryInterleaved, TensorInfo
from engine.config import ConfigError, ModelConfig
from engine.shards import LAYER_KEYS

GGUF_NAMES = NameTable(
    {
        "embed_tokens.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    },
    "blk.{}.",
    dict(
        zip(
            LAYER_KEYS,
            (
                "attn_q.weight",
                "attn_k.weight",
                "attn_v.weight",
                "attn_output.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
                "attn_norm.weight",
                "ffn_norm.weight",
            ),
            strict=True,
        )
    ),
)


class GGUFCheckpoint(RotaryInterleaved):
    """A llama.cpp GGUF file, memory-mapped and dequantized tensor by tensor to float32."""

    format = "gguf"

    def __init__(self, path: Path):
        from gguf import GGUFReader

        super().__init__(path)
        try:
            self._reader = GGUFReader(path)
        except READ_ERRORS as e:
            raise ConversionError(f"{path}: cannot read GGUF file (truncated or corrupt?): {e}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}

    @cached_property
    def config(self) -> ModelConfig:
        try:
            config = ModelConfig.from_gguf(self.path)
        except ConfigError as e:
            raise ConversionError(f"{self.path}: {e}") from None
        except READ_ERRORS as e:
            raise ConversionError(f"{self.path}: cannot read the GGUF metadata: {e}") from None
        return config.replace(tie_word_embeddings="output.weight" not in self._tensors)

    def native_name(self, name: str) -> str:
        return GGUF_NAMES(name)

    def has(self, name: str) -> bool:
        return self.native_name(name) in self._tensors

    def where(self, native: str) -> str:
        return str(self.path)

    def _read(self, native: str, shape: tuple[int, ...]) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._tensors[native]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except (*READ_ERRORS, NotImplementedError) as e:
            raise ConversionError(f"{self.path}: cannot dequantize tensor {native!r}: {e}") from None
        return torch.from_numpy(np.require(values, np.float32, ["W"]))  # copies only read-only views

    def infos(self) -> Iterator[TensorInfo]:
        for t in self._reader.tensors:
            yield TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, self.path)

    def write_tokenizer(self, directory: Path) -> bool:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name).save_pretrained(directory)
        return True
