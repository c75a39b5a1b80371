#!/usr/bin/env bash
# Meta-Llama-3-8B on ${NGPU:-all visible} GPUs with NCCL: convert SRC once, then run launch/infer.py.
#   SRC=/path/to/Meta-Llama-3-8B PROMPTS=prompts.jsonl NGPU=2 bash launch/run_llama3_8b.sh [extra infer.py args]
# See launch/run_llama.sh for every variable (MODEL_TYPE=llama-save collects activations).
set -euo pipefail
NAME=${NAME:-Meta-Llama-3-8B} LLAMA_VERSION=${LLAMA_VERSION:-} exec bash "$(dirname "$0")/run_llama.sh" "$@"
