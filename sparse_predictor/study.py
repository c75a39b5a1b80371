"""Issue 15's study: how well low-rank predictors find SwiGLU's active units, and why.

Recall against sparsity, predictor size, embedding drift, lookahead and attention heads.

    python -m sparse_predictor.study --data-dir COLLECT --model-name MODEL --out OUT \\
        [--publish findings/sparse] [--threads 1] [--quick]

Every predictor is trained by ``sparse_predictor.train`` into ``OUT/pieces/<name>`` (a
rerun keeps the finished layers: ``--resume``); every number is measured on its held-out
test rows. ``OUT/study.json`` holds the results and ``OUT/study.md`` their tables, next
to the PNG plots; ``--publish`` copies those small files (not the checkpoints) elsewhere.
``--pieces`` trains only some predictors and stops, so that processes can share the grid;
the same command without it then finishes the rest and writes the results."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.atomic import write_json_atomic
from sparse_predictor import train
from sparse_predictor.data import Collection
from sparse_predictor.drift import embedding_drift
from sparse_predictor.labels import heads_kept
from sparse_predictor.results import read_metrics, section
from sparse_predictor.stats import spearman
from sparse_predictor.study_report import write_plots, write_tables

STUDY_FILE = "study.json"
DRIFT_FILE = "drift.json"
TIMES_FILE = "piece_seconds.json"
STUDY_FORMAT = 1
#: What each layer's entry keeps of the trainer's metrics.
LAYER_FIELDS = ("recall", "precision", "recall_at_true_sparsity", "true_sparsity", "classifier_sparsity", "best_epoch")


@dataclass(frozen=True)
class Grid:
    """The predictors trained: the base predictor (base rank and sparsity) on every
    ``base_stride``-th layer and the last (the base layers); on every ``sweep_stride``-th
    layer and the last (the sweep layers), the base predictor with lookahead, every other
    rank at the base sparsity, every other sparsity at the base rank, and the attention
    predictor per kept fraction of heads. The full grid covers every layer with both; the
    quick one thins the sweeps (the sweep layers are base layers when ``sweep_stride`` is a
    multiple of ``base_stride``)."""

    ranks: tuple[int, ...]
    sparsities: tuple[float, ...]
    head_keeps: tuple[float, ...]
    base_rank: int
    base_sparsity: float
    epochs: int
    drift_rows: int
    base_stride: int
    sweep_stride: int

    def base_layers(self, layers: list[int]) -> list[int]:
        return sorted({*layers[:: self.base_stride], layers[-1]})

    def sweep_layers(self, layers: list[int]) -> list[int]:
        return sorted({*layers[:: self.sweep_stride], layers[-1]})


FULL = Grid((64, 128, 256, 1000), (0.3, 0.5, 0.7, 0.9), (0.25, 0.5, 0.75), 128, 0.5, 3, 20000, 1, 1)
QUICK = Grid((8, 16), (0.5, 0.9), (0.5,), 16, 0.5, epochs=1, drift_rows=1000, base_stride=1, sweep_stride=2)


def mlp_name(rank: int, sparsity: float, lookahead: bool = False) -> str:
    return f"mlp_r{rank}_s{round(sparsity * 100)}" + ("_lookahead" if lookahead else "")


def att_name(rank: int, keep: float) -> str:
    return f"att_r{rank}_k{round(keep * 100)}"


@dataclass(frozen=True)
class Piece:
    """One ``sparse_predictor.train`` run of the study."""

    kind: str
    rank: int
    layers: tuple[int, ...]
    sparsity: float | None = None
    lookahead: bool = False
    keep: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "att":
            return att_name(self.rank, self.keep)
        return mlp_name(self.rank, self.sparsity, self.lookahead)

    def train_args(self, args: argparse.Namespace, grid: Grid) -> list[str]:
        argv = ["--data-dir", str(args.data_dir), "--model-name", str(args.model_name), "--kind", self.kind]
        argv += ["--out", str(args.out / "pieces" / self.name), "--layers", ",".join(map(str, self.layers))]
        argv += ["--D", str(self.rank), "--epochs", str(grid.epochs), "--seed", str(args.seed)]
        argv += ["--drift-rows", "0", "--resume", "--device", args.device]  # drift: once, by the study
        if self.kind == "att":
            return [*argv, "--att-keep", str(self.keep)]
        return [*argv, "--target-sparsity", str(self.sparsity)] + (["--lookahead"] if self.lookahead else [])


def pieces(grid: Grid, layers: list[int]) -> dict[str, Piece]:
    """The grid's pieces by name, each once (the base predictor serves three questions);
    the costly large ranks last, so an interrupted run has answered the most questions."""
    base, sweep = tuple(grid.base_layers(layers)), tuple(grid.sweep_layers(layers))
    todo = [Piece("mlp", grid.base_rank, base, grid.base_sparsity)]
    todo += [Piece("mlp", grid.base_rank, sweep, grid.base_sparsity, lookahead=True)]
    todo += [Piece("mlp", grid.base_rank, sweep, s) for s in grid.sparsities if s != grid.base_sparsity]
    todo += [Piece("att", grid.base_rank, sweep, keep=keep) for keep in grid.head_keeps]
    todo += [Piece("mlp", rank, sweep, grid.base_sparsity) for rank in grid.ranks if rank != grid.base_rank]
    return {p.name: p for p in todo}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparse_predictor.study", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="llama-save collect directory (reused, not written)")
    p.add_argument("--model-name", required=True, type=Path, help="shard directory of the model collected")
    p.add_argument("--out", required=True, type=Path, help="where the predictors, study.json and plots go")
    p.add_argument("--publish", type=Path, default=None, help="also copy study.json, study.md and the plots here")
    p.add_argument("--layers", default="all", help="comma-separated layer indices, or 'all' recorded layers")
    p.add_argument("--quick", action="store_true", help="a small grid, one epoch (for tests)")
    p.add_argument(
        "--pieces",
        default=None,
        help="train only these comma-separated pieces and stop (to share the grid between processes); "
        "a run without it then trains what is left and writes the results",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def summarize(sec: dict, only: list[int] | None = None) -> dict:
    """Per-layer metrics of one trained piece and their means over its layers (or ``only`` these)."""
    entries = sorted(sec["layers"].items(), key=_layer_key)
    layers = {layer: {k: e[k] for k in LAYER_FIELDS} for layer, e in entries if only is None or int(layer) in only}
    means = {}
    for key in LAYER_FIELDS[:-1]:
        values = [e[key] for e in layers.values() if e[key] is not None]
        means[key] = sum(values) / len(values) if values else None
    return {"layers": layers, "mean": means}


def _layer_key(item: tuple[str, dict]) -> int:
    return int(item[0])


def piece_metrics(out: Path, piece: Piece) -> dict:
    return section(read_metrics(out / "pieces" / piece.name), piece.kind)


def drift_of(args: argparse.Namespace, collection: Collection, grid: Grid) -> dict:
    """The embedding drift, measured once and kept in ``OUT/drift.json``."""
    path = args.out / DRIFT_FILE
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    drift = embedding_drift(collection, grid.drift_rows)
    write_json_atomic(path, drift)
    add_seconds(args.out / TIMES_FILE, "drift", time.perf_counter() - start)
    return drift


def drift_measures(drift: dict) -> dict[str, dict[str, float]]:
    """Per-layer drift, 0 = none: to the next layer's input, to the first layer's, and from
    the layer input to the MLP input (across attention)."""
    layers = drift["layers"]
    return {
        "1 - cos(l, l+1)": {k: 1 - v["cos_next"] for k, v in layers.items() if v["cos_next"] is not None},
        f"1 - cos(l, {drift['first_layer']})": {k: 1 - v["cos_first"] for k, v in layers.items()},
        "1 - cos(att_x, mlp_x)": {k: 1 - v["cos_mlp"] for k, v in layers.items()},
    }


def correlations(drift: dict, standard: dict, lookahead: dict) -> list[dict]:
    """Spearman's rho of each drift measure with each recall series, over the layers both have."""
    recall_series = {
        "standard recall@true": {k: e["recall_at_true_sparsity"] for k, e in standard["layers"].items()},
        "standard recall": {k: e["recall"] for k, e in standard["layers"].items()},
        "lookahead recall@true": {k: e["recall_at_true_sparsity"] for k, e in lookahead["layers"].items()},
        "standard - lookahead recall@true": {
            k: e["recall_at_true_sparsity"] - lookahead["layers"][k]["recall_at_true_sparsity"]
            for k, e in standard["layers"].items()
            if k in lookahead["layers"]
        },
    }
    found = []
    for drift_name, d in drift_measures(drift).items():
        for recall_name, r in recall_series.items():
            layers = sorted((k for k in d if k in r and r[k] is not None), key=int)
            c = spearman([d[k] for k in layers], [r[k] for k in layers])
            pair = {"drift": drift_name, "recall": recall_name, "layers": [int(k) for k in layers]}
            found.append({**pair, **c.to_dict()})
    return found


