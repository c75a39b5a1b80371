"""Token-pipelined greedy inference; one pipeline stage per process.

    torchrun --nproc_per_node 2 launch/infer.py --model-name DIR --pp-degree 2 \
        --infer-data prompts.jsonl --output-path results.jsonl

Run without torchrun it is a single-stage pipeline (``--pp-degree 1``)."""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engine.collector import ActivationCollector, CollectError, check_collect_dir
from engine.comm import BACKENDS, LocalCommunicator, PeerError, TorchDistCommunicator, default_backend, device_for
from engine.config import ConfigError, ModelConfig
from engine.prompts import PromptError, read_prompts, write_jsonl_atomic
from engine.shards import ShardError, shard_filename, verify_manifest, write_json_atomic
from modules.llama import LlamaEmbeddings, LlamaLMHead
from modules.llama_sparse import SPARSE_MODES, SparseSettings, check_sparsity
from modules.registry import BUILDERS, BlockSpec, build_block
from npt.checkpoint import CheckpointError, NPTCheckpoint
from pipeline.generation import GenerationRules, make_micro_batches, make_sequences, padding_fraction
from pipeline.plan import PlanError, StagePlan, make_plans
from pipeline.schedule import FirstStageDriver, run_follower
from pipeline.stage import Stage
from sparse_predictor.inference import load_predictors, teal_thresholds

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
SAVE_TYPE, NPT_TYPE, SPARSE_TYPE = "llama-save", "llama-npt", "llama-sparse"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", default="llama", choices=BUILDERS, help="block type of every stage")
    p.add_argument("--stage-model-types", help="comma-separated block type per stage, e.g. llama,llama-save")
    p.add_argument("--model-name", required=True, help="converted shard directory")
    p.add_argument(
        "--pp-degree", "--pipeline-group-size", type=int, default=None, help="pipeline stages (= world size)"
    )
    p.add_argument("--infer-data", required=True, help="prompts.jsonl")
    p.add_argument("--output-path", required=True, help="results.jsonl, written by rank 0 in input order")
    p.add_argument("--max-new-tokens", "--generate-seq-length", type=_count(0), default=32)
    p.add_argument(
        "--truncate-prompts",
        action="store_true",
        help="keep the end of a prompt too long for the context instead of failing (DejaVu-style)",
    )
    p.add_argument(
        "--micro-batch-size",
        "--token-micro-batch-size",
        type=_count(1),
        default=None,
        help="prompts per micro-batch (default: spread the prompts over the stages, at most 32)",
    )
    p.add_argument(
        "--max-inflight", type=_count(1), default=None, help="micro-batches in the ring at once (default pp + 1)"
    )
    p.add_argument("--num-layers", type=_count(1), default=None, help="layers per stage (DejaVu meaning)")
    p.add_argument("--max-layers", type=_count(1), default=None, help="run only the first L layers")
    p.add_argument(
        "--balance-head",
        action="store_true",
        help="give the last stage fewer layers, weighing the LM head by its decode cost",
    )
    p.add_argument("--dist-backend", choices=BACKENDS, default=None, help="default: torch_nccl with CUDA, else gloo")
    p.add_argument("--dist-timeout", type=float, default=300.0, help="seconds before a silent peer is an error")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 (float16 with --fp16)")
    p.add_argument("--fp16", action="store_true", help="DejaVu alias for --dtype float16")
    p.add_argument("--threads", type=_count(1), default=None, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--collect-dir", help="where llama-save stages write their activation files")
    p.add_argument("--collect-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--collect-capacity", type=_count(1), default=400_000, help="rows per layer file (DejaVu: 400000)")
    p.add_argument("--collect-resume", action="store_true", help="append to the dataset already in --collect-dir")
    p.add_argument("--collect-flush-seconds", type=float, default=30.0, help="how often rows are made durable")
    p.add_argument(
        "--verify-shards", action="store_true", help="check each stage's shard files against the manifest's sha256"
    )
    p.add_argument("--npt-checkpoint", help="npt.pt from python -m npt.train, for llama-npt stages")
    sparse = p.add_argument_group("sparse inference (llama-sparse stages)")
    sparse.add_argument("--sparse-mode", choices=SPARSE_MODES, default="predictor", help="how units are selected")
    sparse.add_argument(
        "--mlp-sparsity", type=_fraction, default=0.5, help="fraction of the MLP's weights skipped per token, in [0, 1)"
    )
    sparse.add_argument("--predictor-dir", help="predictor mode: the output of python -m sparse_predictor.train")
    sparse.add_argument("--sparse-calibration", help="teal mode: a llama-save collect dir of the same model")
    p.add_argument("--stats-path", help="write timing, memory and bubble statistics as JSON")
    p.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens tokens regardless of EOS")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step with torch.compile (CUDA graphs on a GPU); plain and NPT stages only",
    )
    p.add_argument(
        "--no-length-buckets",
        action="store_true",
        help="micro-batch prompts in input order instead of by length (more padding in prefill)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.dtype = DTYPES[args.dtype or ("float16" if args.fp16 else "float32")]
    args.stage_types = (args.stage_model_types or args.model_type).split(",")
    unknown = [t for t in args.stage_types if t not in BUILDERS]
    if unknown:
        p.error(f"--stage-model-types: unknown type {unknown[0]!r} (choose from {', '.join(BUILDERS)})")
    if args.dist_timeout <= 0:
        p.error("--dist-timeout must be positive")
    if SPARSE_TYPE in args.stage_types and args.mlp_sparsity > 0:
        needed = {"predictor": "--predictor-dir", "teal": "--sparse-calibration"}.get(args.sparse_mode)
        if needed and not getattr(args, needed[2:].replace("-", "_")):
            p.error(f"--sparse-mode {args.sparse_mode} needs {needed}")
    return args


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse's message names the type
    return parse


def _fraction(text: str) -> float:
    """An argparse type: a sparsity in [0, 1)."""
    try:
        return check_sparsity(float(text), "the sparsity")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def verify_stage_files(plan: StagePlan, model_dir: Path) -> None:
    problems = verify_manifest(model_dir, [shard_filename(piece) for piece in plan.pieces])
    if problems:
        raise ShardError("shard files do not match the manifest:\n  " + "\n  ".join(problems))


def build_stage(plan: StagePlan, model_dir: Path, config: ModelConfig, dtype, device, options: dict) -> Stage:
    """Load only this stage's shard files: its layers, plus embeddings or head at the ends."""
    blocks = [build_block(plan.model_type, BlockSpec(model_dir, config, i, dtype, options)) for i in plan.layers]
    embeddings = LlamaEmbeddings.from_shard(model_dir, config, dtype) if plan.is_first else None
    head = LlamaLMHead.from_shard(model_dir, config, dtype) if plan.is_last else None
    return Stage(plan, config, blocks, embeddings, head, dtype, device).to(device)


def rank_stats(comm, loop_seconds: float, device: torch.device, stage: Stage) -> dict:
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
    }


