"""The token-pipelined greedy schedule: the order of forward, send and receive per rank.

Rank 0 admits micro-batches (prefill) up to a window, then runs a ring: the last stage
sends each micro-batch's greedy tokens straight back to rank 0, which feeds them in as
the micro-batch's next step while the other micro-batches occupy the other stages.
Ranks after the first only react to what arrives, in arrival order, so the whole
schedule is driven from rank 0 and cannot disagree between ranks."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from pipeline.generation import GenerationRules, MicroBatch
from pipeline.stage import Stage

END, PREFILL, DECODE, RELEASE = 0, 1, 2, 3
HEADER_LEN = 5  # kind, micro-batch, batch size, step length, cache length


class FirstStageDriver:
    """Rank 0: feeds prompts and tokens in, receives greedy tokens back."""

    def __init__(self, stage: Stage, comm, rules: GenerationRules, pad_id: int, window: int):
        self.stage, self.comm, self.rules, self.pad_id, self.window = stage, comm, rules, pad_id, window
        self.first_window_done_at: float | None = None

    def _step(self, kind: int, mb: MicroBatch, ids: torch.Tensor, real: torch.Tensor) -> None:
        device = self.stage.device
        ids, real = ids.to(device), real.to(device)
        if kind == PREFILL:
            out = self.stage.prefill(mb.index, ids, real, mb.cache_len)
        else:
            out = self.stage.decode(mb.index, ids, real)
        if self.stage.plan.is_last:  # one stage: its tokens come back to itself
            self.comm.send(out, 0)
            return
        self._send_header(kind, mb.index, *ids.shape, mb.cache_len)
        self.comm.send(real.to(torch.uint8), 1)
        self.comm.send(out, 1)

    def _send_header(self, kind: int, mb: int = 0, batch: int = 0, length: int = 0, cache_len: int = 0) -> None:
        if self.comm.world_size > 1:
            header = torch.tensor([kind, mb, batch, length, cache_len], dtype=torch.long, device=self.stage.device)
            self.comm.send(header, 1)

    def _tokens(self, mb: MicroBatch) -> torch.Tensor:
        return self.comm.recv((len(mb.rows),), torch.long, self.comm.world_size - 1)

    def run(self, batches: list[MicroBatch], on_token: Callable[[int], None]) -> None:
        waiting, inflight = deque(batches), deque()
        first_window = min(self.window, len(batches))
        served = 0
        start = time.perf_counter()
        while waiting or inflight:
            while waiting and len(inflight) < self.window:
                mb = waiting.popleft()
                self._step(PREFILL, mb, mb.input_ids, mb.real)
                inflight.append(mb)
            mb = inflight.popleft()
            tokens = self._tokens(mb)  # on the device; the host copy serves the stop rules only
            served += 1
            if served == first_window:
                self.first_window_done_at = time.perf_counter() - start
            before = sum(len(s.generated) for s in mb.rows)
            for seq, token in zip(mb.rows, tokens.tolist()):
                self.rules.accept(seq, token)
            on_token(sum(len(s.generated) for s in mb.rows) - before)
            active = mb.active
            if active.any():
                active = active.to(tokens.device)
                next_ids = torch.where(active, tokens, self.pad_id)[:, None]  # finished rows: padding
                self._step(DECODE, mb, next_ids, active[:, None])
                inflight.append(mb)
            else:
                self.stage.release(mb.index)
                self._send_header(RELEASE, mb.index)
        self._send_header(END)


def run_follower(stage: Stage, comm, hidden_size: int) -> None:
    """Ranks after the first: forward whatever arrives, pass it on (or tokens back to rank 0)."""
    prev, nxt, last = comm.rank - 1, comm.rank + 1, comm.rank == comm.world_size - 1
    while True:
        header = comm.recv((HEADER_LEN,), torch.long, prev)
        kind, mb, batch, length, cache_len = header.tolist()
        if kind in (END, RELEASE):
            stage.release(mb)
            if not last:
                comm.send(header, nxt)
            if kind == END:
                return
            continue
        real = comm.recv((batch, length), torch.uint8, prev)
        if kind == PREFILL:  # the prompts come packed: the real tokens only
            x = comm.recv((1, int(real.sum()), hidden_size), stage.dtype, prev)
            out = stage.prefill(mb, x, real.bool(), cache_len)
        else:
            x = comm.recv((batch, length, hidden_size), stage.dtype, prev)
            out = stage.decode(mb, x, real.bool())
        if last:
            comm.send(out, 0)
        else:
            comm.send(header, nxt)
            comm.send(real, nxt)
            comm.send(out, nxt)