def analyse(grid: Grid, layers: list[int], collection: Collection, out: Path, drift: dict) -> dict:
    """Every question's per-layer numbers and means (a sweep's over the sweep layers only,
    the base predictor's included, so that its columns compare like with like; the drift
    correlations over every layer each series has)."""
    todo = pieces(grid, layers)
    sections = {name: section(read_metrics(out / "pieces" / name), piece.kind) for name, piece in todo.items()}
    sweep = grid.sweep_layers(layers)
    base, look = mlp_name(grid.base_rank, grid.base_sparsity), mlp_name(grid.base_rank, grid.base_sparsity, True)
    standard, lookahead = summarize(sections[base]), summarize(sections[look])
    standard_on_sweep = summarize(sections[base], sweep)
    h, f = collection.hidden_size, collection.intermediate_size
    mlp_weights = 3 * h * f  # gate, up and down projections
    return {
        "model": {"hidden_size": h, "intermediate_size": f, "num_heads": collection.num_heads},
        "layers": layers,
        "sweep_layers": sweep,
        "mlp_weights": mlp_weights,
        "sparsity": {
            "rank": grid.base_rank,
            "by_target": {str(s): summarize(sections[mlp_name(grid.base_rank, s)], sweep) for s in grid.sparsities},
        },
        "rank": {
            "sparsity": grid.base_sparsity,
            "by_rank": {
                str(r): {
                    "weights": r * (h + f),
                    "weight_ratio": r * (h + f) / mlp_weights,
                    **summarize(sections[mlp_name(r, grid.base_sparsity)], sweep),
                }
                for r in grid.ranks
            },
        },
        "base": {"rank": grid.base_rank, "sparsity": grid.base_sparsity, **standard},
        "lookahead": {"standard": standard_on_sweep, "lookahead": lookahead},
        "att": {
            str(k): {
                "heads_kept": heads_kept(collection.num_heads, k),
                **summarize(sections[att_name(grid.base_rank, k)], sweep),
            }
            for k in grid.head_keeps
        },
        "drift": {**drift, "correlations": correlations(drift, standard, lookahead)},
    }