def load_npt_checkpoint(path: str | None, plans: list[StagePlan], config: ModelConfig) -> NPTCheckpoint | None:
    """The NPT checkpoint, once it is known to fit the model and every layer it converts
    to run on an NPT stage: on any other stage the layer would silently run as the original."""
    if path is None:
        if any(plan.model_type == NPT_TYPE for plan in plans):
            raise ValueError(f"{NPT_TYPE} stages need --npt-checkpoint")
        return None
    checkpoint = NPTCheckpoint.load(path)
    checkpoint.check_fits(config)
    for plan in plans:
        dropped = [layer for layer in checkpoint.config.layers if layer in plan.layers]
        if dropped and plan.model_type != NPT_TYPE:
            raise CheckpointError(
                f"{checkpoint.source}: converts layers {dropped}, which stage {plan.rank} (rank {plan.rank}, layers"
                f" {plan.layers.start}-{plan.layers.stop - 1}) runs as {plan.model_type!r}, not {NPT_TYPE!r}:"
                " they would run as the original layers; make that stage llama-npt (--stage-model-types)"
            )
    return checkpoint


def block_options(
    args, plan: StagePlan, save_layers: list[int], config: ModelConfig, model_dir: Path, npt: NPTCheckpoint | None
) -> dict:
    """What this stage's block type needs beyond the shards: a collector, an NPT checkpoint."""
    if plan.model_type == SAVE_TYPE:
        collector = ActivationCollector(
            args.collect_dir,
            list(plan.layers),
            save_layers,
            config,
            model_dir,
            str(args.infer_data),
            args.collect_dtype,
            args.collect_capacity,
            args.collect_resume,
            args.collect_flush_seconds,
            args.dist_timeout,
        )
        return {"collector": collector}
    if plan.model_type == SPARSE_TYPE:
        return {"sparse": sparse_settings(args, list(plan.layers), config, model_dir)}
    if plan.model_type == NPT_TYPE:
        return {"npt_checkpoint": npt}
    return {}


