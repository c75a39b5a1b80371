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
HEADER_LEN = 7  # kind, micro-batch, batch size, first row, rows, step length, cache length


class FirstStageDriver:
    """Rank 0: feeds prompts and tokens in, receives greedy tokens back. A prefill goes
    down the pipeline in chunks of rows (``MicroBatch.chunks``), so the next stage starts
    on a micro-batch while this one still prefills the rest of it."""

    def __init__(self, stage: Stage, comm, rules: GenerationRules, pad_id: int, window: int):
        self.stage, self.comm, self.rules, self.pad_id, self.window = stage, comm, rules, pad_id, window
        self.first_window_done_at: float | None = None

    def _prefill(self, mb: MicroBatch) -> None:
        for start, stop in mb.chunks:
            ids, real = mb.input_ids[start:stop].to(self.stage.device), mb.real[start:stop].to(self.stage.device)
            out = self.stage.prefill(mb.index, ids, real, mb.cache_len, start, len(mb.rows))
            self._pass_on(PREFILL, mb, start, real, out)

    def _decode(self, mb: MicroBatch, ids: torch.Tensor, real: torch.Tensor) -> None:
        ids, real = ids.to(self.stage.device), real.to(self.stage.device)
        self._pass_on(DECODE, mb, 0, real, self.stage.decode(mb.index, ids, real))

    def _pass_on(self, kind: int, mb: MicroBatch, first_row: int, real: torch.Tensor, out: torch.Tensor) -> None:
        if self.stage.plan.is_last:  # one stage: its tokens come back to itself
            self.comm.send(out, 0)
            return
        self._send_header(kind, mb.index, len(mb.rows), first_row, *real.shape, mb.cache_len)
        self.comm.send(real.to(torch.uint8), 1)
        self.comm.send(out, 1)

    def _send_header(self, kind: int, mb: int = 0, *sizes: int) -> None:
        if self.comm.world_size > 1:
            header = [kind, mb, *sizes] + [0] * (HEADER_LEN - 2 - len(sizes))
            self.comm.send(torch.tensor(header, dtype=torch.long, device=self.stage.device), 1)

    def _tokens(self, chunks: list[tuple[int, int]]) -> torch.Tensor:
        """The greedy tokens of a micro-batch's rows, as the last stage sent them: one
        message per prefill chunk, or one for a decode step."""
        last = self.comm.world_size - 1
        tokens = torch.empty(chunks[-1][1], dtype=torch.long, device=self.stage.device)
        for start, stop in chunks:  # copied out: chunks of one size share a receive buffer
            tokens[start:stop] = self.comm.recv((stop - start,), torch.long, last)
        return tokens

    def run(self, batches: list[MicroBatch], on_tokens: Callable[[MicroBatch, int], None]) -> None:
        """Drive every micro-batch to its end; ``on_tokens(mb, n)`` hears of each step's
        greedy tokens for ``mb``, ``n`` of them new tokens of its sequences."""
        waiting, inflight, prefilled = deque(batches), deque(), {}
        first_window = min(self.window, len(batches))
        served = 0
        start = time.perf_counter()
        while waiting or inflight:
            while waiting and len(inflight) < self.window:
                mb = waiting.popleft()
                self._prefill(mb)
                inflight.append(mb)
                prefilled[mb.index] = mb.chunks
            mb = inflight.popleft()
            chunks = prefilled.pop(mb.index, [(0, len(mb.rows))])  # after its prefill, or a decode step
            tokens = self._tokens(chunks)  # on the device; the host copy serves the stop rules only
            served += 1
            if served == first_window:
                self.first_window_done_at = time.perf_counter() - start
            before = sum(len(s.generated) for s in mb.rows)
            for seq, token in zip(mb.rows, tokens.tolist()):
                self.rules.accept(seq, token)
            on_tokens(mb, sum(len(s.generated) for s in mb.rows) - before)
            active = mb.active
            if active.any():
                active = active.to(tokens.device)
                next_ids = torch.where(active, tokens, self.pad_id)[:, None]  # finished rows: padding
                self._decode(mb, next_ids, active[:, None])
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
        kind, mb, batch, first_row, rows, length, cache_len = header.tolist()
        if kind in (END, RELEASE):
            stage.release(mb)
            if not last:
                comm.send(header, nxt)
            if kind == END:
                return
            continue
        real = comm.recv((rows, length), torch.uint8, prev)
        if kind == PREFILL:  # the prompts come packed: the real tokens only
            x = comm.recv((1, int(real.sum()), hidden_size), stage.dtype, prev)
            out = stage.prefill(mb, x, real.bool(), cache_len, first_row, batch)
        else:
            x = comm.recv((rows, length, hidden_size), stage.dtype, prev)
            out = stage.decode(mb, x, real.bool())
        if last:
            comm.send(out, 0)
        else:
            comm.send(header, nxt)
            comm.send(real, nxt)
            comm.send(out, nxt)
