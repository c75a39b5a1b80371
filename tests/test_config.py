"""ModelConfig against the published Llama 3.2 1B / 3B and Llama 3 8B configs: HF
config.json in both transformers forms, Meta params.json, parameter counts written here
and counted by transformers itself."""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import ConfigError, ModelConfig

LLAMA3_SCALING = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}
COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "hidden_act": "silu",
    "mlp_bias": False,
    "rms_norm_eps": 1e-05,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
}

# Published config.json files as transformers 4.x wrote them (rope_theta + rope_scaling).
HF4 = {
    "llama-3.2-1b": {
        **COMMON,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_scaling": {**LLAMA3_SCALING, "rope_type": "llama3"},
        "tie_word_embeddings": True,
    },
    "llama-3.2-3b": {
        **COMMON,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_scaling": {**LLAMA3_SCALING, "rope_type": "llama3"},
        "tie_word_embeddings": True,
    },
    "llama-3-8b": {
        **COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 8192,
        "rope_scaling": None,
        "tie_word_embeddings": False,
    },
}
# The same files as transformers 5 writes them: theta and scaling together in rope_parameters.
HF5 = {
    "llama-3.2-1b": {
        **{k: v for k, v in HF4["llama-3.2-1b"].items() if k not in ("rope_theta", "rope_scaling")},
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", **LLAMA3_SCALING},
    },
    "llama-3.2-3b": {
        **{k: v for k, v in HF4["llama-3.2-3b"].items() if k not in ("rope_theta", "rope_scaling")},
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", **LLAMA3_SCALING},
    },
    "llama-3-8b": {
        **{k: v for k, v in HF4["llama-3-8b"].items() if k not in ("rope_theta", "rope_scaling")},
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    },
}
# Meta's params.json files.
META = {
    "llama-3.2-1b": {
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.5,
        "multiple_of": 256,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama-3.2-3b": {
        "dim": 3072,
        "n_layers": 28,
        "n_heads": 24,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.0,
        "multiple_of": 256,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama-3-8b": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
    },
}
# Published parameter counts and FFN sizes.
PARAMS = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3-8b": 8_030_261_248}
FFN = {"llama-3.2-1b": 8192, "llama-3.2-3b": 8192, "llama-3-8b": 14336}
TIED = {"llama-3.2-1b": True, "llama-3.2-3b": True, "llama-3-8b": False}
MODELS = list(PARAMS)
ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
)


@pytest.mark.parametrize("model", MODELS)
def test_hf_config_both_forms(model):
    old, new = ModelConfig.from_hf_dict(HF4[model]), ModelConfig.from_hf_dict(HF5[model])
    assert old == new
    assert old.num_parameters() == PARAMS[model]
    assert old.intermediate_size == FFN[model] and old.tie_word_embeddings is TIED[model]
    assert old.rope_scaling == (LLAMA3_SCALING if model.startswith("llama-3.2") else None)
    assert old.eos_token_ids == (128001,) and old.bos_token_id == 128000


@pytest.mark.parametrize("model", MODELS)
def test_parameter_count_matches_transformers(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**HF4[model]))
    assert sum(p.numel() for p in hf.parameters()) == PARAMS[model]


@pytest.mark.parametrize("model", MODELS)
def test_meta_params(model):
    config = ModelConfig.from_meta_params(META[model], llama_version="3.2")
    assert config.intermediate_size == FFN[model]
    # params.json cannot say whether the head is tied; the converter sets it from output.weight.
    tied = config.replace(tie_word_embeddings=TIED[model])
    assert tied.num_parameters() == PARAMS[model]
    published = ModelConfig.from_hf_dict(HF4[model])
    assert {f: getattr(config, f) for f in ARCHITECTURE} == {f: getattr(published, f) for f in ARCHITECTURE}


@pytest.mark.parametrize(("version", "factor"), [("3.1", 8.0), ("3.2", 32.0)])
def test_meta_rope_factor_from_llama_version(version, factor):
    config = ModelConfig.from_meta_params(META["llama-3.2-1b"], llama_version=version)
    assert config.rope_scaling == {**LLAMA3_SCALING, "factor": factor}


def test_meta_rope_factor_from_params_wins():
    params = {**META["llama-3.2-1b"], "rope_scaling_factor": 8.0}
    assert ModelConfig.from_meta_params(params, llama_version="3.2").rope_scaling["factor"] == 8.0


def test_meta_scaled_rope_needs_a_factor():
    with pytest.raises(ConfigError, match="--llama-version"):
        ModelConfig.from_meta_params(META["llama-3.2-1b"])


@pytest.mark.parametrize("model", MODELS)
def test_to_hf_dict_round_trips_through_transformers(model, tmp_path):
    from transformers import AutoConfig, LlamaConfig

    config = ModelConfig.from_hf_dict(HF4[model])
    hf = LlamaConfig(**config.to_hf_dict())
    assert ModelConfig.from_hf_dict(hf.to_dict()) == config
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.model_type, loaded.hidden_size, loaded.num_key_value_heads) == (
        "llama",
        HF4[model]["hidden_size"],
        8,
    )
    assert loaded.rope_parameters["rope_theta"] == 500000.0
    assert loaded.rope_parameters["rope_type"] == ("llama3" if config.rope_scaling else "default")
    assert ModelConfig.from_hf_dict(loaded.to_dict()) == config
