"""The converter and the inspector, checked against HF transformers' own loading of each
format and against numbers written here."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA32, make_tiny_hf_model, missing_package, smollm_gguf_path
from safetensors.torch import load_file, save_file

from converters.checkpoint import ConversionError
from converters.convert_llama_checkpoint import convert
from converters.convert_llama_checkpoint import main as convert_main
from converters.inspect_checkpoint import main as inspect_main

ROOT = Path(__file__).resolve().parents[1]
MLP = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
ATTN = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")

# The tiny model's parameters, by hand: embeddings 512*64; per layer q,o 64*64 each, k,v
# 16*64 each, gate/up/down 192*64 each, two norms of 64; final norm 64; tied head.
TINY_PARAMS = 512 * 64 + 4 * (2 * 64 * 64 + 2 * 16 * 64 + 3 * 192 * 64 + 2 * 64) + 64
assert TINY_PARAMS == 221_760


def hf_state(model) -> dict[str, torch.Tensor]:
    """HF tensors by name, the head included even when tied to the embeddings."""
    return {**model.state_dict(), "lm_head.weight": model.get_output_embeddings().weight.detach()}


def expected_shard_contents(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, dict[str, torch.Tensor]]:
    """What each shard file must hold, written from DESIGN.md's layout and HF's names."""
    files = {
        "pytorch_embs.pt": {"embed_tokens.weight": state["model.embed_tokens.weight"]},
        "pytorch_lm_head.pt": {"norm.weight": state["model.norm.weight"], "lm_head.weight": state["lm_head.weight"]},
    }
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        layer = {f"self_attn.{k}": state[f"{prefix}self_attn.{k}"] for k in ATTN}
        layer |= {k: state[f"{prefix}mlp.{k}"] for k in MLP}
        layer |= {k: state[prefix + k] for k in NORMS}
        files[f"pytorch_{i}.pt"] = layer
    return files


def assert_shards_equal(shard_dir: Path, state: dict[str, torch.Tensor], num_layers: int, dtype=None) -> None:
    for filename, expected in expected_shard_contents(state, num_layers).items():
        got = torch.load(shard_dir / filename, weights_only=True)
        assert set(got) == set(expected), filename
        for name, tensor in expected.items():
            want = tensor.to(dtype) if dtype is not None else tensor
            assert got[name].dtype == want.dtype, f"{filename}:{name}"
            torch.testing.assert_close(got[name], want, atol=0, rtol=0, msg=f"{filename}:{name}")


def assert_nothing_left(save_path: Path) -> None:
    assert not save_path.exists()
    assert not [p for p in save_path.parent.iterdir() if p.name.startswith(f".{save_path.name}.")]


# ---- HF directories -----------------------------------------------------------------


def test_hf_safetensors_dir(tiny_hf_dir, tiny_shard_dir):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    assert_shards_equal(tiny_shard_dir, hf_state(model), TINY_LLAMA32["num_hidden_layers"])

    config = AutoConfig.from_pretrained(tiny_shard_dir)
    assert (config.model_type, config.hidden_size, config.num_key_value_heads) == ("llama", 64, 2)
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 32.0
    text = "The quick brown fox"
    assert (
        AutoTokenizer.from_pretrained(tiny_shard_dir)(text).input_ids
        == AutoTokenizer.from_pretrained(tiny_hf_dir)(text).input_ids
    )

    manifest = json.loads((tiny_shard_dir / "manifest.json").read_text())
    assert (manifest["format"], manifest["dtype"], manifest["num_layers"]) == ("hf", "float32", 4)
    assert {"pytorch_embs.pt", "pytorch_3.pt", "pytorch_lm_head.pt", "config.json"} <= set(manifest["files"])


@pytest.fixture(scope="module")
def untied_model():
    return make_tiny_hf_model(tie_word_embeddings=False)


def save_sharded_bin(model, directory: Path) -> None:
    """Two ``.bin`` files and an index, as older transformers wrote them."""
    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        filename = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in chunk}, directory / filename)
        weight_map |= dict.fromkeys(chunk, filename)
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["sharded-safetensors", "sharded-bin"])
def test_hf_sharded_dirs(untied_model, tmp_path, layout):
    src = tmp_path / "src"
    if layout == "sharded-safetensors":
        untied_model.save_pretrained(src, max_shard_size="100KB")
        assert len(list(src.glob("*.safetensors"))) > 1 and (src / "model.safetensors.index.json").is_file()
    else:
        src.mkdir()
        save_sharded_bin(untied_model, src)
    out = convert(str(src), tmp_path / "out")
    assert_shards_equal(out, hf_state(untied_model), TINY_LLAMA32["num_hidden_layers"])


def test_dtype_cast(tiny_hf_dir, tmp_path):
    from transformers import LlamaForCausalLM

    out = convert(str(tiny_hf_dir), tmp_path / "out", dtype="float16")
    model = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    assert_shards_equal(out, hf_state(model), TINY_LLAMA32["num_hidden_layers"], dtype=torch.float16)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "float16"


# ---- GGUF ---------------------------------------------------------------------------


def test_gguf_matches_transformers_load(smollm_hf_model, smollm_shard_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert_shards_equal(smollm_shard_dir, hf_state(smollm_hf_model), 30)
    config = AutoConfig.from_pretrained(smollm_shard_dir)
    published = (576, 1536, 30, 9, 3, 49152, True, 100000.0)
    assert (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        config.tie_word_embeddings,
        config.rope_parameters["rope_theta"],
    ) == published
    tokenizer = AutoTokenizer.from_pretrained(smollm_shard_dir)
    assert tokenizer("Hello world").input_ids == [19556, 905]
    manifest = json.loads((smollm_shard_dir / "manifest.json").read_text())
    assert (manifest["format"], manifest["dtype"]) == ("gguf", "float32")


# ---- Meta checkpoints ---------------------------------------------------------------


def hf_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half q/k rows back to Meta's interleaved rotary layout (inverse of HF's permute)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(model, directory: Path, parts: int, dtype: torch.dtype, **params) -> None:
    """A Meta checkpoint of ``model`` split over ``parts`` model-parallel files: rows of
    wq/wk/wv/w1/w3/output/embeddings and columns of wo/w2 are split, norms replicated."""
    cfg, state = model.config, model.state_dict()
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    tensors = {
        "tok_embeddings.weight": (state["model.embed_tokens.weight"], 0),
        "norm.weight": (state["model.norm.weight"], None),
    }
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = (state["lm_head.weight"], 0)
    for i in range(cfg.num_hidden_layers):
        hf, meta = f"model.layers.{i}.", f"layers.{i}."
        tensors |= {
            meta + "attention.wq.weight": (hf_to_interleaved(state[hf + "self_attn.q_proj.weight"], heads), 0),
            meta + "attention.wk.weight": (hf_to_interleaved(state[hf + "self_attn.k_proj.weight"], kv_heads), 0),
            meta + "attention.wv.weight": (state[hf + "self_attn.v_proj.weight"], 0),
            meta + "attention.wo.weight": (state[hf + "self_attn.o_proj.weight"], 1),
            meta + "feed_forward.w1.weight": (state[hf + "mlp.gate_proj.weight"], 0),
            meta + "feed_forward.w3.weight": (state[hf + "mlp.up_proj.weight"], 0),
            meta + "feed_forward.w2.weight": (state[hf + "mlp.down_proj.weight"], 1),
            meta + "attention_norm.weight": (state[hf + "input_layernorm.weight"], None),
            meta + "ffn_norm.weight": (state[hf + "post_attention_layernorm.weight"], None),
        }
    directory.mkdir()
    for rank in range(parts):
        part = {k: (t if dim is None else t.chunk(parts, dim)[rank]) for k, (t, dim) in tensors.items()}
        part = {k: t.to(dtype).clone() for k, t in part.items()}
        torch.save(part, directory / f"consolidated.{rank:02d}.pth")
    # Meta's FFN size: int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 64 -> 192.
    (directory / "params.json").write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 4,
                "n_heads": 8,
                "n_kv_heads": 2,
                "vocab_size": 512,
                "multiple_of": 64,
                "norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "use_scaled_rope": True,
                **params,
            }
        )
    )


def test_meta_two_files_untied(untied_model, tmp_path, capsys):
    write_meta_checkpoint(untied_model, tmp_path / "meta", parts=2, dtype=torch.float32)
    out = convert(str(tmp_path / "meta"), tmp_path / "out", llama_version="3.1")
    assert_shards_equal(out, hf_state(untied_model), 4)
    assert "llama3 rope scaling factor 8 (from --llama-version 3.1)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["factor"] == 8.0 and config["intermediate_size"] == 192
    assert config["tie_word_embeddings"] is False

    assert inspect_main([str(tmp_path / "meta")]) == 0
    report = capsys.readouterr().out
    assert "layers.0.attention.wq.weight" in report and "consolidated.01.pth" in report
    head = 512 * 64  # untied: the output matrix adds a second vocab x hidden
    assert f"{TINY_PARAMS + head:,} parameters" in report


def test_meta_tied_bf16_factor_from_params(tmp_path, capsys):
    model = make_tiny_hf_model()
    write_meta_checkpoint(model, tmp_path / "meta", parts=2, dtype=torch.bfloat16, rope_scaling_factor=32.0)
    out = convert(str(tmp_path / "meta"), tmp_path / "out")
    assert "llama3 rope scaling factor 32 (from params.json)" in capsys.readouterr().out
    assert_shards_equal(out, hf_state(model), 4, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"


def test_meta_needs_rope_factor(untied_model, tmp_path):
    write_meta_checkpoint(untied_model, tmp_path / "meta", parts=1, dtype=torch.float32)
    with pytest.raises(ConversionError, match="--llama-version"):
        convert(str(tmp_path / "meta"), tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def llama3_tokenizer_model() -> Path:
    spec = importlib.util.find_spec("llama_models")
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model" if spec and spec.origin else None
    if path is None or not path.is_file():
        missing_package("llama-models")
    return path


def test_meta_llama3_tokenizer(untied_model, tmp_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import AutoTokenizer

    write_meta_checkpoint(untied_model, tmp_path / "meta", parts=1, dtype=torch.float32)
    shutil.copy(llama3_tokenizer_model(), tmp_path / "meta" / "tokenizer.model")
    out = convert(str(tmp_path / "meta"), tmp_path / "out", llama_version="3.2")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hello world", add_special_tokens=False).input_ids == [9906, 1917]
    assert tokenizer("Hello world").input_ids == [128000, 9906, 1917]
    specials = ["<|eot_id|>", "<|end_of_text|>", "<|python_tag|>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [128009, 128001, 128010]
    # Meta's own tokenizer: tiktoken over the same file with Meta's split pattern.
    meta = tiktoken.Encoding(
        "llama3",
        pat_str=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # noqa: E501
        mergeable_ranks=load_tiktoken_bpe(str(tmp_path / "meta" / "tokenizer.model")),
        special_tokens={},
    )
    for text in ["Pipeline parallel inference, 12345 tokens!", "  indented\n\tcode(x) ünïcødé 日本語"]:
        assert tokenizer(text, add_special_tokens=False).input_ids == meta.encode(text)


# ---- bad input ----------------------------------------------------------------------


def test_unknown_format(tmp_path):
    (tmp_path / "weights.txt").write_text("not a model")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "readme.md").write_text("no model here")
    for src in (tmp_path / "weights.txt", tmp_path / "dir"):
        with pytest.raises(ConversionError, match="unknown checkpoint format"):
            convert(str(src), tmp_path / "out")
        assert_nothing_left(tmp_path / "out")


def test_missing_path_cli(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.gguf"
    assert convert_main(["--model-name", str(missing), "--save-path", str(tmp_path / "out")]) == 1
    assert f"{missing}: no such file or directory" in capsys.readouterr().err
    assert_nothing_left(tmp_path / "out")


def test_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network here
    with pytest.raises(ConversionError, match="no-such-org/no-such-model: not a local path.*Hugging Face hub"):
        convert("no-such-org/no-such-model", tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_wrong_tensor_shape(tiny_hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dir, src)
    state = load_file(src / "model.safetensors")
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(191, 64)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as err:
        convert(str(src), tmp_path / "out")
    message = str(err.value)
    assert "model.layers.2.mlp.up_proj.weight" in message and "model.safetensors" in message
    assert "(191, 64)" in message and "(192, 64)" in message
    assert_nothing_left(tmp_path / "out")


def write_small_gguf(path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((32, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_truncated_file(tiny_hf_dir, tmp_path, kind):
    if kind == "safetensors":
        src = tmp_path / "src"
        shutil.copytree(tiny_hf_dir, src)
        broken = src / "model.safetensors"
    else:
        src = broken = tmp_path / "small.gguf"
        write_small_gguf(broken)
    os.truncate(broken, broken.stat().st_size - 100)
    with pytest.raises(ConversionError, match=f"{broken}: .*truncated or corrupt"):
        convert(str(src), tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_existing_output_is_kept(tiny_hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert(str(tiny_hf_dir), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ---- command lines and the inspector --------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_script_and_inspector_verify(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    script = run(
        "converters/convert_llama_checkpoint.py",
        "--model-name",
        str(tiny_hf_dir),
        "--save-path",
        str(out),
        "--dtype",
        "bfloat16",
    )
    assert script.returncode == 0, script.stderr
    assert torch.load(out / "pytorch_1.pt", weights_only=True)["gate_proj.weight"].dtype == torch.bfloat16

    inspected = run("-m", "converters.inspect_checkpoint", str(out), "--verify")
    assert inspected.returncode == 0, inspected.stderr
    assert "self_attn.q_proj.weight" in inspected.stdout and "[64, 64]" in inspected.stdout
    assert f"{TINY_PARAMS:,} parameters" in inspected.stdout  # the lm_head copy of tied embeddings counted once

    shard = out / "pytorch_2.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    tampered = run("converters/inspect_checkpoint.py", str(out), "--verify")
    assert tampered.returncode != 0
    assert "pytorch_2.pt: sha256 differs" in tampered.stderr


def test_inspect_hf_and_gguf(tiny_hf_dir, smollm_hf_model, capsys):
    assert inspect_main([str(tiny_hf_dir)]) == 0
    report = capsys.readouterr().out
    assert "model.layers.3.mlp.down_proj.weight" in report and "[64, 192]" in report
    assert f"{TINY_PARAMS:,} parameters" in report

    assert inspect_main([str(smollm_gguf_path())]) == 0
    report = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in report and "Q4_1" in report
    assert f"{sum(p.numel() for p in smollm_hf_model.parameters()):,} parameters" in report


def test_inspect_verify_needs_shard_dir(tiny_hf_dir, capsys):
    assert inspect_main([str(tiny_hf_dir), "--verify"]) == 1
    assert "needs a shard directory" in capsys.readouterr().err
