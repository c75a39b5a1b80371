"""Pipelined greedy generation equals HF generate, for several stage counts and micro-batch sizes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import save_tiny_hf_dir
from pipeline_helpers import PROMPTS, hf_greedy, infer_args, run_infer, torchrun, write_prompts

from pipeline.plan import PlanError, make_plans, split_layers

NEW_TOKENS = 10
NEVER = "\x00 text no model writes"  # a stop string that never occurs


@pytest.fixture(scope="module")
def smollm_reference(smollm_hf_model, smollm_shard_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_shard_dir)
    return [hf_greedy(smollm_hf_model, tokenizer, p, NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def tiny_reference(tiny_model):
    model, tokenizer = tiny_model
    return [hf_greedy(model, tokenizer, p, NEW_TOKENS) for p in PROMPTS]


def model_with_eos(shard_dir: Path, directory: Path, eos: int) -> Path:
    """A copy of a shard directory whose config makes ``eos`` (a token the model emits) its EOS."""
    shutil.copytree(shard_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = eos
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def prompts_file(tmp_path, **extra):
    return write_prompts(
        tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p, **extra} for i, p in enumerate(PROMPTS)]
    )


@pytest.mark.parametrize("nproc,micro_batch", [(1, len(PROMPTS)), (2, 1), (3, 2)])
def test_smollm_tokens_equal_hf_generate(smollm_shard_dir, smollm_reference, tmp_path, nproc, micro_batch):
    rows = run_infer(
        smollm_shard_dir,
        prompts_file(tmp_path),
        tmp_path / "out.jsonl",
        nproc,
        ["--max-new-tokens", str(NEW_TOKENS), "--micro-batch-size", str(micro_batch)],
    )
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(PROMPTS))]
    assert [r["token_ids"] for r in rows] == smollm_reference
    assert [r["prompt"] for r in rows] == PROMPTS


@pytest.mark.parametrize(
    "nproc,micro_batch,chunk",
    [(1, 1, None), (2, 2, None), (3, len(PROMPTS), None), (2, len(PROMPTS), 1), (3, 3, 12)],
    ids=["1-stage", "2-stages", "3-stages", "2-stages-prompt-chunks", "3-stages-12-token-chunks"],
)
def test_tiny_llama32_tokens_equal_hf_generate(tiny_shard_dir, tiny_reference, tmp_path, nproc, micro_batch, chunk):
    """4 layers on 3 stages is an uneven split (2, 1, 1). Prefill chunks of 1 token make
    every prompt a chunk of its own; of 12, some chunks hold several prompts."""
    chunks = [] if chunk is None else ["--prefill-chunk-tokens", str(chunk)]
    rows = run_infer(
        tiny_shard_dir,
        prompts_file(tmp_path),
        tmp_path / "out.jsonl",
        nproc,
        ["--max-new-tokens", str(NEW_TOKENS), "--micro-batch-size", str(micro_batch), *chunks],
    )
    assert [r["token_ids"] for r in rows] == tiny_reference


@pytest.mark.parametrize("flags,nproc", [(["--dtype", "bfloat16"], 2), (["--fp16"], 1)], ids=["bfloat16", "fp16"])
def test_half_precision_tokens_equal_hf_in_the_same_dtype(
    tiny_hf_dir, tiny_shard_dir, tiny_model, tmp_path, flags, nproc
):
    """The shards hold float32; --dtype (or DejaVu's --fp16) casts them as each stage loads.
    Tokens equal HF generate in that dtype. The tiny model's tokens are well separated, so
    float32 would give them too: the stats show the stages really hold 2-byte weights, and
    test_llama_modules checks the half-precision logits themselves against HF's."""
    import torch
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if "bfloat16" in flags else torch.float16
    model = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=dtype).eval()
    tokenizer = tiny_model[1]
    stats_path = tmp_path / "stats.json"
    extra = ["--max-new-tokens", "8", "--micro-batch-size", "2", "--stats-path", str(stats_path), *flags]
    rows = run_infer(tiny_shard_dir, prompts_file(tmp_path), tmp_path / "out.jsonl", nproc, extra)
    assert [r["token_ids"] for r in rows] == [hf_greedy(model, tokenizer, p, 8) for p in PROMPTS]
    shards = [torch.load(f, weights_only=True) for f in tiny_shard_dir.glob("pytorch_*.pt")]
    numel = sum(t.numel() for shard in shards for t in shard.values())
    assert sum(r["parameter_bytes"] for r in json.loads(stats_path.read_text())["ranks"]) == 2 * numel


