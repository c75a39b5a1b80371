"""One run's settings: what ``launch/infer.py``'s flags ask for, as plain values, so the
runner can be called (and tested) without a command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class CollectSettings:
    """Where and how llama-save stages write their activations (``--collect-*``)."""

    dir: Path | None = None
    dtype: str = "float16"
    capacity: int = 400_000
    resume: bool = False
    flush_seconds: float = 30.0
    layers: tuple[int, ...] | None = None  # --collect-layers; None: every layer of the llama-save stages
    ignore_disk_space: bool = False  # start even when the files at full capacity would not fit


@dataclass(frozen=True)
class SparseRequest:
    """How llama-sparse stages select MLP units (``--sparse-mode``, ``--mlp-sparsity``, ...)."""

    mode: str = "predictor"
    mlp_sparsity: float = 0.5
    predictor_dir: Path | None = None
    calibration_dir: Path | None = None


@dataclass(frozen=True)
class RunSettings:
    """Everything one rank's run needs besides its place in the world (``RankPlace``)."""

    model_dir: Path
    infer_data: Path
    stage_types: tuple[str, ...] = ("llama",)
    pp_degree: int | None = None  # None: the world size
    max_new_tokens: int = 32
    truncate_prompts: bool = False
    micro_batch_size: int | None = None  # None: generation.default_micro_batch_size
    max_inflight: int | None = None  # None: pp + 1
    prefill_chunk_tokens: int | None = None  # None: generation.PREFILL_CHUNK_TOKENS when pp > 1; 0: whole
    num_layers: int | None = None  # layers per stage (DejaVu meaning)
    max_layers: int | None = None
    balance_head: str | None = None  # None, "measured" (timed on rank 0) or "params" (by weights)
    dist_backend: str | None = None  # None: torch_nccl with CUDA, else gloo
    dist_timeout: float = 300.0
    dtype: torch.dtype = torch.float32
    threads: int | None = None  # None: cores / ranks when there are several ranks
    bind_cores: bool = True  # several CPU ranks on a machine: each on cores of its own (engine.host)
    verify_shards: bool = False
    ignore_eos: bool = False
    progress: bool = True
    compile: bool = False  # compile the decode step (Stage.compile_decode)
    length_buckets: bool = True  # micro-batch prompts of similar length together
    packed_weights: bool = True  # pack eager CPU float32 linear weights (Stage.pack_weights)
    collect: CollectSettings = field(default_factory=CollectSettings)
    npt_checkpoint: Path | None = None
    sparse: SparseRequest = field(default_factory=SparseRequest)


@dataclass(frozen=True)
class RankPlace:
    """This process's place in the torchrun world (its environment); one rank by default."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str]) -> RankPlace:
        world_size = int(env.get("WORLD_SIZE", 1))
        local = (int(env.get("LOCAL_WORLD_SIZE", world_size)), int(env.get("LOCAL_RANK", 0)))
        return cls(int(env.get("RANK", 0)), world_size, *local)

    @property
    def node_ranks(self) -> range:
        """The ranks on this node: torchrun gives a node consecutive global ranks."""
        first = self.rank - self.local_rank
        return range(first, first + self.local_world_size)
