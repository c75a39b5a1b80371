"""Multi-process fault scenarios: start a pipeline, wait until it is mid-decode, then hurt it.

Shared by tests/test_faults_runtime.py (which checks what the user sees and what is kept)
and benchmarks/bench_faults.py (which times how fast the survivors stop)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from pipeline_helpers import INFER, ROOT, infer_args, start_node, write_prompts

from engine.collect_manifest import recorded_rows

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pipeline parallel inference splits a model into stages",
    "Sparse predictors guess",
]
#: Long enough that the run is still decoding when it is hurt; flushing every step makes
#: the manifest a progress signal and makes every published row count.
SETTINGS = [
    "--model-type",
    "llama-save",
    "--ignore-eos",
    "--max-new-tokens",
    "200",
    "--micro-batch-size",
    "3",
    "--collect-capacity",
    "5000",
    "--collect-flush-seconds",
    "0",
]


@dataclass
class Run:
    """A started pipeline: its processes (one per rank, or torchrun alone) and their stderr files."""

    procs: list[subprocess.Popen]
    logs: list[Path]
    collect_dir: Path
    out: Path
    node_dirs: tuple[Path, ...] = ()  # node-local collect dirs, on a multi-node run

    def stderr(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)

    def wait(self, timeout: float) -> tuple[list[int | None], float]:
        """Exit codes (None: still running after ``timeout``) and when the last one ended."""
        start = time.monotonic()
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs], time.monotonic() - start

    def kill_all(self) -> None:
        for proc in self.procs:
            for child in _children(proc.pid):
                child.kill()
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(
    model_dir: Path, work: Path, nproc: int, extra: list[str], texts: list[str], collect_dir: Path | None = None
) -> tuple[list[str], Path, Path]:
    prompts = write_prompts(work / "prompts.jsonl", [{"prompt": text} for text in texts])
    out, collect_dir = work / "out" / "results.jsonl", collect_dir or work / "collect"
    extra = ["--pp-degree", str(nproc), "--collect-dir", str(collect_dir), *SETTINGS, *extra]
    return infer_args(model_dir, prompts, out, extra), out, collect_dir


def start_torchrun(
    model_dir: Path, work: Path, nproc: int, extra: list[str] = (), prompts: list[str] = PROMPTS * 3
) -> Run:
    """``torchrun --standalone`` with ``nproc`` ranks, as users start the engine; the prompts
    are written to ``work/prompts.jsonl``."""
    args, out, collect_dir = _args(model_dir, work, nproc, list(extra), prompts)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(INFER)]
    log = work / "torchrun.err"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    return Run([proc], [log], collect_dir, out)


def start_ranks(model_dir: Path, work: Path, nproc: int, extra: list[str] = ()) -> Run:
    """One process per rank with no launcher: no agent stops the others when one dies
    (as on a multi-node run), so they must stop by themselves."""
    args, out, collect_dir = _args(model_dir, work, nproc, list(extra), PROMPTS * 3)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs, logs = [], []
    for rank in range(nproc):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc)}
        env["LOCAL_WORLD_SIZE"] = str(nproc)
        log = work / f"rank{rank}.err"
        procs.append(
            subprocess.Popen(
                [sys.executable, str(INFER), *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w")
            )
        )
        logs.append(log)
    return Run(procs, logs, collect_dir, out)


def start_nodes(model_dir: Path, work: Path, extra: list[str] = ()) -> Run:
    """Two "nodes" (launch/run_multinode.sh, one rank each) collecting into a directory each."""
    port, dirs = free_port(), (work / "node0", work / "node1")
    procs, logs = [], []
    for node, directory in enumerate(dirs):
        args, out, _ = _args(model_dir, work, 2, list(extra), PROMPTS * 3, directory)
        logs.append(work / f"node{node}.err")
        procs.append(start_node(node, 2, port, args, logs[-1]))
    return Run(procs, logs, work / "collect", out, dirs)


def wait_until_decoding(run: Run, rows: int = 60, timeout: float = 120) -> None:
    """Wait until layer 0 has published ``rows`` rows: past the prefill, mid-decode."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in run.procs):
            raise AssertionError(f"the run ended before it could be hurt:\n{run.stderr()[-3000:]}")
        if any(recorded_rows(d).get(0, 0) >= rows for d in (run.collect_dir, *run.node_dirs)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no progress within {timeout} s:\n{run.stderr()[-3000:]}")


def rank_pid(run: Run, rank: int) -> int:
    """The process of ``rank``: the Popen itself, or a torchrun agent's worker with that RANK."""
    if len(run.procs) > 1 and not run.node_dirs:
        return run.procs[rank].pid
    for proc in run.procs:
        for child in _children(proc.pid):
            try:
                if child.environ().get("RANK") == str(rank) and "infer.py" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
    raise AssertionError(f"no worker process with RANK={rank}")


def node_of(run: Run, pid: int) -> int:
    """The index of the node (torchrun agent) that runs process ``pid``."""
    return next(i for i, proc in enumerate(run.procs) if pid in {c.pid for c in _children(proc.pid)})


def leftover_temporary_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*") if ".tmp" in p.name or "converting" in p.name]