def sparse_settings(args, layers: list[int], config: ModelConfig, model_dir: Path) -> SparseSettings:
    """The selection of this stage's sparse layers: predictors or TEAL thresholds, checked."""
    settings = SparseSettings(args.sparse_mode, args.mlp_sparsity)
    if args.mlp_sparsity > 0 and args.sparse_mode == "predictor":
        settings.predictors = load_predictors(args.predictor_dir, layers, config)
    if args.mlp_sparsity > 0 and args.sparse_mode == "teal":
        settings.thresholds = teal_thresholds(args.sparse_calibration, model_dir, config, layers, args.mlp_sparsity)
    return settings


def run(args: argparse.Namespace) -> None:
    """Checks every rank makes alike and cheaply come first, before the process group;
    then each rank loads its stage, all agree they started, and the pipeline runs."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    pp = args.pp_degree or world_size
    if pp != world_size:
        raise PlanError(
            f"--pp-degree {pp} must equal the number of processes ({world_size}); use torchrun --nproc_per_node {pp}"
        )
    if args.threads or world_size > 1:
        torch.set_num_threads(
            args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        )
    model_dir = Path(args.model_name)
    config = ModelConfig.from_model_dir(model_dir)
    head_cost = config.vocab_size * config.hidden_size / config.layer_parameters() if args.balance_head else 0.0
    plans = make_plans(config.num_layers, world_size, args.stage_types, args.num_layers, args.max_layers, head_cost)
    plan = plans[rank]
    save_layers = [layer for p in plans if p.model_type == SAVE_TYPE for layer in p.layers]
    if save_layers:
        if not args.collect_dir:
            raise ValueError(f"{SAVE_TYPE} stages need --collect-dir")
        check_collect_dir(Path(args.collect_dir), args.collect_resume)  # every rank, before any writes
    npt = load_npt_checkpoint(args.npt_checkpoint, plans, config)
    backend = args.dist_backend or default_backend()
    device = device_for(backend)

    comm = TorchDistCommunicator(backend, args.dist_timeout, device) if world_size > 1 else LocalCommunicator()
    stage, collector, driver_inputs = start_together(
        comm, lambda: load_stage(args, plan, save_layers, config, model_dir, npt, device)
    )
    start = time.perf_counter()
    try:
        if collector is not None:
            collector.open()
        if plan.is_first:
            finish = drive(args, stage, comm, *driver_inputs, pp)
        else:
            run_follower(stage, comm, config.hidden_size)
    except BaseException:
        if collector is not None:
            close_after_failure(collector)
        raise
    if collector is not None:
        collector.close()
    loop_seconds = time.perf_counter() - start
    stats = rank_stats(comm, loop_seconds, device, stage)
    all_stats = comm.gather_objects(stats)
    if plan.is_first:
        finish(loop_seconds, all_stats)
    comm.close()


def load_stage(
    args,
    plan: StagePlan,
    save_layers: list[int],
    config: ModelConfig,
    model_dir: Path,
    npt: NPTCheckpoint | None,
    device,
):
    """Rank 0 reads the prompts first (bad input fails before any model loads); every rank
    then checks and loads its own shard files. Nothing is written yet."""
    driver_inputs = prepare_inputs(args, model_dir, config) if plan.is_first else None
    if args.verify_shards:
        verify_stage_files(plan, model_dir)
    options = block_options(args, plan, save_layers, config, model_dir, npt)
    stage = build_stage(plan, model_dir, config, args.dtype, device, options)
    if args.compile:
        stage.compile_decode()
    return stage, options.get("collector"), driver_inputs


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


def close_after_failure(collector: ActivationCollector) -> None:
    """Publish the rows written before the failure; a second error must not hide the first."""
    try:
        collector.close()
    except CollectError as e:
        print(f"collect: rows after the last flush are lost: {e}", file=sys.stderr)


def prepare_inputs(args, model_dir: Path, config: ModelConfig):
    """Rank 0 alone reads and tokenizes the prompts; bad input fails before any model loads."""
    from engine.tokenizer import load_tokenizer

    requests = read_prompts(args.infer_data)
    tokenizer = load_tokenizer(model_dir)
    sequences = make_sequences(
        requests, tokenizer, args.max_new_tokens, config.max_position_embeddings, args.infer_data, args.truncate_prompts
    )
    return tokenizer, sequences


def drive(args, stage: Stage, comm, tokenizer, sequences, pp: int):
    from tqdm import tqdm

    config = stage.config
    eos = set(config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})
    pad_id = next(iter(({tokenizer.pad_token_id} | eos) - {None}), 0)
    size = args.micro_batch_size or min(32, -(-len(sequences) // pp))
    batches = make_micro_batches(sequences, size, pad_id, by_length=not args.no_length_buckets)
    rules = GenerationRules(tokenizer, eos, args.ignore_eos)
    driver = FirstStageDriver(stage, comm, rules, pad_id, args.max_inflight or pp + 1)
    total = sum(s.max_new for s in sequences)
    with tqdm(total=total, unit="tok", desc="generate", disable=args.no_progress or None) as bar:
        driver.run(batches, bar.update)

    def finish(loop_seconds: float, all_stats: list[dict]) -> None:
        rows = [
            {
                "id": s.request.id,
                "prompt": s.request.prompt,
                "text": rules.text_of(s),
                "token_ids": s.generated,
                "finish_reason": s.finish_reason,
            }
            for s in sequences
        ]
        write_jsonl_atomic(args.output_path, rows)
        if args.stats_path:
            generated = sum(len(s.generated) for s in sequences)
            prefill = driver.first_window_done_at or 0.0
            stats = {
                "pp_degree": pp,
                "prompts": len(sequences),
                "micro_batch_size": size,
                "prompt_tokens": sum(len(s.prompt_ids) for s in sequences),
                "padding_fraction": round(padding_fraction(batches), 4),
                "generated_tokens": generated,
                "prefill_seconds": round(prefill, 4),
                "decode_seconds": round(loop_seconds - prefill, 4),
                "total_seconds": round(loop_seconds, 4),
                "tokens_per_second": round(generated / loop_seconds, 3) if loop_seconds else 0.0,
                "ranks": all_stats,
            }
            write_json_atomic(args.stats_path, stats)

    return finish


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (torchrun stops the other ranks with it): unwind, keeping collected rows."""


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(args)
    except (*USER_ERRORS, PeerError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        kept = f"; {args.collect_dir} keeps the rows its manifest lists" if args.collect_dir else ""
        print(f"interrupted (rank {rank}) by {name}: stopped, no results written{kept}", file=sys.stderr)
        return 128 + signal.Signals[name].value
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
