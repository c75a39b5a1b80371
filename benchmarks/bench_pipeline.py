"""Pipeline throughput against HF ``generate`` on the same model and cores, in one run.

    python -m benchmarks.bench_pipeline [--prompts 16] [--new-tokens 48]

Converts the bundled SmolLM2 (fp32) once, then measures: HF generate (batch = all prompts,
2 threads), the engine at pp=1 (2 threads) and pp=2 (1 thread per rank), and single-stream
(batch 1) latency per token for HF and the engine. Prints tokens/s and ratios to HF."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import GGUF, gguf_path, run_engine, smollm_model_dir, write_prompt_file

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


def hf_run(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    """Tokens/s of HF generate on one left-padded batch."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - start
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--work-dir", default=None, help="keep the converted model here")
    args = parser.parse_args()
    prompts = (PROMPTS * 8)[: args.prompts]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.work_dir or tempfile.mkdtemp())
    model_dir = smollm_model_dir(work)
    many = write_prompt_file(work / "prompts.jsonl", prompts)
    one = write_prompt_file(work / "prompt1.jsonl", prompts[:1])
    common = ["--max-new-tokens", str(args.new_tokens), "--ignore-eos"]
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(gguf_path().parent, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    hf_run(model, tokenizer, prompts[:2], 4)  # warm-up

    rows = []
    hf_tps = hf_run(model, tokenizer, prompts, args.new_tokens)
    rows.append((f"HF generate, batch {len(prompts)}, 2 threads", hf_tps, None))
    for nproc, threads, split in ((1, 2, []), (2, 1, []), (2, 1, ["--balance-head"])):
        batch = ["--micro-batch-size", str(-(-len(prompts) // nproc))]
        stats = run_engine(model_dir, many, nproc, threads, [*common, *batch, *split])
        name = f"engine pp={nproc}, {threads} thread(s)/rank{', ' + split[0] if split else ''}"
        rows.append((name, stats["tokens_per_second"], stats))
    hf_single = hf_run(model, tokenizer, prompts[:1], args.new_tokens)
    single = run_engine(model_dir, one, 1, 2, common)
    rows.append(("HF generate, batch 1 (single stream)", hf_single, None))
    rows.append(("engine pp=1, batch 1 (single stream)", single["tokens_per_second"], single))

    print(f"\nSmolLM2-135M fp32, {len(prompts)} prompts x {args.new_tokens} new tokens, torch {torch.__version__}")
    print(f"{'run':45s} {'tok/s':>8s} {'vs HF':>7s} {'ms/token':>9s}")
    for name, tps, _ in rows:
        base = hf_single if "single" in name else hf_tps
        print(f"{name:45s} {tps:8.1f} {tps / base:6.2f}x {1000 / tps * (1 if 'single' in name else len(prompts)):9.1f}")
    for name, _, stats in rows:
        if stats and stats["pp_degree"] > 1:
            for r in stats["ranks"]:
                print(
                    f"  {name}: rank {r['rank']} layers {r['layers']} idle {r['idle_fraction']:.1%} "
                    f"peak RSS {r['peak_memory_bytes'] / 2**20:.0f} MiB params {r['parameter_bytes'] / 2**20:.0f} MiB"
                )
    pp1 = rows[1][2]["ranks"][0]
    mib = 2**20
    print(
        f"  engine pp=1: peak RSS {pp1['peak_memory_bytes'] / mib:.0f} MiB",
        f"params {pp1['parameter_bytes'] / mib:.0f} MiB",
    )


if __name__ == "__main__":
    main()
