"""The NPT study: how close neuro-plastic layers get to the original model, and what stops them.

    python -m npt.study --model-name SHARD_DIR --out DIR [--steps 60] [--copy-to findings/npt] [--quick]

Trains every configuration of the grid (NP rank x converted layers x training mode, plus
the gate_up reading of seed 003's W_in on a subset; see ``grid``) for the same number of
steps on the same training windows, and measures the NPT/base perplexity ratio on held-out windows at
half and at the full step budget. Layer-wise training fits each layer on its own original
input, so the layers of one run are independent: one run on the upper half gives every
nested set (last 1, 2, 4 layers) too. The layer-wise runs also measure, per layer, how much
of the attention residual the update can and cannot reproduce (see ``npt.limits``).

Resumable: each run keeps its checkpoint and, when done, ``runs/<name>/result.json``; a
rerun skips finished runs and continues an unfinished one from its checkpoint. The
original model's hidden states over the training windows are computed once
(``residual_cache.pt``). Writes ``study.json`` (settings, points, the frontier, the
configurations within the seeds' 5%, timings) and ``frontier.png`` / ``limits.png`` next
to it; ``--copy-to`` copies those small files (e.g. into the repository's findings/npt)."""

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
from engine.config import ModelConfig
from engine.tokenizer import load_tokenizer
from modules.llama_npt import NPTConfig, parse_convert_layers
from modules.npt_checkpoint import CHECKPOINT_NAME, NPTCheckpoint
from npt.cache import ResidualCache
from npt.data import load_windows
from npt.evaluate import batches, layer_fidelity, perplexity
from npt.limits import attention_residual_limits
from npt.model import Residuals, ShardModel
from npt.train import LOG_NAME, EquivalenceTrainer, parse_args, start_checkpoint, train_steps, trim_log

#: The seeds' target: "< 5% perplexity increase" (seed 003: ratio 1.00 +- 0.05).
RATIO_GOAL = 1.05
LAYER_SETS = ("last1", "last2", "last4", "upper_half")
RANKS = (16, 64, 256)
#: The learning rate of the highest-rank runs repeated below the study's --lr.
LOW_LR = 3e-4
RESULT_NAME = "result.json"
LIMITS_NAME = "limits.json"
#: Held-out windows the limits are measured on (the per-token subspace: on --limit-tokens of them).
LIMIT_WINDOWS = 4
STUDY_NAME = "study.json"
PLOTS = ("frontier.png", "limits.png")


@dataclass(frozen=True)
class Run:
    """One training run of the grid; a layer-wise run is evaluated on every nested layer set."""

    mode: str
    target: str
    rank: int
    layer_set: str
    #: A learning rate other than the study's ``--lr`` (None: the study's).
    lr: float | None = None

    @property
    def name(self) -> str:
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.mode}-{self.target}-r{self.rank}-{self.layer_set}{lr}"


def layer_set(name: str, num_layers: int) -> tuple[int, ...]:
    """A ``--convert-layers`` spec such as ``last2`` or ``upper_half``."""
    return parse_convert_layers(name, num_layers)


def grid(ranks: tuple[int, ...], sets: tuple[str, ...], extra_rank: int) -> list[Run]:
    """Cheapest first, so an interrupted study has the most points. At every rank: end to
    end on every set, and layer-wise on the largest set (its layers train independently,
    so that one run gives the nested sets too). At ``extra_rank``, the gate_up reading the
    same way. The highest rank again at a third of the learning rate (it trains worse
    than the lower ranks at the common one). The end-to-end runs on the largest set come
    last: each costs as much as all the small runs of its rank together."""
    small, largest = sets[:-1], sets[-1]
    runs = [Run("end-to-end", "gate", r, s) for s in small for r in ranks]
    runs += [Run("end-to-end", "gate_up", extra_rank, s) for s in small]
    runs += [Run("end-to-end", "gate", max(ranks), s, LOW_LR) for s in small]
    runs += [Run("layerwise", "gate", r, largest) for r in ranks]
    runs += [Run("layerwise", "gate_up", extra_rank, largest), Run("layerwise", "gate", max(ranks), largest, LOW_LR)]
    runs += [Run("end-to-end", "gate", r, largest) for r in ranks]
    return runs + [
        Run("end-to-end", "gate_up", extra_rank, largest),
        Run("end-to-end", "gate", max(ranks), largest, LOW_LR),
    ]


