"""The stage plan: which layers each pipeline rank owns and which block type it runs."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig
from engine.shards import EMBEDDINGS, LM_HEAD


class PlanError(ValueError):
    """The requested split cannot be made (too few layers, wrong world size, ...)."""


def _even(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (r < extra) for r in range(parts)]


def lm_head_cost(config: ModelConfig) -> float:
    """The LM head's decode work in layers (its weights over a layer's): what
    ``last_stage_extra`` takes to balance the stages (``--balance-head``)."""
    return config.vocab_size * config.hidden_size / config.layer_parameters()


def split_layers(
    num_layers: int,
    world_size: int,
    layers_per_stage: int | None = None,
    max_layers: int | None = None,
    last_stage_extra: float = 0.0,
) -> list[range]:
    """Layer ranges per rank. As in DejaVu, ``layers_per_stage`` fixes each stage's count
    and ``max_layers`` caps the total (only the first layers run); otherwise the layers
    are split as evenly as possible, the earlier ranks taking one more when uneven.
    ``last_stage_extra`` counts the LM head as that many layers of work, so the last
    stage gets fewer layers (what balances decoding, where the head runs every step)."""
    if max_layers is not None and max_layers > num_layers:
        raise PlanError(f"--max-layers {max_layers} is more than the model's {num_layers} layers")
    total = num_layers if max_layers is None else max_layers
    if layers_per_stage is not None:
        total = min(total, layers_per_stage * world_size)
        counts = [max(0, min(layers_per_stage, total - r * layers_per_stage)) for r in range(world_size)]
    elif last_stage_extra and world_size > 1:
        share = (total + last_stage_extra) / world_size
        last = min(max(1, round(share - last_stage_extra)), total - (world_size - 1))
        counts = [*_even(total - last, world_size - 1), last]
    else:
        counts = _even(total, world_size)
    if total < 1 or min(counts) < 1:
        raise PlanError(f"cannot give each of {world_size} pipeline stages at least one of {total} layers")
    starts = [sum(counts[:r]) for r in range(world_size)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


@dataclass(frozen=True)
class StagePlan:
    rank: int
    world_size: int
    layers: range
    model_type: str

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def pieces(self) -> list[int | str]:
        """The shard pieces this stage loads: its layers, plus embeddings or head at the ends."""
        return [EMBEDDINGS] * self.is_first + list(self.layers) + [LM_HEAD] * self.is_last


def make_plans(
    num_layers: int,
    world_size: int,
    model_types: list[str],
    layers_per_stage: int | None = None,
    max_layers: int | None = None,
    last_stage_extra: float = 0.0,
) -> list[StagePlan]:
    """One plan per rank; ``model_types`` holds one type for all stages or one per stage."""
    if len(model_types) == 1:
        model_types = model_types * world_size
    if len(model_types) != world_size:
        raise PlanError(f"--stage-model-types lists {len(model_types)} types for {world_size} stages")
    ranges = split_layers(num_layers, world_size, layers_per_stage, max_layers, last_stage_extra)
    return [StagePlan(r, world_size, ranges[r], model_types[r]) for r in range(world_size)]


def recorded_layers(plans: list[StagePlan], save_types: set[str], chosen: tuple[int, ...] | None) -> list[int]:
    """The layers the stages of ``save_types`` record: all of theirs, or the ``chosen`` ones
    (--collect-layers), each of which must run on such a stage: elsewhere nothing records it."""
    on_save = [layer for plan in plans if plan.model_type in save_types for layer in plan.layers]
    for layer in chosen or ():
        owner = next((plan for plan in plans if layer in plan.layers), None)
        if owner is None:
            raise PlanError(
                f"--collect-layers: layer {layer} is not run (this pipeline runs layers 0-{plans[-1].layers.stop - 1})"
            )
        if owner.model_type not in save_types:
            raise PlanError(
                f"--collect-layers: layer {layer} runs on stage {owner.rank} as {owner.model_type!r}, which records"
                " nothing; make that stage llama-save (--model-type or --stage-model-types)"
            )
    return on_save if chosen is None else list(chosen)
