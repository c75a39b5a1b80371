"""Running launch/infer.py (in-process for one stage, torchrun for several) and HF references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
INFER = ROOT / "launch" / "infer.py"
MULTINODE = ROOT / "launch" / "run_multinode.sh"
NAMES = ("att_x", "att_label", "mlp_x", "mlp_label")


def write_prompts(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run launch/infer.py under torchrun (gloo, one thread per rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(INFER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def start_node(node_rank: int, nnodes: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One "node" of a multi-node run: launch/run_multinode.sh (a torchrun agent with one
    rank, gloo) meeting the others at the c10d rendezvous on 127.0.0.1:``port``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NNODES": str(nnodes),
        "NODE_RANK": str(node_rank),
        "RDZV_ENDPOINT": f"127.0.0.1:{port}",
        "NPROC_PER_NODE": "1",
        "PY": sys.executable,
    }
    cmd = ["bash", str(MULTINODE), *args, "--threads", "1", "--dist-backend", "gloo"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def infer_args(model_dir: Path, prompts: Path, out: Path, extra: list[str] = ()) -> list[str]:
    """launch/infer.py's arguments for one run, without a progress bar."""
    return [
        "--model-name",
        str(model_dir),
        "--infer-data",
        str(prompts),
        "--output-path",
        str(out),
        "--no-progress",
        *extra,
    ]


def run_infer(model_dir: Path, prompts: Path, out: Path, nproc: int = 1, extra: list[str] = ()) -> list[dict]:
    args = infer_args(model_dir, prompts, out, ["--pp-degree", str(nproc), *extra])
    if nproc == 1:
        from launch.infer import main

        assert main(args) == 0
    else:
        result = torchrun(nproc, args)
        assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


#: hf_greedy's default EOS: the model config's.
MODEL_EOS = object()


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int, eos_token_id=MODEL_EOS) -> list[int]:
    """HF ``generate(do_sample=False)`` on one unpadded prompt: the reference tokens. It stops
    at the model's EOS, at ``eos_token_id`` (an id or a list) if given, and with None at none."""
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    eos = model.config.eos_token_id if eos_token_id is MODEL_EOS else eos_token_id
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def read_dataset(collect_dir: Path) -> tuple[dict, dict]:
    """A collect dir's manifest (joined, or merged from its parts), and the rows it claims
    of every array as float32."""
    from engine.collect_manifest import read_manifest

    manifest = read_manifest(collect_dir)
    widths = {
        "att_x": manifest["hidden_size"],
        "mlp_x": manifest["hidden_size"],
        "att_label": manifest["num_heads"],
        "mlp_label": manifest["intermediate_size"],
    }
    data = {}
    for layer in manifest["layers"]:
        rows = manifest["rows"][str(layer)]
        for name in NAMES:
            if rows == 0:  # the rank may have died before it created its files
                data[name, layer] = np.zeros((0, widths[name]), dtype=np.float32)
                continue
            mm = np.memmap(collect_dir / f"{name}_{layer}.mmap", dtype=manifest["dtype"], mode="r")
            data[name, layer] = np.array(mm.reshape(manifest["capacity"], widths[name])[:rows], dtype=np.float32)
    return manifest, data