def run_pieces(args: argparse.Namespace, grid: Grid, todo: dict[str, Piece]) -> dict[str, float]:
    """Train what is missing; returns the seconds spent per piece over every run so far."""
    path = args.out / TIMES_FILE
    bar = tqdm(todo.values(), desc="study", unit="piece")
    for piece in bar:
        bar.set_postfix_str(piece.name)
        start = time.perf_counter()
        try:
            train.main(piece.train_args(args, grid))
        finally:  # an interrupted piece's time counts too
            add_seconds(path, piece.name, time.perf_counter() - start)
    return read_seconds(path)


def read_seconds(path: Path) -> dict[str, float]:
    return json.loads(path.read_text()) if path.is_file() else {}


def add_seconds(path: Path, name: str, spent: float) -> dict[str, float]:
    """Count ``spent`` to ``name`` in the tally on disk (read afresh: resumed runs and
    processes sharing the grid add up)."""
    seconds = read_seconds(path)
    seconds[name] = seconds.get(name, 0.0) + spent
    write_json_atomic(path, seconds)
    return seconds


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else FULL
    collection = Collection.open(args.data_dir)
    layers = train.resolve_layers(args.layers, collection)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    todo = pieces(grid, layers)
    if args.pieces is not None:
        chosen = [name.strip() for name in args.pieces.split(",") if name.strip()]
        unknown = sorted(set(chosen) - set(todo))
        if unknown:
            raise SystemExit(f"--pieces: unknown {unknown}; the grid's pieces are {list(todo)}")
        run_pieces(args, grid, {name: todo[name] for name in chosen})
        return args.out
    run_pieces(args, grid, todo)
    drift = drift_of(args, collection, grid)
    seconds = read_seconds(args.out / TIMES_FILE)
    study = {
        "format": STUDY_FORMAT,
        "config": {**train.run_config(args), "grid": asdict(grid)},
        **analyse(grid, layers, collection, args.out, drift),
        "piece_seconds": seconds,
        "total_seconds": sum(seconds.values()),
        "this_run_seconds": time.perf_counter() - start,
    }
    path = args.out / STUDY_FILE
    write_json_atomic(path, study)
    files = [path, write_tables(study, args.out), *write_plots(study, args.out)]
    if args.publish is not None:
        args.publish.mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copyfile(file, args.publish / file.name)
    print(f"study: {path} ({study['this_run_seconds']:.0f} s this run)")
    return path


def cli(argv: list[str] | None = None) -> int:
    return train.run_cli(main, argv, "finished layers are kept; run the same command again to go on")


if __name__ == "__main__":
    sys.exit(cli())
