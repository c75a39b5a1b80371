"""Meta checkpoints: params.json, consolidated.*.pth (one file per model-parallel rank,
merged here) and the tiktoken tokenizer.model."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch

from converters.checkpoint import ConversionError, NameTable, RotaryInterleaved, TensorInfo, TorchFile
from converters.llama3_tokenizer import convert_llama3_tokenizer
from engine.config import ConfigError, ModelConfig
from engine.shards import LAYER_KEYS

META_NAMES = NameTable(
    {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight", "lm_head.weight": "output.weight"},
    "layers.{}.",
    dict(
        zip(
            LAYER_KEYS,
            (
                "attention.wq.weight",
                "attention.wk.weight",
                "attention.wv.weight",
                "attention.wo.weight",
                "feed_forward.w1.weight",
                "feed_forward.w3.weight",
                "feed_forward.w2.weight",
                "attention_norm.weight",
                "ffn_norm.weight",
            ),
            strict=True,
        )
    ),
)


class MetaCheckpoint(RotaryInterleaved):
    """Meta's params.json + consolidated.*.pth (one file per model-parallel rank) + tokenizer.model."""

    format = "meta"

    def __init__(self, path: Path, llama_version: str | None = None):
        super().__init__(path)
        self.llama_version = llama_version
        self._part_paths = sorted(path.glob("consolidated.*.pth"))
        if not self._part_paths:
            raise ConversionError(f"{path}: no consolidated.*.pth files")
        self._opened: list[TorchFile] = []
        self._parts()  # open now, so that a corrupt file fails before any work

    def _parts(self) -> list[TorchFile]:
        if not self._opened:
            self._opened = [TorchFile(f) for f in self._part_paths]
        return self._opened

    def release(self) -> None:
        self._opened = []

    @cached_property
    def config(self) -> ModelConfig:
        params_path = self.path / "params.json"
        try:
            params = json.loads(params_path.read_text())
            config = ModelConfig.from_meta_params(params, self.llama_version)
        except (json.JSONDecodeError, ConfigError) as e:
            raise ConversionError(f"{params_path}: {e}") from None
        if config.rope_scaling:
            origin = (
                "params.json"
                if params.get("rope_scaling_factor") is not None
                else (f"--llama-version {self.llama_version}")
            )
            print(f"llama3 rope scaling factor {config.rope_scaling['factor']:g} (from {origin})")
        # Meta marks tied output embeddings (Llama 3.2 1B/3B) by leaving output.weight out.
        return config.replace(tie_word_embeddings="output.weight" not in self._parts()[0].keys())

    def native_name(self, name: str) -> str:
        return META_NAMES(name)

    def has(self, name: str) -> bool:
        native = self.native_name(name)
        return all(native in part.keys() for part in self._parts())

    def where(self, native: str) -> str:
        return ", ".join(str(part.path) for part in self._parts())

    def _read(self, native: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Merge the model-parallel slices: replicated tensors (norms) are taken once, the
        others are concatenated along the one dimension whose slices add up to the full
        size (rows for wq/wk/wv/w1/w3/output and Llama 3's embeddings, columns for wo/w2)."""
        parts = [part.get(native) for part in self._parts()]
        if all(tuple(p.shape) == shape for p in parts):
            return parts[0]
        for dim in range(len(shape)):
            if sum(p.shape[dim] for p in parts) == shape[dim]:
                try:
                    return torch.cat(parts, dim)
                except RuntimeError:
                    break
        shapes = [tuple(p.shape) for p in parts]
        raise ConversionError(f"{self.where(native)}: tensor {native!r} has slice shapes {shapes}, expected {shape}")

    def infos(self) -> Iterator[TensorInfo]:
        for part in self._parts():
            for native in part.keys():
                shape, dtype = part.info(native)
                yield TensorInfo(native, shape, dtype, part.path)

    def num_parameters(self) -> int:
        """Model-parallel files split every matrix but replicate the 1-D norm weights."""
        return sum(math.prod(i.shape) for i in self.infos() if len(i.shape) > 1 or i.file == self._parts()[0].path)

    def write_tokenizer(self, directory: Path) -> bool:
        model = self.path / "tokenizer.model"
        if not model.is_file():
            return False
        convert_llama3_tokenizer(model, self.config.max_position_embeddings).save_pretrained(directory)
        return True
