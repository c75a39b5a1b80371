"""Collection overhead: ``llama-save`` against ``llama`` tokens/s, measured side by side.

    python -m benchmarks.bench_collect [--docs 48] [--doc-tokens 256] [--new-tokens 32]

SmolLM2 fp32 on a 2-stage gloo pipeline (1 thread per rank), on documents of the Lee
news corpus: prompt-only (as DejaVu collects C4) and with greedy generation, micro-batches
as the engine sizes them by default. Prints the slowdown, the write bandwidth, the share of
the machine's GEMM throughput the prompt-only runs reach, bytes per token per layer, and
the disk 400000 rows need for Llama 3.2 1B/3B and Llama 3 8B."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import run_engine, smollm_model_dir, write_prompt_file
from engine.collect_manifest import recorded_rows
from engine.config import ModelConfig
from engine.corpus import load_documents
from engine.dataset_format import array_widths
from engine.tokenizer import load_tokenizer
from modules.packed_linear import PackedLinear

#: Published shapes (hidden, ffn, heads, layers) for the 400000-row projection.
PUBLISHED = {
    "Llama 3.2 1B": (2048, 8192, 32, 16),
    "Llama 3.2 3B": (3072, 8192, 24, 28),
    "Llama 3 8B": (4096, 14336, 32, 32),
}


def bytes_per_token_layer(hidden: int, ffn: int, heads: int, itemsize: int = 2) -> int:
    return (2 * hidden + ffn + heads) * itemsize


def layer_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of a decoder layer's seven linear layers."""
    h, q, kv, ffn = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    return [(q, h), (kv, h), (kv, h), (h, q), (ffn, h), (ffn, h), (h, ffn)]


def flops_per_token(config: ModelConfig, context: float) -> float:
    """A real token's multiply-adds x 2 through every layer: the linear layers, and the
    attention over ``context`` keys (QK^T and the weighted sum of V)."""
    linear = sum(n * k for n, k in layer_shapes(config))
    return 2 * config.num_layers * (linear + 2 * context * config.q_size)


def gemm_flops_per_second(config: ModelConfig, rows: int, repeats: int = 5) -> float:
    """One thread's best GEMM rate on a layer's shapes at ``rows`` rows (row-major weights as
    F.linear takes them, or packed; the faster), all seven in sequence as a layer runs them."""
    torch.set_num_threads(1)
    linears = [torch.nn.Linear(k, n, bias=False) for n, k in layer_shapes(config)]
    inputs = [torch.randn(rows, linear.in_features) for linear in linears]
    products = {"row-major": linears, "packed": [PackedLinear(linear) for linear in linears]}
    flops = 2 * rows * sum(n * k for n, k in layer_shapes(config))
    best = 0.0
    for layer in products.values():
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                for linear, x in zip(layer, inputs):
                    linear(x)
            best = max(best, flops / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=48)
    parser.add_argument("--doc-tokens", type=int, default=256, help="words kept per document (approx.)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per mode; the best is kept")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp())
    model_dir = smollm_model_dir(work)
    config = ModelConfig.from_model_dir(model_dir)
    docs = [" ".join(d.split()[: args.doc_tokens]) for d in load_documents("gensim-lee")[: args.docs]]

    print(f"SmolLM2-135M fp32, pp=2 gloo, 1 thread/rank, {len(docs)} Lee documents")
    header = ("llama tok/s", "save tok/s", "slowdown", "write MB/s", "mb size")
    print(f"{'workload':28s} " + " ".join(f"{h:>11s}" for h in header))
    per_token = bytes_per_token_layer(config.hidden_size, config.intermediate_size, config.num_heads)
    tokenizer = load_tokenizer(model_dir)
    lengths = [len(tokenizer(d)["input_ids"]) for d in docs]
    # The machine's best rate over the row counts a prefill micro-batch has; 2 ranks, 1 core each.
    gemm = 2 * max(gemm_flops_per_second(config, rows) for rows in (256, 512, 1024, 2048))
    shares, sizes = {}, {}
    for label, max_tokens in (("prompt-only", 0), (f"generate {args.new_tokens}", args.new_tokens)):
        prompts = write_prompt_file(work / f"docs_{max_tokens}.jsonl", docs, max_tokens)
        best = {"llama": 0.0, "llama-save": 0.0}
        rows = 0
        for _ in range(args.repeats):
            for model_type in best:
                collect = work / "collect"
                shutil.rmtree(collect, ignore_errors=True)
                extra = ["--model-type", model_type, "--collect-capacity", "200000"]
                if model_type == "llama-save":
                    extra += ["--collect-dir", str(collect)]
                stats = run_engine(model_dir, prompts, 2, 1, extra)
                tokens = stats["prompt_tokens"] + stats["generated_tokens"]
                sizes[label] = stats["micro_batch_size"]
                best[model_type] = max(best[model_type], tokens / stats["total_seconds"])
                if model_type == "llama-save":
                    rows = min(recorded_rows(collect).values())
        save_seconds = rows / best["llama-save"]
        bandwidth = rows * per_token * config.num_layers / save_seconds / 1e6
        slowdown = best["llama"] / best["llama-save"] - 1
        print(
            f"{label:28s} {best['llama']:11.1f} {best['llama-save']:11.1f} {slowdown:11.1%} {bandwidth:11.1f}"
            f" {sizes[label]:11d}"
        )
        if max_tokens == 0:
            context = sum(n * n / 2 for n in lengths) / sum(lengths)  # mean keys a causal token sees
            shares = {m: tok * flops_per_token(config, context) / gemm for m, tok in best.items()}
    print(
        f"\nprompt-only share of the GEMM throughput (2 x one thread's best {gemm / 2e9:.1f} GFLOP/s, 256-2048"
        f" rows): llama {shares['llama']:.1%}, llama-save {shares['llama-save']:.1%}"
    )
    print(f"\nbytes per token per layer (float16): {per_token} for SmolLM2 ({array_widths(config)})")
    for name, (hidden, ffn, heads, layers) in PUBLISHED.items():
        per_layer = bytes_per_token_layer(hidden, ffn, heads)
        total = per_layer * layers * 400_000
        print(f"{name}: {per_layer} B/token/layer, 400000 rows x {layers} layers = {total / 1e9:.0f} GB")


if __name__ == "__main__":
    main()
