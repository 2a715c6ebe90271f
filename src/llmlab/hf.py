"""The boundary with Hugging Face transformers: one key-mapping table and the config translation for
Llama / Qwen2 / Mistral layouts. HF names live only here.

LLM-Lab keys equal HF's `LlamaForCausalLM` keys without the `model.` prefix, so the table is a prefix
rule plus the head.
"""

from __future__ import annotations

from typing import Any

import torch

from llmlab.config import ModelConfig
from llmlab.errors import ConfigError


def hf_key_to_llmlab(key: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`; None to drop."""
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        rest = key[len("model."):]
        if "rotary_emb" in rest:
            return None
        return rest
    return None


def llmlab_key_to_hf(key: str) -> str:
    return key if key == "lm_head.weight" else f"model.{key}"


def hf_state_to_llmlab(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        nk = hf_key_to_llmlab(k)
        if nk is not None:
            out[nk] = v
    return out


def llmlab_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {llmlab_key_to_hf(k): v for k, v in state.items()}


def model_config_from_hf(hf: Any, tokenizer_name: str = "Qwen/Qwen2.5-0.5B") -> ModelConfig:
    """A transformers Llama/Qwen2/Mistral config -> ModelConfig (rope or yarn, rmsnorm, swiglu)."""
    model_type = getattr(hf, "model_type", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ConfigError(f"model_type {model_type!r} is not supported for import; supported: llama, qwen2, mistral")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf.hidden_act!r} has no LLM-Lab equivalent (swiglu uses silu)")
    n_heads, n_kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    if head_dim * n_heads != hf.hidden_size:
        raise ConfigError("head_dim * num_attention_heads != hidden_size: not representable in LLM-Lab")
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kw: dict[str, Any] = {}
    if rope_type == "yarn":
        kw = dict(positional_encoding="yarn", rope_scaling_factor=float(rope["factor"]),
                  original_max_seq_len=rope.get("original_max_position_embeddings"),
                  yarn_beta_fast=float(rope.get("beta_fast", 32.0)), yarn_beta_slow=float(rope.get("beta_slow", 1.0)))
    elif rope_type not in ("default", None):
        raise ConfigError(f"rope scaling {rope_type!r} is not supported; supported: default, yarn")
    sliding = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if model_type == "llama" and getattr(hf, "attention_bias", False):
        raise ConfigError("Llama attention_bias also biases o_proj, which LLM-Lab does not have")
    attention_type = "mha" if n_kv == n_heads else ("mqa" if n_kv == 1 else "gqa")
    return ModelConfig(
        tokenizer_name=tokenizer_name,
        positional_encoding=kw.pop("positional_encoding", "rope"),
        attention_type=attention_type, norm_type="rmsnorm", activation="swiglu",
        d_model=hf.hidden_size, n_heads=n_heads, n_kv_heads=n_kv, d_ff=hf.intermediate_size,
        n_layers=hf.num_hidden_layers, vocab_size=hf.vocab_size, max_seq_len=hf.max_position_embeddings,
        sliding_window=sliding, attention_bias=model_type == "qwen2", norm_eps=hf.rms_norm_eps,
        rope_theta=float(theta), tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), **kw,
    )
