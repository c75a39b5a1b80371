"""Save mode: collected rows equal HF LlamaForCausalLM's own activations, token for token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import fault_scenarios
import numpy as np
import pytest
import torch
from pipeline_helpers import INFER, NAMES, ROOT, hf_greedy, infer_args, read_dataset, run_infer, write_prompts

from engine.collect_manifest import read_manifest, recorded_rows

#: Float32 rows against HF float32: only summation order differs (float16 rounding is 4.9e-4).
FLOAT32_TOL = 1e-5
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pipeline parallel inference splits a model into stages",
    "Sparse predictors guess",
    "Hello",
]


def hf_activations(model, token_ids: list[int]) -> dict:
    """The four arrays of every layer, from forward pre-hooks on HF's own modules."""
    got, hooks = {}, []
    heads = model.config.num_attention_heads

    def capture(name, i, transform=lambda t: t):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            got[name, i] = transform(x[0])

        return hook

    for i, layer in enumerate(model.model.layers):
        targets = {
            "att_x": layer,
            "mlp_x": layer.post_attention_layernorm,
            "mlp_label": layer.mlp.down_proj,
        }
        for name, module in targets.items():
            hooks.append(module.register_forward_pre_hook(capture(name, i), with_kwargs=True))
        per_head_norm = capture("att_label", i, lambda t: t.unflatten(-1, (heads, -1)).norm(dim=-1))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(per_head_norm, with_kwargs=True))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for h in hooks:
        h.remove()
    return {k: v.float().numpy() for k, v in got.items()}


def expected_rows(model, results, tokenizer, layers):
    """Every prompt token and every generated token fed back (not the last one)."""
    per_token = {(name, layer): [] for name in NAMES for layer in layers}
    for row in results:
        fed = tokenizer(row["prompt"])["input_ids"] + row["token_ids"][:-1]
        acts = hf_activations(model, fed)
        for key in per_token:
            per_token[key].append(acts[key])
    return {key: np.concatenate(v) for key, v in per_token.items()}


def assert_rows_match(data, expected, layers, tol=2e-3, some=False):
    """Rows may come in any order, but row k must be the same token in every file and layer:
    each row is matched to its token on one array, then every array of every layer must
    equal HF's for that token. The rows are every expected token once, or with ``some``,
    some of them (none twice). The default ``tol`` allows float16 storage (a relative step
    of 2**-11 = 4.9e-4)."""
    probe = ("mlp_x", layers[-1])
    dist = torch.cdist(torch.from_numpy(data[probe]), torch.from_numpy(expected[probe]))
    order = dist.argmin(dim=1).numpy()
    if some:
        assert len(set(order.tolist())) == len(order), "a token was collected twice"
    else:
        assert sorted(order.tolist()) == list(range(len(expected[probe]))), "collected rows are not a permutation"
    for key, want in expected.items():
        want = want[order]
        scale = np.abs(want).max()
        np.testing.assert_allclose(data[key], want, rtol=tol, atol=tol * scale, err_msg=str(key))


def save_args(collect_dir) -> list[str]:
    """The collection settings every test here starts from."""
    return [
        "--model-type",
        "llama-save",
        "--collect-dir",
        str(collect_dir),
        "--collect-capacity",
        "500",
        "--max-new-tokens",
        "5",
        "--micro-batch-size",
        "3",
    ]


def collect(model_dir, tmp_path, nproc, extra=(), prompts=None, name="collect"):
    items = prompts or [{"prompt": p} for p in PROMPTS]
    prompts_path = write_prompts(tmp_path / f"{name}.jsonl", items)
    out = tmp_path / f"{name}_out.jsonl"
    results = run_infer(model_dir, prompts_path, out, nproc, [*save_args(tmp_path / name), *extra])
    return results, tmp_path / name


@pytest.mark.parametrize(
    "nproc,extra", [(1, []), (2, []), (2, ["--prefill-chunk-tokens", "1"])], ids=["1", "2", "2-chunked"]
)
def test_rows_equal_hf_activations(tiny_shard_dir, tiny_model, tmp_path, nproc, extra):
    """Prefill chunks of one prompt each record the same rows, in the same order."""
    model, tokenizer = tiny_model
    results, collect_dir = collect(tiny_shard_dir, tmp_path, nproc, extra)
    manifest, data = read_dataset(collect_dir)
    layers = list(range(model.config.num_hidden_layers))
    assert manifest["layers"] == layers and manifest["dtype"] == "float16"
    real_tokens = sum(len(tokenizer(r["prompt"])["input_ids"]) + len(r["token_ids"]) - 1 for r in results)
    assert set(manifest["rows"].values()) == {real_tokens}
    assert_rows_match(data, expected_rows(model, results, tokenizer, layers), layers)


