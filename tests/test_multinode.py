"""Several "nodes" on this machine: torchrun agents meeting at a c10d rendezvous on 127.0.0.1,
one rank each, as launch/run_multinode.sh starts them on real nodes. Each node collects its
rank's layers into a directory of its own; joined, they are the dataset one node writes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fault_scenarios import free_port
from pipeline_helpers import hf_greedy, infer_args, read_dataset, run_infer, start_node, write_prompts

from engine.collect_join import main as join_main
from engine.collect_manifest import read_manifest
from engine.dataset_format import CollectError
from sparse_predictor.data import Collection

pytestmark = pytest.mark.slow
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Pipeline parallel inference splits", "Hello"]
#: One thread per rank in both runs, so both sum in the same order: rows equal to the bit.
NEW_TOKENS = 6
COLLECT = ["--model-type", "llama-save", "--max-new-tokens", str(NEW_TOKENS), "--micro-batch-size", "1"]
COLLECT += ["--collect-capacity", "200", "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tiny_shard_dir, tmp_path_factory):
    """The same collection on one node (one shared directory) and on two (one directory each)."""
    work = tmp_path_factory.mktemp("nodes")
    prompts = write_prompts(work / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    single = work / "single"
    run_infer(tiny_shard_dir, prompts, work / "single.jsonl", 2, [*COLLECT, "--collect-dir", str(single)])
    port, dirs = free_port(), [work / "node0", work / "node1"]
    out = work / "nodes.jsonl"
    procs = [
        start_node(i, 2, port, infer_args(tiny_shard_dir, prompts, out, [*COLLECT, "--collect-dir", str(d)]), log)
        for i, (d, log) in enumerate((d, work / f"node{i}.err") for i, d in enumerate(dirs))
    ]
    try:
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert codes == [0, 0], "".join((work / f"node{i}.err").read_text()[-2000:] for i in range(2))
    return single, dirs, work


def test_two_nodes_tokens_equal_hf_generate(runs, tiny_model):
    model, tokenizer = tiny_model
    _, _, work = runs
    rows = [json.loads(line) for line in (work / "nodes.jsonl").read_text().splitlines()]
    assert [r["token_ids"] for r in rows] == [hf_greedy(model, tokenizer, p, NEW_TOKENS) for p in PROMPTS]


def test_joined_node_directories_equal_a_single_node_collection(runs, tiny_shard_dir, tmp_path):
    from sparse_predictor.train import cli as train

    single, dirs, _ = runs
    for directory in dirs:  # one node's directory alone is not a dataset, and says why
        with pytest.raises(CollectError, match="recorded in another directory .* python -m engine.collect_join"):
            read_manifest(directory)
    joined = tmp_path / "joined"
    assert join_main([str(joined), *map(str, dirs)]) == 0
    want_manifest, want = read_dataset(single)
    got_manifest, got = read_dataset(joined)
    assert got_manifest["rows"] == want_manifest["rows"] and min(got_manifest["rows"].values()) > 0
    assert got.keys() == want.keys()
    for key, rows in want.items():
        np.testing.assert_array_equal(got[key], rows, err_msg=str(key))
    assert Collection.open(joined).layers == [0, 1, 2, 3]
    fast = ["--D", "8", "--epochs", "1", "--batch-size", "64", "--drift-rows", "50", "--layers", "0,3"]
    out = tmp_path / "predictors"
    assert train(["--data-dir", str(joined), "--model-name", str(tiny_shard_dir), "--out", str(out), *fast]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["layers"]) == {"0", "3"}


def edited_copy(directory, target, **changes):
    """A copy of a node's directory whose manifest part says something else."""
    shutil.copytree(directory, target)
    (part,) = target.glob("manifest-part-*.json")
    manifest = json.loads(part.read_text())
    for key, value in changes.items():
        manifest[key] = {**manifest[key], **value} if isinstance(value, dict) else value
    part.write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"model": {"config_sha256": "0" * 64}}, "a different model"),
        ({"capacity": 300}, "capacity is 300, not 200"),
        ({"dtype": "float32"}, "dtype is 'float32', not 'float16'"),
    ],
    ids=["model", "capacity", "dtype"],
)
def test_join_refuses_mismatched_directories(runs, tmp_path, capsys, changes, message):
    _, (node0, node1), _ = runs
    other = edited_copy(node1, tmp_path / "other", **changes)
    assert join_main([str(tmp_path / "joined"), str(node0), str(other)]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "joined" / "manifest.json").exists()


def test_join_refuses_a_layer_twice_or_missing(runs, tmp_path, capsys):
    _, (node0, _), _ = runs
    twin = shutil.copytree(node0, tmp_path / "twin")
    assert join_main([str(tmp_path / "a"), str(node0), str(twin)]) == 1
    assert "is in both" in capsys.readouterr().err
    assert join_main([str(tmp_path / "b"), str(node0)]) == 1
    assert "recorded in another directory" in capsys.readouterr().err
