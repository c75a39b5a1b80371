"""Training throughput on a synthetic layer (SmolLM2-135M's shape by default).

    python -m benchmarks.bench_predictor_throughput [--rows 20000] [--hidden 576] [--ffn 1536] [--heads 9]

Prints rows per second of one training epoch per predictor kind, and the rate at which
the same batches are only read and labelled (no model), so the share of I/O is visible."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sparse_predictor.data import Collection, split_rows
from sparse_predictor.labels import abs_quantile, heads_kept
from sparse_predictor.predictor import Task, low_rank_predictor
from sparse_predictor.synthetic import tiny_config, write_collection, write_model_dir
from sparse_predictor.trainer import LayerData, Settings, train_layer


def read_rate(data: LayerData, settings: Settings) -> float:
    """Rows per second of streaming, normalizing and labelling alone."""
    start = time.perf_counter()
    for _ in data.batches(data.split.train, settings.batch_size, settings.device):
        pass
    return len(data.split.train) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_predictor_throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--D", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=Settings.batch_size)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = tiny_config(hidden=args.hidden, ffn=args.ffn, heads=args.heads, layers=1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", config)
        collection = Collection.open(write_collection(Path(tmp) / "data", model_dir, [0], args.rows))
        split = split_rows(args.rows, 0.1, 0.1, seed=0)
        threshold, _ = abs_quantile(collection, collection.array("mlp_label", 0), split.train, 0.5, seed=0)
        settings = Settings(epochs=1, batch_size=args.batch_size, device=args.device)
        print(
            f"{args.rows} rows, hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}, D {args.D}, "
            f"batch {args.batch_size}, {args.threads} threads, {args.device}"
        )
        for task in (Task.mlp(threshold, lookahead=False), Task.att(heads_kept(args.heads, 0.5))):
            data = LayerData.open(collection, task, model_dir, config, 0, split)
            predictor = low_rank_predictor(args.hidden, args.D, data.y.shape[1])
            result = train_layer(predictor, data, settings, name=f"bench {task.kind}")
            print(
                f"{task.kind}: train {result.rows_per_second:.0f} rows/s, read+label only "
                f"{read_rate(data, settings):.0f} rows/s"
            )


if __name__ == "__main__":
    main()
