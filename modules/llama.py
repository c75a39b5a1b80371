"""Llama blocks, each loadable from its shard file. The maths follows HF ``modeling_llama.py``.

Every forward takes a ``StepContext`` built once per step and shared by all layers of a
stage: RoPE tables for the step's positions, the attention mask (causal plus left
padding, as wide as the KV cache) and the cache slots the step's keys go to; or, for a
prefill, the prompts packed without padding (``PackedPrompts``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.shards import EMBEDDINGS, LM_HEAD, load_shard


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with llama3 scaling when the config asks for it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if not s:
        return inv_freq
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RopeTable:
    """cos and sin of every rotary position below a length, computed once per stage: a step
    looks its positions up instead of recomputing them, so a compiled decode step holds no
    trigonometry and allocates nothing that depends on the step number. The table grows
    (outside any compiled step: at a prefill) when a longer cache needs more positions."""

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype):
        self.inv_freq, self.dtype = inv_freq, dtype
        self.cos = self.sin = torch.empty(0, 2 * len(inv_freq), dtype=dtype, device=inv_freq.device)

    def ensure(self, length: int) -> None:
        if length > len(self.cos):
            cos, sin = rope_cos_sin(self.inv_freq, torch.arange(length, device=self.inv_freq.device), self.dtype)
            self.cos, self.sin = cos, sin

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin of ``positions`` (any shape) times the inverse frequencies, as HF rounds them."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class RealRows:
    """Where a step's real tokens are among its (B * T) rows, and how many there are: found
    once per step, so that recording layers need no host sync of their own."""

    index: torch.Tensor  # (count,) long: flat row indices of the real tokens
    count: int

    @classmethod
    def of(cls, real: torch.Tensor) -> RealRows:
        index = real.reshape(-1).nonzero().squeeze(1)
        return cls(index, len(index))

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The real rows of ``x`` (B, T, ...), flattened to (count, ...)."""
        rows = x.flatten(0, 1)
        return rows if self.count == len(rows) else rows.index_select(0, self.index.to(x.device))


@dataclass
class PackedPrompts:
    """A prefill's prompts packed into one row of real tokens, with no padding between them:
    the linear layers, norms and RoPE see real tokens only, attention runs causally within
    each prompt, and keys and values land in the cache where the left-padded layout puts
    them (so decode steps see the cache as if the prompts had been padded)."""

    bounds: list[tuple[int, int]]  # each prompt's [start, end) among the packed tokens
    batch_index: torch.Tensor  # (N,) long: each token's row in the micro-batch
    slot_index: torch.Tensor  # (N,) long: each token's cache slot

    @classmethod
    def of(cls, real: torch.Tensor, first_row: int = 0) -> PackedPrompts:
        """From the (n, T) left-padding mask of a micro-batch's rows ``first_row`` onwards
        (one host sync: the prompt lengths)."""
        batch_index, slot_index = real.nonzero(as_tuple=True)
        ends = real.sum(-1).cumsum(0).tolist()
        return cls(list(zip([0, *ends[:-1]], ends)), batch_index + first_row, slot_index)

    @property
    def last_tokens(self) -> torch.Tensor:
        """(B,) index of each prompt's last token: where the next token is predicted."""
        return torch.tensor([end - 1 for _, end in self.bounds], device=self.batch_index.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """q, k, v (1, heads, N, head_dim) -> (1, heads, N, head_dim)."""
        return torch.cat(
            [
                F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=gqa)
                for s, e in self.bounds
            ],
            dim=2,
        )


@dataclass
class StepContext:
    """What every layer of a stage needs for one forward step of one micro-batch."""

    cos: torch.Tensor  # (B, T, head_dim)
    sin: torch.Tensor  # (B, T, head_dim)
    mask: torch.Tensor | None  # (B, 1, T, K) bool: which of the K keys (the whole cache) each query may see
    slots: torch.Tensor | None  # (T,) long: the cache slots the step's keys and values go to
    real: torch.Tensor  # (B, T) bool: real tokens (not padding, not finished rows)
    packed: PackedPrompts | None = None  # a packed prefill (B = 1): attention per prompt, no mask

    @cached_property
    def real_rows(self) -> RealRows:
        return RealRows.of(self.real)

    @classmethod
    def build(
        cls,
        inv_freq: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        start: int,
        real: torch.Tensor,
        dtype: torch.dtype,
    ) -> StepContext:
        """``positions`` (B, T) are the rotary positions; the step's keys go to cache slots
        ``start`` .. ``start + T - 1``; ``key_valid`` (B, K) marks which of the K keys the
        attention sees hold real tokens (K = the cache length, or T without a cache)."""
        cos, sin = rope_cos_sin(inv_freq, positions, dtype)
        slots = torch.arange(start, start + positions.shape[1], device=positions.device)
        return cls(cos, sin, attention_mask(key_valid, slots), slots, real)


