"""Convert an HF directory, a GGUF file, a Meta checkpoint or a hub id into a shard directory.

One shard file is read, checked, written and freed at a time, so converting never holds
two copies of the model. Everything is written into a hidden sibling directory that is
renamed at the end: a failed run leaves nothing behind.

    python converters/convert_llama_checkpoint.py --model-name SRC --save-path DIR \
        [--dtype float32|float16|bfloat16] [--llama-version 3.1|3.2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from converters.checkpoint import Checkpoint, ConversionError, layer_name
from converters.sources import open_checkpoint
from engine.atomic import write_json_atomic
from engine.config import LLAMA3_ROPE_FACTOR_BY_VERSION, ConfigError
from engine.shards import (
    EMBEDDINGS,
    LM_HEAD,
    MANIFEST,
    ShardError,
    expected_shapes,
    save_shard,
    sha256_file,
    shard_filename,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _piece_tensors(checkpoint: Checkpoint, piece: int | str) -> dict[str, torch.Tensor]:
    """The tensors of one shard file, read from the checkpoint and checked."""
    shapes = expected_shapes(checkpoint.config, piece)
    if piece == LM_HEAD:
        head = "embed_tokens.weight" if checkpoint.config.tie_word_embeddings else "lm_head.weight"
        return {
            "norm.weight": checkpoint.read("norm.weight", shapes["norm.weight"]),
            "lm_head.weight": checkpoint.read(head, shapes["lm_head.weight"]),
        }
    if piece == EMBEDDINGS:
        return {key: checkpoint.read(key, shape) for key, shape in shapes.items()}
    return {key: checkpoint.read(layer_name(piece, key), shape) for key, shape in shapes.items()}


def _write_shards(checkpoint: Checkpoint, out: Path, dtype: torch.dtype | None) -> tuple[dict[str, dict], str]:
    """Write every shard file; returns their manifest entries and the dtype(s) written."""
    pieces = [EMBEDDINGS, *range(checkpoint.config.num_layers), LM_HEAD]
    files, dtypes = {}, set()
    for piece in tqdm(pieces, desc=f"converting {checkpoint.path.name}", unit="shard"):
        tensors = _piece_tensors(checkpoint, piece)
        if dtype is not None:
            tensors = {k: t.to(dtype) for k, t in tensors.items()}
        dtypes.update(str(t.dtype).removeprefix("torch.") for t in tensors.values())
        files[shard_filename(piece)] = save_shard(out, piece, tensors)
        del tensors
        checkpoint.release()
    return files, ",".join(sorted(dtypes))


def convert(source: str, save_path: str | Path, dtype: str | None = None, llama_version: str | None = None) -> Path:
    """Convert ``source`` into the shard directory ``save_path``; returns that path.

    ``dtype`` casts every tensor (default: GGUF dequantizes to float32, other formats keep
    the source dtype). ``llama_version`` gives the llama3 rope factor of Meta checkpoints
    whose params.json lacks it."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    save_path = Path(save_path)
    if save_path.exists() and (not save_path.is_dir() or any(save_path.iterdir())):
        raise ConversionError(f"{save_path}: already exists and is not empty; remove it or pick another --save-path")
    checkpoint = open_checkpoint(str(source), llama_version)
    config = checkpoint.config

    save_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_path.parent / f".{save_path.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files, written_dtype = _write_shards(checkpoint, tmp, DTYPES.get(dtype))
        write_json_atomic(tmp / "config.json", config.to_hf_dict())
        if not checkpoint.write_tokenizer(tmp):
            print(f"warning: {source} has no tokenizer files; {save_path} will have none", file=sys.stderr)
        for path in sorted(tmp.iterdir()):
            if path.name not in files:
                files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {
            "source": str(source),
            "format": checkpoint.format,
            "dtype": written_dtype,
            "num_layers": config.num_layers,
            "files": files,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        if save_path.exists():
            save_path.rmdir()
        os.rename(tmp, save_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", required=True, help="HF model dir, .gguf file, Meta checkpoint dir or hub id")
    parser.add_argument("--save-path", required=True, type=Path, help="shard directory to create")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast every tensor (default: source dtype; GGUF float32)")
    parser.add_argument(
        "--llama-version",
        choices=list(LLAMA3_ROPE_FACTOR_BY_VERSION),
        help="Meta checkpoints only: llama3 rope factor when params.json lacks rope_scaling_factor",
    )
    args = parser.parse_args(argv)
    try:
        out = convert(args.model_name, args.save_path, args.dtype, args.llama_version)
    except (ConversionError, ConfigError, ShardError, OSError) as e:  # OSError: writing metadata, disk full
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
