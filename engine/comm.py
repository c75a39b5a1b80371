"""Point-to-point communication between pipeline stages over ``torch.distributed``.

Sends are non-blocking so that the decode ring (last stage -> rank 0) can never deadlock
against rank 0's own sends; receives block, bounded by the process-group timeout, so a
dead peer makes the others fail with an error instead of hanging. Another transport
(cupy's NCCL, engine/comm_cupy.py) is one more class with the same methods."""

from __future__ import annotations

import datetime
import os
import time
from collections import deque
from contextlib import contextmanager

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "torch_nccl", "nccl", "cupy_nccl")


def default_backend() -> str:
    return "torch_nccl" if torch.cuda.is_available() else "gloo"


def device_for(backend: str) -> torch.device:
    """NCCL runs on the GPU that LOCAL_RANK picks; gloo on the CPU. A backend that cannot
    run here is refused now, on every rank, before any process group."""
    if backend == "cupy_nccl":
        from engine.comm_cupy import check_cupy_nccl

        check_cupy_nccl()
    if backend in ("torch_nccl", "nccl", "cupy_nccl"):
        if not torch.cuda.is_available():
            raise ValueError(f"--dist-backend {backend} needs CUDA, which is not available on this machine")
        index = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


class PeerError(RuntimeError):
    """Another rank died, hung or failed: this rank cannot go on."""


class LocalCommunicator:
    """The communicator of a one-stage pipeline: rank 0 alone, whose sends come back to it
    (the first stage is also the last), so the schedule has no single-process branches."""

    rank, world_size, wait_seconds = 0, 1, 0.0

    def __init__(self):
        self._loopback: deque[torch.Tensor] = deque()

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._loopback.append(tensor)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        return self._loopback.popleft()

    def failed_ranks(self, failed: bool) -> list[int]:
        return [0] if failed else []

    def all_gather_objects(self, obj: object) -> list[object]:
        return [obj]

    def gather_objects(self, obj: object) -> list[object]:
        return [obj]

    def close(self) -> None:
        self._loopback.clear()


class TorchDistCommunicator:
    """Activations and tokens between stages, with the time spent waiting measured."""

    def __init__(self, backend: str, timeout_seconds: float, device: torch.device):
        self.device, self.timeout_seconds = device, timeout_seconds
        with self._peer(None, "joining"):
            dist.init_process_group(
                backend="nccl" if backend in ("torch_nccl", "nccl") else "gloo",
                timeout=datetime.timedelta(seconds=timeout_seconds),
                device_id=device if device.type == "cuda" else None,
            )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.wait_seconds = 0.0
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        with self._peer(dst, "sending to"):
            self._pending.append((dist.isend(tensor, dst), tensor))
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        start = time.perf_counter()
        with self._peer(src, "receiving from"):
            dist.recv(tensor, src)
        self.wait_seconds += time.perf_counter() - start
        return tensor

    def failed_ranks(self, failed: bool) -> list[int]:
        """Tell every rank whether this one failed to start; returns the ranks that did."""
        flags = self.all_gather_objects(failed, "starting with")
        return [rank for rank, flag in enumerate(flags) if flag]

    def all_gather_objects(self, obj: object, doing: str = "exchanging state with") -> list[object]:
        """Every rank's ``obj``, on every rank."""
        gathered = [None] * self.world_size
        with self._peer(None, doing):
            dist.all_gather_object(gathered, obj)
        return gathered

    def gather_objects(self, obj: object) -> list[object] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere), e.g. per-rank statistics."""
        gathered = [None] * self.world_size if self.rank == 0 else None
        with self._peer(None, "gathering statistics with"):
            dist.gather_object(obj, gathered, dst=0)
        return gathered

    def close(self) -> None:
        """Finish every send, then wait for all ranks before tearing down: a rank that
        destroyed its process group while a peer's gloo threads still served it was seen
        to abort (SIGABRT, "terminate called without an active exception") now and then.
        The wait polls, so a SIGINT or SIGTERM meanwhile (a peer stopped before it got
        here) still unwinds this rank at once instead of after --dist-timeout."""
        with self._peer(None, "finishing with"):
            for work, _ in self._pending:
                work.wait()
            barrier = dist.barrier(async_op=True)
            deadline = time.monotonic() + self.timeout_seconds
            while not barrier.is_completed():
                if time.monotonic() > deadline:
                    raise RuntimeError("barrier timed out")
                time.sleep(0.002)
            barrier.wait()
        self._pending.clear()
        dist.destroy_process_group()

    @contextmanager
    def _peer(self, peer: int | None, doing: str):
        """Turn a transport failure into a PeerError that says which peer and why."""
        try:
            yield
        except RuntimeError as e:  # torch.distributed's errors, gloo's included, are RuntimeErrors
            who = f"rank {peer}" if peer is not None else "the other ranks"
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                why = f"nothing arrived within --dist-timeout {self.timeout_seconds:g} s (is it hung?)"
            elif peer is not None:
                why = "its connection closed (did it fail? see its own error)"
            else:
                why = "a connection closed (did a rank fail? see its error)"
            raise PeerError(f"lost contact while {doing} {who}: {why}") from e


def open_communicator(backend: str, timeout_seconds: float, device: torch.device, world_size: int):
    """The communicator of this run: one process needs none, cupy_nccl its own class."""
    if world_size == 1:
        return LocalCommunicator()
    if backend == "cupy_nccl":
        from engine.comm_cupy import CupyNcclCommunicator

        return CupyNcclCommunicator(timeout_seconds, device)
    return TorchDistCommunicator(backend, timeout_seconds, device)
