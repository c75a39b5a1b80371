"""Writes collected activations into DejaVu's raw row-major files (read as ``np.memmap``).

Files are created sparse (no zero-filling) and written with ``pwrite``: on a full disk a
write through a memory map would kill the process with SIGBUS, a ``pwrite`` fails with an
error naming the file. ``manifest.json`` holds the rows written per layer and is replaced
atomically after each flush, under a file lock shared by the ranks, so a run killed or
failing at any moment leaves a dataset whose manifest rows are valid."""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from engine.atomic import write_json_atomic
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

LOCK = ".manifest.lock"
#: Writes smaller than this many values are done inline rather than by the writer thread.
INLINE_WRITE_VALUES = 1 << 16


def check_collect_dir(collect_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an existing dataset unless resuming. Run before any rank writes.
    A dataset without rows (left by a run that failed at start) holds nothing to lose."""
    if resume:
        if not (collect_dir / MANIFEST).is_file():
            raise CollectError(f"{collect_dir}: --collect-resume given but there is no {MANIFEST} to resume")
    elif collect_dir.exists() and any(collect_dir.iterdir()) and _recorded_rows(collect_dir) != 0:
        raise CollectError(
            f"{collect_dir}: collect directory is not empty; pass --collect-resume to append, or choose another"
        )


def _write_manifest(path: Path, manifest: dict) -> None:
    try:
        write_json_atomic(path, manifest)
    except OSError as e:
        raise CollectError(f"{path}: cannot update the manifest: {e.strerror} (disk full?)") from None


def _header_mismatch(manifest: dict, header: dict) -> str | None:
    """How an existing manifest differs from this run's, or None when they agree."""
    for key, value in header.items():
        if key != "model" and manifest.get(key) != value:
            return f"{key} is {manifest.get(key)!r}, this run has {value!r}"
    if manifest["model"]["config_sha256"] != header["model"]["config_sha256"]:
        return f"collected from {manifest['model']['path']}, a different model"
    return None


def _recorded_rows(collect_dir: Path) -> int | None:
    """Rows the manifest claims over all layers; None when there is no readable manifest."""
    try:
        return sum(json.loads((collect_dir / MANIFEST).read_text())["rows"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@contextmanager
def _locked(collect_dir: Path, timeout: float):
    """The manifest lock the ranks share. Waiting is bounded: a rank that hangs while
    holding it (stopped, stuck on a network disk) must not hang the others."""
    with open(collect_dir / LOCK, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CollectError(
                        f"{collect_dir / LOCK}: another process has held the manifest lock for {timeout:g} s"
                        " (a hung rank?)"
                    ) from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ActivationCollector:
    """One rank's writer for the layers it owns; all ranks share one manifest."""

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
        lock_timeout: float = 300.0,
    ):
        self.dir = Path(collect_dir)
        self.layers, self.dtype, self.capacity = list(layers), np.dtype(dtype), capacity
        self.torch_dtype = getattr(torch, self.dtype.name)
        self.widths = array_widths(config)
        self.flush_seconds, self._last_flush = flush_seconds, time.monotonic()
        self.lock_timeout = lock_timeout
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

    def open(self) -> ActivationCollector:
        """Create (or reopen, when resuming) the manifest and this rank's files. Called once
        every rank has started, so a run that fails at start writes nothing."""
        start = self._open_manifest()
        self.rows = {layer: start for layer in self.layers}
        self._warn_disk_space()
        for layer in self.layers:
            for name in ARRAYS:
                path = array_path(self.dir, name, layer)
                self.files[(name, layer)] = ArrayFile(path, self.widths[name], self.dtype, self.capacity)
        self._writer = BackgroundWriter(self.torch_dtype, max_pending=len(self.files))  # about one step
        return self

    def _open_manifest(self) -> int:
        """Create the manifest (the first rank to get here), or check one made by another
        rank of this run or being resumed; return the first row to write."""
        header, input_path = self.header, self.input_path
        self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.dir, self.lock_timeout):
            path = self.dir / MANIFEST
            fresh = {
                **header,
                "rows": {str(layer): 0 for layer in header["layers"]},
                "full": False,
                "inputs": [input_path],
            }
            if not path.exists():
                _write_manifest(path, fresh)
                return 0
            manifest = json.loads(path.read_text())
            mismatch = _header_mismatch(manifest, header)
            if not self.resume:
                if mismatch and not any(manifest["rows"].values()):  # left by a run that failed at start
                    _write_manifest(path, fresh)
                elif mismatch:
                    raise CollectError(f"{path}: another run started collecting here ({mismatch})")
                return 0
            if mismatch:
                raise CollectError(f"{path}: cannot resume: {mismatch}")
            # Keep row k the same token in every layer: restart every layer at the shortest,
            # and say so at once, before rows past it are overwritten.
            start = min((manifest["rows"].get(str(layer), 0) for layer in header["layers"]), default=0)
            manifest["rows"] = {str(layer): start for layer in header["layers"]}
            manifest["inputs"] += [input_path] if input_path not in manifest["inputs"] else []
            _write_manifest(path, manifest)
            return start

    def _warn_disk_space(self) -> None:
        per_row = sum(self.widths.values()) * self.dtype.itemsize * len(self.layers)
        need = per_row * max(0, self.capacity - min(self.rows.values(), default=0))
        free = shutil.disk_usage(self.dir).free
        if need > free:
            warnings.warn(
                f"{self.dir}: collection may write up to {need / 1e9:.3g} GB but only {free / 1e9:.3g} GB are free",
                stacklevel=2,
            )

    def record(self, layer: int, real: torch.Tensor, **arrays: torch.Tensor) -> None:
        """Append the rows of real tokens (``real`` (B, T) bool) of one layer's arrays."""
        start = self.rows[layer]
        count = min(int(real.sum()), self.capacity - start)
        if count <= 0:
            if int(real.sum()):
                self._mark_full()
            return
        for name, tensor in arrays.items():
            self._writer.submit(self.files[(name, layer)], start, tensor[real][:count])
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
        with _locked(self.dir, self.lock_timeout):
            path = self.dir / MANIFEST
            manifest = json.loads(path.read_text())
            manifest["rows"].update({str(layer): n for layer, n in self.rows.items()})
            manifest["full"] = manifest["full"] or self.full
            _write_manifest(path, manifest)
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
        self.thread = threading.Thread(target=self._run, name="collect-writer", daemon=True)
        self.thread.start()

    def submit(self, file: ArrayFile, start: int, rows: torch.Tensor) -> None:
        """Large writes (prefill) go to the thread; small ones (a decode step's few rows)
        are cheaper done at once than handed over, which costs GIL switches."""
        self._raise_error()
        if rows.numel() < INLINE_WRITE_VALUES:
            self._write(file, start, rows)
        else:
            self.queue.put((file, start, rows))

    def _write(self, file: ArrayFile, start: int, rows: torch.Tensor) -> None:
        file.write(start, rows.to(self.dtype).cpu().numpy())

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self._write(*item)
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
