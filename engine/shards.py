"""The shard directory: one ``pytorch_*.pt`` file per pipeline piece, plus a manifest.

A stage reads only the files it owns, so a rank's memory holds its share of the model.
Files are read with ``weights_only=True`` (never unpickle code) and memory-mapped."""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import torch

from engine.atomic import atomic_write

EMBEDDINGS = "embs"
LM_HEAD = "lm_head"
MANIFEST = "manifest.json"

#: Tensor names inside each shard file, with their shapes as functions of the config.
LAYER_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


#: What reading a truncated or corrupt ``torch.save`` file raises.
READ_ERRORS = (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError)


class ShardError(RuntimeError):
    """A shard file is missing, truncated, or holds the wrong tensors."""


def load_untrusted(path: Path, what: str, error: type[Exception] = ShardError, mmap: bool = True) -> object:
    """``torch.load`` for files from anywhere: ``weights_only``, so the file can hold tensors
    and plain data but never run code. A refused or unreadable file raises ``error``
    naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = _refusal(e)
        raise error(f"{path}: refused to load {what}: it holds more than tensors and plain data ({reason})") from None
    except READ_ERRORS as e:
        raise error(f"{path}: cannot read {what} (truncated or corrupt?): {e}") from None


def _refusal(e: pickle.UnpicklingError) -> str:
    """The first sentence of torch's reason for refusing, without its advice to retry with
    ``weights_only=False`` or to allowlist the global (either would run the file's code)."""
    lines = [line.strip() for line in str(e).splitlines()]
    reasons = [line for line in lines if line and "weights_only" not in line and "documentation" not in line]
    return (reasons[-1] if reasons else str(e)).split(". ")[0]


def shard_filename(piece: int | str) -> str:
    """``pytorch_embs.pt``, ``pytorch_<i>.pt`` or ``pytorch_lm_head.pt``."""
    return f"pytorch_{piece}.pt"


def expected_shapes(config, piece: int | str) -> dict[str, tuple[int, ...]]:
    """The tensors a shard file must hold, so a wrong file fails loudly at load time."""
    h, v = config.hidden_size, config.vocab_size
    if piece == EMBEDDINGS:
        return {"embed_tokens.weight": (v, h)}
    if piece == LM_HEAD:
        return {"norm.weight": (h,), "lm_head.weight": (v, h)}
    ffn, q, kv = config.intermediate_size, config.q_size, config.kv_size
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (ffn, h), (ffn, h), (h, ffn), (h,), (h,)]
    return dict(zip(LAYER_KEYS, shapes))


def load_shard(model_dir: str | Path, piece: int | str, config=None) -> dict[str, torch.Tensor]:
    """Load one shard file: floating-point tensors only, of the dtype(s) the manifest
    records; with ``config``, exactly the expected tensors with their shapes. A wrong file
    fails here, naming file and tensor, instead of running with wrong weights."""
    path = Path(model_dir) / shard_filename(piece)
    if not path.is_file():
        raise ShardError(f"{path}: shard file is missing")
    tensors = load_untrusted(path, "shard file")
    if not isinstance(tensors, dict):
        raise ShardError(f"{path}: holds a {type(tensors).__name__}, not a dict of tensors")
    if config is not None:
        check_shapes(path, tensors, expected_shapes(config, piece))
    check_dtypes(path, tensors, manifest_dtypes(model_dir))
    return tensors


def check_shapes(path: Path | str, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Exactly the tensors of ``shapes``: an extra one means a file of another architecture."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise ShardError(f"{path}: tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise ShardError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
    extra = [name for name in tensors if name not in shapes]
    if extra:
        raise ShardError(f"{path}: unexpected tensor {extra[0]!r} (expected only {', '.join(shapes)})")


def check_dtypes(path: Path, tensors: dict[str, object], dtypes: frozenset[torch.dtype] | None) -> None:
    """Every value a floating-point tensor, of one of ``dtypes`` when given."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ShardError(f"{path}: {name!r} is a {type(t).__name__}, not a tensor")
        if not t.dtype.is_floating_point:
            raise ShardError(f"{path}: tensor {name!r} has dtype {_name(t.dtype)}, expected a floating-point dtype")
        if dtypes and t.dtype not in dtypes:
            expected = " or ".join(sorted(map(_name, dtypes)))
            raise ShardError(f"{path}: tensor {name!r} has dtype {_name(t.dtype)}, expected {expected} ({MANIFEST})")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def manifest_dtypes(model_dir: str | Path) -> frozenset[torch.dtype] | None:
    """The dtypes the manifest says the shards hold; None without a manifest (synthetic test
    models) or a ``dtype`` field. Cached per manifest version: a stage reads it once."""
    path = Path(model_dir) / MANIFEST
    try:
        version = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    return _manifest_dtypes(path, version)


@functools.lru_cache(maxsize=8)
def _manifest_dtypes(path: Path, version: int) -> frozenset[torch.dtype] | None:
    names = read_manifest(path.parent).get("dtype")
    if not names:
        return None
    dtypes = {name: getattr(torch, name, None) for name in names.split(",")}
    for name, dtype in dtypes.items():
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ShardError(f"{path}: unknown dtype {name!r}")
    return frozenset(dtypes.values())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_shard(directory: str | Path, piece: int | str, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """Write one shard file; returns its manifest entry (size and sha256). A failed write
    (a full disk) leaves no file and raises ShardError naming it."""
    path = Path(directory) / shard_filename(piece)
    try:
        # Through a Python file, not torch's own writer: its OSError then says why it failed.
        with atomic_write(path, "wb") as f:
            torch.save({k: t.contiguous() for k, t in tensors.items()}, f)
    except (OSError, RuntimeError) as e:
        raise ShardError(f"{path}: cannot write (disk full?): {_os_error(e)}") from None
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _os_error(e: Exception) -> Exception:
    """The OSError behind a failed ``torch.save``: torch reports a failed write as a
    RuntimeError about zip positions, with the file's OSError as its context."""
    return e.__context__ if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) else e


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest (is {model_dir} a converted shard directory?)") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: invalid JSON: {e}") from None


def verify_manifest(model_dir: str | Path, names: list[str] | None = None) -> list[str]:
    """Return one message per file (all, or only ``names``) whose size or sha256 differs
    from the manifest."""
    listed = read_manifest(model_dir)["files"]
    problems = [f"{Path(model_dir) / name}: not listed in {MANIFEST}" for name in names or () if name not in listed]
    for name, entry in listed.items():
        path = Path(model_dir) / name
        if names is not None and name not in names:
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: size {path.stat().st_size}, manifest says {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems
