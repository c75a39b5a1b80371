"""The single-GPU smoke path: CUDA tokens equal HF generate on the GPU. Skips without CUDA."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from pipeline_helpers import ROOT, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 32  # what launch/smoke_single_gpu.sh asks for
#: float16 tokens compared with HF float16: a prefix only. The engine and HF run the same
#: maths in another op order (fused QKV or not, their own SDPA calls), so float16 sums round
#: differently; after enough tokens one near-tie between two logits can flip and the rest of
#: the sequence follows another branch. The first tokens have no such excuse.
FP16_PREFIX = 8


def test_smoke_script_matches_hf_generate(smollm_shard_dir, smollm_hf_model, tmp_path):
    from transformers import AutoTokenizer

    env = {**os.environ, "OUT": str(tmp_path), "MODEL_DIR": str(smollm_shard_dir), "PY": sys.executable}
    subprocess.run(["bash", str(ROOT / "launch" / "smoke_single_gpu.sh")], check=True, env=env, cwd=ROOT)
    tokenizer = AutoTokenizer.from_pretrained(smollm_shard_dir)
    for dtype, compared in ((torch.float32, NEW_TOKENS), (torch.float16, FP16_PREFIX)):
        name = str(dtype).removeprefix("torch.")
        rows = [json.loads(line) for line in (tmp_path / f"results_{name}.jsonl").read_text().splitlines()]
        stats = json.loads((tmp_path / f"stats_{name}.json").read_text())
        assert len(rows) == 3 and stats["generated_tokens"] == sum(len(r["token_ids"]) for r in rows)
        # A copy: the session's reference model stays float32 on the CPU for the other tests.
        model = copy.deepcopy(smollm_hf_model).to("cuda", dtype)
        for row in rows:
            expected = hf_greedy(model, tokenizer, row["prompt"], NEW_TOKENS)
            assert row["token_ids"][:compared] == expected[:compared], (name, row["prompt"])
        del model
        torch.cuda.empty_cache()
