"""List every tensor of a checkpoint (HF dir, Meta dir, GGUF file or shard dir) without
loading it, and optionally verify a shard directory against its manifest.

    python converters/inspect_checkpoint.py PATH [--verify]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters.checkpoint import ConversionError, TensorInfo, TorchFile
from converters.sources import open_checkpoint
from engine.config import ModelConfig
from engine.shards import EMBEDDINGS, LM_HEAD, MANIFEST, ShardError, shard_filename, verify_manifest


def is_shard_dir(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / shard_filename(EMBEDDINGS)).is_file())


def _shard_order(path: Path) -> tuple[int, int]:
    piece = path.stem.removeprefix("pytorch_")
    return (0, -1) if piece == EMBEDDINGS else (2, 0) if piece == LM_HEAD else (1, int(piece))


def shard_infos(path: Path) -> Iterator[TensorInfo]:
    """The tensors of a shard directory, file by file in pipeline order (memory-mapped)."""
    for file in sorted(path.glob("pytorch_*.pt"), key=_shard_order):
        shard = TorchFile(file)
        for name in shard.keys():
            shape, dtype = shard.info(name)
            yield TensorInfo(name, shape, dtype, file)


def inspect(path: Path) -> tuple[list[TensorInfo], int]:
    """All tensors of ``path`` and the model's parameter count (tied weights counted once)."""
    if is_shard_dir(path):
        infos = list(shard_infos(path))
        count = sum(math.prod(i.shape) for i in infos)
        if (path / "config.json").is_file() and ModelConfig.from_model_dir(path).tie_word_embeddings:
            count -= sum(math.prod(i.shape) for i in infos if i.name == "lm_head.weight")
        return infos, count
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    checkpoint = open_checkpoint(str(path))
    return list(checkpoint.infos()), checkpoint.num_parameters()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="HF model dir, Meta checkpoint dir, .gguf file or shard dir")
    parser.add_argument("--verify", action="store_true", help="check a shard dir's files against manifest.json")
    args = parser.parse_args(argv)
    try:
        infos, count = inspect(args.path)
    except (ConversionError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    width = max((len(i.name) for i in infos), default=0)
    for info in infos:
        print(f"{info.name:<{width}}  {str(list(info.shape)):<16}  {info.dtype:<9}  {info.file.name}")
    print(f"{len(infos)} tensors, {count:,} parameters")
    if not args.verify:
        return 0
    if not is_shard_dir(args.path):
        print(f"error: --verify needs a shard directory with {MANIFEST}", file=sys.stderr)
        return 1
    try:
        problems = verify_manifest(args.path)
    except ShardError as e:
        problems = [str(e)]
    for problem in problems:
        print(f"MISMATCH {problem}", file=sys.stderr)
    print("manifest: FAILED" if problems else "manifest: all files match")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
