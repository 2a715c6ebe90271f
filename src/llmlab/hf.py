"""The boundary with Hugging Face transformers: one key-mapping table and the config translation for
Llama / Qwen2 / Mistral layouts, both ways. HF names live only here (file I/O is in `llmlab.interop`).

LLM-Lab keys equal HF's `LlamaForCausalLM` keys without the `model.` prefix, so the table is a prefix
rule plus the head; a LoRA adapter's keys (PEFT format) follow the same rule under PEFT's own prefix.
"""

from __future__ import annotations

from typing import Any

import torch

from llmlab.config import ModelConfig
from llmlab.errors import CheckpointError, ConfigError


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
    """`layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj.weight`; the head keeps its
    name. The same rule maps module names (`layers.0.mlp.up_proj`, `lm_head`) and keys under a module
    (`lm_head.lora_A.weight`)."""
    return key if key.split(".", 1)[0] == "lm_head" else f"model.{key}"


def hf_state_to_llmlab(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        nk = hf_key_to_llmlab(k)
        if nk is not None:
            out[nk] = v
    return out


def llmlab_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {llmlab_key_to_hf(k): v for k, v in state.items()}


PEFT_PREFIX = "base_model.model."  # what PEFT puts before the wrapped model's names in an adapter's keys


def llmlab_adapter_key_to_hf(key: str) -> str:
    """A PEFT adapter key on an LLM-Lab model -> the same key on the transformers model:
    `base_model.model.layers.0.self_attn.q_proj.lora_A.weight` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (`lm_head.lora_A.weight` stays)."""
    if not key.startswith(PEFT_PREFIX):
        raise CheckpointError(f"adapter tensor {key!r} does not start with {PEFT_PREFIX!r}, so it is not a PEFT "
                              f"LoRA adapter of an LLM-Lab model; pass an adapter folder LLM-Lab saved")
    return PEFT_PREFIX + llmlab_key_to_hf(key[len(PEFT_PREFIX):])


def llmlab_adapter_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {llmlab_adapter_key_to_hf(k): v for k, v in state.items()}


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
    layer_types = getattr(hf, "layer_types", None) or []
    if sliding is not None and layer_types and "sliding_attention" not in layer_types:
        sliding = None  # e.g. Qwen2 with max_window_layers >= num_hidden_layers: transformers windows no layer
    if sliding is not None and len(set(layer_types)) > 1:
        raise ConfigError(f"{model_type} with sliding_window on some layers only (layer_types mixes "
                          f"{sorted(set(layer_types))}, max_window_layers={getattr(hf, 'max_window_layers', '?')}) "
                          f"is not supported; LLM-Lab windows every layer or none")
    if model_type == "llama" and getattr(hf, "attention_bias", False):
        raise ConfigError("Llama attention_bias=True also biases o_proj, which LLM-Lab does not have; "
                          "only attention_bias=False Llama models can be imported")
    if getattr(hf, "mlp_bias", False):
        raise ConfigError(f"{model_type} mlp_bias=True (biases on gate/up/down_proj) has no LLM-Lab equivalent; "
                          f"only mlp_bias=False models can be imported")
    attention_type = "mha" if n_kv == n_heads else ("mqa" if n_kv == 1 else "gqa")
    return ModelConfig(
        tokenizer_name=tokenizer_name,
        positional_encoding=kw.pop("positional_encoding", "rope"),
        attention_type=attention_type, norm_type="rmsnorm", activation="swiglu",
        d_model=hf.hidden_size, n_heads=n_heads, n_kv_heads=n_kv, d_ff=hf.intermediate_size,
        n_layers=hf.num_hidden_layers, vocab_size=hf.vocab_size, max_seq_len=hf.max_position_embeddings,
        sliding_window=sliding, attention_bias=model_type == "qwen2", norm_eps=hf.rms_norm_eps,
        rope_theta=float(theta), tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=float(getattr(hf, "initializer_range", None) or 0.02), **kw,
    )


# --------------------------------------------------------------------------------------------------
# LLM-Lab -> transformers
# --------------------------------------------------------------------------------------------------

EXPORT_SUPPORTED = "export-hf supports rope and yarn, rmsnorm, swiglu, mha/gqa/mqa"


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers family that reproduces `cfg` exactly, or a ConfigError naming the first option
    with no equivalent. Bias on q/k/v is Qwen2's layout; a window without bias is Mistral's."""
    if cfg.positional_encoding not in ("rope", "yarn"):
        raise ConfigError(f"positional_encoding={cfg.positional_encoding!r} has no transformers Llama/Qwen2 "
                          f"equivalent; {EXPORT_SUPPORTED}")
    if cfg.norm_type != "rmsnorm":
        raise ConfigError(f"norm_type={cfg.norm_type!r} has no transformers Llama/Qwen2 equivalent; "
                          f"{EXPORT_SUPPORTED}")
    if cfg.activation != "swiglu":
        raise ConfigError(f"activation={cfg.activation!r} has no transformers Llama/Qwen2 equivalent; "
                          f"{EXPORT_SUPPORTED}")
    if cfg.attention_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def hf_rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' `rope_parameters` for rope or yarn (the keys `model_config_from_hf` reads back)."""
    if cfg.positional_encoding == "yarn":
        return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor,
                "original_max_position_embeddings": cfg.yarn_original_len,
                "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}


def hf_config_from_llmlab(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                          pad_token_id: int | None = None) -> Any:
    """ModelConfig -> a transformers LlamaConfig / MistralConfig / Qwen2Config with the same maths."""
    import transformers

    model_type = hf_model_type(cfg)
    common = dict(
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters=hf_rope_parameters(cfg), tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_dropout=0.0, initializer_range=cfg.init_std,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, dtype="float32",
    )
    if model_type == "qwen2":
        windowed = cfg.sliding_window is not None
        hf = transformers.Qwen2Config(**common, use_sliding_window=windowed, sliding_window=cfg.sliding_window,
                                      max_window_layers=0)
        hf.architectures = ["Qwen2ForCausalLM"]
    elif model_type == "mistral":
        hf = transformers.MistralConfig(**common, sliding_window=cfg.sliding_window)
        hf.architectures = ["MistralForCausalLM"]
    else:
        hf = transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False)
        hf.architectures = ["LlamaForCausalLM"]
    return hf
