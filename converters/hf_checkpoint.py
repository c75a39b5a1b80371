"""HF model directories: config.json plus safetensors or ``.bin`` weights, sharded (with
an index) or not, every file memory-mapped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch

from converters.checkpoint import (
    Checkpoint,
    ConversionError,
    NameTable,
    SafetensorsFile,
    TensorInfo,
    TorchFile,
    open_weights,
)
from engine.config import ConfigError, ModelConfig
from engine.shards import LAYER_KEYS

MLP_KEYS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
#: Files next to HF weights that the tokenizer (or generation defaults) need.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


HF_NAMES = NameTable(
    {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    "model.layers.{}.",
    {key: f"mlp.{key}" if key in MLP_KEYS else key for key in LAYER_KEYS},
)


class HFCheckpoint(Checkpoint):
    """An HF model directory: config.json plus safetensors or ``.bin`` weights, sharded or not."""

    format = "hf"

    def __init__(self, path: Path):
        super().__init__(path)
        self._files: dict[str, SafetensorsFile | TorchFile] = {}
        self._weight_map = self._find_weights()

    def _find_weights(self) -> dict[str, str]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (self.path / index).is_file():
                try:
                    return json.loads((self.path / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ConversionError(f"{self.path / index}: not a weight index: {e}") from None
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        if not files:
            raise ConversionError(f"{self.path}: no *.safetensors or *.bin weight files")
        return {name: f.name for f in files for name in self._file(f.name).keys()}

    @cached_property
    def config(self) -> ModelConfig:
        config_path = self.path / "config.json"
        try:
            raw = json.loads(config_path.read_text())
            if raw.get("model_type", "llama") != "llama":
                raise ConfigError(f"model_type {raw['model_type']!r} is not llama")
            return ModelConfig.from_hf_dict(raw)
        except (json.JSONDecodeError, ConfigError) as e:
            raise ConversionError(f"{config_path}: {e}") from None

    def _file(self, filename: str) -> SafetensorsFile | TorchFile:
        if filename not in self._files:
            path = self.path / filename
            if not path.is_file():
                raise ConversionError(f"{path}: weight file named in the index is missing")
            self._files[filename] = open_weights(path)
        return self._files[filename]

    def native_name(self, name: str) -> str:
        return HF_NAMES(name)

    def release(self) -> None:
        self._files.clear()

    def has(self, name: str) -> bool:
        return self.native_name(name) in self._weight_map

    def where(self, native: str) -> str:
        return str(self.path / self._weight_map[native])

    def _read(self, native: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._file(self._weight_map[native]).get(native)

    def infos(self) -> Iterator[TensorInfo]:
        for native, filename in self._weight_map.items():
            shape, dtype = self._file(filename).info(native)
            yield TensorInfo(native, shape, dtype, self.path / filename)

    def write_tokenizer(self, directory: Path) -> bool:
        found = [name for name in HF_TOKENIZER_FILES if (self.path / name).is_file()]
        for name in found:
            (directory / name).write_bytes((self.path / name).read_bytes())
        return bool(found)
