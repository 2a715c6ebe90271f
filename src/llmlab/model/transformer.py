"""The LLM-Lab transformer: token embedding, optional additive positions, N pre-norm blocks, final norm,
LM head. Module names follow Llama/Qwen (`embed_tokens`, `layers.i.self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, `post_attention_layernorm`, `norm`, `lm_head`) so LoRA presets and the HF key map
work unchanged.

    model = build_model(ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, vocab_size=512))
    logits = model(input_ids)  # (B, T, vocab_size)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmlab.config import ModelConfig
from llmlab.model.attention import Attention, AttentionMask, MaskSpec
from llmlab.model.cache import KVCache
from llmlab.model.linear import decode_mm
from llmlab.model.mlp import build_mlp
from llmlab.model.norms import build_norm
from llmlab.model.positions import PositionScheme, build_positions


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, positions: PositionScheme) -> None:
        super().__init__()
        self.input_layernorm = build_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx, positions)
        self.post_attention_layernorm = build_norm(cfg)
        self.mlp = build_mlp(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.use_dropout = cfg.dropout > 0  # skip two module calls per block when there is none

    def forward(self, x: torch.Tensor, rope: Any, mask: MaskSpec, cache: KVCache | None = None) -> torch.Tensor:
        """rope: the position scheme's `prepare(position_ids)` (shared by all layers)."""
        a = self.self_attn(self.input_layernorm(x), rope, mask, cache)
        x = x + (self.resid_dropout(a) if self.use_dropout else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (self.resid_dropout(m) if self.use_dropout else m)


class Transformer(nn.Module):
    head_decode_weight: torch.Tensor | None = None  # lm_head's decode weight, only while decoding on CPU

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = build_positions(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.use_dropout = cfg.dropout > 0  # as in Block: decided here, never from the config in forward
        self.layers = nn.ModuleList(Block(cfg, i, self.positions) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # exactly nn.Linear (the chunked loss's fused path)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.attention_mask = AttentionMask(cfg, self.positions)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, zero biases, unit norms; residual output projections
        (o_proj, down_proj) scaled by 1/sqrt(2 n_layers) so the residual stream does not grow with depth."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj", "down_proj")) else 1
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm,)) or hasattr(module, "eps") and hasattr(module, "weight"):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V).

        attention_mask (B, past+T), 1 for real tokens: pass it only with left padding (generation);
        right padding in training needs no mask under causal attention.
        output_hidden: return the final normed hidden states (B, T, D) instead of logits (for chunked
        losses). last_only: logits for the last position only (B, 1, V) (generation prefill).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0  # an int, or a 0-d tensor (StaticKVCache)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).narrow(1, past, T)
            else:
                position_ids = (torch.arange(T, device=input_ids.device) + past).expand(B, T)
        if cache is not None:
            mask = cache.attention_mask(self.attention_mask, T, attention_mask, input_ids.device)
        else:
            mask = self.attention_mask(T, 0, attention_mask, input_ids.device)
        h = self.positions.embed(self.embed_tokens(input_ids), position_ids)  # (B, T, D)
        if self.use_dropout:
            h = self.embed_dropout(h)
        rope = self.positions.prepare(position_ids)  # cos/sin once for all layers
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, rope, mask, cache, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        h = self.norm(h)
        if output_hidden:
            return h
        if last_only:
            h = h[:, -1:]
        if self.head_decode_weight is not None and not torch.is_grad_enabled():
            return decode_mm(h, self.head_decode_weight)  # (B, T, V), see llmlab.model.decode
        return self.lm_head(h)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, max_len or self.config.max_seq_len)


def build_model(cfg: ModelConfig) -> Transformer:
    """A freshly initialised model for `cfg` (fp32, on CPU; move it with `.to(device)`)."""
    return Transformer(cfg)
