"""Exact parameter count and a training-memory estimate, from the config alone (no model is built).

    llm-lab estimate --model-config model_config.json --batch-size 8 --optimizer adamw
"""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.config import ModelConfig

# Optimizer state, in numbers per trainable parameter (fp32). Adafactor keeps factored row/column
# second moments (about (rows + cols) per matrix), approximated here per parameter as small.
OPTIMIZER_STATES = {"adamw": 2.0, "lion": 1.0, "sophia": 2.0, "muon": 1.0, "adafactor": 0.05}
LORA_TARGETS = {
    "minimal": ("q_proj", "v_proj"),
    "attention_only": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "ffn_only": ("gate_proj", "up_proj", "down_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """Per-block Linear layers: name -> (in_features, out_features, has_bias)."""
    d, hd = cfg.d_model, cfg.head_dim
    shapes = {
        "q_proj": (d, cfg.n_heads * hd, cfg.attention_bias),
        "k_proj": (d, cfg.n_kv_heads * hd, cfg.attention_bias),
        "v_proj": (d, cfg.n_kv_heads * hd, cfg.attention_bias),
        "o_proj": (cfg.n_heads * hd, d, False),
        "up_proj": (d, cfg.d_ff, False),
        "down_proj": (cfg.d_ff, d, False),
    }
    if cfg.activation == "swiglu":
        shapes["gate_proj"] = (d, cfg.d_ff, False)
    return shapes


def count_parameters(cfg: ModelConfig) -> int:
    """Equal to `sum(p.numel() for p in build_model(cfg).parameters())` (tested for every option)."""
    d = cfg.d_model
    norm = d * (2 if cfg.norm_type == "layernorm" else 1)
    block = 2 * norm + sum(i * o + (o if b else 0) for i, o, b in linear_shapes(cfg).values())
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return embed + cfg.n_layers * block + norm + head


def count_lora_parameters(cfg: ModelConfig, targets: tuple[str, ...] | list[str], r: int) -> int:
    """LoRA's A and B matrices for `targets`: each block's projections, and lm_head (d_model -> vocab) once."""
    shapes = linear_shapes(cfg)
    head = r * (cfg.d_model + cfg.vocab_size) if "lm_head" in targets else 0
    return cfg.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes) + head


@dataclass
class MemoryEstimate:
    parameters: int
    trainable: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.gradients_gb + self.optimizer_gb + self.activations_gb


def estimate_memory(cfg: ModelConfig, *, batch_size: int = 1, seq_len: int | None = None,
                    optimizer: str = "adamw", dtype: str = "fp32", lora_preset: str | None = None,
                    lora_r: int = 8, lora_targets: list[str] | None = None,
                    gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Training memory: weights, gradients and optimizer states of what trains, and activations.

    bf16 means bf16 autocast: fp32 master weights, gradients and states, activations in bf16. The
    activation term counts the tensors a block keeps for backward (about 34 d + 5 heads T bytes per
    token in bf16, after Korthikanti et al.), the logits, and halves nothing for fp32: a guide, not a
    guarantee.
    """
    T = seq_len or cfg.max_seq_len
    n = count_parameters(cfg)
    if lora_preset is not None:
        targets = lora_targets if lora_preset == "custom" else LORA_TARGETS[lora_preset]
        if cfg.activation != "swiglu" and lora_preset in ("ffn_only", "all"):
            targets = tuple(t for t in targets if t != "gate_proj")
        trainable = count_lora_parameters(cfg, targets or [], lora_r)
    else:
        trainable = n
    act_bytes = 2 if dtype == "bf16" else 4
    gb = 1024**3
    weights = n * 4 + (trainable * 4 if lora_preset else 0)
    grads = trainable * 4
    states = trainable * 4 * OPTIMIZER_STATES[optimizer]
    tokens = batch_size * T
    per_layer = tokens * (17 * cfg.d_model + 2.5 * cfg.n_heads * T) * act_bytes
    if gradient_checkpointing:
        per_layer = tokens * cfg.d_model * act_bytes
    logits = tokens * cfg.vocab_size * 4 * 2
    acts = cfg.n_layers * per_layer + logits
    return MemoryEstimate(n, trainable, weights / gb, grads / gb, states / gb, acts / gb)


FF_RATIO_RANGE = (1.0, 8.0)  # d_ff / d_model outside this is almost always a d_model changed without d_ff


def shape_notice(cfg: ModelConfig) -> str | None:
    """One line when d_ff is far from d_model's usual multiple (e.g. `configure d_model=256` keeps the
    default d_ff=4864, 19x), naming the usual value; None otherwise. Only advice: the config is kept."""
    ratio = cfg.d_ff / cfg.d_model
    if FF_RATIO_RANGE[0] <= ratio <= FF_RATIO_RANGE[1]:
        return None
    gated = cfg.activation == "swiglu"
    usual = -(-8 * cfg.d_model // 3 // 64) * 64 if gated else 4 * cfg.d_model  # SwiGLU: 8/3 x, to a multiple of 64
    return (f"notice: d_ff {cfg.d_ff} is {ratio:.1f}x d_model {cfg.d_model}; "
            f"{'SwiGLU (Llama-style) models use about 8/3x' if gated else 'plain MLPs use 4x'}: "
            f"d_ff={usual} (set it with d_ff=...)")
