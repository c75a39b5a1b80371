"""One rank's run, start to end: load the stage, agree with the others that all started,
open the collector, drive the pipeline (rank 0) or follow it, gather the statistics.

``launch/infer.py`` adds the command line, signals, exit codes and the output files; a
test calls ``run`` directly with a ``RunSettings``."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.collector import ActivationCollector, CollectError
from engine.comm import PeerError, default_backend, device_for, open_communicator
from engine.config import ConfigError, ModelConfig
from engine.host import bind_cores, keep_freed_memory
from engine.prompts import PromptError, read_prompts
from engine.shards import ShardError, shard_filename, verify_manifest
from engine.tokenizer import load_tokenizer
from modules.npt_checkpoint import CheckpointError
from modules.registry import SaveOptions
from pipeline.block_options import RunInputs, prepare_run, stage_options
from pipeline.generation import (
    PREFILL_CHUNK_TOKENS,
    GenerationRules,
    MicroBatch,
    Sequence,
    default_micro_batch_size,
    make_micro_batches,
    make_sequences,
    padding_fraction,
)
from pipeline.head_cost import measured_head_cost
from pipeline.plan import PlanError, StagePlan, lm_head_cost, make_plans
from pipeline.schedule import FirstStageDriver, run_follower
from pipeline.settings import RankPlace, RunSettings
from pipeline.stage import Stage, build_stage

#: Errors of the user's input or environment: reported in one line, never a traceback.
USER_ERRORS = (
    PromptError,
    ShardError,
    ConfigError,
    PlanError,
    CollectError,
    CheckpointError,
    ValueError,
    OSError,  # e.g. a full disk; the message names the file
)


@dataclass
class RunResult:
    """What one rank's run gives back. Only rank 0, which drives, has results and stats."""

    rank: int
    loop_seconds: float
    rows: list[dict]  # results.jsonl's rows in input order (rank 0; empty elsewhere)
    stats: dict | None  # the --stats-path content (rank 0; None elsewhere)


@dataclass
class Generation:
    """Rank 0's side of a finished run: what the results and the stats are made of."""

    sequences: list[Sequence]
    batches: list[MicroBatch]
    micro_batch_size: int
    prefill_seconds: float
    rules: GenerationRules


def run(settings: RunSettings, place: RankPlace | None = None) -> RunResult:
    """Checks every rank makes alike and cheaply come first, before the process group;
    then each rank loads its stage, all agree they started, and the pipeline runs.
    ``place`` defaults to a one-rank world."""
    place = place or RankPlace()
    pp = settings.pp_degree or place.world_size
    if pp != place.world_size:
        raise PlanError(
            f"--pp-degree {pp} must equal the number of processes ({place.world_size});"
            f" use torchrun --nproc_per_node {pp} (on several nodes: --nnodes times --nproc_per_node)"
        )
    backend = settings.dist_backend or default_backend()
    device = device_for(backend)
    threads = configure_host(settings, place)
    config = ModelConfig.from_model_dir(settings.model_dir)
    head_cost = lm_head_cost(config) if settings.balance_head else 0.0
    measure = settings.balance_head == "measured" and place.world_size > 1
    plans = stage_plans(settings, config, place, head_cost)
    run_inputs = None if measure else prepare_run(settings, plans, config, place)  # measured: once split
    # Bound only once every check before the process group has passed (and before gloo starts
    # its threads): a run that fails earlier, in-process as tests run it, keeps its cores.
    bind = threads and settings.bind_cores and device.type == "cpu" and place.local_world_size > 1
    cores = bind_cores(place.local_rank, place.local_world_size, threads) if bind else []
    comm = open_communicator(backend, settings.dist_timeout, device, place.world_size)
    if measure:
        head_cost = agreed_head_cost(comm, settings, config, device)
        plans = stage_plans(settings, config, place, head_cost)
    plan = plans[place.rank]

    def prepare_and_load():
        inputs = run_inputs if run_inputs is not None else prepare_run(settings, plans, config, place)
        return inputs, *load_stage(settings, plan, inputs, config, device)

    run_inputs, stage, collector, inputs = start_together(comm, prepare_and_load)
    resuming = settings.collect.resume and run_inputs.save_layers
    first_row = agree_first_row(comm, collector) if resuming else 0
    start = time.perf_counter()
    generation = None
    try:
        if collector is not None:
            collector.open(first_row)
        if plan.is_first:
            generation = drive(settings, stage, comm, *inputs, pp)
        else:
            run_follower(stage, comm, config.hidden_size)
    except BaseException:
        if collector is not None:
            close_after_failure(collector)
        raise
    if collector is not None:
        collector.close()
    loop_seconds = time.perf_counter() - start
    all_stats = comm.gather_objects({**rank_stats(comm, loop_seconds, device, stage), "cores": cores})
    comm.close()
    if generation is None:
        return RunResult(place.rank, loop_seconds, [], None)
    rows = [result_row(generation.rules, s) for s in generation.sequences]
    stats = run_stats(generation, pp, loop_seconds, all_stats)
    return RunResult(place.rank, loop_seconds, rows, {**stats, "balance_head_cost": round(head_cost, 3)})


