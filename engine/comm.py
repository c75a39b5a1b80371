"""Point-to-point communication between pipeline stages over ``torch.distributed``.

Sends are non-blocking so that the decode ring (last stage -> rank 0) can never deadlock
against rank 0's own sends; receives block, bounded by the process-group timeout, so a
dead peer makes the others fail with an error instead of hanging. Another transport
(e.g. cupy NCCL) is one more class with the same four methods."""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "torch_nccl", "nccl", "cupy_nccl")


def default_backend() -> str:
    return "torch_nccl" if torch.cuda.is_available() else "gloo"


def device_for(backend: str) -> torch.device:
    """NCCL runs on the GPU that LOCAL_RANK picks; gloo on the CPU."""
    if backend in ("torch_nccl", "nccl"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--dist-backend {backend} needs CUDA, which is not available")
        index = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


class TorchDistCommunicator:
    """Activations and tokens between stages, with the time spent waiting measured."""

    def __init__(self, backend: str, timeout_seconds: float, device: torch.device):
        if backend == "cupy_nccl":
            raise ValueError("--dist-backend cupy_nccl is not implemented yet: use torch_nccl (GPUs) or gloo")
        self.device = device
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
        self._pending.append((dist.isend(tensor, dst), tensor))
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        start = time.perf_counter()
        dist.recv(tensor, src)
        self.wait_seconds += time.perf_counter() - start
        return tensor

    def gather_objects(self, obj: object) -> list[object] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere), e.g. per-rank statistics."""
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def close(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
        dist.destroy_process_group()