def attention_mask(key_valid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, K): a query sees the real keys at or before its own slot. It always sees
    itself, so padded rows stay finite instead of turning NaN and leaking through zero
    attention weights."""
    k_slot = torch.arange(key_valid.shape[1], device=key_valid.device)[None, :]
    q_slot = slots[:, None]
    mask = ((k_slot <= q_slot) & key_valid[:, None, :]) | (k_slot == q_slot)
    return mask[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer for one micro-batch, written in place at
    the step's slots (a tensor, so a compiled step does not depend on the step number);
    attention always reads the whole, fixed-width cache, which the mask limits."""

    def __init__(self, batch: int, num_kv_heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, num_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v

    def write_packed(self, packed: PackedPrompts, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a packed prefill's keys and values (1, kv_heads, N, head_dim) at their slots."""
        rows, slots = packed.batch_index, packed.slot_index
        self.k[rows, :, slots] = k[0].transpose(0, 1)
        self.v[rows, :, slots] = v[0].transpose(0, 1)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(h, config.q_size, bias=False)
        self.k_proj = nn.Linear(h, config.kv_size, bias=False)
        self.v_proj = nn.Linear(h, config.kv_size, bias=False)
        self.o_proj = nn.Linear(config.q_size, h, bias=False)

    def heads(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None) -> torch.Tensor:
        """Per-head attention outputs before ``o_proj``: (B, T, heads, head_dim)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.cos[:, None], ctx.sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        gqa = self.num_heads != self.num_kv_heads
        if ctx.packed is not None:
            if cache is not None:
                cache.write_packed(ctx.packed, k, v)
            return ctx.packed.attend(q, k, v, gqa).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(ctx.slots, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=gqa).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None = None) -> torch.Tensor:
        return self.o_proj(self.heads(x, ctx, cache).flatten(2))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, ffn = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, ffn, bias=False)
        self.up_proj = nn.Linear(h, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, h, bias=False)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up: the intermediate activation whose sparsity predictors study."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(x))


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], rename: dict[str, str] | None = None) -> None:
    """Copy shard tensors into a module; shapes were checked by ``load_shard``."""
    rename = rename or {}
    state = {rename.get(k, k): t for k, t in tensors.items()}
    module.load_state_dict(state, strict=True, assign=True)


def _from_shard(cls, model_dir: str | Path, config: ModelConfig, piece: str, dtype: torch.dtype) -> nn.Module:
    """Build on the meta device (no random init to throw away), then take the shard's tensors."""
    with torch.device("meta"):
        module = cls(config)
    _load(module, load_shard(model_dir, piece, config))
    return module.to(dtype)


class LlamaBlock(nn.Module):
    """One decoder layer: h = x + Attn(Norm(x)); out = h + MLP(Norm(h))."""

    #: Whether a decode step through it can be compiled into one graph (no host-side work).
    compilable = True

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def packable_parts(self) -> list[nn.Module]:
        """The parts whose linear layers are only called, never read as ``.weight``, so
        that they can be packed for the CPU's GEMM (``modules.packed_linear``)."""
        return [self]

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        _load(self, tensors, {k: f"mlp.{k}" for k in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")})

    @classmethod
    def from_shard(cls, model_dir: str | Path, config: ModelConfig, layer_index: int, dtype=torch.float32):
        with torch.device("meta"):  # no random init: every weight comes from the shard
            block = cls(config, layer_index)
        block.load_tensors(load_shard(model_dir, layer_index, config))
        return block.to(dtype)


class LlamaEmbeddings(nn.Module):
    """Token embeddings only: Llama has no learned positions (RoPE lives in attention)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    @classmethod
    def from_shard(cls, model_dir: str | Path, config: ModelConfig, dtype=torch.float32):
        return _from_shard(cls, model_dir, config, EMBEDDINGS, dtype)


class LlamaLMHead(nn.Module):
    """Final RMSNorm and the vocabulary projection (a copy of the embeddings when tied)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))

    @classmethod
    def from_shard(cls, model_dir: str | Path, config: ModelConfig, dtype=torch.float32):
        return _from_shard(cls, model_dir, config, LM_HEAD, dtype)