def test_eos_and_max_tokens(tiny_shard_dir, tiny_model, tiny_reference, tmp_path):
    """Make a token the model really emits mid-sequence the EOS; HF stops there too."""
    model, tokenizer = tiny_model
    eos = tiny_reference[1][3]
    model_dir = model_with_eos(tiny_shard_dir, tmp_path / "model", eos)
    items = [{"prompt": p} for p in PROMPTS] + [
        {"prompt": PROMPTS[0], "max_tokens": 3},
        {"prompt": PROMPTS[0], "max_tokens": 0},
    ]
    rows = run_infer(
        model_dir,
        write_prompts(tmp_path / "p.jsonl", items),
        tmp_path / "out.jsonl",
        2,
        ["--max-new-tokens", str(NEW_TOKENS), "--micro-batch-size", "3"],
    )
    for row, prompt in zip(rows, PROMPTS):
        expected = hf_greedy(model, tokenizer, prompt, NEW_TOKENS, eos_token_id=[eos, tokenizer.eos_token_id])
        assert row["token_ids"] == expected
        assert row["finish_reason"] == ("stop" if expected[-1] in (eos, tokenizer.eos_token_id) else "length")
    assert rows[1]["token_ids"][-1] == eos and rows[1]["finish_reason"] == "stop"
    assert rows[-2]["token_ids"] == tiny_reference[0][:3] and rows[-2]["finish_reason"] == "length"
    assert rows[-1]["token_ids"] == [] and rows[-1]["text"] == ""


