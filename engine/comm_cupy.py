"""DejaVu's transport: activations and tokens over NCCL driven through cupy (``cupy.cuda.nccl``).

Each link of the ring (rank r -> r + 1, the last rank -> 0) is a two-rank NCCL communicator
with a CUDA stream of its own, so a rank's sends and receives never queue behind each
other (with one stream, rank 0's next send would wait for a receive that waits for it). The
links' unique ids travel through torch.distributed's store; a small gloo process group
beside them carries the start agreement, the statistics and the closing barrier."""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

from engine.comm import PeerError, TorchDistCommunicator

#: How often a receive polls for its data (seconds): a bounded wait, so a lost peer is an error.
POLL_SECONDS = 5e-5


def check_cupy_nccl() -> None:
    """Refuse up front, on every rank, where the backend cannot run."""
    if not torch.cuda.is_available():
        raise ValueError("--dist-backend cupy_nccl needs CUDA, which is not available on this machine")
    _nccl()


def _nccl():
    """cupy's NCCL module (an optional dependency: the gpu extra)."""
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise ValueError(
            f"--dist-backend cupy_nccl needs cupy with NCCL (pip install 'dejavu-llama[gpu]', i.e. cupy-cuda12x): {e}"
        ) from None
    return nccl


def nccl_dtype(dtype: torch.dtype) -> int:
    nccl = _nccl()
    types = {
        torch.float32: nccl.NCCL_FLOAT32,
        torch.float16: nccl.NCCL_FLOAT16,
        torch.bfloat16: nccl.NCCL_BFLOAT16,
        torch.int64: nccl.NCCL_INT64,
        torch.int32: nccl.NCCL_INT32,
        torch.uint8: nccl.NCCL_UINT8,
        torch.bool: nccl.NCCL_UINT8,
    }
    if dtype not in types:
        raise ValueError(f"cupy_nccl cannot send {dtype}")
    return types[dtype]


class Link:
    """One direction of the ring between two ranks: a two-rank NCCL communicator (the
    sender is its rank 0) and the stream its transfers run on."""

    def __init__(self, index: int, sending: bool, store, device: torch.device):
        nccl = _nccl()
        key = f"cupy_nccl/link{index}"
        if sending:
            unique_id = nccl.get_unique_id()
            store.set(key, json.dumps(list(unique_id)))
        else:
            unique_id = tuple(json.loads(store.get(key)))
        self.peer = 1 if sending else 0
        self.comm = nccl.NcclCommunicator(2, unique_id, 0 if sending else 1)
        self.stream = torch.cuda.Stream(device)


class CupyNcclCommunicator:
    """The methods of TorchDistCommunicator, with activations moved by cupy's NCCL."""

    def __init__(self, timeout_seconds: float, device: torch.device):
        check_cupy_nccl()
        self.device, self.timeout_seconds = device, timeout_seconds
        self._control = TorchDistCommunicator("gloo", timeout_seconds, torch.device("cpu"))
        self.rank, self.world_size = self._control.rank, self._control.world_size
        self.wait_seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.Tensor]] = []
        store = dist.distributed_c10d._get_default_store()
        self._next, self._prev = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        links: dict[int, Link] = {}
        try:
            for index in range(self.world_size):  # the same order on every rank: no cycle of waits
                if index in (self.rank, self._prev):
                    links[index] = Link(index, index == self.rank, store, device)
        except RuntimeError as e:  # the store's timeout and cupy's NcclError
            raise PeerError(f"rank {self.rank} could not open its NCCL links: {e}") from e
        self._out, self._in = links[self.rank], links[self._prev]

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Queue the send on the outgoing link's stream once the tensor is computed; the
        tensor is kept alive until the transfer is done."""
        if dst != self._next:
            raise ValueError(f"cupy_nccl sends along the ring only: rank {self.rank} -> {self._next}, not {dst}")
        tensor = tensor.contiguous()
        link = self._out
        link.stream.wait_stream(torch.cuda.current_stream(self.device))
        tensor.record_stream(link.stream)
        link.comm.send(tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype), link.peer, link.stream.cuda_stream)
        done = torch.cuda.Event()
        done.record(link.stream)
        self._pending = [(e, t) for e, t in self._pending if not e.query()] + [(done, tensor)]

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        """Receive on the incoming link's stream and wait for it, at most --dist-timeout."""
        if src != self._prev:
            raise ValueError(f"cupy_nccl receives along the ring only: rank {self._prev} -> {self.rank}, not {src}")
        link = self._in
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        link.stream.wait_stream(torch.cuda.current_stream(self.device))
        tensor.record_stream(link.stream)
        start = time.perf_counter()
        link.comm.recv(tensor.data_ptr(), tensor.numel(), nccl_dtype(dtype), link.peer, link.stream.cuda_stream)
        done = torch.cuda.Event()
        done.record(link.stream)
        self._wait(done, f"receiving from rank {src}")
        torch.cuda.current_stream(self.device).wait_stream(link.stream)
        self.wait_seconds += time.perf_counter() - start
        return tensor

    def _wait(self, event: torch.cuda.Event, doing: str) -> None:
        deadline = time.monotonic() + self.timeout_seconds
        while not event.query():
            if time.monotonic() > deadline:
                self._abort()
                raise PeerError(
                    f"lost contact while {doing}: nothing moved within --dist-timeout"
                    f" {self.timeout_seconds:g} s (is it hung or dead?)"
                )
            time.sleep(POLL_SECONDS)

    def failed_ranks(self, failed: bool) -> list[int]:
        return self._control.failed_ranks(failed)

    def all_gather_objects(self, obj: object) -> list[object]:
        return self._control.all_gather_objects(obj)

    def gather_objects(self, obj: object) -> list[object] | None:
        return self._control.gather_objects(obj)

    def close(self) -> None:
        """Finish the sends, then meet the other ranks (gloo) before releasing NCCL."""
        for event, _ in self._pending:
            self._wait(event, f"sending to rank {self._next}")
        self._pending.clear()
        self._control.close()
        for link in (self._out, self._in):
            link.comm.destroy()

    def _abort(self) -> None:
        for link in (self._out, self._in):
            link.comm.abort()
