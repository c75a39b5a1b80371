"""Token-pipelined greedy inference; one pipeline stage per process.

    torchrun --nproc_per_node 2 launch/infer.py --model-name DIR --pp-degree 2 \
        --infer-data prompts.jsonl --output-path results.jsonl

Run without torchrun it is a single-stage pipeline (``--pp-degree 1``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.host import HUGE_PAGES

os.environ.setdefault(*HUGE_PAGES)  # before torch's first allocation (engine/host.py)

import torch

from engine.atomic import write_json_atomic, write_jsonl_atomic
from engine.cli_types import count
from engine.comm import BACKENDS, PeerError
from modules.llama_sparse import SPARSE_MODES, check_sparsity
from modules.registry import BLOCK_TYPES
from pipeline.runner import USER_ERRORS, run
from pipeline.settings import CollectSettings, RankPlace, RunSettings, SparseRequest

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPARSE_TYPE = "llama-sparse"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", default="llama", choices=BLOCK_TYPES, help="block type of every stage")
    p.add_argument("--stage-model-types", help="comma-separated block type per stage, e.g. llama,llama-save")
    p.add_argument("--model-name", required=True, help="converted shard directory")
    p.add_argument(
        "--pp-degree", "--pipeline-group-size", type=int, default=None, help="pipeline stages (= world size)"
    )
    p.add_argument("--infer-data", required=True, help="prompts.jsonl")
    p.add_argument("--output-path", required=True, help="results.jsonl, written by rank 0 in input order")
    p.add_argument("--max-new-tokens", "--generate-seq-length", type=count(0), default=32)
    p.add_argument(
        "--truncate-prompts",
        action="store_true",
        help="keep the end of a prompt too long for the context instead of failing (DejaVu-style)",
    )
    p.add_argument(
        "--micro-batch-size",
        "--token-micro-batch-size",
        type=count(1),
        default=None,
        help="prompts per micro-batch (default: spread the prompts over the stages, at most 32; "
        "prompt-only runs: about 512 prompt tokens each)",
    )
    p.add_argument(
        "--prefill-chunk-tokens",
        type=count(0),
        default=None,
        help="prompt tokens per prefill chunk sent down the pipeline (default: 64 with several stages,"
        " whole micro-batches with one; 0: whole micro-batches)",
    )
    p.add_argument(
        "--max-inflight", type=count(1), default=None, help="micro-batches in the ring at once (default pp + 1)"
    )
    p.add_argument("--num-layers", type=count(1), default=None, help="layers per stage (DejaVu meaning)")
    p.add_argument("--max-layers", type=count(1), default=None, help="run only the first L layers")
    p.add_argument(
        "--balance-head",
        nargs="?",
        const="measured",
        choices=("measured", "params"),
        help="give the last stage fewer layers, weighing the LM head by its decode time against a layer's,"
        " measured on rank 0 at start (the default), or by its parameters (params)",
    )
    p.add_argument(
        "--dist-backend",
        choices=BACKENDS,
        default=None,
        help="default: torch_nccl with CUDA, else gloo; cupy_nccl needs the gpu extra",
    )
    p.add_argument("--dist-timeout", type=float, default=300.0, help="seconds before a silent peer is an error")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 (float16 with --fp16)")
    p.add_argument("--fp16", action="store_true", help="DejaVu alias for --dtype float16")
    p.add_argument("--threads", type=count(1), default=None, help="torch threads per rank (default: cores / ranks)")
    p.add_argument(
        "--no-bind-cores",
        action="store_true",
        help="let CPU ranks float over every core (default: several ranks on a machine each get cores of their own)",
    )
    p.add_argument("--collect-dir", help="where llama-save stages write their activation files")
    p.add_argument(
        "--collect-layers",
        type=_layer_list,
        default=None,
        help="record only these layers, e.g. 0,15,28-31 (default: every layer of the llama-save stages)",
    )
    p.add_argument("--collect-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--collect-capacity", type=count(1), default=400_000, help="rows per layer file (DejaVu: 400000)")
    p.add_argument("--collect-resume", action="store_true", help="append to the dataset already in --collect-dir")
    p.add_argument("--collect-flush-seconds", type=float, default=30.0, help="how often rows are made durable")
    p.add_argument(
        "--collect-ignore-disk-space",
        action="store_true",
        help="start even when the files at full --collect-capacity would not fit on the disk (a warning instead)",
    )
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
        "--no-packed-weights",
        action="store_true",
        help="eager CPU float32 runs: keep the linear weights row-major instead of packed for the GEMM",
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
    unknown = [t for t in args.stage_types if t not in BLOCK_TYPES]
    if unknown:
        p.error(f"--stage-model-types: unknown type {unknown[0]!r} (choose from {', '.join(BLOCK_TYPES)})")
    if args.dist_timeout <= 0:
        p.error("--dist-timeout must be positive")
    if SPARSE_TYPE in args.stage_types and args.mlp_sparsity > 0:
        needed = {"predictor": "--predictor-dir", "teal": "--sparse-calibration"}.get(args.sparse_mode)
        if needed and not getattr(args, needed[2:].replace("-", "_")):
            p.error(f"--sparse-mode {args.sparse_mode} needs {needed}")
    return args


def _layer_list(text: str) -> tuple[int, ...]:
    """An argparse type: layer indices, comma-separated, with ranges as ``first-last``."""
    layers = []
    try:
        for item in text.split(","):
            first, _, last = item.strip().partition("-")
            layers += range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 0,3,8-11, got {text!r}") from None
    return tuple(sorted(set(layers)))


def _fraction(text: str) -> float:
    """An argparse type: a sparsity in [0, 1)."""
    try:
        return check_sparsity(float(text), "the sparsity")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The runner's plain settings from the parsed flags."""
    return RunSettings(
        model_dir=Path(args.model_name),
        infer_data=Path(args.infer_data),
        stage_types=tuple(args.stage_types),
        pp_degree=args.pp_degree,
        max_new_tokens=args.max_new_tokens,
        truncate_prompts=args.truncate_prompts,
        micro_batch_size=args.micro_batch_size,
        max_inflight=args.max_inflight,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        num_layers=args.num_layers,
        max_layers=args.max_layers,
        balance_head=args.balance_head,
        dist_backend=args.dist_backend,
        dist_timeout=args.dist_timeout,
        dtype=args.dtype,
        threads=args.threads,
        bind_cores=not args.no_bind_cores,
        verify_shards=args.verify_shards,
        ignore_eos=args.ignore_eos,
        progress=not args.no_progress,
        compile=args.compile,
        length_buckets=not args.no_length_buckets,
        packed_weights=not args.no_packed_weights,
        collect=CollectSettings(
            _path(args.collect_dir),
            args.collect_dtype,
            args.collect_capacity,
            args.collect_resume,
            args.collect_flush_seconds,
            args.collect_layers,
            args.collect_ignore_disk_space,
        ),
        npt_checkpoint=_path(args.npt_checkpoint),
        sparse=SparseRequest(
            args.sparse_mode,
            args.mlp_sparsity,
            _path(args.predictor_dir),
            _path(args.sparse_calibration),
        ),
    )


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def run_and_write(args: argparse.Namespace) -> None:
    """Run this rank; rank 0 then writes the results (and the statistics) atomically."""
    result = run(settings_from_args(args), RankPlace.from_env(os.environ))
    if result.rank != 0:
        return
    write_jsonl_atomic(args.output_path, result.rows)
    if args.stats_path:
        write_json_atomic(args.stats_path, result.stats)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (torchrun stops the other ranks with it): unwind, keeping collected rows."""


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_and_write(args)
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