@dataclass
class Study:
    """What every run shares: the settings, the data and the original model's hidden states."""

    args: argparse.Namespace
    config: ModelConfig
    windows: torch.Tensor
    val: torch.Tensor
    cache: ResidualCache
    val_cached: Residuals
    ppl_base: float
    sets: tuple[str, ...]

    def layers(self, name: str) -> tuple[int, ...]:
        return layer_set(name, self.config.num_layers)


def parse_study_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m npt.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-name", required=True, help="converted shard directory")
    p.add_argument("--out", required=True, type=Path, help="study directory (runs/, study.json, plots)")
    p.add_argument("--data", type=Path, help="training text (default: the gensim Lee corpus, prepared in <out>/corpus)")
    p.add_argument("--val-data", type=Path, help="held-out text (default: the Lee validation split)")
    p.add_argument("--steps", type=int, default=60, help="the step budget of every run")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)))
    p.add_argument("--extra-rank", type=int, default=64, help="the rank of the gate_up runs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--limit-tokens", type=int, default=128, help="tokens of the per-token subspace measurement")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--copy-to", type=Path, help="also copy study.json and the plots here")
    p.add_argument(
        "--quick", action="store_true", help="a tiny grid for tests: ranks 4,8, last1 and upper_half, 4 steps"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.ranks, args.extra_rank, args.steps, args.eval_windows, args.limit_tokens = "4,8", 4, 4, 2, 16
    args.ranks = tuple(int(r) for r in args.ranks.split(","))
    return args


def lee_corpus(out: Path, model_dir: str) -> Path:
    from engine.corpus import prepare_corpus

    if not (out / "validation.jsonl").exists():
        prepare_corpus("gensim-lee", out, model_name=model_dir)
    return out


def prepare_study(args: argparse.Namespace) -> Study:
    """Data, the cached hidden states (loaded, or computed and saved) and the base perplexity."""
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_model_dir(args.model_name)
    tokenizer = load_tokenizer(args.model_name)
    corpus = None if args.data else lee_corpus(args.out / "corpus", args.model_name)
    args.data = args.data or corpus / "train.jsonl"
    val_data = args.val_data or (corpus and corpus / "validation.jsonl")
    windows = load_windows(args.data, tokenizer, args.seq_len)[: args.steps * args.batch_size]
    if val_data:
        val = load_windows(val_data, tokenizer, args.seq_len)[: args.eval_windows]
    else:
        held = max(1, min(args.eval_windows, len(windows) // 5))
        windows, val = windows[:-held], windows[-held:]
    sets = ("last1", "upper_half") if args.quick else LAYER_SETS
    union = sorted({i for s in sets for i in layer_set(s, config.num_layers)})
    cache = ResidualCache(windows, (*union, config.num_layers))
    base = ShardModel.load(args.model_name, NPTCheckpoint(NPTConfig(layers=tuple(union)), {}))
    cache_path = args.out / "residual_cache.pt"
    if not cache.load(cache_path):
        every = torch.arange(len(windows))
        for chunk in tqdm(every.split(args.batch_size), desc="original hidden states", unit="batch", leave=False):
            cache.fill(base, chunk, args.batch_size)
        cache.save(cache_path)
    parts = [base.residual_stream(ids, cache.layers) for ids, _ in batches(val, args.batch_size, None)]
    val_cached = {i: torch.cat([p[i] for p in parts]) for i in cache.layers}
    ppl_base = perplexity(base, val, args.batch_size, plastic=False, cached=val_cached)
    return Study(args, config, windows, val, cache, val_cached, ppl_base, sets)


def train_args(study: Study, run: Run, out: Path) -> argparse.Namespace:
    a = study.args
    argv = [
        "--model-name", str(a.model_name), "--out", str(out), "--data", str(a.data), "--mode", run.mode,
        "--convert-layers", run.layer_set, "--np-rank", str(run.rank),
        "--np-target", run.target, "--lr", str(run.lr or a.lr), "--warmup-steps", str(a.warmup_steps),
        "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--max-steps", str(a.steps),
        "--save-every", "20", "--device", "cpu", "--resume",
    ]  # fmt: skip
    return parse_args(argv)


def point_model(study: Study, run: Run, trainer: EquivalenceTrainer, name: str) -> ShardModel:
    """The trained model restricted to the layer set ``name`` (a layer-wise run's nested sets)."""
    layers = study.layers(name)
    if layers == trainer.config.layers:
        return trainer.model
    config = NPTConfig(run.rank, trainer.config.np_init_scale, layers, run.target)
    state = {i: b.np.state_dict() for i, b in trainer.model.npt_blocks.items() if i in layers}
    return ShardModel.load(study.args.model_name, NPTCheckpoint(config, state))


def point_sets(study: Study, run: Run) -> list[str]:
    if run.mode == "end-to-end":
        return [run.layer_set]
    trained = set(study.layers(run.layer_set))
    return [s for s in study.sets if set(study.layers(s)) <= trained]


def evaluate_run(study: Study, run: Run, trainer: EquivalenceTrainer, final: bool) -> dict[str, dict]:
    """Per layer set of the run: the NPT perplexity and its ratio; at the end also the
    per-layer fidelity."""
    a, out = study.args, {}
    for name in point_sets(study, run):
        model = point_model(study, run, trainer, name)
        ppl = perplexity(model, study.val, a.batch_size, plastic=True, cached=study.val_cached)
        point = {"ppl_npt": ppl, "ppl_ratio": ppl / study.ppl_base}
        if final:
            point["np_parameters"] = sum(p.numel() for b in model.npt_blocks.values() for p in b.np.parameters())
            point["layer_fidelity"] = layer_fidelity(model, study.val, a.batch_size, study.val_cached)
        out[name] = point
    return out


def train_run(study: Study, run: Run) -> dict:
    """Train one run to the step budget (resuming its checkpoint), evaluating at half and at
    the full budget; the evaluations are kept as they come, so a resume redoes none."""
    out = study.args.out / "runs" / run.name
    if (out / RESULT_NAME).exists():
        return json.loads((out / RESULT_NAME).read_text())
    started = time.perf_counter()
    args = train_args(study, run, out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = EquivalenceTrainer(args, start_checkpoint(args, study.config.num_layers), study.cache)
    trim_log(out / LOG_NAME, trainer.steps)
    milestones_path = out / "milestones.json"
    evals = json.loads(milestones_path.read_text()) if milestones_path.exists() else {}
    budget = study.args.steps
    for milestone in sorted({budget // 2, budget} - {0}):
        if str(milestone) in evals:
            continue
        with open(out / LOG_NAME, "a") as log:
            train_steps(trainer, study.windows, milestone, log)
        evals[str(milestone)] = evaluate_run(study, run, trainer, final=milestone == budget)
        write_json_atomic(milestones_path, evals)
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    result = {
        **asdict(run),
        "name": run.name,
        "steps": budget,
        "train_seconds": sum(r["seconds"] for r in log),
        "seconds": time.perf_counter() - started,
        "fidelity_first_last": [log[0]["fidelity"], log[-1]["fidelity"]],
        "evaluations": evals,
    }
    write_json_atomic(out / RESULT_NAME, result)
    return result


def points(study: Study, results: list[dict]) -> list[dict]:
    """One row per (run, layer set): the ratio at the full and at half the budget."""
    rows, budget = [], str(study.args.steps)
    half = str(study.args.steps // 2)
    for r in results:
        for name, final in r["evaluations"][budget].items():
            rows.append(
                {
                    "run": r["name"],
                    "mode": r["mode"],
                    "target": r["target"],
                    "rank": r["rank"],
                    "lr": r.get("lr") or study.args.lr,
                    "layer_set": name,
                    "layers": list(study.layers(name)),
                    "np_parameters": final["np_parameters"],
                    "ppl_npt": final["ppl_npt"],
                    "ppl_ratio": final["ppl_ratio"],
                    "ppl_ratio_half_steps": r["evaluations"].get(half, {}).get(name, {}).get("ppl_ratio"),
                    "train_seconds": r["train_seconds"],
                }
            )
    return rows


def frontier(rows: list[dict]) -> list[dict]:
    """The points no other point beats with as few NP parameters or fewer."""
    best, out = float("inf"), []
    for row in sorted(rows, key=lambda r: (r["np_parameters"], r["ppl_ratio"])):
        if row["ppl_ratio"] < best:
            best = row["ppl_ratio"]
            out.append(row)
    return out


def ratio_without_attention(study: Study) -> dict[str, float]:
    """Per layer set, the ratio when its layers simply drop their attention residual (an NPT
    layer whose update is zero): the baseline a trained update has to beat."""
    out = {}
    for name in study.sets:
        ckpt = NPTCheckpoint(NPTConfig(np_rank=1, np_init_scale=0.0, layers=study.layers(name)), {})
        model = ShardModel.load(study.args.model_name, ckpt)
        out[name] = perplexity(model, study.val, study.args.batch_size, True, study.val_cached) / study.ppl_base
    return out


def run_limits(study: Study, result: dict) -> dict[str, dict[str, float]]:
    """The attention-residual limits of a finished layer-wise run, from its checkpoint, on
    the first ``LIMIT_WINDOWS`` held-out windows; kept in ``runs/<name>/limits.json``."""
    out = study.args.out / "runs" / result["name"]
    if (out / LIMITS_NAME).exists():
        return json.loads((out / LIMITS_NAME).read_text())
    model = ShardModel.load(study.args.model_name, NPTCheckpoint.load(out / CHECKPOINT_NAME))
    ids = study.val[:LIMIT_WINDOWS]
    cached = {i: s[:LIMIT_WINDOWS] for i, s in study.val_cached.items()}
    limits = attention_residual_limits(model, ids, cached, study.args.limit_tokens)
    write_json_atomic(out / LIMITS_NAME, limits)
    return limits


def summary(study: Study, results: list[dict], cache_seconds: float, wall_seconds: float) -> dict:
    rows = points(study, results)
    limits = {r["name"]: run_limits(study, r) for r in results if r["mode"] == "layerwise"}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(study.args).items()}
    return {
        "settings": settings,
        "model": str(study.args.model_name),
        "train_windows": len(study.windows),
        "val_tokens": study.val.numel(),
        "ppl_base": study.ppl_base,
        "ratio_goal": RATIO_GOAL,
        "ratio_without_attention": ratio_without_attention(study),
        "points": rows,
        "frontier": [r["run"] + ":" + r["layer_set"] for r in frontier(rows)],
        "within_goal": [r["run"] + ":" + r["layer_set"] for r in rows if r["ppl_ratio"] < RATIO_GOAL],
        "limits": limits,
        "timing": {
            "runs_seconds": sum(r["seconds"] for r in results),
            "train_seconds": sum(r["train_seconds"] for r in results),
            "this_invocation_seconds": wall_seconds,
            "cache_seconds_this_invocation": cache_seconds,
            "threads": study.args.threads,
        },
    }


def markdown_table(result: dict) -> str:
    lines = [
        "| mode | W_in | rank | lr | layers | NP params | ratio (half steps) | ratio |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]

    def key(r: dict) -> tuple:
        return r["mode"], r["target"], LAYER_SETS.index(r["layer_set"]), r["rank"], r["lr"]

    for r in sorted(result["points"], key=key):
        half = "" if r["ppl_ratio_half_steps"] is None else f"{r['ppl_ratio_half_steps']:.3f}"
        lines.append(
            f"| {r['mode']} | {r['target']} | {r['rank']} | {r['lr']:g} | {r['layer_set']} | {r['np_parameters']:,} "
            f"| {half} | {r['ppl_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from npt.study_plots import plot_frontier, plot_limits

    args = parse_study_args(argv)
    started = time.perf_counter()
    study = prepare_study(args)
    cache_seconds = time.perf_counter() - started
    runs = grid(args.ranks, study.sets, args.extra_rank)
    results = []
    try:
        for run in tqdm(runs, desc="npt study", unit="run"):
            results.append(train_run(study, run))
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; run the same command again to continue", file=sys.stderr)
        return 130
    result = summary(study, results, cache_seconds, time.perf_counter() - started)
    write_json_atomic(args.out / STUDY_NAME, result)
    plot_frontier(result, args.out / PLOTS[0])
    plot_limits(result, args.out / PLOTS[1])
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for name in (STUDY_NAME, *PLOTS):
            shutil.copyfile(args.out / name, args.copy_to / name)
    print(f"base perplexity {study.ppl_base:.2f}; {args.steps} steps per run\n")
    print(markdown_table(result))
    print("\nwithout attention (zero update):", {k: round(v, 3) for k, v in result["ratio_without_attention"].items()})
    print(f"\nwithin {RATIO_GOAL}: {result['within_goal'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
