"""The manifest of a collected dataset: one part per rank, merged when read.

Each save rank publishes the rows of its own layers in a part file of its own
(``manifest-part-<first>-<last>.json``, replaced atomically), so ranks share no lock and
no file: a collection directory may be shared by every node or local to each. A
directory holding every part is a dataset as it stands; node-local directories are made
one by ``python -m engine.collect_join``, which writes ``manifest.json`` (the merged
manifest, the same fields a part has, rows for every layer). Readers take
``manifest.json`` where there is one, else the merge of the parts."""

from __future__ import annotations

import json
import re
from pathlib import Path

from engine.atomic import write_json_atomic
from engine.dataset_format import MANIFEST, CollectError

PART_PATTERN = re.compile(r"manifest-part-(\d+)-(\d+)\.json")
JOIN_COMMAND = "python -m engine.collect_join OUT DIR..."


def part_name(layers: list[int]) -> str:
    return f"manifest-part-{min(layers)}-{max(layers)}.json"


def header_mismatch(manifest: dict, header: dict) -> str | None:
    """How a manifest's header differs from another's, or None when they agree (the model
    by its config's content: its path may differ between nodes)."""
    for key, value in header.items():
        if key not in ("model", "rows", "full", "inputs", "part_layers") and manifest.get(key) != value:
            return f"{key} is {manifest.get(key)!r}, not {value!r}"
    if manifest["model"]["config_sha256"] != header["model"]["config_sha256"]:
        return f"collected from {manifest['model']['path']}, a different model than {header['model']['path']}"
    return None


def write_part(path: Path, part: dict) -> None:
    try:
        write_json_atomic(path, part)
    except OSError as e:
        raise CollectError(f"{path}: cannot update the manifest: {e.strerror} (disk full?)") from None


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CollectError(f"{path}: unreadable manifest: {e}") from None


def read_parts(directory: Path) -> dict[Path, dict]:
    """Every part in ``directory``, by path (none when it has none)."""
    paths = sorted(p for p in Path(directory).glob("manifest-part-*.json") if PART_PATTERN.fullmatch(p.name))
    return {path: _load(path) for path in paths}


def recorded_rows(directory: Path) -> dict[int, int]:
    """Rows published per layer by whatever manifest or parts ``directory`` holds, complete or not."""
    directory = Path(directory)
    joined = directory / MANIFEST
    manifests = [_load(joined)] if joined.is_file() else list(read_parts(directory).values())
    return {int(layer): int(n) for m in manifests for layer, n in m.get("rows", {}).items()}


def merge_parts(parts: dict[Path, dict]) -> dict:
    """One manifest from the parts of every rank: they must describe the same collection
    (model, layout, layers) and, together, every layer once."""
    (first_path, first), *others = parts.items()
    rows: dict[str, int] = {}
    owner: dict[str, Path] = {}
    for path, part in parts.items():
        if mismatch := header_mismatch(part, first):
            raise CollectError(f"{path} does not match {first_path}: {mismatch}")
        for layer, count in part["rows"].items():
            if layer in owner:
                raise CollectError(f"layer {layer} is in both {owner[layer]} and {path}")
            rows[layer], owner[layer] = int(count), path
    missing = [layer for layer in first["layers"] if str(layer) not in rows]
    if missing:
        where = sorted({str(p.parent) for p in parts})
        raise CollectError(
            f"{', '.join(where)}: no rows of layers {missing}: they were recorded in another directory"
            f" (another node?); join the directories: {JOIN_COMMAND}"
        )
    merged = {key: value for key, value in first.items() if key != "part_layers"}
    merged["rows"] = {str(layer): rows[str(layer)] for layer in first["layers"]}
    merged["full"] = any(part.get("full", False) for part in parts.values())
    merged["inputs"] = list(dict.fromkeys(i for part in parts.values() for i in part.get("inputs", [])))
    return merged


def read_manifest(directory: Path) -> dict:
    """The dataset's manifest: ``manifest.json`` when joined, else the merge of its parts."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return _load(directory / MANIFEST)
    parts = read_parts(directory)
    if not parts:
        raise CollectError(f"{directory}: no {MANIFEST} and no manifest parts (is it a save-mode collect directory?)")
    try:
        return merge_parts(parts)
    except (KeyError, TypeError, AttributeError) as e:
        raise CollectError(f"{directory}: a manifest part is malformed ({e!r})") from None
