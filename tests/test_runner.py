"""The runner without a command line: one stage in this process, tokens equal to HF
generate, its progress bar; the pieces it is made of (typed block options, the head's
cost, core binding); and the blocks' import hygiene (no training code)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
from pipeline_helpers import ROOT, hf_greedy, write_prompts

from engine.config import ModelConfig
from engine.host import bind_cores
from modules.registry import BlockSpec, NPTOptions, build_block
from pipeline.plan import lm_head_cost
from pipeline.runner import run
from pipeline.settings import RunSettings

PROMPTS = ["The quick brown fox", "Pipeline parallel inference splits", "Hello"]
NEW_TOKENS = 6


def test_runner_called_directly_gives_hf_tokens(tiny_shard_dir, tiny_model, tmp_path):
    model, tokenizer = tiny_model
    reference = [hf_greedy(model, tokenizer, p, NEW_TOKENS) for p in PROMPTS]
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    settings = RunSettings(
        model_dir=tiny_shard_dir, infer_data=prompts, max_new_tokens=NEW_TOKENS, micro_batch_size=2, progress=False
    )

    result = run(settings)

    assert [r["token_ids"] for r in result.rows] == reference
    assert [r["id"] for r in result.rows] == ["p0", "p1", "p2"]
    assert result.stats["generated_tokens"] == sum(map(len, reference))
    assert [r["layers"] for r in result.stats["ranks"]] == [[0, 4]]  # one stage holds all 4 layers
    assert result.loop_seconds > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]  # the runner writes no files


def test_lm_head_cost_is_the_head_in_layers(tiny_shard_dir):
    # Hand count for the tiny model: head 512 x 64; a layer q, o 64 x 64, k, v 64 x 16,
    # gate, up, down 64 x 192, two norms of 64.
    layer = 2 * 64 * 64 + 2 * 64 * 16 + 3 * 64 * 192 + 2 * 64
    assert lm_head_cost(ModelConfig.from_model_dir(tiny_shard_dir)) == pytest.approx(512 * 64 / layer)


def test_bind_cores_leaves_ranks_that_do_not_fit_unbound():
    """Two ranks that each want every core cannot have cores of their own: nothing changes."""
    before = os.sched_getaffinity(0)
    assert bind_cores(0, 2, len(before)) == []
    assert os.sched_getaffinity(0) == before


FLOAT_A_THREAD = """
import os, threading
from engine.host import bind_cores, float_this_thread
before = sorted(os.sched_getaffinity(0))
seen = {}
def helper():
    float_this_thread()
    seen["helper"] = sorted(os.sched_getaffinity(0))
assert bind_cores(1, 2, 1) == before[1:2]
thread = threading.Thread(target=helper)
thread.start()
thread.join()
assert seen["helper"] == before, seen
assert sorted(os.sched_getaffinity(0)) == before[1:2]
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to bind one")
def test_bound_rank_threads_float_only_when_asked():
    """Rank 1 of two binds to the second core; a helper thread (the collector's writer)
    floats back over every core, and the rank's own thread stays bound."""
    subprocess.run([sys.executable, "-c", FLOAT_A_THREAD], cwd=ROOT, check=True)


def test_block_options_are_typed(tiny_shard_dir):
    spec = BlockSpec(tiny_shard_dir, ModelConfig.from_model_dir(tiny_shard_dir), 0, None)
    with pytest.raises(TypeError, match="llama-save blocks take SaveOptions, got NoneType"):
        build_block("llama-save", spec)
    with pytest.raises(TypeError, match="llama blocks take no options, got NPTOptions"):
        build_block("llama", spec, NPTOptions(None))
    with pytest.raises(ValueError, match="unknown model type 'opt'"):
        build_block("opt", spec)


TRAINING_PACKAGES = ("npt", "sparse_predictor")


def test_blocks_import_no_training_code():
    """Importing the registry loads no training package, and no block module imports one,
    not even lazily inside a function (what the import alone would not show)."""
    code = "import json, sys, modules.registry; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    loaded = json.loads(out)
    assert [m for m in loaded if m.split(".")[0] in TRAINING_PACKAGES] == []
    assert "modules.npt_checkpoint" in loaded  # the NPT block's loader is with the blocks
    for path in sorted((ROOT / "modules").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in TRAINING_PACKAGES], f"{path.name} imports {names}"


class RecordingBar:
    """Stands in for tqdm: what a progress bar was asked to show."""

    bars: list[RecordingBar] = []

    def __init__(self, total, desc, **_):
        self.total, self.desc, self.done = total, desc, 0
        RecordingBar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def update(self, n):
        self.done += n


@pytest.mark.parametrize("max_new", [0, NEW_TOKENS], ids=["prompt-only", "generating"])
def test_progress_counts_prompt_tokens_when_nothing_is_generated(
    tiny_shard_dir, tiny_model, tmp_path, monkeypatch, max_new
):
    """A collection run (no new tokens) shows its progress in prompt tokens, not an empty
    bar of 0 new tokens; a generating run counts the new tokens."""
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    RecordingBar.bars.clear()
    _, tokenizer = tiny_model
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    settings = RunSettings(
        model_dir=tiny_shard_dir, infer_data=prompts, max_new_tokens=max_new, micro_batch_size=2, ignore_eos=True
    )
    run(settings)
    (bar,) = RecordingBar.bars
    expected = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS) if not max_new else max_new * len(PROMPTS)
    assert (bar.desc, bar.total, bar.done) == ("prefill" if not max_new else "generate", expected, expected)
