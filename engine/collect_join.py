"""Join the collect directories of a multi-node run into one dataset the trainer reads.

    python -m engine.collect_join OUT DIR [DIR ...]

Each node's directory holds the files and manifest parts of the layers its ranks recorded
(copy them to one host first, or give the paths of a shared filesystem). The parts must
describe one collection (the same model by its config's content, dtype, capacity, widths,
recorded layers) and together hold every recorded layer once. OUT then gets a symbolic
link to each layer's files (none where OUT is the directory holding them) and, last and
atomically, ``manifest.json``: the rows each part published, nothing more."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.collect_manifest import merge_parts, read_parts, write_part
from engine.dataset_format import ARRAYS, MANIFEST, CollectError, array_path


def join(out: Path, dirs: list[Path]) -> dict:
    """Write the joined dataset to ``out``; returns its manifest."""
    parts, owner = {}, {}
    for directory in dict.fromkeys(Path(d).resolve() for d in dirs):
        if (directory / MANIFEST).is_file():
            raise CollectError(f"{directory}: already a joined dataset; join the directories it came from")
        found = read_parts(directory)
        if not found:
            raise CollectError(f"{directory}: no manifest parts (is it a save-mode collect directory?)")
        parts.update(found)
        owner.update({int(layer): directory for part in found.values() for layer in part["rows"]})
    manifest = merge_parts(parts)
    out = Path(out).resolve()
    if (out / MANIFEST).exists():
        raise CollectError(f"{out / MANIFEST}: exists; join into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for layer in manifest["layers"]:
        if manifest["rows"][str(layer)] == 0 or owner[layer] == out:
            continue
        for name in ARRAYS:
            _link(array_path(owner[layer], name, layer), array_path(out, name, layer))
    write_part(out / MANIFEST, manifest)
    return manifest


def _link(source: Path, link: Path) -> None:
    if not source.is_file():
        raise CollectError(f"{source}: missing (its manifest part lists rows for it)")
    if link.is_symlink() and link.resolve() == source.resolve():
        return  # a join that stopped half-way, run again
    if link.exists() or link.is_symlink():
        raise CollectError(f"{link}: exists; join into a new directory")
    os.symlink(source, link)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the joined dataset's directory (may be one of DIR)")
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="collect directories, one per node")
    args = p.parse_args(argv)
    try:
        manifest = join(args.out, args.dirs)
    except (CollectError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = manifest["rows"].values()
    print(f"{args.out}: {len(manifest['layers'])} layers, {min(rows)}-{max(rows)} rows per layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
