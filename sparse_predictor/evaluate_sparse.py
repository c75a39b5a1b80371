"""What sparse inference costs and gains: perplexity, agreement with dense greedy tokens and
batch-1 decode speed, for each selection mode and sparsity, side by side in one process.

    python -m sparse_predictor.evaluate_sparse --model-name DIR --data held_out.jsonl --out DIR \\
        --modes oracle,teal,predictor --sparsity 0.3,0.5,0.7,0.9 \\
        [--predictor-dir DIR] [--sparse-calibration COLLECT_DIR] [--max-length 256]

Perplexity: each document cut to ``--max-length`` tokens (BOS as the tokenizer adds it),
exp of the mean NLL over every predicted token of every document. Agreement: the fraction
of the first ``--agreement-tokens`` greedy tokens of each prompt equal to the dense
model's at the same position. Speed: decode tokens/s at batch 1 over those generations
(prefill excluded), dense measured in the same process with the same threads: ``speedup``
against dense with row-major weights, like the sparse models here (whose selections read
the dense MLP's weights; perplexity stays comparable with HF's to float noise);
``speedup_vs_packed_dense`` against dense with packed weights, the engine's CPU default, a
lower bound since the engine also packs a sparse stage's attention and head.

Writes ``sparse_eval.json`` after each configuration and ``sparse_eval.png`` at the end."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.atomic import write_json_atomic
from engine.cli_types import count
from engine.config import ModelConfig
from engine.prompts import read_prompts
from engine.shards import ShardError
from engine.tokenizer import load_tokenizer
from modules.llama import LlamaBlock, LlamaEmbeddings, LlamaLMHead
from modules.llama_sparse import SPARSE_MODES, LlamaSparseBlock, SparseSettings, check_sparsity
from npt.model import ShardModel
from pipeline.plan import StagePlan
from pipeline.stage import Stage
from sparse_predictor.inference import SparseSetupError, load_predictors, teal_thresholds

RESULT_NAME, PLOT_NAME = "sparse_eval.json", "sparse_eval.png"


class SparseModel:
    """One model in one process, for perplexity and batch-1 generation."""

    def __init__(self, config: ModelConfig, blocks: list, embeddings: LlamaEmbeddings, head: LlamaLMHead):
        self.full = ShardModel(config, embeddings, blocks, head).eval()
        plan = StagePlan(0, 1, range(config.num_layers), "llama-sparse")
        self.stage = Stage(plan, config, blocks, embeddings, head, torch.float32, torch.device("cpu"))

    @classmethod
    def load(cls, model_dir: Path, config: ModelConfig) -> SparseModel:
        blocks = [LlamaBlock.from_shard(model_dir, config, i) for i in range(config.num_layers)]
        embeddings, head = LlamaEmbeddings.from_shard(model_dir, config), LlamaLMHead.from_shard(model_dir, config)
        return cls(config, blocks, embeddings, head)

    def sparse(self, settings: SparseSettings) -> SparseModel:
        """The same weights with every block sparse."""
        config, full = self.stage.config, self.full
        blocks = [LlamaSparseBlock.from_block(b, config, settings) for b in full.blocks]
        return SparseModel(config, blocks, full.embeddings, full.head)

    def measured_sparsity(self) -> float:
        """Mean fraction of MLP weights skipped per token, over the layers."""
        meters = [b.sparse_mlp.meter for b in self.full.blocks if isinstance(b, LlamaSparseBlock)]
        return sum(m.mean for m in meters) / len(meters) if meters else 0.0

    @torch.inference_mode()
    def nll(self, documents: list[torch.Tensor]) -> tuple[float, int]:
        """Summed next-token NLL and the number of predicted tokens, one document at a time."""
        total, count = 0.0, 0
        for ids in documents:
            hidden, _ = self.full.hidden_states(ids[None])
            logits = self.full.head(hidden[0, :-1]).float()
            total += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += len(ids) - 1
        return total, count

    @torch.inference_mode()
    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
        """Greedy tokens after ``prompt`` (batch 1) and the seconds spent in decode steps."""
        real = torch.ones(1, len(prompt), dtype=torch.bool)
        token = self.stage.prefill(0, prompt[None], real, cache_len=len(prompt) + new_tokens)
        tokens, one = [int(token)], torch.ones(1, 1, dtype=torch.bool)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.stage.decode(0, token[:, None], one)
            tokens.append(int(token))
        seconds = time.perf_counter() - start
        self.stage.release(0)
        return tokens, seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparse_predictor.evaluate_sparse", description=__doc__.split("\n")[0])
    p.add_argument("--model-name", required=True, type=Path, help="converted shard directory")
    p.add_argument("--data", required=True, type=Path, help='held-out text: JSON lines with "prompt"')
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--modes", default="oracle,teal,predictor", help=f"comma-separated, of {', '.join(SPARSE_MODES)}")
    p.add_argument("--sparsity", default="0.3,0.5,0.7,0.9", help="comma-separated MLP sparsities in [0, 1)")
    p.add_argument("--predictor-dir", type=Path, help="for predictor mode: python -m sparse_predictor.train's --out")
    p.add_argument("--sparse-calibration", type=Path, help="for teal mode: a llama-save collect dir of this model")
    p.add_argument("--max-length", type=count(1), default=256, help="tokens per document for perplexity")
    p.add_argument("--max-docs", type=count(1), default=None, help="use only the first N documents")
    p.add_argument("--prompts", type=count(1), default=4, help="documents whose start prompts the greedy runs")
    p.add_argument("--prompt-tokens", type=count(1), default=32, help="tokens of each generation prompt")
    p.add_argument("--agreement-tokens", type=count(1), default=32, help="greedy tokens compared with dense")
    p.add_argument("--threads", type=count(1), default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in SPARSE_MODES]
    if unknown:
        p.error(f"--modes: unknown mode {unknown[0]!r} (choose from {', '.join(SPARSE_MODES)})")
    try:
        args.sparsity = [check_sparsity(float(s), "--sparsity") for s in args.sparsity.split(",") if s.strip()]
    except ValueError as e:
        p.error(str(e))
    if "predictor" in args.modes and not args.predictor_dir:
        p.error("--modes predictor needs --predictor-dir")
    if "teal" in args.modes and not args.sparse_calibration:
        p.error("--modes teal needs --sparse-calibration")
    return args


def documents(path: Path, tokenizer, max_length: int, max_docs: int | None) -> list[torch.Tensor]:
    docs = [tokenizer(r.prompt)["input_ids"][:max_length] for r in read_prompts(path)[:max_docs]]
    docs = [torch.tensor(ids) for ids in docs if len(ids) >= 2]
    if not docs:
        raise SparseSetupError(f"{path}: no document has 2 tokens or more to score")
    return docs


def selection(args, mode: str, sparsity: float, config: ModelConfig, cache: dict) -> SparseSettings:
    """The settings of one configuration; predictors are loaded once and thresholds once per sparsity."""
    settings = SparseSettings(mode, sparsity)
    layers = list(range(config.num_layers))
    if mode == "predictor":
        if "predictors" not in cache:
            cache["predictors"] = load_predictors(args.predictor_dir, layers, config)
        settings.predictors = cache["predictors"]
    if mode == "teal":
        settings.thresholds = teal_thresholds(args.sparse_calibration, args.model_name, config, layers, sparsity)
    return settings


def greedy_speed(model: SparseModel, prompts: list[torch.Tensor], new_tokens: int) -> tuple[list[list[int]], float]:
    """Each prompt's greedy tokens (batch 1) and the decode tokens/s over all of them."""
    generations, seconds = zip(*(model.greedy(p, new_tokens) for p in prompts))
    decoded = sum(len(g) - 1 for g in generations)
    return list(generations), decoded / sum(seconds) if sum(seconds) else 0.0