def test_float32_collection_equals_hf_activations(tiny_shard_dir, tiny_model, tmp_path):
    """--collect-dtype float32 stores float32 rows: HF's float32 activations to float32
    accuracy, far closer than float16 storage could come."""
    model, tokenizer = tiny_model
    results, collect_dir = collect(tiny_shard_dir, tmp_path, 1, ["--collect-dtype", "float32"])
    manifest, data = read_dataset(collect_dir)
    layers = list(range(model.config.num_hidden_layers))
    assert manifest["dtype"] == "float32"
    capacity, hidden = 500, model.config.hidden_size
    assert (collect_dir / "mlp_x_0.mmap").stat().st_size == capacity * hidden * 4
    assert_rows_match(data, expected_rows(model, results, tokenizer, layers), layers, tol=FLOAT32_TOL)


def test_smollm_rows_equal_hf_activations(smollm_shard_dir, smollm_hf_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_shard_dir)
    results, collect_dir = collect(smollm_shard_dir, tmp_path, 2, ["--stage-model-types", "llama,llama-save"])
    manifest, data = read_dataset(collect_dir)
    assert manifest["layers"] == list(range(15, 30))
    assert_rows_match(data, expected_rows(smollm_hf_model, results, tokenizer, manifest["layers"]), manifest["layers"])


def test_mixed_stage_types_record_only_save_stages(tiny_shard_dir, tmp_path):
    _, collect_dir = collect(tiny_shard_dir, tmp_path, 2, ["--stage-model-types", "llama-save,llama"])
    manifest = read_manifest(collect_dir)
    assert manifest["layers"] == [0, 1] and sorted(manifest["rows"]) == ["0", "1"]
    assert sorted(p.name for p in collect_dir.glob("*.mmap")) == sorted(
        f"{n}_{layer}.mmap" for n in NAMES for layer in (0, 1)
    )


@pytest.mark.parametrize("nproc", [1, 2])
def test_prompt_only_mode(tiny_shard_dir, tiny_model, tmp_path, nproc):
    """No new tokens: the stages keep no KV cache and the last predicts no token, and the
    rows are still every prompt token's HF activations."""
    model, tokenizer = tiny_model
    results, collect_dir = collect(tiny_shard_dir, tmp_path, nproc, ["--max-new-tokens", "0"])
    manifest, data = read_dataset(collect_dir)
    assert all(r["token_ids"] == [] for r in results)
    assert manifest["rows"]["0"] == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    layers = list(range(model.config.num_hidden_layers))
    assert_rows_match(data, expected_rows(model, results, tokenizer, layers), layers)


def test_capacity_limit_stops_recording_not_generation(tiny_shard_dir, tmp_path):
    full_results, _ = collect(tiny_shard_dir, tmp_path, 1, name="free")
    results, collect_dir = collect(tiny_shard_dir, tmp_path, 1, ["--collect-capacity", "7"], name="capped")
    manifest, data = read_dataset(collect_dir)
    assert manifest["full"] is True and set(manifest["rows"].values()) == {7}
    assert [r["token_ids"] for r in results] == [r["token_ids"] for r in full_results]


def test_refuses_to_overwrite_and_resume_appends(tiny_shard_dir, tmp_path):
    _, collect_dir = collect(tiny_shard_dir, tmp_path, 1)
    first_manifest, first = read_dataset(collect_dir)
    rows = first_manifest["rows"]["0"]
    from launch.infer import main

    prompts, again = tmp_path / "collect.jsonl", tmp_path / "again.jsonl"
    args = infer_args(tiny_shard_dir, prompts, again, save_args(collect_dir))
    assert main(args) != 0  # not empty, no --collect-resume
    assert read_dataset(collect_dir)[0]["rows"] == first_manifest["rows"]
    assert main([*args, "--collect-resume", "--collect-dtype", "float32"]) != 0  # different dtype
    assert main([*args, "--collect-resume"]) == 0
    manifest, both = read_dataset(collect_dir)
    assert set(manifest["rows"].values()) == {2 * rows}
    for key, value in first.items():  # the same prompts again: the appended half repeats the first
        np.testing.assert_array_equal(both[key][:rows], value)
        np.testing.assert_array_equal(both[key][rows:], value)


