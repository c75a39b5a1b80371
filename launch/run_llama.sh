#!/usr/bin/env bash
# Convert a Llama checkpoint (once) and run pipelined inference or collection on N GPUs
# with NCCL, one pipeline stage per GPU. Called by the per-size scripts; usable alone.
#
#   SRC=/ckpt/Llama-3.2-1B NGPU=2 PROMPTS=prompts.jsonl bash launch/run_llama.sh [extra infer.py args]
#
# SRC        HF dir, Meta dir (params.json + consolidated.*.pth), .gguf file, or hub id (required)
# MODEL_DIR  converted shard dir (default runs/$NAME/model)
# NGPU       pipeline stages (default: the number of visible GPUs)
# PROMPTS    prompts.jsonl (required); OUT  results dir (default runs/$NAME)
# MODEL_TYPE llama | llama-save | llama-npt (default llama); llama-save writes to $OUT/collect
# DTYPE      float16 | bfloat16 | float32 (default bfloat16); LLAMA_VERSION 3.1 | 3.2 for Meta checkpoints
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SRC:?set SRC to the checkpoint to convert}" "${PROMPTS:?set PROMPTS to a prompts.jsonl file}"
NAME=${NAME:-$(basename "$SRC")}
OUT=${OUT:-runs/$NAME}
MODEL_DIR=${MODEL_DIR:-$OUT/model}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MODEL_TYPE=${MODEL_TYPE:-llama}
DTYPE=${DTYPE:-bfloat16}
PY=${PY:-python}
[ "$NGPU" -ge 1 ] || { echo "no GPU found: set NGPU, or use launch/demo_smollm2_cpu.sh for CPU" >&2; exit 1; }

if [ ! -f "$MODEL_DIR/manifest.json" ]; then
    "$PY" converters/convert_llama_checkpoint.py --model-name "$SRC" --save-path "$MODEL_DIR" \
        --dtype "$DTYPE" ${LLAMA_VERSION:+--llama-version "$LLAMA_VERSION"}
fi
collect=()
[ "$MODEL_TYPE" = llama-save ] && collect=(--collect-dir "$OUT/collect")
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" launch/infer.py \
    --model-type "$MODEL_TYPE" --model-name "$MODEL_DIR" --pp-degree "$NGPU" \
    --dist-backend torch_nccl --dtype "$DTYPE" --infer-data "$PROMPTS" \
    --output-path "$OUT/results.jsonl" --stats-path "$OUT/stats.json" "${collect[@]}" "$@"
