"""One model config for every checkpoint format (HF config.json in both transformers forms,
Meta params.json, GGUF metadata), so that nothing downstream cares where a model came from."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: llama3 rope scaling factor by Llama version, for Meta checkpoints whose params.json
#: says ``use_scaled_rope`` without the factor (Llama 3.1 used 8, Llama 3.2 uses 32).
LLAMA3_ROPE_FACTOR_BY_VERSION = {"3.1": 8.0, "3.2": 32.0}
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_value(key: str, value: float) -> float | int:
    return int(value) if key == "original_max_position_embeddings" else float(value)


class ConfigError(ValueError):
    """A config file is missing a field or describes a model this engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    #: None for plain RoPE, else the llama3 parameters (factor, low/high_freq_factor,
    #: original_max_position_embeddings).
    rope_scaling: dict[str, float] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    # ---- readers -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read an HF LlamaConfig dict, transformers 4.x (rope_theta/rope_scaling) or 5.x (rope_parameters)."""
        try:
            rope = dict(d.get("rope_parameters") or {})
            theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
            scaling = rope if rope.get("rope_type", "default") != "default" else None
            if scaling is None and d.get("rope_scaling"):
                scaling = dict(d["rope_scaling"])
            if scaling is not None:
                kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
                if kind != "llama3":
                    raise ConfigError(f"unsupported rope scaling type {kind!r} (only default and llama3)")
                scaling = {k: _llama3_value(k, v) for k, v in scaling.items() if k in ("factor", *LLAMA3_ROPE_DEFAULTS)}
            heads = d["num_attention_heads"]
            eos = d.get("eos_token_id")
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=d.get("max_position_embeddings", 8192),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
                pad_token_id=d.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config has no field {e.args[0]!r}") from None

    @classmethod
    def from_meta_params(cls, p: dict[str, Any], llama_version: str | None = None) -> ModelConfig:
        """Read Meta's params.json; the FFN size is derived as Meta's reference code derives it."""
        try:
            dim, heads = p["dim"], p["n_heads"]
            ffn = int(2 * (4 * dim) / 3)
            if p.get("ffn_dim_multiplier") is not None:
                ffn = int(p["ffn_dim_multiplier"] * ffn)
            multiple_of = p.get("multiple_of", 256)
            ffn = multiple_of * ((ffn + multiple_of - 1) // multiple_of)
            scaling = None
            if p.get("use_scaled_rope"):
                factor = p.get("rope_scaling_factor")
                if factor is None:
                    if llama_version not in LLAMA3_ROPE_FACTOR_BY_VERSION:
                        raise ConfigError(
                            "params.json sets use_scaled_rope but no rope_scaling_factor: "
                            "pass --llama-version 3.1 (factor 8) or 3.2 (factor 32)"
                        )
                    factor = LLAMA3_ROPE_FACTOR_BY_VERSION[llama_version]
                scaling = {"factor": float(factor), **LLAMA3_ROPE_DEFAULTS}
            return cls(
                vocab_size=p["vocab_size"],
                hidden_size=dim,
                intermediate_size=ffn,
                num_layers=p["n_layers"],
                num_heads=heads,
                num_kv_heads=p.get("n_kv_heads") or heads,
                head_dim=dim // heads,
                rms_norm_eps=float(p.get("norm_eps", 1e-5)),
                rope_theta=float(p.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                max_position_embeddings=131072 if scaling else 8192,
                # Llama 3.2 1B/3B tie the output to the embeddings; Meta marks it by the
                # absence of output.weight, which the converter checks and passes on.
                tie_word_embeddings=False,
                bos_token_id=128000,
                eos_token_ids=(128001, 128008, 128009),
            )
        except KeyError as e:
            raise ConfigError(f"params.json has no field {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, path: str | Path) -> ModelConfig:
        """Read a GGUF file's metadata through transformers' own GGUF reader."""
        from transformers import AutoConfig

        path = Path(path)
        hf = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if hf.model_type != "llama":
            raise ConfigError(f"{path}: architecture {hf.model_type!r} is not llama")
        return cls.from_hf_dict(hf.to_dict())

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (is {model_dir} a converted shard directory?)") from None
        except (json.JSONDecodeError, ConfigError) as e:
            raise ConfigError(f"{path}: {e}") from None

    # ---- writers and derived values ------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """An HF config.json that transformers 4.4x and 5.x both load as LlamaForCausalLM."""
        eos = list(self.eos_token_ids)
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"rope_type": "llama3", **self.rope_scaling} if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "mlp_bias": False,
        }
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_parameters(self) -> int:
        h = self.hidden_size
        attention = 2 * h * self.q_size + 2 * h * self.kv_size
        return attention + 3 * h * self.intermediate_size + 2 * h

    def num_parameters(self) -> int:
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        return embeddings + self.num_layers * self.layer_parameters() + self.hidden_size + head
