"""Train sparse predictors for the recorded layers of a collect directory.

    python -m sparse_predictor.train --data-dir DIR --model-name MODEL_DIR --out OUT \\
        [--layers 0,15,29|all] [--kind mlp|att] [--target-sparsity s | --threshold t] ...

Writes ``<kind>_layer_<l>.pt`` per layer, ``metrics.json`` and ``report.md`` with plots.
Each layer's rows are split by blocks into training rows, validation rows (which pick the
best epoch) and test rows, on which alone the reported metrics are measured."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from engine.atomic import atomic_write
from engine.config import ConfigError, ModelConfig
from engine.shards import ShardError
from sparse_predictor.data import CollectError, Collection, split_rows
from sparse_predictor.drift import embedding_drift
from sparse_predictor.labels import abs_quantile, heads_kept
from sparse_predictor.predictor import KINDS, Task, low_rank_predictor
from sparse_predictor.report import write_report
from sparse_predictor.results import METRICS_FILE, read_metrics, section, write_metrics
from sparse_predictor.trainer import SELECT_METRICS, LayerData, Settings, evaluate, train_layer

CHECKPOINT_FORMAT = 1


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m sparse_predictor.train", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="collect directory (manifest.json + *.mmap)")
    p.add_argument("--model-name", required=True, type=Path, help="shard directory of the model collected")
    p.add_argument("--out", required=True, type=Path, help="where checkpoints, metrics.json and report go")
    p.add_argument("--layers", default="all", help="comma-separated layer indices, or 'all' recorded layers")
    p.add_argument("--kind", choices=KINDS, default="mlp")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument(
        "--target-sparsity",
        type=float,
        default=None,
        help="MLP: active = |y| above this quantile of |y| over the training rows (default 0.5)",
    )
    labels.add_argument("--threshold", type=float, default=None, help="MLP: active = |y| > this absolute value")
    p.add_argument("--D", type=int, default=1000, help="rank of the low-rank predictor")
    p.add_argument("--lookahead", action="store_true", help="MLP: predict from the layer input (att_x)")
    p.add_argument("--att-keep", type=float, default=0.5, help="attention: fraction of heads labelled important")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--patience", type=int, default=defaults.patience, help="epochs without improvement before stopping")
    p.add_argument("--select-metric", choices=SELECT_METRICS, default=defaults.select_metric)
    p.add_argument("--val-fraction", type=float, default=0.1, help="rows (whole blocks) that pick the best epoch")
    p.add_argument(
        "--test-fraction", type=float, default=0.1, help="rows (whole blocks) held out to measure the metrics on"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--drift-rows", type=int, default=20000, help="tokens sampled for the embedding drift (0: not measured)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the layers a run with the same settings already finished in --out; train only the rest",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def resolve_layers(spec: str, collection: Collection) -> list[int]:
    """The layers to train; each must be recorded and hold rows (else a CollectError)."""
    try:
        layers = collection.layers if spec == "all" else [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise CollectError(f"--layers must be 'all' or comma-separated integers, got {spec!r}") from None
    for layer in layers:
        collection.rows_of(layer)
    return layers


def check_model(collection: Collection, config: ModelConfig, model_dir: Path) -> None:
    """Refuse a model directory whose shapes differ from the collected data's."""
    for name in ("hidden_size", "intermediate_size", "num_heads"):
        if getattr(collection, name) != getattr(config, name):
            raise CollectError(
                f"{collection.directory}: {name}={getattr(collection, name)} but model {model_dir} "
                f"has {getattr(config, name)} (was the data collected from another model?)"
            )


def make_task(args: argparse.Namespace, collection: Collection, layer: int, train_rows) -> tuple[Task, str | None]:
    """The layer's task and, for a quantile threshold, how the quantile was computed."""
    if args.kind == "att":
        return Task.att(heads_kept(collection.num_heads, args.att_keep)), None
    if args.threshold is not None:
        return Task.mlp(args.threshold, args.lookahead), "absolute"
    sparsity = 0.5 if args.target_sparsity is None else args.target_sparsity
    labels = collection.array("mlp_label", layer)
    threshold, method = abs_quantile(collection, labels, train_rows, sparsity, seed=args.seed + layer)
    return Task.mlp(threshold, args.lookahead), method


