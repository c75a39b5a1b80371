"""Bad prompts, bad configuration and unsafe collection requests: a clear error naming what is
wrong, a non-zero exit, no results file, and no model loaded first."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pipeline_helpers import infer_args, read_dataset, torchrun, write_prompts

import launch.infer as infer

PROMPT = '{"prompt": "The quick brown fox"}\n'


def fails(capsys, tmp_path, model_dir, prompts: bytes | str = PROMPT, extra=()) -> str:
    prompts_path = tmp_path / "bad.jsonl"
    prompts_path.write_bytes(prompts if isinstance(prompts, bytes) else prompts.encode())
    out = tmp_path / "out.jsonl"
    assert infer.main(infer_args(model_dir, prompts_path, out, ["--max-new-tokens", "3", *extra])) == 1
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "text,message",
    [
        (PROMPT.encode() + b'{"prompt": "caf\xe9"}\n', "bad.jsonl:2: not valid UTF-8"),
        (PROMPT + '{"prompt": 42}\n', 'bad.jsonl:2: each line must be a JSON object with a string "prompt"'),
        (PROMPT + '["a list"]\n', 'bad.jsonl:2: each line must be a JSON object with a string "prompt"'),
        (PROMPT + '\n{"prompt": ""}\n', 'bad.jsonl:3: "prompt" is empty'),
        (PROMPT + '{"prompt": "x", "max_tokens": -2}\n', 'bad.jsonl:2: "max_tokens" must be a non-negative'),
        ("\n\n", "the prompt file is empty"),
    ],
    ids=["invalid-utf8", "non-string", "not-an-object", "empty-prompt", "negative-max-tokens", "blank-file"],
)
def test_bad_prompt_lines(tiny_shard_dir, tmp_path, capsys, no_model_loading, text, message):
    assert message in fails(capsys, tmp_path, tiny_shard_dir, text)


def test_too_long_prompt_fails_or_is_cut_on_request(tiny_hf_dir, tiny_shard_dir, tmp_path, capsys):
    """Never silent: an error naming the line, or with --truncate-prompts the prompt's end,
    generating exactly what HF generate does on that end."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    long_prompt = json.dumps({"id": "long", "prompt": "lazy dog " * 300}) + "\n"
    err = fails(capsys, tmp_path, tiny_shard_dir, PROMPT + long_prompt)
    assert "bad.jsonl:2: prompt 'long' has" in err and "--truncate-prompts" in err

    prompts = write_prompts(tmp_path / "long.jsonl", [json.loads(long_prompt)])
    out = tmp_path / "cut.jsonl"
    assert infer.main(infer_args(tiny_shard_dir, prompts, out, ["--max-new-tokens", "5", "--truncate-prompts"])) == 0
    assert "cut from" in capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_hf_dir).eval()
    context = model.config.max_position_embeddings
    kept = tokenizer(json.loads(long_prompt)["prompt"])["input_ids"][-(context - 5) :]
    with torch.no_grad():
        want = model.generate(torch.tensor([kept]), max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert json.loads(out.read_text())["token_ids"] == want[0, len(kept) :].tolist()


def test_more_stages_than_layers(tiny_shard_dir, tmp_path, capsys, monkeypatch, no_model_loading):
    monkeypatch.setenv("WORLD_SIZE", "5")
    err = fails(capsys, tmp_path, tiny_shard_dir, extra=["--pp-degree", "5"])
    assert "cannot give each of 5 pipeline stages at least one of 4 layers" in err


def test_max_layers_beyond_the_model(tiny_shard_dir, tmp_path, capsys, no_model_loading):
    assert "--max-layers 9 is more than the model's 4 layers" in fails(
        capsys, tmp_path, tiny_shard_dir, extra=["--max-layers", "9"]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_nccl_without_cuda(tiny_shard_dir, tmp_path, capsys, no_model_loading):
    assert "--dist-backend torch_nccl needs CUDA" in fails(
        capsys, tmp_path, tiny_shard_dir, extra=["--dist-backend", "torch_nccl"]
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--model-type", "llama-fast"], "invalid choice: 'llama-fast'"),
        (["--stage-model-types", "llama,lama-save"], "unknown type 'lama-save'"),
        (["--max-new-tokens", "-1"], "must be at least 0"),
        (["--micro-batch-size", "0"], "must be at least 1"),
        (["--dist-timeout", "0"], "--dist-timeout must be positive"),
    ],
)
def test_bad_flags_are_refused_by_the_parser(tiny_shard_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(infer_args(tiny_shard_dir, tmp_path / "p.jsonl", tmp_path / "o.jsonl", flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_rank_failing_at_start_stops_the_others(tiny_shard_dir, tmp_path):
    """Rank 0's prompt file is bad: it says why, rank 1 says who failed, nothing runs."""
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": \n')
    out = tmp_path / "out.jsonl"
    result = torchrun(2, infer_args(tiny_shard_dir, prompts, out, ["--dist-timeout", "30"]), timeout=120)
    assert result.returncode != 0
    assert "error (rank 0): " in result.stderr and "bad.jsonl:2: malformed JSON" in result.stderr
    assert "error (rank 1): rank 0 failed to start (see its error); nothing was run" in result.stderr
    assert not out.exists()


# ---- collection safety ---------------------------------------------------------------------


def test_collection_never_overwrites_or_mixes_models(tiny_shard_dir, tmp_path, capsys):
    collect_dir = tmp_path / "collect"
    save = ["--model-type", "llama-save", "--collect-dir", str(collect_dir)]
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "The quick brown fox"}])
    assert infer.main(infer_args(tiny_shard_dir, prompts, tmp_path / "a.jsonl", save)) == 0
    before = read_dataset(collect_dir)

    other = tmp_path / "other_model"
    shutil.copytree(tiny_shard_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    capsys.readouterr()
    assert infer.main(infer_args(other, prompts, tmp_path / "b.jsonl", save)) == 1
    assert "collect directory is not empty" in capsys.readouterr().err
    assert infer.main(infer_args(other, prompts, tmp_path / "c.jsonl", [*save, "--collect-resume"])) == 1
    err = capsys.readouterr().err
    assert "cannot resume: collected from" in err and "a different model" in err

    after = read_dataset(collect_dir)
    assert after[0]["rows"] == before[0]["rows"]
    assert all((after[1][key] == value).all() for key, value in before[1].items())
