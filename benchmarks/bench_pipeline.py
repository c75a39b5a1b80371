"""Pipeline throughput against HF ``generate`` on the same model and cores, in one run.

    python -m benchmarks.bench_pipeline [--prompts 16] [--new-tokens 48]

Converts the bundled SmolLM2 (fp32) once, then measures, batched (all prompts) and
single-stream (batch 1): HF generate (dynamic cache) and its stronger configurations (see
``hf_peers``), and the engine at pp=1 (2 threads; with row-major and packed weights) and
pp=2 (1 thread per rank), eager and with ``--compile``. Prints a table for BENCHMARKS.md:
tokens/s, ratios to HF generate and to the strongest HF peer, the bubble per rank and the
compile time (a compiled engine run's tokens/s is given with and without it: the engine
compiles inside its timed loop, at the first decode step of each micro-batch shape)."""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.host import HUGE_PAGES

os.environ.setdefault(*HUGE_PAGES)  # HF gets the engine's huge pages, before torch allocates

import torch

from benchmarks.common import GGUF, gguf_path, run_engine, smollm_model_dir, write_prompt_file
from modules.packed_linear import pack_linears

#: Inductor's freezing: weights become constants of the graph, packed for the CPU's GEMM.
FREEZE = {"freezing": True}

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter who",
    "def fibonacci(n):",
    "The three laws of thermodynamics state that",
    "Hello",
    "In 1969, the Apollo 11 mission",
    "A good recipe for pancakes needs flour, eggs, milk and",
    "The main difference between a virus and a bacterium is that",
    "Photosynthesis converts sunlight into",
    "To install the package, run",
    "The stock market fell sharply today after the central bank announced that interest rates would",
    "My favourite book is",
    "Machine learning models are trained by",
    "The Great Wall of China was built",
    "Dear hiring manager, I am writing to apply for the position of",
    "Water boils at",
]


@dataclass
class Row:
    name: str
    tokens_per_second: float
    batched: bool
    stats: dict | None = None

    @property
    def compile_seconds(self) -> float:
        return max((r.get("compile_seconds", 0.0) for r in self.stats["ranks"]), default=0.0) if self.stats else 0.0

    @property
    def steady_tokens_per_second(self) -> float:
        """Without the compile time (exact at pp=1; at pp=2 the ranks compile partly at once)."""
        if not self.compile_seconds:
            return self.tokens_per_second
        return self.stats["generated_tokens"] / (self.stats["total_seconds"] - self.compile_seconds)


def hf_run(model, tokenizer, prompts: list[str], new_tokens: int, compiled: dict | None = None) -> float:
    """Tokens/s of HF generate on one left-padded batch; ``compiled``: with a static cache
    and its forward compiled with these ``torch.compile`` options (transformers compiles
    on CPU too once told to)."""
    from transformers import CompileConfig

    extra = {}
    if compiled is not None:
        compile_config = CompileConfig(dynamic=False, mode=None, options=compiled)
        compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked
        extra = {"cache_implementation": "static", "compile_config": compile_config}
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
    seconds = time.perf_counter() - start
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / seconds


def hf_peers(model, tokenizer, texts: list[str], new_tokens: int, label: str, batched: bool) -> list[Row]:
    """HF generate as it comes; with the engine's packed weights put into its linear layers;
    and with a static cache compiled by inductor, without and with freezing (which packs the
    weights inside the graph). Compiled peers are timed on a second, warm call."""
    rows = [Row(f"HF generate, {label}", hf_run(model, tokenizer, texts, new_tokens), batched)]
    packed = copy.deepcopy(model)
    pack_linears(packed)
    rows.append(Row(f"HF generate, packed weights, {label}", hf_run(packed, tokenizer, texts, new_tokens), batched))
    del packed
    for name, options in (("static cache + torch.compile", {}), ("static cache + torch.compile, freezing", FREEZE)):
        hf_run(model, tokenizer, texts, new_tokens, compiled=options)  # compiles for this shape
        rows.append(Row(f"HF generate, {name}, {label}", hf_run(model, tokenizer, texts, new_tokens, options), batched))
    return rows


def engine_row(model_dir: Path, prompts: Path, nproc: int, threads: int, flags: list[str], batched: bool) -> Row:
    stats = run_engine(model_dir, prompts, nproc, threads, flags)
    extras = [f for f in flags if f in ("--balance-head", "--compile", "--no-packed-weights")]
    name = f"engine pp={nproc}, {threads} thread(s)/rank{''.join(', ' + f for f in extras)}"
    return Row(name + ("" if batched else ", batch 1"), stats["tokens_per_second"], batched, stats)


def print_table(rows: list[Row], prompts: int, new_tokens: int) -> None:
    print(f"\nSmolLM2-135M fp32, {prompts} prompts x {new_tokens} new tokens, torch {torch.__version__}")
    print("| run | tok/s | vs HF | vs strongest HF | ms/token | compile s | tok/s without compile |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        peers = [r.tokens_per_second for r in rows if r.batched == row.batched and r.stats is None]
        hf, strongest = peers[0], max(peers)
        per_token = 1000 / row.tokens_per_second * (prompts if row.batched else 1)
        compiled = row.compile_seconds
        compile_cells = f"{compiled:.1f} | {row.steady_tokens_per_second:.1f}" if compiled else "- | -"
        print(
            f"| {row.name} | {row.tokens_per_second:.1f} | {row.tokens_per_second / hf:.2f}x |"
            f" {row.tokens_per_second / strongest:.2f}x | {per_token:.1f} | {compile_cells} |"
        )
    print("\n| run | rank | layers | idle (bubble) | peak RSS MiB | parameters MiB | padding (decode cache) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    mib = 2**20
    for row in rows:
        for r in row.stats["ranks"] if row.stats else []:
            print(
                f"| {row.name} | {r['rank']} | {r['layers'][0]}-{r['layers'][1] - 1} | {r['idle_fraction']:.1%} |"
                f" {r['peak_memory_bytes'] / mib:.0f} | {r['parameter_bytes'] / mib:.0f} |"
                f" {row.stats['padding_fraction']:.1%} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--work-dir", default=None, help="keep the converted model here")
    parser.add_argument("--model-dir", default=None, help="an already converted SmolLM2 shard directory")
    args = parser.parse_args()
    prompts = (PROMPTS * 8)[: args.prompts]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.work_dir or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else smollm_model_dir(work)
    many = write_prompt_file(work / "prompts.jsonl", prompts)
    one = write_prompt_file(work / "prompt1.jsonl", prompts[:1])
    common = ["--max-new-tokens", str(args.new_tokens), "--ignore-eos"]
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(gguf_path().parent, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    hf_run(model, tokenizer, prompts[:2], 4)  # warm-up

    rows = []
    for batched, texts, file in ((True, prompts, many), (False, prompts[:1], one)):
        label = f"batch {len(texts)}" + ("" if batched else " (single stream)") + ", 2 threads"
        rows += hf_peers(model, tokenizer, texts, args.new_tokens, label, batched)
        runs = [(1, 2, ["--no-packed-weights"]), (1, 2, []), (1, 2, ["--compile"])]
        if batched:
            runs += [(2, 1, []), (2, 1, ["--balance-head"]), (2, 1, ["--balance-head", "--compile"])]
        for nproc, threads, flags in runs:
            batch = ["--micro-batch-size", str(-(-len(texts) // nproc))]
            rows.append(engine_row(model_dir, file, nproc, threads, [*common, *batch, *flags], batched))
    print_table(rows, len(prompts), args.new_tokens)


if __name__ == "__main__":
    main()