def save_command(model_dir, prompts, out, collect_dir, extra=()) -> list[str]:
    """launch/infer.py as its own process: a long collection."""
    return [
        sys.executable,
        str(INFER),
        *infer_args(model_dir, prompts, out, save_args(collect_dir)),
        "--collect-capacity",
        "5000",
        "--max-new-tokens",
        "200",
        "--ignore-eos",
        *extra,
    ]


def assert_within_fp16_ulp(actual: np.ndarray, desired: np.ndarray, err_msg: str = "") -> None:
    """Equal to within one float16 ulp at each element's own magnitude."""
    magnitude = np.maximum(np.abs(actual), np.abs(desired)).astype(np.float16)
    ulp = np.spacing(magnitude).astype(np.float32)
    bad = np.abs(actual - desired) > ulp
    assert not bad.any(), f"{err_msg}: {bad.sum()} elements differ by more than one float16 ulp"


def test_killed_run_leaves_a_readable_dataset(tiny_shard_dir, tmp_path):
    """SIGKILL mid-run (flushing every step): the manifest's rows are all valid rows."""
    prompts = write_prompts(tmp_path / "many.jsonl", [{"prompt": p} for p in PROMPTS * 3])
    # The reference is the same command in the same environment, run to the end: a run in
    # pytest's own process would use another thread count, so another summation order in
    # the matmuls, and float16 rows that differ by one ulp now and then. Only how often
    # rows are made durable differs (which changes no value, and saves a sync per step).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference_dir, collect_dir = tmp_path / "ref", tmp_path / "killed"
    every_step = ["--collect-flush-seconds", "0"]
    # Both at once (one thread each): the reference runs while the other is being killed.
    reference = subprocess.Popen(
        save_command(tiny_shard_dir, prompts, tmp_path / "ref.jsonl", reference_dir), cwd=ROOT, env=env
    )
    try:
        proc = subprocess.Popen(
            save_command(tiny_shard_dir, prompts, tmp_path / "k.jsonl", collect_dir, every_step), cwd=ROOT, env=env
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if collect_dir.exists() and recorded_rows(collect_dir).get(0, 0) > 40:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
        assert reference.wait(timeout=300) == 0
    finally:
        reference.kill()
    _, ref = read_dataset(reference_dir)
    manifest, data = read_dataset(collect_dir)
    rows = min(manifest["rows"].values())
    assert rows > 40
    assert not (tmp_path / "k.jsonl").exists()
    # The same schedule: the valid rows equal a complete run's first rows. Same threads
    # should give the same bits; one float16 ulp of slack per element keeps the test about
    # torn or unwritten rows (which are off by far more), not about the BLAS library.
    for key, value in data.items():
        assert_within_fp16_ulp(value[:rows], ref[key][:rows], err_msg=str(key))


def test_resume_after_a_kill_on_two_ranks(tiny_shard_dir, tiny_model, tmp_path):
    """Rank 1 killed mid-decode (torchrun then stops rank 0, which publishes its rows: its
    layers may count more rows than rank 1's), then --collect-resume with the same prompts:
    row k is the same token in every file and layer, and the whole dataset equals HF's
    activations: the killed run's rows are tokens of its prompts' greedy continuations,
    the resumed run's rows are every token it fed."""
    model, tokenizer = tiny_model
    layers = list(range(model.config.num_hidden_layers))
    prompts = fault_scenarios.PROMPTS  # distinct prompts: no two tokens share their activations
    run = fault_scenarios.start_torchrun(tiny_shard_dir, tmp_path, 2, ["--micro-batch-size", "1"], prompts=prompts)
    try:
        fault_scenarios.wait_until_decoding(run, rows=60)
        os.kill(fault_scenarios.rank_pid(run, 1), signal.SIGKILL)
        codes, _ = run.wait(60)
    finally:
        run.kill_all()
    assert codes[0] not in (0, None), "the run finished before it could be killed"
    killed = read_manifest(run.collect_dir)["rows"]
    kept = min(killed.values())
    assert kept > 0, killed

    resume = [*fault_scenarios.SETTINGS, "--collect-dir", str(run.collect_dir), "--collect-resume"]
    prompts_path = tmp_path / "prompts.jsonl"  # the killed run's prompts, a short generation this time
    results = run_infer(tiny_shard_dir, prompts_path, tmp_path / "resumed.jsonl", 2, [*resume, "--max-new-tokens", "3"])
    manifest, data = read_dataset(run.collect_dir)
    fed = sum(len(tokenizer(r["prompt"])["input_ids"]) + len(r["token_ids"]) - 1 for r in results)
    assert manifest["rows"] == {str(layer): kept + fed for layer in layers}, killed

    never = model.config.vocab_size  # an EOS id no greedy step can produce: as --ignore-eos
    killed_run = [{"prompt": p, "token_ids": hf_greedy(model, tokenizer, p, kept, eos_token_id=never)} for p in prompts]
    before = {key: rows[:kept] for key, rows in data.items()}
    assert_rows_match(before, expected_rows(model, killed_run, tokenizer, layers), layers, some=True)
    after = {key: rows[kept:] for key, rows in data.items()}
    assert_rows_match(after, expected_rows(model, results, tokenizer, layers), layers)


def test_collect_layers_records_only_the_chosen_layers(tiny_shard_dir, tiny_model, tmp_path):
    """Two stages, one chosen layer on each: HF's rows for those, no files for the others
    (which run as plain blocks: the tokens stay HF's)."""
    model, tokenizer = tiny_model
    results, collect_dir = collect(tiny_shard_dir, tmp_path, 2, ["--collect-layers", "0,3"])
    manifest, data = read_dataset(collect_dir)
    assert manifest["layers"] == [0, 3]
    assert sorted(p.name for p in collect_dir.glob("*.mmap")) == sorted(f"{n}_{i}.mmap" for n in NAMES for i in (0, 3))
    assert_rows_match(data, expected_rows(model, results, tokenizer, [0, 3]), [0, 3])
    for row in results:
        assert row["token_ids"] == hf_greedy(model, tokenizer, row["prompt"], 5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--collect-layers", "2,9"], "--collect-layers: layer 9 is not run (this pipeline runs layers 0-3)"),
        (
            ["--collect-layers", "1", "--stage-model-types", "llama,llama-save", "--pp-degree", "2"],
            "layer 1 runs on stage 0 as 'llama', which records nothing",
        ),
        (["--collect-layers", "1-x"], "expected layer indices like 0,3,8-11, got '1-x'"),
    ],
    ids=["beyond", "plain-stage", "syntax"],
)
def test_collect_layers_refused_before_loading(
    tiny_shard_dir, tmp_path, monkeypatch, capsys, no_model_loading, extra, message
):
    from launch.infer import main

    if "--pp-degree" in extra:  # the error comes before any process group
        monkeypatch.setenv("WORLD_SIZE", "2")
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    args = infer_args(tiny_shard_dir, prompts, tmp_path / "out.jsonl", [*save_args(tmp_path / "c"), *extra])
    cores = os.sched_getaffinity(0)
    try:
        assert main(args) != 0
    except SystemExit as e:  # argparse
        assert e.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert os.sched_getaffinity(0) == cores  # rank 0 of 2 binds a core only once the group opens


