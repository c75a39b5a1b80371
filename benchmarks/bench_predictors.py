"""Sparse predictors on real SmolLM2 activations: recall per layer at 50% and 80% true
sparsity, attention-head recall, embedding drift, and training throughput.

    python -m benchmarks.bench_predictors [--layers 0,5,10,15,20,25,29] [--epochs 5]

Prepares the Lee news corpus (gensim's test data, from PyPI), collects it prompt-only
with llama-save on a 2-stage gloo pipeline, then trains DejaVu's low-rank predictors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, run_engine, smollm_model_dir
from engine.collect_manifest import recorded_rows


def python(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", default="0,5,10,15,20,25,29")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--doc-tokens", type=int, default=256)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp())
    model_dir = smollm_model_dir(work)
    corpus, collect = work / "lee", work / "collect_lee"
    if not (corpus / "corpus.json").exists():
        python(
            "-m",
            "engine.corpus",
            "--source",
            "gensim-lee",
            "--out-dir",
            str(corpus),
            "--model-name",
            str(model_dir),
            "--max-tokens-per-doc",
            str(args.doc_tokens),
        )
    if not any(recorded_rows(collect).values()):
        run_engine(
            model_dir,
            corpus / "train.jsonl",
            2,
            1,
            [
                "--model-type",
                "llama-save",
                "--collect-dir",
                str(collect),
                "--max-new-tokens",
                "0",
                "--collect-capacity",
                "100000",
                "--micro-batch-size",
                "8",
            ],
        )
    rows = min(recorded_rows(collect).values())

    results = {}
    for kind, flag, value in (
        ("mlp", "--target-sparsity", "0.5"),
        ("mlp", "--target-sparsity", "0.8"),
        ("att", "--att-keep", "0.5"),
    ):
        out = work / f"pred_{kind}_{value}"
        python(
            "-m",
            "sparse_predictor.train",
            "--data-dir",
            str(collect),
            "--model-name",
            str(model_dir),
            "--out",
            str(out),
            "--layers",
            args.layers,
            "--kind",
            kind,
            flag,
            value,
            "--epochs",
            str(args.epochs),
        )
        metrics = json.loads((out / "metrics.json").read_text())
        results[kind, value] = metrics["layers"] if kind == "mlp" else metrics["att"]["layers"]
        drift = metrics["drift"]["layers"]

    print(f"SmolLM2-135M, {rows} Lee tokens (prompt-only), D=1000, {args.epochs} epochs, 90/10 split by blocks")
    print(
        "| layer | MLP recall @50% | recall@true 50% | MLP recall @80% | recall@true 80% | att recall (keep 50%) "
        "| cos(l, l+1) | cos(l, 0) | MLP rows/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mean = {key: [] for key in results}
    for layer in args.layers.split(","):
        r50, r80, att = results["mlp", "0.5"][layer], results["mlp", "0.8"][layer], results["att", "0.5"][layer]
        for key in results:
            mean[key].append(results[key][layer]["recall"])
        cos_next = drift[layer]["cos_next"]
        print(
            f"| {layer} | {r50['recall']:.3f} | {r50['recall_at_true_sparsity']:.3f} | {r80['recall']:.3f} "
            f"| {r80['recall_at_true_sparsity']:.3f} | {att['recall']:.3f} "
            f"| {'-' if cos_next is None else f'{cos_next:.3f}'} | {drift[layer]['cos_first']:.3f} "
            f"| {r50['rows_per_second']:.0f} |"
        )
    print(" ".join(f"mean {k[0]} {k[1]}: {sum(v) / len(v):.3f}" for k, v in mean.items()))


if __name__ == "__main__":
    main()
