"""Writes collected activations into DejaVu's raw row-major files (read as ``np.memmap``).

Files are created sparse (no zero-filling) and written with ``pwrite``: on a full disk a
write through a memory map would kill the process with SIGBUS, a ``pwrite`` fails with an
error naming the file. Each rank publishes the rows written for its own layers in its own
manifest part (engine/collect_manifest.py), replaced atomically after each flush and
shared with no other rank, so a run killed or failing at any moment, on one node or
several, leaves parts whose rows are valid."""

from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.collect_manifest import header_mismatch, part_name, read_parts, recorded_rows, write_part
from engine.config import ModelConfig
from engine.dataset_format import (
    ARRAYS,
    FORMAT_VERSION,
    MANIFEST,
    CollectError,
    array_path,
    array_widths,
    model_fingerprint,
)
from engine.host import float_this_thread

if TYPE_CHECKING:
    from modules.llama import RealRows

#: Writes smaller than this many values are done inline rather than by the writer thread.
INLINE_WRITE_VALUES = 1 << 16


@dataclass(frozen=True)
class DiskEstimate:
    """What a collection may write: ``bytes_per_layer_row`` = (2 hidden + heads + ffn) values
    of the collect dtype (att_x, mlp_x, att_label, mlp_label), for every row still free in
    the files of ``layers`` layers; and the space free on the collect dir's disk."""

    directory: Path
    bytes_per_layer_row: int
    layers: int
    rows: int
    free_bytes: int

    @property
    def bytes(self) -> int:
        return self.bytes_per_layer_row * self.layers * self.rows

    @property
    def missing_bytes(self) -> int:
        return self.bytes - self.free_bytes

    def describe(self) -> str:
        return (
            f"{self.bytes_per_layer_row} bytes per layer per row; {self.layers} layers x {self.rows} rows"
            f" may write up to {self.bytes / 1e9:.3g} GB, {self.free_bytes / 1e9:.3g} GB free in {self.directory}"
        )


def disk_estimate(config: ModelConfig, dtype: str, collect_dir: Path, layers: list[int], capacity: int) -> DiskEstimate:
    """The files of ``layers`` at full ``capacity`` (less the rows a resumed dataset holds)."""
    written = recorded_rows(collect_dir) if collect_dir.is_dir() else {}
    rows = capacity - min((written.get(layer, 0) for layer in layers), default=0)
    existing = next(p for p in (collect_dir, *collect_dir.parents) if p.exists())  # the disk it will be on
    per_row = sum(array_widths(config).values()) * np.dtype(dtype).itemsize
    return DiskEstimate(collect_dir, per_row, len(layers), max(0, rows), shutil.disk_usage(existing).free)


def check_disk_space(estimate: DiskEstimate, allow: bool, announce: bool) -> None:
    """Say (``announce``) what the collection may write; refuse, before anything starts, when
    it cannot fit, or only warn when ``allow`` (--collect-ignore-disk-space)."""
    if announce:
        print(f"collect: {estimate.describe()}", file=sys.stderr, flush=True)
    if estimate.missing_bytes <= 0:
        return
    if not allow:
        raise CollectError(
            f"{estimate.describe()}: the files would not fit; lower --collect-capacity, record fewer layers"
            " (--collect-layers), or pass --collect-ignore-disk-space"
        )
    warnings.warn(estimate.describe(), stacklevel=2)


