"""The collect directory written by save mode, read through its manifest.

Save mode preallocates ``capacity`` rows per file; only the first ``rows[l]`` rows of
layer ``l`` hold tokens. Every array handed out here is mapped with exactly that many
rows, so the unfilled tail (zeros in DejaVu's runs: its "all zero y") can never reach a
predictor, and nothing is loaded into memory until a batch asks for it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.collect_manifest import read_manifest
from engine.dataset_format import FORMAT_VERSION, STORAGE_DTYPES, CollectError, array_path, array_widths

#: Validation and test hold out whole blocks of consecutive rows (at most this many per
#: block): neighbouring tokens of one prompt are near copies, so a row-level split would
#: measure on the training rows' twins.
MAX_SPLIT_BLOCK = 512
MIN_SPLIT_BLOCKS = 100


@dataclass(frozen=True)
class Collection:
    directory: Path
    dtype: str
    capacity: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    rows: dict[int, int]
    full: bool

    @classmethod
    def open(cls, directory: str | Path) -> Collection:
        """The dataset in ``directory``: joined (manifest.json) or as its ranks left it (parts)."""
        directory = Path(directory)
        path = f"{directory}'s manifest"
        m = read_manifest(directory)
        if m.get("format") != FORMAT_VERSION:
            raise CollectError(f"{path}: format {m.get('format')!r}, this trainer reads format {FORMAT_VERSION}")
        if m.get("dtype") not in STORAGE_DTYPES:
            raise CollectError(f"{path}: dtype {m.get('dtype')!r} is not one of {sorted(STORAGE_DTYPES)}")
        try:
            rows = {int(layer): int(m["rows"].get(str(layer), 0)) for layer in m["layers"]}
            return cls(
                directory=directory,
                dtype=m["dtype"],
                capacity=int(m["capacity"]),
                hidden_size=int(m["hidden_size"]),
                intermediate_size=int(m["intermediate_size"]),
                num_heads=int(m["num_heads"]),
                num_layers=int(m["num_layers"]),
                rows=rows,
                full=bool(m.get("full", False)),
            )
        except KeyError as e:
            raise CollectError(f"{path}: manifest has no field {e.args[0]!r}") from None

    @property
    def layers(self) -> list[int]:
        return sorted(self.rows)

    def rows_of(self, layer: int) -> int:
        """Rows written for ``layer``; an error when it was not recorded or holds none."""
        if layer not in self.rows:
            raise CollectError(f"layer {layer} was not recorded in {self.directory} (recorded layers: {self.layers})")
        if self.rows[layer] <= 0:
            raise CollectError(f"layer {layer} has no rows in {self.directory}'s manifest")
        return self.rows[layer]

    def width(self, stem: str) -> int:
        return array_widths(self)[stem]

    def array(self, stem: str, layer: int) -> np.memmap:
        """``<stem>_<layer>.mmap`` mapped read-only with only the rows written (row-major)."""
        rows, width = self.rows_of(layer), self.width(stem)
        path = array_path(self.directory, stem, layer)
        if not path.is_file():
            raise CollectError(f"{path}: file is missing (layer {layer} is listed in the manifest)")
        dtype = STORAGE_DTYPES[self.dtype]
        needed = rows * width * np.dtype(dtype).itemsize
        if path.stat().st_size < needed:
            raise CollectError(
                f"{path}: {path.stat().st_size} bytes, but {rows} rows of {width} {self.dtype} need {needed}"
            )
        return np.memmap(path, dtype=dtype, mode="r", shape=(rows, width))

    def read(self, array: np.memmap, rows: np.ndarray) -> torch.Tensor:
        """``rows`` (sorted first: one slice when consecutive) of one of this collection's
        arrays, as a tensor of the stored dtype that owns its memory: half the bytes of
        float32 to move to a GPU, where ``.float()`` is cheap. A non-finite value is an
        error naming the file and row, since one overflowed float16 would silently turn
        a predictor's loss into NaN."""
        rows = np.sort(rows)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            block = np.array(array[rows[0] : rows[-1] + 1])
        else:
            block = np.asarray(array[rows])
        t = torch.from_numpy(block)
        t = t.view(torch.bfloat16) if self.dtype == "bfloat16" else t
        finite = torch.isfinite(t).all(dim=1)
        if not finite.all():
            raise CollectError(f"{array.filename}: non-finite value in row {rows[int((~finite).nonzero()[0])]}")
        return t

    def batches(self, arrays: Sequence[np.memmap], rows: np.ndarray, batch_size: int) -> Iterator[list[torch.Tensor]]:
        """Stream ``rows`` of each array in the given order, ``batch_size`` at a time."""
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            yield [self.read(array, batch) for array in arrays]


@dataclass(frozen=True)
class RowSplit:
    """Disjoint, sorted row indices covering ``range(num_rows)``: ``train`` fits the
    predictor, ``val`` picks its best epoch, ``test`` (used for nothing else) measures it.
    ``definition`` is JSON that recomputes them without this code: block ``b`` holds rows
    ``b * block_rows`` up to ``(b + 1) * block_rows`` (the last block may be shorter), the
    listed blocks are validation and test, every other block is training."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    definition: dict


def split_rows(num_rows: int, val_fraction: float, test_fraction: float, seed: int) -> RowSplit:
    """Split ``num_rows`` into training, validation and test rows by whole blocks.

    A seeded permutation of blocks of consecutive rows chooses the test blocks (its first
    ones) and then the validation blocks, so the split is reproducible, spread over the
    whole collection (not only its end, where the longest generations sit), never shares
    a block between two parts, and the test rows do not depend on ``val_fraction``."""
    if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {val_fraction}, {test_fraction}"
        )
    if num_rows < 3:
        raise ValueError(f"need at least 3 rows to split into train, validation and test, got {num_rows}")
    block = max(1, min(MAX_SPLIT_BLOCK, num_rows // MIN_SPLIT_BLOCKS))
    num_blocks = -(-num_rows // block)
    num_test = min(max(1, round(num_blocks * test_fraction)), num_blocks - 2)
    num_val = min(max(1, round(num_blocks * val_fraction)), num_blocks - 1 - num_test)
    order = np.random.default_rng(seed).permutation(num_blocks)
    test_blocks, val_blocks = np.sort(order[:num_test]), np.sort(order[num_test : num_test + num_val])
    part = np.zeros(num_blocks, dtype=np.int8)  # 0 train, 1 validation, 2 test
    part[val_blocks], part[test_blocks] = 1, 2
    of_row = np.repeat(part, block)[:num_rows]
    rows = np.arange(num_rows)
    definition = {
        "num_rows": num_rows,
        "block_rows": block,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "val_blocks": val_blocks.tolist(),
        "test_blocks": test_blocks.tolist(),
    }
    return RowSplit(rows[of_row == 0], rows[of_row == 1], rows[of_row == 2], definition)