def configure_host(settings: RunSettings, place: RankPlace) -> int:
    """This process's malloc and torch threads (see ``engine.host``), before any thread pool
    starts; returns the threads it set (0: left as they were)."""
    keep_freed_memory()
    if not (settings.threads or place.world_size > 1):
        return 0
    threads = settings.threads or max(1, (os.cpu_count() or 1) // place.local_world_size)
    torch.set_num_threads(threads)
    return threads


def stage_plans(settings: RunSettings, config: ModelConfig, place: RankPlace, head_cost: float) -> list[StagePlan]:
    types, layers = list(settings.stage_types), (settings.num_layers, settings.max_layers)
    return make_plans(config.num_layers, place.world_size, types, *layers, head_cost)


def agreed_head_cost(comm, settings: RunSettings, config: ModelConfig, device: torch.device) -> float:
    """``--balance-head measured``: rank 0 times the head against a layer, and every rank
    splits by its figure (timed on every rank, the splits could differ by noise)."""
    mine = measured_head_cost(config, settings.dtype, device, settings.packed_weights) if comm.rank == 0 else None
    return comm.all_gather_objects(mine, "agreeing on the layer split with")[0]


def load_stage(settings: RunSettings, plan: StagePlan, run_inputs: RunInputs, config: ModelConfig, device):
    """Rank 0 reads the prompts first (bad input fails before any model loads); every rank
    then checks and loads its own shard files. Nothing is written yet."""
    driver_inputs = prepare_inputs(settings, config) if plan.is_first else None
    if settings.verify_shards:
        verify_stage_files(plan, settings.model_dir)
    options = stage_options(settings, plan, run_inputs, config)
    stage = build_stage(plan, settings.model_dir, config, settings.dtype, device, options)
    compiled = settings.compile and stage.compile_decode()
    if settings.packed_weights and not compiled:  # a compiled step has inductor pack them
        stage.pack_weights()
    collector = options.collector if isinstance(options, SaveOptions) else None
    return stage, collector, driver_inputs


def verify_stage_files(plan: StagePlan, model_dir: Path) -> None:
    problems = verify_manifest(model_dir, [shard_filename(piece) for piece in plan.pieces])
    if problems:
        raise ShardError("shard files do not match the manifest:\n  " + "\n  ".join(problems))


def start_together(comm, start: Callable):
    """Run ``start`` on every rank, then agree whether all succeeded: a rank's bad input
    stops the others at once with a message naming it, not with a hang-up mid-run."""
    try:
        result = start()
    except USER_ERRORS:
        comm.failed_ranks(True)
        raise
    if failed := comm.failed_ranks(False):
        raise PeerError(f"rank {', '.join(map(str, failed))} failed to start (see its error); nothing was run")
    return result


def agree_first_row(comm, collector: ActivationCollector | None) -> int:
    """Where a resumed collection goes on: the shortest layer of any rank (save stage or
    not, every rank takes part), so row k is the same token in every layer on every node."""
    rows = comm.all_gather_objects(collector.resume_from if collector is not None else None)
    return min(row for row in rows if row is not None)


def close_after_failure(collector: ActivationCollector) -> None:
    """Publish the rows written before the failure; a second error must not hide the first."""
    try:
        collector.close()
    except CollectError as e:
        print(f"collect: rows after the last flush are lost: {e}", file=sys.stderr)


def prepare_inputs(settings: RunSettings, config: ModelConfig):
    """Rank 0 alone reads and tokenizes the prompts; bad input fails before any model loads."""
    requests = read_prompts(settings.infer_data)
    tokenizer = load_tokenizer(settings.model_dir)
    sequences = make_sequences(
        requests,
        tokenizer,
        settings.max_new_tokens,
        config.max_position_embeddings,
        settings.infer_data,
        settings.truncate_prompts,
    )
    return tokenizer, sequences


def drive(settings: RunSettings, stage: Stage, comm, tokenizer, sequences: list[Sequence], pp: int) -> Generation:
    """Rank 0: generate every sequence through the pipeline."""
    from tqdm import tqdm

    eos = set(stage.config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})
    pad_id = next(iter(({tokenizer.pad_token_id} | eos) - {None}), 0)
    size = settings.micro_batch_size or default_micro_batch_size(sequences, pp)
    chunk_tokens = settings.prefill_chunk_tokens
    if chunk_tokens is None:  # one stage has nothing to overlap a chunk with
        chunk_tokens = PREFILL_CHUNK_TOKENS if pp > 1 else 0
    batches = make_micro_batches(sequences, size, pad_id, settings.length_buckets, chunk_tokens)
    rules = GenerationRules(tokenizer, eos, settings.ignore_eos)
    driver = FirstStageDriver(stage, comm, rules, pad_id, settings.max_inflight or pp + 1)
    generating = any(s.max_new for s in sequences)
    if generating:  # progress in new tokens
        total, desc = sum(s.max_new for s in sequences), "generate"
    else:  # prompt-only (collection): in prompt tokens, a micro-batch at a time
        total, desc = sum(len(s.prompt_ids) for s in sequences), "prefill"
    with tqdm(total=total, unit="tok", desc=desc, disable=not settings.progress or None) as bar:

        def progress(mb: MicroBatch, generated: int) -> None:
            bar.update(generated if generating else sum(len(s.prompt_ids) for s in mb.rows))

        driver.run(batches, progress)
    return Generation(sequences, batches, size, driver.first_window_done_at or 0.0, rules)


