"""The collected-data format, defined once for its writer (save mode's collector) and its
readers (the predictor trainer, sparse calibration): the manifest's name and version, the
arrays, their widths and file names, and the error a bad collect directory raises.

A collect directory holds, per layer ``l``, one raw row-major file per array
(``<array>_<l>.mmap``, ``capacity`` rows of the array's width) and a manifest whose ``rows``
say how many rows of each layer hold tokens: one part per rank as a run leaves it, or the
``manifest.json`` of a joined dataset (engine/collect_manifest.py reads either)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ARRAYS = ("att_x", "att_label", "mlp_x", "mlp_label")

#: Array -> the field giving its row width, named alike in the model config and the manifest.
WIDTH_FIELDS = {
    "att_x": "hidden_size",
    "att_label": "num_heads",
    "mlp_x": "hidden_size",
    "mlp_label": "intermediate_size",
}

#: How each manifest dtype is laid out on disk; numpy has no bfloat16, so its raw bits
#: are mapped as uint16 and reinterpreted by torch.
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


class CollectError(ValueError):
    """A collect directory cannot be written or read as asked: it would be overwritten, a
    resume does not match, or a file, layer or row a reader needs is missing or broken."""


def array_widths(source) -> dict[str, int]:
    """Row width of each array, from a model config or a manifest-backed collection."""
    return {name: getattr(source, field) for name, field in WIDTH_FIELDS.items()}


def array_path(collect_dir: Path, name: str, layer: int) -> Path:
    return Path(collect_dir) / f"{name}_{layer}.mmap"


def model_fingerprint(model_dir: Path) -> dict:
    """What identifies the model a dataset was collected from: its config, by content."""
    text = (Path(model_dir) / "config.json").read_bytes()
    return {"path": str(Path(model_dir).resolve()), "config_sha256": hashlib.sha256(text).hexdigest()}