def train_one(args: argparse.Namespace, collection: Collection, config: ModelConfig, layer: int) -> dict:
    """Train, checkpoint and describe one layer's predictor."""
    split = split_rows(collection.rows_of(layer), args.val_fraction, args.test_fraction, args.seed)
    task, threshold_method = make_task(args, collection, layer, split.train)
    data = LayerData.open(collection, task, args.model_name, config, layer, split)
    width = data.y.shape[1]
    torch.manual_seed(args.seed + layer)
    predictor = low_rank_predictor(config.hidden_size, args.D, width)
    settings = Settings(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        patience=args.patience,
        select_metric=args.select_metric,
        device=args.device,
        seed=args.seed + layer,
    )
    result = train_layer(predictor, data, settings, name=f"{args.kind} layer {layer}")
    entry = {
        **evaluate(predictor, data, split.test, settings),  # the best epoch, on rows it never saw
        "val_at_best_epoch": {k: v for k, v in result.val_metrics.items() if k != "curve"},
        "threshold": task.threshold,
        "threshold_method": threshold_method,
        "heads_kept": task.keep,
        "train_rows": len(split.train),
        "val_rows": len(split.val),
        "test_rows": len(split.test),
        "split": split.definition,
        "rows_per_second": result.rows_per_second,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "checkpoint": f"{args.kind}_layer_{layer}.pt",
    }
    with atomic_write(args.out / entry["checkpoint"], "wb") as f:
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "kind": args.kind,
                "layer": layer,
                "state_dict": result.state_dict,
                "threshold": task.threshold,
                "heads_kept": task.keep,
                "input": {"stem": task.x_stem, "norm": task.norm_key, "rms_norm_eps": config.rms_norm_eps},
                "shape": {"in": config.hidden_size, "rank": args.D, "out": width},
                "metrics": entry,
            },
            f,
        )
    return entry


def run_config(args: argparse.Namespace) -> dict:
    """The settings as stored in metrics.json; paths absolute, so that a rerun from another
    directory, or with relative paths, is recognised as the same run."""
    return {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in vars(args).items()}


#: Settings that may differ between a run and the run it resumes: they do not change a layer's result.
RESUME_FREE = ("layers", "resume", "device")


def finished_layers(args: argparse.Namespace) -> dict:
    """The layer entries of ``--out``'s metrics.json that ``--resume`` keeps: those of a run
    with the same settings whose checkpoint is there. Other settings are an error, since
    their layers and ours would be reported as one run."""
    try:
        sec = section(read_metrics(args.out), args.kind)
    except FileNotFoundError:
        return {}
    except ValueError as e:  # an older trainer's file
        raise SystemExit(f"--resume: {e}") from None
    if sec is None:
        return {}
    ours, theirs = run_config(args), sec["config"]
    differ = sorted(k for k in ours.keys() | theirs.keys() if k not in RESUME_FREE and ours.get(k) != theirs.get(k))
    if differ:
        raise SystemExit(f"--resume: {args.out / METRICS_FILE} was trained with other settings ({', '.join(differ)})")
    return {layer: e for layer, e in sec["layers"].items() if (args.out / e["checkpoint"]).is_file()}


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.kind == "att" and (args.threshold is not None or args.target_sparsity is not None or args.lookahead):
        raise SystemExit("--threshold, --target-sparsity and --lookahead apply to --kind mlp only")
    if not (args.val_fraction > 0 and args.test_fraction > 0 and args.val_fraction + args.test_fraction < 1):
        raise SystemExit("--val-fraction and --test-fraction must be positive, with a sum below 1")
    if args.drift_rows < 0:
        raise SystemExit("--drift-rows must be 0 (not measured) or positive")
    collection = Collection.open(args.data_dir)
    config = ModelConfig.from_model_dir(args.model_name)
    check_model(collection, config, args.model_name)
    layers = resolve_layers(args.layers, collection)
    args.out.mkdir(parents=True, exist_ok=True)
    done = finished_layers(args) if args.resume else {}
    results = {}
    for layer in layers:  # metrics after each layer: an interrupted run keeps the finished ones
        key = str(layer)
        results[key] = done[key] if key in done else train_one(args, collection, config, layer)
        write_metrics(args.out, args.kind, results, run_config(args), drift=None)
    drift = embedding_drift(collection, args.drift_rows) if args.drift_rows > 0 else None
    path = write_metrics(args.out, args.kind, results, run_config(args), drift)
    report = write_report(args.out)
    print(f"metrics: {path}\nreport: {report}")
    return report


def run_cli(entry: Callable[[list[str] | None], object], argv: list[str] | None, interrupted: str) -> int:
    """``entry(argv)`` with errors and Ctrl-C as one line each (``interrupted`` says what is
    kept), not a traceback; returns the exit status."""
    try:
        entry(argv)
    except (CollectError, ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, "the finished layers' checkpoints and metrics.json are kept")


if __name__ == "__main__":
    sys.exit(cli())
