#!/usr/bin/env bash
# Llama-3.2-1B on ${NGPU:-all visible} GPUs with NCCL: convert SRC once, then run launch/infer.py.
#   SRC=/path/to/Llama-3.2-1B PROMPTS=prompts.jsonl NGPU=2 bash launch/run_llama32_1b.sh [extra infer.py args]
# See launch/run_llama.sh for every variable (MODEL_TYPE=llama-save collects activations).
set -euo pipefail
NAME=${NAME:-Llama-3.2-1B} LLAMA_VERSION=${LLAMA_VERSION:-3.2} exec bash "$(dirname "$0")/run_llama.sh" "$@"