def result_row(rules: GenerationRules, seq: Sequence) -> dict:
    """One line of results.jsonl."""
    return {
        "id": seq.request.id,
        "prompt": seq.request.prompt,
        "text": rules.text_of(seq),
        "token_ids": seq.generated,
        "finish_reason": seq.finish_reason,
    }


def run_stats(generation: Generation, pp: int, loop_seconds: float, ranks: list[dict]) -> dict:
    """The --stats-path content: the run's totals and each rank's own statistics."""
    sequences, prefill = generation.sequences, generation.prefill_seconds
    generated = sum(len(s.generated) for s in sequences)
    return {
        "pp_degree": pp,
        "prompts": len(sequences),
        "micro_batch_size": generation.micro_batch_size,
        "prefill_chunks": sum(len(mb.chunks) for mb in generation.batches),
        "prompt_tokens": sum(len(s.prompt_ids) for s in sequences),
        "padding_fraction": round(padding_fraction(generation.batches), 4),
        "generated_tokens": generated,
        "prefill_seconds": round(prefill, 4),
        "decode_seconds": round(loop_seconds - prefill, 4),
        "total_seconds": round(loop_seconds, 4),
        "tokens_per_second": round(generated / loop_seconds, 3) if loop_seconds else 0.0,
        "ranks": ranks,
    }


def rank_stats(comm, loop_seconds: float, device: torch.device, stage: Stage) -> dict:
    """One rank's statistics: its layers, peak memory and the fraction of the loop it waited."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wait = comm.wait_seconds
    return {
        "rank": comm.rank,
        "layers": [stage.plan.layers.start, stage.plan.layers.stop],
        "model_type": stage.plan.model_type,
        "peak_memory_bytes": peak,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in stage.parameters()),
        "wait_seconds": round(wait, 4),
        "idle_fraction": round(wait / loop_seconds, 4) if loop_seconds else 0.0,
        "compile_seconds": round(stage.compile_seconds, 4),
        "packed_linears": stage.packed_linears,
    }
