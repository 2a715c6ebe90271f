"""Causal self-attention with MHA / GQA / MQA, optional sliding window, ALiBi bias and a KV cache.

Uses `torch.nn.functional.scaled_dot_product_attention`. The mask is built once per forward pass by
`AttentionMask` (shared by all layers); when plain causal attention suffices it passes no mask at all so
that fused kernels run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ModelConfig
from llmlab.model.cache import KVCache
from llmlab.model.causal_blocks import block_causal_attention, rows_for
from llmlab.model.linear import Linear, decode_mm
from llmlab.model.positions import PositionScheme


@dataclass
class MaskSpec:
    """What every layer passes to SDPA: an additive/boolean mask, or `is_causal`."""

    mask: torch.Tensor | None  # bool (B|1, 1, Tq, Tk) or float (B|1, H|1, Tq, Tk)
    is_causal: bool
    block_rows: int = 0  # plain causal on CPU: query rows per block for `block_causal_attention` in training (0: none)


class AttentionMask:
    """Builds the attention mask. Resolved at build time: whether a window or a score bias forces an
    explicit mask; at run time: whether padding or cached context does."""

    def __init__(self, cfg: ModelConfig, positions: PositionScheme) -> None:
        self.window = cfg.sliding_window
        self.positions = positions
        self.always_explicit = cfg.sliding_window is not None or positions.has_score_bias
        self.group = cfg.n_heads // cfg.n_kv_heads  # query heads per KV head (`rows_for`)

    def __call__(self, q_len: int, past: int, key_padding: torch.Tensor | None, device) -> MaskSpec:
        k_len = past + q_len
        if not self.always_explicit:
            if key_padding is None and past == 0:
                rows = rows_for(q_len, self.group) if torch.device(device).type == "cpu" else 0
                return MaskSpec(None, is_causal=q_len > 1, block_rows=rows)
            if q_len == 1:  # one new query sees every filled slot: padding is the only mask
                if key_padding is None:
                    return MaskSpec(None, is_causal=False)
                allowed = key_padding[:, None, None, :k_len] != 0  # (B, 1, 1, Tk), a fresh tensor
                allowed[..., -1] = True  # its own slot, as below
                return MaskSpec(allowed, is_causal=False)
        q_slots = torch.arange(past, k_len, device=device)
        k_slots = torch.arange(k_len, device=device)
        return self.explicit(q_slots, k_slots, None if key_padding is None else key_padding[:, :k_len])

    def static(self, q_len: int, past: torch.Tensor, key_padding: torch.Tensor | None, slots: int, device) -> MaskSpec:
        """For a `StaticKVCache`: queries at slots past .. past + q_len - 1 (past a 0-d tensor) against
        all `slots` keys of the buffer, unfilled ones masked. Same shapes at every step."""
        q_slots = past + torch.arange(q_len, device=device)
        k_slots = torch.arange(slots, device=device)
        return self.explicit(q_slots, k_slots, None if key_padding is None else key_padding[:, :slots])

    def explicit(self, q_slots: torch.Tensor, k_slots: torch.Tensor, key_padding: torch.Tensor | None) -> MaskSpec:
        """Causal (and windowed) mask of these query slots over these key slots, with padding and any
        score bias."""
        allowed = k_slots[None, :] <= q_slots[:, None]  # (Tq, Tk)
        if self.window is not None:
            allowed = allowed & (q_slots[:, None] - k_slots[None, :] < self.window)
        allowed = allowed[None, None]  # (1, 1, Tq, Tk)
        if key_padding is not None:
            allowed = allowed & key_padding[:, None, None, :].bool()
            # a padding query would see nothing (NaN softmax): let every query see its own slot
            allowed = allowed | (k_slots[None, :] == q_slots[:, None])[None, None]
        bias = self.positions.score_bias(q_slots, k_slots)
        if bias is None:
            return MaskSpec(allowed, is_causal=False)
        neg = torch.finfo(torch.float32).min
        return MaskSpec(bias[None].masked_fill(~allowed, neg), is_causal=False)


class Attention(nn.Module):
    # q/k/v weights (and biases) fused for CPU decoding, set only while decoding (llmlab.model.decode)
    qkv_decode: torch.Tensor | None = None
    qkv_decode_bias: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig, layer_idx: int, positions: PositionScheme) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = Linear(d, cfg.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = Linear(d, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = Linear(d, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.n_heads * hd, d, bias=False)
        self.positions = positions
        self.dropout = cfg.dropout
        self.sdpa_kwargs = {"enable_gqa": True} if cfg.n_kv_heads != cfg.n_heads else {}

    def heads(self, x: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q (B, H, T, hd), k and v (B, Hkv, T, hd), q and k rotated."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_decode is None or torch.is_grad_enabled():
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)
            k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
            v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
            return self.positions.rotate(q, rope), self.positions.rotate(k, rope), v
        # decoding: one product for q, k and v, one rotation for q and k together
        y = decode_mm(x, self.qkv_decode)
        if self.qkv_decode_bias is not None:
            y = y + self.qkv_decode_bias
        y = y.view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H + 2 Hkv, T, hd)
        qk, v = y.split([H + Hkv, Hkv], 1)
        q, k = self.positions.rotate(qk, rope).split([H, Hkv], 1)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Any, mask: MaskSpec, cache: KVCache | None = None) -> torch.Tensor:
        """rope: the position scheme's `prepare(position_ids)`, computed once per forward pass."""
        return self.o_proj(self.attend(x, rope, mask, cache))

    def attend(self, x: torch.Tensor, rope: Any, mask: MaskSpec, cache: KVCache | None = None) -> torch.Tensor:
        """The heads' outputs, (B, T, H * hd): everything `forward` does before the output projection."""
        B, T, _ = x.shape
        q, k, v = self.heads(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, past+T, hd)
        if mask.block_rows and q.requires_grad and q.dtype == torch.float32 and not (self.training and self.dropout):
            y = block_causal_attention(q, k, v, mask.block_rows)  # CPU training: batched products, masked part skipped
        else:
            attn_mask = mask.mask
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                attn_mask = attn_mask.to(q.dtype)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=mask.is_causal,
                dropout_p=self.dropout if self.training else 0.0, **self.sdpa_kwargs,
            )  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