def measure(model: SparseModel, docs: list[torch.Tensor], prompts: list[torch.Tensor], new_tokens: int) -> dict:
    nll, count = model.nll(docs)
    tokens, speed = greedy_speed(model, prompts, new_tokens)
    return {"ppl": math.exp(nll / count), "tokens": tokens, "decode_tokens_per_second": speed}


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    same = sum(a == b for got, want in zip(tokens, reference) for a, b in zip(got, want))
    return same / sum(len(want) for want in reference)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_model_dir(args.model_name)
    tokenizer = load_tokenizer(args.model_name)
    docs = documents(args.data, tokenizer, args.max_length, args.max_docs)
    prompts = [d[: args.prompt_tokens] for d in docs[: args.prompts]]
    args.out.mkdir(parents=True, exist_ok=True)
    configs = [(m, s) for m in args.modes for s in args.sparsity]
    cache: dict = {}
    settings = {c: selection(args, *c, config, cache) for c in configs}  # every input checked before any run
    base = SparseModel.load(args.model_name, config)
    dense = measure(base, docs, prompts, args.agreement_tokens)
    report = {
        "model": str(args.model_name),
        "data": str(args.data),
        "documents": len(docs),
        "scored_tokens": sum(len(d) - 1 for d in docs),
        "threads": torch.get_num_threads(),
        "base_ppl": dense["ppl"],
        "base_decode_tokens_per_second": dense["decode_tokens_per_second"],
        "results": [],
    }
    for mode, sparsity in tqdm(configs, desc="sparse configurations"):
        model = base.sparse(settings[mode, sparsity])
        got = measure(model, docs, prompts, args.agreement_tokens)
        report["results"].append(
            {
                "mode": mode,
                "mlp_sparsity": sparsity,
                "measured_sparsity": model.measured_sparsity(),
                "ppl": got["ppl"],
                "ppl_ratio": got["ppl"] / dense["ppl"],
                "token_agreement": agreement(got["tokens"], dense["tokens"]),
                "decode_tokens_per_second": got["decode_tokens_per_second"],
                "speedup": got["decode_tokens_per_second"] / dense["decode_tokens_per_second"],
            }
        )
        write_json_atomic(args.out / RESULT_NAME, report)
    base.stage.pack_weights()  # last: the sparse models slice its MLP weights
    packed = greedy_speed(base, prompts, args.agreement_tokens)[1]
    report["base_packed_decode_tokens_per_second"] = packed
    for row in report["results"]:
        row["speedup_vs_packed_dense"] = row["decode_tokens_per_second"] / packed
    write_json_atomic(args.out / RESULT_NAME, report)
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in report["results"]):
        rows = [r for r in report["results"] if r["mode"] == mode]
        left.plot([r["mlp_sparsity"] for r in rows], [r["ppl_ratio"] for r in rows], marker="o", label=mode)
        right.plot([r["mlp_sparsity"] for r in rows], [r["speedup"] for r in rows], marker="o", label=mode)
    left.axhline(1.05, color="grey", linestyle=":", label="+5% perplexity")
    left.set(xlabel="MLP sparsity", ylabel="perplexity / dense", title="Accuracy cost", yscale="log")
    right.axhline(1.0, color="grey", linestyle=":")
    right.set(xlabel="MLP sparsity", ylabel="decode tokens/s / dense", title="Batch-1 decode speed-up")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['model']}: dense perplexity {report['base_ppl']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(report: dict) -> str:
    lines = [
        f"dense: perplexity {report['base_ppl']:.3f}, {report['base_decode_tokens_per_second']:.2f} tokens/s"
        f" ({report['base_packed_decode_tokens_per_second']:.2f} with packed weights, the engine's CPU default)",
        "| mode | sparsity | measured | ppl | ppl ratio | agreement | tokens/s | speed-up | vs packed dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['mlp_sparsity']:.2f} | {r['measured_sparsity']:.3f} | {r['ppl']:.3f} | "
            f"{r['ppl_ratio']:.3f} | {r['token_agreement']:.3f} | {r['decode_tokens_per_second']:.2f} | "
            f"{r['speedup']:.2f}x | {r['speedup_vs_packed_dense']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (ValueError, ShardError) as e:  # setup, collect, config and shard errors name their file
        print(f"error: {e}", file=sys.stderr)
        return 1
    plot(report, args.out / PLOT_NAME)
    print(table(report))
    print(f"results: {args.out / RESULT_NAME}\nplot: {args.out / PLOT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
