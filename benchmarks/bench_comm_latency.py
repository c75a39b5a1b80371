"""Round-trip latency between two gloo ranks, with and without work in between.

    python -m benchmarks.bench_comm_latency [--compute-ms 30] [--round-trips 50]

Rank 0 sends a decode step's hidden states (8 x 1 x 576 fp32) and waits for 8 tokens
back; rank 1 receives, computes for ``--compute-ms`` (GEMMs on one thread, as a stage
would), and answers. The time per round trip minus the compute is what a pipeline pays
each time a rank sleeps in a receive: with nothing in between it is the transport's
latency; after the peer computed, it adds the time a sleeping rank takes to run again."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from engine.comm import open_communicator

HIDDEN = (8, 1, 576)


def compute(ms: float, x: torch.Tensor, w: torch.Tensor) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        torch.nn.functional.linear(x, w)


def worker(compute_ms: float, round_trips: int) -> None:
    torch.set_num_threads(1)
    comm = open_communicator("gloo", 60, torch.device("cpu"), 2)
    x, w = torch.randn(8, 576), torch.randn(1536, 576)
    for ms in (0.0, compute_ms):
        start = time.perf_counter()
        for _ in range(round_trips):
            if comm.rank == 0:
                comm.send(torch.zeros(HIDDEN), 1)
                comm.recv((8,), torch.long, 1)
            else:
                comm.recv(HIDDEN, torch.float32, 0)
                compute(ms, x, w)
                comm.send(torch.zeros(8, dtype=torch.long), 0)
        per_trip = (time.perf_counter() - start) / round_trips * 1000
        if comm.rank == 0:
            print(
                f"peer computes {ms:4.0f} ms: round trip {per_trip:6.2f} ms, {per_trip - ms:5.2f} ms beyond the compute"
            )
    comm.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compute-ms", type=float, default=30.0)
    p.add_argument("--round-trips", type=int, default=50)
    args = p.parse_args()
    if "RANK" in os.environ:
        worker(args.compute_ms, args.round_trips)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    cmd += ["benchmarks.bench_comm_latency", "--compute-ms", str(args.compute_ms)]
    cmd += ["--round-trips", str(args.round_trips)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