def test_disk_estimate_printed_and_a_collection_too_big_refused(tiny_shard_dir, tmp_path, capsys, no_model_loading):
    """(2 hidden + heads + ffn) values per layer per row: (2 * 64 + 8 + 192) * 2 bytes in float16."""
    from launch.infer import main

    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    huge = [*save_args(tmp_path / "c"), "--collect-capacity", str(10**15)]
    assert main(infer_args(tiny_shard_dir, prompts, tmp_path / "out.jsonl", huge)) == 1
    err = capsys.readouterr().err
    assert f"collect: 656 bytes per layer per row; 4 layers x {10**15} rows may write up to 2.62e+09 GB" in err, err
    assert "the files would not fit; lower --collect-capacity" in err and not (tmp_path / "c").exists()


def test_background_writer_reuses_buffers_without_mixing_rows(tmp_path):
    """Writes of growing and shrinking row counts, on the thread (large) and inline (small),
    through the reused conversion buffers: the file holds each block converted by numpy."""
    from engine.collector import INLINE_WRITE_VALUES, ArrayFile, BackgroundWriter

    width, counts = 1024, [100, 30, 200, 1, 64, 3]
    assert max(counts) * width >= INLINE_WRITE_VALUES > min(counts) * width  # both paths
    file = ArrayFile(tmp_path / "a.mmap", width, np.dtype("float16"), sum(counts))
    writer = BackgroundWriter(torch.float16, max_pending=2)
    blocks = [torch.randn(n, width) for n in counts]
    start = 0
    for block in blocks:
        writer.submit(file, start, block)
        start += len(block)
    writer.drain()
    writer.stop()
    file.close()

    written = np.fromfile(tmp_path / "a.mmap", dtype=np.float16).reshape(-1, width)
    np.testing.assert_array_equal(written, np.concatenate([b.numpy().astype(np.float16) for b in blocks]))
