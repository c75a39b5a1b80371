"""The single-GPU smoke path: CUDA tokens equal HF generate on the GPU. Skips without CUDA."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from pipeline_helpers import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_smoke_script_matches_hf_generate(smollm_shard_dir, smollm_hf_model, tmp_path):
    from transformers import AutoTokenizer

    env = {**os.environ, "OUT": str(tmp_path), "MODEL_DIR": str(smollm_shard_dir), "PY": "python"}
    subprocess.run(["bash", str(ROOT / "launch" / "smoke_single_gpu.sh")], check=True, env=env, cwd=ROOT)
    tokenizer = AutoTokenizer.from_pretrained(smollm_shard_dir)
    model = smollm_hf_model.to("cuda")
    rows = [json.loads(line) for line in (tmp_path / "results_float32.jsonl").read_text().splitlines()]
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt").to("cuda")
        out = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert row["token_ids"] == out[0, ids["input_ids"].shape[1] :].tolist()
    assert all(json.loads(line)["token_ids"] for line in (tmp_path / "results_float16.jsonl").read_text().splitlines())