def check_collect_dir(collect_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an existing dataset unless resuming. Run before any rank writes.
    A dataset without rows (left by a run that failed at start) holds nothing to lose."""
    if resume:
        if (collect_dir / MANIFEST).is_file():
            raise CollectError(
                f"{collect_dir}: a joined dataset ({MANIFEST}) cannot be resumed: resume in the directories"
                " it was joined from, then join again"
            )
        if not read_parts(collect_dir):
            raise CollectError(f"{collect_dir}: --collect-resume given but there are no manifest parts to resume")
    elif collect_dir.exists() and any(collect_dir.iterdir()) and any(recorded_rows(collect_dir).values()):
        raise CollectError(
            f"{collect_dir}: collect directory is not empty; pass --collect-resume to append, or choose another"
        )


class ActivationCollector:
    """One rank's writer for the layers it owns and their manifest part."""

    def __init__(
        self,
        collect_dir: str | Path,
        layers: list[int],
        all_layers: list[int],
        config: ModelConfig,
        model_dir: Path,
        input_path: str,
        dtype: str = "float16",
        capacity: int = 400_000,
        resume: bool = False,
        flush_seconds: float = 30.0,
    ):
        self.dir = Path(collect_dir)
        self.layers, self.dtype, self.capacity = list(layers), np.dtype(dtype), capacity
        self.torch_dtype = getattr(torch, self.dtype.name)
        self.widths = array_widths(config)
        self.flush_seconds, self._last_flush = flush_seconds, time.monotonic()
        header = {
            "format": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "capacity": capacity,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_heads": config.num_heads,
            "num_layers": config.num_layers,
            "layers": sorted(all_layers),
            "model": model_fingerprint(model_dir),
        }
        self.header, self.input_path, self.resume = header, input_path, resume
        self.rows: dict[int, int] = {}
        self.full = False
        self.files: dict[tuple[str, int], ArrayFile] = {}
        self._writer: BackgroundWriter | None = None
        self.resume_from = self.resume_row() if resume else 0

    @property
    def part_path(self) -> Path:
        return self.dir / part_name(self.layers)

    def resume_row(self) -> int:
        """The first row to write when resuming: the shortest of this rank's layers. The
        ranks then agree on the shortest of all (``open``), so row k stays the same token
        in every layer, on every node."""
        parts = read_parts(self.dir)
        if self.part_path not in parts:
            raise CollectError(
                f"{self.part_path}: missing: layers {self.layers} were not collected in {self.dir}"
                " (another node's directory, or another stage split?)"
            )
        part = parts[self.part_path]
        if mismatch := header_mismatch(part, self.header):
            raise CollectError(f"{self.part_path}: cannot resume: {mismatch}")
        return min(int(part["rows"].get(str(layer), 0)) for layer in self.layers)

    def open(self, start: int = 0) -> ActivationCollector:
        """Publish this rank's part (rows from ``start``) and open its files. Called once
        every rank has started, so a run that fails at start writes nothing."""
        self.dir.mkdir(parents=True, exist_ok=True)
        inputs = [self.input_path]
        if self.resume:
            inputs = list(dict.fromkeys([*read_parts(self.dir)[self.part_path].get("inputs", []), self.input_path]))
        else:
            self._clear_stale_parts()
        self.inputs = inputs
        self.rows = {layer: start for layer in self.layers}
        self._publish()  # at once, before rows past ``start`` are overwritten
        for layer in self.layers:
            for name in ARRAYS:
                path = array_path(self.dir, name, layer)
                self.files[(name, layer)] = ArrayFile(path, self.widths[name], self.dtype, self.capacity)
        self._writer = BackgroundWriter(self.torch_dtype, max_pending=len(self.files))  # about one step
        return self

    def _clear_stale_parts(self) -> None:
        """Remove rowless parts left by a run that failed at start where they would clash
        with this run's (same layers, or another layout); a part with rows is another
        run collecting here."""
        for path, part in read_parts(self.dir).items():
            overlaps = set(map(int, part.get("rows", {}))) & set(self.layers)
            if path == self.part_path or not (overlaps or header_mismatch(part, self.header)):
                continue
            if any(part.get("rows", {}).values()):
                raise CollectError(f"{path}: another run started collecting here")
            path.unlink(missing_ok=True)

    def _publish(self) -> None:
        part = {
            **self.header,
            "part_layers": self.layers,
            "rows": {str(layer): n for layer, n in self.rows.items()},
            "full": self.full,
            "inputs": self.inputs,
        }
        write_part(self.part_path, part)

    def record(self, layer: int, rows: RealRows, **arrays: torch.Tensor) -> None:
        """Append the real tokens' rows (``rows``, found once per step) of one layer's (B, T, ...)
        arrays. Nothing here waits for the device: the rows are gathered there and copied
        to the host by the writer."""
        start = self.rows[layer]
        count = min(rows.count, self.capacity - start)
        if count <= 0:
            if rows.count:
                self._mark_full()
            return
        for name, tensor in arrays.items():
            self._writer.submit(self.files[(name, layer)], start, rows.select(tensor)[:count])
        self.rows[layer] = start + count
        if self.rows[layer] == self.capacity:
            self._mark_full()
        if layer == self.layers[-1] and time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def _mark_full(self) -> None:
        if not self.full:
            self.full = True
            print(f"collect: {self.dir} is full ({self.capacity} rows per layer); recording stopped", flush=True)

    def flush(self) -> None:
        """Make the written rows durable, then publish their count in the manifest. A write
        that failed raises here, before the manifest could claim its rows."""
        if self._writer is None:
            return
        self._writer.drain()
        for file in self.files.values():
            file.sync()
        self._publish()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Publish the last rows and release the files, also when publishing fails."""
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.stop()
            for file in self.files.values():
                file.close()
            self.files.clear()


class ArrayFile:
    """One collected array: a (capacity, width) row-major file, written a block of rows at a time."""

    def __init__(self, path: Path, width: int, dtype: np.dtype, capacity: int):
        self.path, self.row_bytes = path, width * dtype.itemsize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = capacity * self.row_bytes
        try:
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)  # sparse: no blocks are allocated yet
        except OSError as e:
            os.close(self.fd)
            raise CollectError(f"{path}: cannot size the file to {size} bytes: {e.strerror}") from None

    def write(self, start: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows)).cast("B")
        offset = start * self.row_bytes
        try:
            while data:
                written = os.pwrite(self.fd, data, offset)
                data, offset = data[written:], offset + written
        except OSError as e:
            raise CollectError(
                f"{self.path}: writing rows {start}-{start + len(rows) - 1} failed: {e.strerror} (disk full?)"
            ) from None

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise CollectError(f"{self.path}: cannot flush to disk: {e.strerror}") from None

    def close(self) -> None:
        os.close(self.fd)


class BackgroundWriter:
    """Converts rows to the file dtype and writes them to their files on a thread of its
    own, so that this work fills the time the stage would otherwise wait for its peers.
    The queue is bounded, so a slow disk slows the stage instead of filling memory."""

    def __init__(self, dtype: torch.dtype, max_pending: int):
        self.dtype = dtype
        self.queue: queue.Queue = queue.Queue(max_pending)
        self.error: BaseException | None = None
        self._inline_buffers: dict[int, torch.Tensor] = {}  # the stage thread's, by row width
        self._thread_buffers: dict[int, torch.Tensor] = {}  # the writer thread's
        self.thread = threading.Thread(target=self._run, name="collect-writer", daemon=True)
        self.thread.start()

    def submit(self, file: ArrayFile, start: int, rows: torch.Tensor) -> None:
        """Large writes (prefill) go to the thread; small ones (a decode step's few rows)
        are cheaper done at once than handed over, which costs GIL switches."""
        self._raise_error()
        if rows.numel() < INLINE_WRITE_VALUES:
            self._write(file, start, rows, self._inline_buffers)
        else:
            self.queue.put((file, start, rows))

    def _write(self, file: ArrayFile, start: int, rows: torch.Tensor, buffers: dict[int, torch.Tensor]) -> None:
        """Convert on the device, or on the CPU into a buffer kept per row width: a fresh
        tensor per write has its large memory mapped in from the OS each time, page fault
        by page fault, which took longer than the conversion itself."""
        if rows.device.type != "cpu":
            file.write(start, rows.to(self.dtype).cpu().numpy())
            return
        count, width = rows.shape
        buffer = buffers.get(width)
        if buffer is None or len(buffer) < count:
            buffer = buffers[width] = torch.empty(count, width, dtype=self.dtype)
        converted = buffer[:count]
        converted.copy_(rows)
        file.write(start, converted.numpy())

    def _run(self) -> None:
        float_this_thread()  # a stage bound to one core would otherwise take turns with it
        while (item := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self._write(*item, self._thread_buffers)
            except BaseException as e:  # reported to the stage at its next submit or flush
                self.error = e
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def drain(self) -> None:
        """Wait until every submitted row is written."""
        self.queue.join()
        self._raise_error()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _raise_error(self) -> None:
        if isinstance(self.error, CollectError):
            raise self.error
        if self.error is not None:
            raise CollectError(f"writing collected rows failed: {self.error}") from self.error
