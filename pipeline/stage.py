"""One pipeline stage: its modules, a pool of KV caches and, per micro-batch, its positions.

A stage knows nothing of the schedule: ``prefill`` starts a micro-batch from its prompt
step and ``decode`` continues it a token at a time, turning the step's input (token ids
on the first stage, hidden states elsewhere) into its output (hidden states, or the
greedy token of each row's last position on the last stage).

The decode step is static: within a micro-batch every tensor it touches keeps its shape
(the cache is padded to a multiple of ``CACHE_LENGTH_STEP`` and attention reads all of
it through a mask), and the write slot, the rotary positions and the valid keys are
device tensors updated in place. So the step runs the same graph every time, and
``compile_decode`` can compile it once per micro-batch shape (on CUDA, as a CUDA graph)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig
from modules.llama import (
    KVCache,
    LlamaEmbeddings,
    LlamaLMHead,
    PackedPrompts,
    RopeTable,
    StepContext,
    rope_inv_freq,
)
from modules.packed_linear import pack_linears, packing_available
from modules.registry import BlockSpec, build_block
from pipeline.plan import StagePlan

#: Cache lengths are rounded up to a multiple of this, so micro-batches whose prompts
#: differ a little share one decode shape (and one compiled graph).
CACHE_LENGTH_STEP = 64


@dataclass
class MicroBatchState:
    """What a stage remembers about one micro-batch between its steps."""

    caches: list[KVCache] | None  # None: a micro-batch that generates nothing keeps no cache
    key_valid: torch.Tensor  # (B, cache length) bool: slots holding real keys
    position: torch.Tensor  # (B, 1) long: rotary position of the next token
    slot: torch.Tensor  # (1,) long: cache slot of the next token


class CachePool:
    """A stage's KV caches, kept by shape and reused: once the first micro-batches of a
    run have finished, starting another allocates nothing."""

    def __init__(self, config: ModelConfig, layers: int, dtype: torch.dtype, device: torch.device):
        self.config, self.layers, self.dtype, self.device = config, layers, dtype, device
        self.free: dict[tuple[int, int], list[list[KVCache]]] = {}
        self.static_addresses = False  # CUDA graphs need the caches at fixed addresses

    def take(self, batch: int, length: int) -> list[KVCache]:
        if free := self.free.get((batch, length)):
            return free.pop()
        c = self.config
        caches = [
            KVCache(batch, c.num_kv_heads, length, c.head_dim, self.dtype, self.device) for _ in range(self.layers)
        ]
        if self.static_addresses:
            for cache in caches:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
        return caches

    def give_back(self, batch: int, length: int, caches: list[KVCache]) -> None:
        self.free.setdefault((batch, length), []).append(caches)


def padded_cache_length(length: int) -> int:
    return -(-length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP


class Stage(nn.Module):
    def __init__(
        self,
        plan: StagePlan,
        config: ModelConfig,
        blocks: list[nn.Module],
        embeddings: LlamaEmbeddings | None,
        head: LlamaLMHead | None,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.plan, self.config, self.dtype, self.device = plan, config, dtype, device
        self.blocks = nn.ModuleList(blocks)
        self.embeddings, self.head = embeddings, head
        self.rope = RopeTable(rope_inv_freq(config).to(device), dtype)
        self.pool = CachePool(config, len(blocks), dtype, device)
        self.states: dict[int, MicroBatchState] = {}
        self._decode = self._decode_step
        self.compiled_shapes: set[tuple[int, int]] | None = None  # None: eager
        self.compile_seconds = 0.0  # spent in the first (compiling) decode step of each shape
        self.packed_linears = 0  # linear layers whose weights pack_weights packed

    @property
    def input_is_tokens(self) -> bool:
        return self.embeddings is not None

    @torch.inference_mode()
    def prefill(
        self, mb: int, x: torch.Tensor, real: torch.Tensor, cache_len: int, first_row: int = 0, batch: int = 0
    ) -> torch.Tensor:
        """Start micro-batch ``mb`` with its prompt step, whole or in chunks of rows: ``real``
        (n, T) is the left-padding mask of rows ``first_row`` .. ``first_row + n - 1`` of a
        micro-batch of ``batch`` rows (0: n, all of it at once), and ``cache_len`` the prompt
        width plus the most new tokens of any row. The chunk at row 0 sets the micro-batch
        up, so chunks come in row order. The prompts run packed, without their padding: ``x``
        is the (n, T) token ids on the first stage, elsewhere the packed (1, N, hidden)
        states of the chunk's N real tokens, which is also what a stage before the last
        returns; the last returns the chunk's n greedy tokens. A micro-batch that generates
        nothing (``cache_len`` = T: prompt-only collection) keeps no KV cache and predicts
        no token (zeros): nothing would read either."""
        rows, width = real.shape
        if first_row == 0:
            self._start(mb, batch or rows, width, cache_len)
        state = self.states[mb]
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        state.key_valid[first_row : first_row + rows, :width] = real
        state.position[first_row : first_row + rows] = positions[:, -1:] + 1
        packed = PackedPrompts.of(real, first_row)
        if self.input_is_tokens:
            x = x[real][None]
        cos, sin = self.rope.lookup(positions[real][None])
        everything = torch.ones(1, len(packed.batch_index), dtype=torch.bool, device=self.device)
        ctx = StepContext(cos, sin, None, None, everything, packed)
        h = self._layers(x, ctx, state.caches)
        if self.head is None:
            return h
        if state.caches is None:  # generates nothing: no token to predict
            return torch.zeros(rows, dtype=torch.long, device=self.device)
        return self.head(h[0, packed.last_tokens]).argmax(dim=-1)

    def _start(self, mb: int, batch: int, width: int, cache_len: int) -> None:
        """A micro-batch's caches (from the pool, if it generates) and state; its prefill
        fills in its rows."""
        length = padded_cache_length(cache_len)
        self.rope.ensure(length)
        key_valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        position = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        slot = torch.tensor([width], device=self.device)
        caches = self.pool.take(batch, length) if cache_len > width else None
        self.states[mb] = MicroBatchState(caches, key_valid, position, slot)

    @torch.inference_mode()
    def decode(self, mb: int, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Continue micro-batch ``mb`` by one token (``x`` is (B, 1, ...)); ``real`` (B, 1)
        marks the rows still generating (the others compute padding, and record nothing)."""
        state = self.states[mb]
        cos, sin = self.rope.lookup(state.position)
        args = (x, real, cos, sin, state.caches, state.key_valid, state.position, state.slot)
        shape = tuple(state.key_valid.shape)
        if self.compiled_shapes is None or shape in self.compiled_shapes:
            return self._decode(*args)
        start = time.perf_counter()
        out = self._decode(*args)
        self.compile_seconds += time.perf_counter() - start
        self.compiled_shapes.add(shape)
        return out

    def _decode_step(self, x, real, cos, sin, caches, key_valid, position, slot) -> torch.Tensor:
        key_valid.index_fill_(1, slot, True)
        out = self._forward(x, StepContext(cos, sin, key_valid[:, None, None, :], slot, real), caches)
        position.add_(1)
        slot.add_(1)
        return out

    def _forward(self, x: torch.Tensor, ctx: StepContext, caches: list[KVCache]) -> torch.Tensor:
        """A decode step: the hidden states, or on the last stage each row's greedy token."""
        h = self._layers(x, ctx, caches)
        return h if self.head is None else self.head(h[:, -1]).argmax(dim=-1)

    def _layers(self, x: torch.Tensor, ctx: StepContext, caches: list[KVCache] | None) -> torch.Tensor:
        h = self.embeddings(x) if self.embeddings is not None else x
        for block, cache in zip(self.blocks, caches if caches is not None else repeat(None)):
            h = block(h, ctx, cache)
        return h

    def pack_weights(self) -> int:
        """Pack the linear weights of the head and of the blocks' packable parts for the CPU's
        GEMM (float32 only, see ``modules.packed_linear``); return how many were packed."""
        if packing_available(self.device, self.dtype):
            modules = [part for block in self.blocks for part in block.packable_parts()]
            modules += [self.head] if self.head is not None else []
            self.packed_linears += sum(pack_linears(m) for m in modules)
        return self.packed_linears

    def compile_decode(self) -> bool:
        """Compile the decode step: one graph per micro-batch shape (``dynamic=False``; the
        cache length is padded, so prompts of similar length share one); on CUDA captured
        as a CUDA graph. Blocks with host-side work per step (recording, sparse selections)
        would break the graph at every layer: such a stage stays eager, and says so."""
        eager = sorted({type(b).__name__ for b in self.blocks if not b.compilable})
        if eager:
            warnings.warn(f"--compile: stage {self.plan.rank} runs {', '.join(eager)} blocks eagerly", stacklevel=2)
            return False
        cuda = self.device.type == "cuda"
        self.pool.static_addresses = cuda
        # On the CPU inductor's freezing (weights as packed constants) was measured slower (BENCHMARKS.md).
        compiled = torch.compile(self._decode_step, dynamic=False, mode="reduce-overhead" if cuda else None)
        # A CUDA graph's output is overwritten by its next replay, while a send may still read it.
        self._decode = (lambda *args: compiled(*args).clone()) if cuda else compiled
        self.compiled_shapes = set()
        return True

    def release(self, mb: int) -> None:
        state = self.states.pop(mb, None)
        if state is not None and state.caches is not None:
            self.pool.give_back(*state.key_valid.shape, state.caches)


def build_stage(
    plan: StagePlan, model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, options=None
) -> Stage:
    """Load only this stage's shard files: its layers, plus embeddings or head at the ends.
    ``options`` are the block type's typed options (see ``modules.registry``)."""
    blocks = [build_block(plan.model_type, BlockSpec(model_dir, config, i, dtype), options) for i in plan.layers]
    embeddings = LlamaEmbeddings.from_shard(model_dir, config, dtype) if plan.is_first else None
    head = LlamaLMHead.from_shard(model_dir, config, dtype) if plan.is_last else None
    return Stage(plan, config, blocks, embeddings, head, dtype, device).to(device)
