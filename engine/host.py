"""Process-level settings that make a CPU rank's step times steady: its cores, its memory.

- **Cores.** With several ranks on one machine, each rank's compute thread and its gloo
  thread float over all cores, and a message sent just before a step can wait for the
  scheduler's next tick (4 ms here) before it leaves. Each rank bound to cores of its own
  keeps both threads together (BENCHMARKS.md: pp=2 decode's bubble and throughput). A
  helper thread with work of its own (the collector's writer) floats over all the cores
  again, to use the time the other ranks wait, instead of taking turns with its stage.
- **Memory.** glibc's malloc returns large freed blocks to the OS (blocks above the mmap
  threshold, and the top of a trimmed heap), with a threshold that moves with what the
  process has freed. A stage allocates and frees megabytes per layer and step, so each
  allocation can fault its pages back in one by one: in a prompt-only SmolLM2 collection
  on two ranks, the second rank took 904k page faults and 1.8 s of system time in a 14.8 s
  run, and 200k / 0.5 s once the thresholds were fixed.
- **Huge pages.** ``HUGE_PAGES`` has torch put its large CPU tensors on
  transparent huge pages: decode streams every packed weight once per step, and fewer
  TLB misses made SmolLM2's head 7.6 ms a step instead of 8.3-10.2."""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: bigger blocks are mapped
TRIM_THRESHOLD = (1 << 31) - 1  # never trim the heap (the largest int mallopt takes)


#: Torch's switch for transparent huge pages under its large CPU tensors. Torch reads it
#: once, at its first allocation: set it (``os.environ.setdefault(*HUGE_PAGES)``, so the
#: environment can still say otherwise) before torch is imported; this module does not.
HUGE_PAGES = ("THP_MEM_ALLOC_ENABLE", "1")


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds; False where the C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


#: The cores this process could use before ``bind_cores`` narrowed them (None: not bound).
_unbound_cores: set[int] | None = None


def bind_cores(local_rank: int, local_ranks: int, threads: int) -> list[int]:
    """Bind this process (its threads from now on) to ``threads`` cores of its own, the
    ``local_rank``-th share of the cores it may use; return them, or [] (left as it was)
    where the ranks' threads do not fit in those cores or the system cannot bind."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    if local_ranks * threads > len(cores):
        return []
    global _unbound_cores
    _unbound_cores = set(cores)
    mine = cores[local_rank * threads : (local_rank + 1) * threads]
    os.sched_setaffinity(0, mine)
    return mine


def float_this_thread() -> None:
    """Let the calling thread run on every core the process had before it was bound."""
    if _unbound_cores is not None:
        os.sched_setaffinity(0, _unbound_cores)  # 0: the calling thread alone (Linux)