def assert_stopped_at_stop(row: dict, reference: list[int], stops: list[str], tokenizer) -> None:
    """The reference: HF's greedy text cut at the earliest occurrence of any stop string. The
    engine's tokens are HF's up to the first whose text holds a stop string."""

    def text_of(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    full = text_of(reference)
    hits = [full.find(s) for s in stops if s in full]
    assert hits, f"no stop string occurs in {full!r}: nothing to test"
    assert row["finish_reason"] == "stop" and row["text"] == full[: min(hits)]
    n = len(row["token_ids"])
    assert n > 0 and row["token_ids"] == reference[:n]
    assert any(s in text_of(reference[:n]) for s in stops) and not any(s in text_of(reference[: n - 1]) for s in stops)


def test_stop_strings_and_ignore_eos(tiny_shard_dir, tiny_model, tmp_path):
    """One micro-batch of five rows on two stages, with --ignore-eos: one row's model emits its
    EOS mid-sequence and goes on; one stops at the earliest of several stop strings while the
    others go on; one has a stop string that never occurs."""
    model, tokenizer = tiny_model
    new_tokens = 8
    reference = [hf_greedy(model, tokenizer, p, new_tokens, eos_token_id=None) for p in PROMPTS]
    # The EOS: the first token "Hello" continues with after its first one; not its last token.
    hello = reference[3]
    eos = next(t for t in hello if t != hello[0])
    assert eos in hello[1:-1]
    # Two stops of one length, the one listed second occurring first; and one that never occurs.
    text = tokenizer.decode(reference[4], skip_special_tokens=True)
    stops = [text[2:4], text[1:3], NEVER]
    assert 0 < text.find(stops[1]) < text.find(stops[0])
    items = [{"prompt": PROMPTS[0], "stop": [NEVER]}, *({"prompt": p} for p in PROMPTS[1:4])]
    items.append({"prompt": PROMPTS[4], "stop": stops})
    rows = run_infer(
        model_with_eos(tiny_shard_dir, tmp_path / "model", eos),
        write_prompts(tmp_path / "p.jsonl", items),
        tmp_path / "out.jsonl",
        2,
        ["--max-new-tokens", str(new_tokens), "--micro-batch-size", str(len(items)), "--ignore-eos"],
    )
    assert_stopped_at_stop(rows[4], reference[4], stops, tokenizer)
    for row, expected in zip(rows[:4], reference):
        assert row["token_ids"] == expected and row["finish_reason"] == "length"
        assert row["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert eos in rows[3]["token_ids"][:-1]


def test_smollm_stop_string(smollm_shard_dir, smollm_reference, tmp_path):
    """Real text: a stop string (a word of the continuation) next to one that never occurs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_shard_dir)
    full = tokenizer.decode(smollm_reference[2], skip_special_tokens=True)
    stops = [NEVER, full.strip().split()[1]]
    rows = run_infer(
        smollm_shard_dir,
        write_prompts(tmp_path / "p.jsonl", [{"prompt": PROMPTS[2], "stop": stops}]),
        tmp_path / "o.jsonl",
        1,
        ["--max-new-tokens", str(NEW_TOKENS), "--ignore-eos"],
    )
    assert_stopped_at_stop(rows[0], smollm_reference[2], stops, tokenizer)


@pytest.fixture(scope="module")
def narrow_mlp_dirs(tmp_path_factory):
    """The tiny model with an MLP of 16 units, whose LM head weighs 2.4 layers: (HF dir, shards)."""
    from converters.convert_llama_checkpoint import convert

    hf_dir = save_tiny_hf_dir(tmp_path_factory.mktemp("narrow_hf"), intermediate_size=16)
    return hf_dir, convert(str(hf_dir), tmp_path_factory.mktemp("narrow") / "model")


def hf_first_layers(hf_dir, num_layers: int):
    """An HF model that runs only its first ``num_layers`` layers (what --max-layers means)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    return model


@pytest.mark.parametrize(
    "model,flags,ranges",
    [
        # DejaVu's --num-layers is per stage: 1 layer on each of 2 stages runs layers 0 and 1 only.
        ("tiny", ["--num-layers", "1"], [(0, 1), (1, 2)]),
        # --max-layers caps the total: 2 per stage, but only 3 layers, so the last stage gets 1.
        ("tiny", ["--max-layers", "3", "--num-layers", "2"], [(0, 2), (2, 3)]),
        # Head 512 x 64 = 32768 parameters; a layer 2*64*64 + 2*64*16 + 3*64*16 + 2*64 = 13440;
        # so the head weighs 2.44 layers: (4 + 2.44) / 2 = 3.22 per stage, the last keeps
        # round(3.22 - 2.44) = 1 layer. An even split would be (0, 2), (2, 4).
        ("narrow", ["--balance-head", "params"], [(0, 3), (3, 4)]),
    ],
    ids=["num-layers", "max-layers", "balance-head-params"],
)
def test_layer_split_flags_end_to_end(request, tmp_path, model, flags, ranges):
    """The stats name each rank's layers as the flags promise, and the tokens equal an HF
    model of the layers that ran."""
    from transformers import AutoTokenizer

    if model == "tiny":
        hf_dir, shard_dir = request.getfixturevalue("tiny_hf_dir"), request.getfixturevalue("tiny_shard_dir")
    else:
        hf_dir, shard_dir = request.getfixturevalue("narrow_mlp_dirs")
    stats_path = tmp_path / "stats.json"
    extra = ["--max-new-tokens", "6", "--stats-path", str(stats_path), *flags]
    rows = run_infer(shard_dir, prompts_file(tmp_path), tmp_path / "out.jsonl", 2, extra)
    assert [tuple(r["layers"]) for r in json.loads(stats_path.read_text())["ranks"]] == ranges
    reference, tokenizer = hf_first_layers(hf_dir, ranges[-1][1]), AutoTokenizer.from_pretrained(hf_dir)
    assert [r["token_ids"] for r in rows] == [hf_greedy(reference, tokenizer, p, 6) for p in PROMPTS]


def test_measured_head_balance_is_one_split_on_every_rank(narrow_mlp_dirs, tmp_path):
    """--balance-head (measured): rank 0 times the head; both ranks then run the split that
    its figure gives (rank 1 reports its own layers), and the tokens are the full model's."""
    from transformers import AutoTokenizer

    hf_dir, shard_dir = narrow_mlp_dirs
    stats_path = tmp_path / "stats.json"
    extra = ["--max-new-tokens", "6", "--stats-path", str(stats_path), "--balance-head"]
    rows = run_infer(shard_dir, prompts_file(tmp_path), tmp_path / "out.jsonl", 2, extra)
    stats = json.loads(stats_path.read_text())
    cost = stats["balance_head_cost"]
    assert cost > 0
    want = split_layers(4, 2, last_stage_extra=cost)
    assert [tuple(r["layers"]) for r in stats["ranks"]] == [(r.start, r.stop) for r in want]
    reference, tokenizer = hf_first_layers(hf_dir, 4), AutoTokenizer.from_pretrained(hf_dir)
    assert [r["token_ids"] for r in rows] == [hf_greedy(reference, tokenizer, p, 6) for p in PROMPTS]


def test_stats_file(tiny_shard_dir, tmp_path):
    run_infer(
        tiny_shard_dir,
        prompts_file(tmp_path),
        tmp_path / "out.jsonl",
        2,
        ["--max-new-tokens", "4", "--stats-path", str(tmp_path / "stats.json"), "--ignore-eos", "--threads", "1"],
    )
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["generated_tokens"] == 4 * len(PROMPTS)
    assert {"prefill_seconds", "decode_seconds", "tokens_per_second"} <= stats.keys()
    assert [r["rank"] for r in stats["ranks"]] == [0, 1]
    assert all(r["peak_memory_bytes"] > 0 and 0 <= r["idle_fraction"] <= 1 for r in stats["ranks"])
    # Two ranks of one thread each: each bound to a core of its own, in order (one core: unbound).
    available = sorted(os.sched_getaffinity(0))
    expected = [[available[0]], [available[1]]] if len(available) >= 2 else [[], []]
    assert [r["cores"] for r in stats["ranks"]] == expected


@pytest.mark.parametrize(
    "layers,world,per_stage,max_layers,expected",
    [
        (30, 4, None, None, [(0, 8), (8, 16), (16, 23), (23, 30)]),
        (16, 2, None, None, [(0, 8), (8, 16)]),
        (28, 3, 4, None, [(0, 4), (4, 8), (8, 12)]),
        (30, 2, None, 5, [(0, 3), (3, 5)]),
    ],
)
def test_split_layers(layers, world, per_stage, max_layers, expected):
    assert [(r.start, r.stop) for r in split_layers(layers, world, per_stage, max_layers)] == expected


@pytest.mark.parametrize(
    "world,head_cost,expected",
    [
        # SmolLM2: the head (49152 x 576) costs 8 layers (3.54M parameters each) per decoded token.
        (2, 8.0, [(0, 19), (19, 30)]),  # (30 + 8) / 2 = 19 per stage: 19 | 11 + head
        (3, 8.0, [(0, 13), (13, 25), (25, 30)]),  # 38 / 3 = 12.7: last 12.7 - 8 -> 5
        (2, 40.0, [(0, 29), (29, 30)]),  # the last stage keeps at least one layer
    ],
)
def test_split_layers_balancing_the_head(world, head_cost, expected):
    assert [(r.start, r.stop) for r in split_layers(30, world, last_stage_extra=head_cost)] == expected


def test_plan_errors():
    with pytest.raises(PlanError, match="at least one"):
        split_layers(2, 3)
    with pytest.raises(PlanError, match="2 types for 3 stages"):
        make_plans(6, 3, ["llama", "llama"])


# ---- bad input: a clear error, a non-zero exit, no results file -----------------------------


def run_failing(capsys, tmp_path, model_dir, prompts_text: str, extra=()):
    from launch.infer import main

    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(prompts_text)
    out = tmp_path / "out.jsonl"
    code = main(infer_args(model_dir, prompts, out, extra))
    assert code != 0
    assert not out.exists()
    return capsys.readouterr().err


def test_malformed_json_line_names_the_line(tiny_shard_dir, tmp_path, capsys):
    err = run_failing(capsys, tmp_path, tiny_shard_dir, '{"prompt": "ok"}\n{"prompt": "broken"\n')
    assert "bad.jsonl:2" in err and "malformed JSON" in err


def test_line_without_prompt(tiny_shard_dir, tmp_path, capsys):
    err = run_failing(capsys, tmp_path, tiny_shard_dir, '{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert "bad.jsonl:2" in err and '"prompt"' in err


def test_empty_prompt_file(tiny_shard_dir, tmp_path, capsys):
    assert "empty" in run_failing(capsys, tmp_path, tiny_shard_dir, "")


def test_prompt_longer_than_context(tiny_shard_dir, tmp_path, capsys):
    err = run_failing(capsys, tmp_path, tiny_shard_dir, json.dumps({"id": "long", "prompt": "dragon " * 400}) + "\n")
    assert "'long'" in err and "context" in err


def test_pp_degree_must_equal_world_size(tiny_shard_dir, tmp_path, capsys):
    err = run_failing(capsys, tmp_path, tiny_shard_dir, '{"prompt": "hi"}\n', ["--pp-degree", "2"])
    assert "--pp-degree 2" in err


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_shard_names_the_file(tiny_shard_dir, tmp_path, capsys, damage):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_shard_dir, model_dir)
    shard = model_dir / "pytorch_1.pt"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    err = run_failing(capsys, tmp_path, model_dir, '{"prompt": "hi"}\n')
    assert "pytorch_1.pt" in err


def test_dead_rank_does_not_hang_the_others(tiny_shard_dir, tmp_path):
    """Rank 1's shard is missing: rank 1 says so, rank 0 says who failed, and both exit."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_shard_dir, model_dir)
    (model_dir / "pytorch_3.pt").unlink()
    out = tmp_path / "out.jsonl"
    result = torchrun(
        2,
        [
            "--model-name",
            str(model_dir),
            "--infer-data",
            str(prompts_file(tmp_path)),
            "--output-path",
            str(out),
            "--dist-timeout",
            "30",
            "--no-progress",
        ],
        timeout=120,
    )
    assert result.returncode != 0
    assert "error (rank 1): " in result.stderr and "pytorch_3.pt" in result.stderr
    assert "error (rank 0): rank 1 failed to start" in result.stderr
    assert not out.exists()
