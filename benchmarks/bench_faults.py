"""How fast the other ranks stop when one is killed, hung or interrupted mid-decode.

Runs the fault scenarios of the test suite (tests/fault_scenarios.py) on the bundled
SmolLM2, 2 stages collecting (llama-save), and prints the seconds from the fault to the
last process's exit, next to the limit that bounds it (--dist-timeout for a hung rank).

    python -m benchmarks.bench_faults [--repeats 3] [--work /tmp/bench_faults]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, smollm_model_dir

sys.path.insert(0, str(ROOT / "tests"))
from fault_scenarios import rank_pid, start_ranks, start_torchrun, wait_until_decoding  # noqa: E402

TIMEOUT = 10  # --dist-timeout, seconds


def time_fault(model_dir: Path, work: Path, scenario: str) -> tuple[float, list[int | None]]:
    """Seconds from the fault until every process of the run has exited, and their codes."""
    bare = scenario in ("killed-no-launcher", "hung-no-launcher")
    start_run = start_ranks if bare else start_torchrun
    run = start_run(model_dir, work, 2, ["--dist-timeout", str(TIMEOUT)])
    try:
        wait_until_decoding(run, rows=200, timeout=600)
        if scenario == "ctrl-c-torchrun":
            run.procs[0].send_signal(signal.SIGINT)
        else:
            os.kill(rank_pid(run, 1), signal.SIGSTOP if scenario.startswith("hung") else signal.SIGKILL)
        start = time.monotonic()
        survivors = run.procs[:1] if bare else run.procs
        for proc in survivors:
            proc.wait(timeout=TIMEOUT + 120)
        return time.monotonic() - start, [p.returncode for p in survivors]
    finally:
        run.kill_all()


def count_fault_cases() -> int:
    """The fault-injection test cases, as pytest collects them."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            *map(str, sorted((ROOT / "tests").glob("test_faults_*.py"))),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    return sum("::" in line for line in out.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_faults")
    args = parser.parse_args()
    model_dir = smollm_model_dir(args.work)
    print(f"fault-injection test cases: {count_fault_cases()}")
    print(f"SmolLM2-135M fp32, 2 stages, llama-save, --dist-timeout {TIMEOUT} s, {os.cpu_count()} cores")
    print(f"{'scenario':<20} {'exit codes':<12} {'median s':>9} {'max s':>7} {'median / timeout':>17}")
    for scenario in ("killed-torchrun", "ctrl-c-torchrun", "killed-no-launcher", "hung-no-launcher"):
        times, codes = [], None
        for i in range(args.repeats):
            work = args.work / f"{scenario}-{i}"
            shutil.rmtree(work, ignore_errors=True)  # a stale manifest would look like progress
            work.mkdir(parents=True)
            seconds, codes = time_fault(model_dir, work, scenario)
            times.append(seconds)
        median = statistics.median(times)
        print(f"{scenario:<20} {str(codes):<12} {median:>9.2f} {max(times):>7.2f} {median / TIMEOUT:>17.2f}")


if __name__ == "__main__":
    main()
