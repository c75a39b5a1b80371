"""What every checkpoint reader shares: lazy single-file readers, the name mapping from
shard names to a format's own names, and the checks and errors of a tensor read.

Readers answer for tensors by their shard-file names (``embed_tokens.weight``,
``layers.<i>.<key>``, ``norm.weight``, ``lm_head.weight``) in the HF layout, one tensor at
a time, so a conversion never holds the whole model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.config import ModelConfig
from engine.shards import READ_ERRORS as TORCH_READ_ERRORS
from engine.shards import load_untrusted

#: What reading a truncated or corrupt file raises: torch's, plus safetensors', gguf's and numpy's.
READ_ERRORS = (*TORCH_READ_ERRORS, KeyError, SafetensorError)


class ConversionError(RuntimeError):
    """A checkpoint cannot be read or converted; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as stored in its source file (native name and dtype), for the inspector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path


def layer_name(index: int, key: str) -> str:
    return f"layers.{index}.{key}"


def interleaved_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k rows from the interleaved rotary layout (Meta, llama.cpp) to HF's
    rotate-half layout: per head, rows (0, 1, 2, 3, ...) pairs become (evens, odds)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- single files ------------------------------------------------------------------


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
        except READ_ERRORS as e:
            raise ConversionError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(name)
        except READ_ERRORS as e:
            raise ConversionError(f"{self.path}: cannot read tensor {name!r}: {e}") from None

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        view = self._file.get_slice(name)
        return tuple(view.get_shape()), view.get_dtype()


class TorchFile:
    """A ``torch.save`` state dict, memory-mapped (no unpickling of code: weights_only)."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors = load_untrusted(path, "torch file", ConversionError)
        if not isinstance(self._tensors, dict):
            raise ConversionError(f"{path}: holds a {type(self._tensors).__name__}, not a state dict")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        t = self._tensors[name]
        return tuple(t.shape), str(t.dtype).removeprefix("torch.")


def open_weights(path: Path) -> SafetensorsFile | TorchFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchFile(path)


# ---- checkpoints -------------------------------------------------------------------


class Checkpoint:
    """A model checkpoint in some format. Subclasses map names and read native tensors."""

    format: str

    def __init__(self, path: Path):
        self.path = path

    @cached_property
    def config(self) -> ModelConfig:
        """Read on first use, so that the inspector works without a full config."""
        raise NotImplementedError

    def native_name(self, name: str) -> str:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def where(self, native: str) -> str:
        """The file (or files) a native tensor lives in, for error messages."""
        raise NotImplementedError

    def _read(self, native: str, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def infos(self) -> Iterator[TensorInfo]:
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(math.prod(info.shape) for info in self.infos())

    def write_tokenizer(self, directory: Path) -> bool:
        """Write tokenizer files that ``AutoTokenizer`` loads; False when the source has none."""
        raise NotImplementedError

    def release(self) -> None:
        """Unmap the source files, so pages read for one shard do not stay resident for the
        whole conversion; they are mapped again on the next read."""

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """One tensor by shard name, checked against ``shape``, in the HF layout."""
        native = self.native_name(name)
        if not self.has(name):
            raise ConversionError(f"{self.path}: tensor {native!r} (for {name}) is missing")
        t = self._read(native, shape)
        if tuple(t.shape) != shape:
            raise ConversionError(
                f"{self.where(native)}: tensor {native!r} has shape {tuple(t.shape)}, expected {shape} for {name}"
            )
        return self._to_hf_layout(name, t)

    def _to_hf_layout(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t


class RotaryInterleaved(Checkpoint):
    """Formats storing q/k rows in the interleaved rotary layout (Meta and llama.cpp)."""

    def _to_hf_layout(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith("self_attn.q_proj.weight"):
            return interleaved_to_halves(t, self.config.num_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return interleaved_to_halves(t, self.config.num_kv_heads)
        return t


class NameTable:
    """Shard name -> native name, from a table of global names and per-layer suffixes."""

    def __init__(self, globals_: dict[str, str], layer_prefix: str, layer_keys: dict[str, str]):
        self.globals, self.layer_prefix, self.layer_keys = globals_, layer_prefix, layer_keys

    def __call__(self, name: str) -> str:
        if name in self.globals:
            return self.globals[name]
        _, index, key = name.split(".", 2)
        return self.layer_prefix.format(index) + self.layer_keys[key]
