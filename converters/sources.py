"""Which reader a converter source needs: a .gguf file, a Meta or HF directory, or a hub id."""

from __future__ import annotations

import re
from pathlib import Path

from converters.checkpoint import Checkpoint, ConversionError
from converters.gguf_checkpoint import GGUFCheckpoint
from converters.hf_checkpoint import HFCheckpoint
from converters.meta_checkpoint import MetaCheckpoint

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def open_checkpoint(source: str, llama_version: str | None = None) -> Checkpoint:
    """Recognise the format of ``source`` (a path or a hub id) and open it lazily."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFCheckpoint(path)
        raise ConversionError(f"{path}: unknown checkpoint format (expected a .gguf file or a model directory)")
    if path.is_dir():
        if (path / "params.json").is_file():
            return MetaCheckpoint(path, llama_version)
        if (path / "config.json").is_file():
            return HFCheckpoint(path)
        raise ConversionError(
            f"{path}: unknown checkpoint format (expected config.json with safetensors/.bin weights, "
            "or Meta's params.json with consolidated.*.pth)"
        )
    if HUB_ID.match(source) and not source.startswith("."):
        return HFCheckpoint(download(source))
    raise ConversionError(f"{path}: no such file or directory")


def download(repo_id: str) -> Path:
    """Fetch a hub model's weights, config and tokenizer (needs a network)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown id, no access: all mean the same here
        raise ConversionError(
            f"{repo_id}: not a local path, and downloading it from the Hugging Face hub failed "
            f"(offline or unknown id?): {type(e).__name__}: {e}"
        ) from None
