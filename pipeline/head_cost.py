"""How many decoder layers of decode work the LM head is worth here, measured.

``--balance-head`` gives the last stage fewer layers, so that with the head it does as
much work per decode step as the others. Parameter counts mis-weigh the head: packed CPU
weights make its one wide GEMM much cheaper per weight than a layer's seven narrow ones
plus its attention (on 2 cores, SmolLM2's head holds 8 layers' weights and takes the time
of about 4.5). So rank 0 times both on its device, and every rank splits by its figure."""

from __future__ import annotations

import time

import torch

from engine.config import ModelConfig
from modules.llama import KVCache, LlamaBlock, LlamaLMHead, StepContext, rope_inv_freq
from modules.packed_linear import pack_linears, packing_available
from pipeline.plan import lm_head_cost

#: Decode rows timed (a typical micro-batch) and the cache length the layers attend over.
ROWS, CACHE_LENGTH = 8, 128


def measured_head_cost(config: ModelConfig, dtype: torch.dtype, device: torch.device, packed: bool) -> float:
    """The head's decode step time over a layer's, with the run's weight layout, each the
    best of a time budget's runs. As many layers as hold the head's weights run in a row,
    so that neither side's weights sit in a cache the real run would not have them in.
    Zero weights: the kernels' time does not depend on the values."""
    count = max(1, round(lm_head_cost(config)))
    with torch.device("meta"):
        blocks, head = torch.nn.ModuleList(LlamaBlock(config, i) for i in range(count)), LlamaLMHead(config)
    blocks, head = (m.to_empty(device=device).to(dtype) for m in (blocks, head))
    for tensor in (*blocks.parameters(), *head.parameters()):
        tensor.detach().zero_()
    if packed and packing_available(device, dtype):
        pack_linears(blocks)
        pack_linears(head)
    x = torch.zeros(ROWS, 1, config.hidden_size, dtype=dtype, device=device)
    caches = [KVCache(ROWS, config.num_kv_heads, CACHE_LENGTH, config.head_dim, dtype, device) for _ in blocks]
    valid = torch.ones(ROWS, CACHE_LENGTH, dtype=torch.bool, device=device)
    positions = torch.full((ROWS, 1), CACHE_LENGTH - 1, device=device)
    real = torch.ones(ROWS, 1, dtype=torch.bool, device=device)
    ctx = StepContext.build(rope_inv_freq(config).to(device), positions, valid, CACHE_LENGTH - 1, real, dtype)

    def layers() -> None:
        for block, cache in zip(blocks, caches):
            block(x, ctx, cache)

    with torch.inference_mode():
        layer_seconds = _best_seconds(layers, device) / count
        head_seconds = _best_seconds(lambda: head(x[:, -1]).argmax(dim=-1), device)
    return head_seconds / layer_seconds


def _best_seconds(step, device: torch.device, budget_seconds: float = 0.5, min_repeats: int = 5) -> float:
    """The fastest of as many runs as ``budget_seconds`` holds (at least ``min_repeats``):
    the head's one wide GEMM varies by 20% from run to run here, and a figure near a split
    boundary needs the steady value (best of 7 runs put SmolLM2's head anywhere in 4.9-5.6
    layers, and the split moved with it; best of about 50, 4.6-4.9)."""
    step()  # warm-up: first-call allocations and kernel selection
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_repeats or spent < budget_seconds:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        best, spent, runs = min(best, seconds), spent + seconds, runs + 1
    return best
