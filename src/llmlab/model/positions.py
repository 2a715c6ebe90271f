"""Position schemes. Each answers four questions the transformer asks, so `forward` never branches on
the config string:

- `embed(h, position_ids)`: what to add to the token embeddings (sinusoidal only);
- `prepare(position_ids)` once per forward pass, then `rotate(x, prepared)` in every layer: how to
  rotate queries and keys, (B, heads, T, head_dim) (rope, yarn: the cos/sin tables are computed once
  and shared by the layers);
- `score_bias(q_slots, k_slots)`: an additive bias on attention scores, (heads, Tq, Tk) (alibi), or None;
- `step_prepare(max_len)`: a faster `prepare` for decode steps (rope, yarn: lookups in tables made once).

RoPE follows the Llama "rotate_half" layout (first half / second half of each head), which is what
Hugging Face checkpoints expect. YaRN (Peng et al. 2023) interpolates low frequencies by the scale
factor, keeps high frequencies, ramps in between, and scales attention by 0.1 ln(s) + 1; with factor 1
it is exactly RoPE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ModelConfig


class PositionScheme(nn.Module):
    """Default: no position signal (each subclass overrides what it uses)."""

    has_score_bias = False

    def embed(self, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return h

    def prepare(self, position_ids: torch.Tensor) -> Any:
        """What `rotate` needs, computed once per forward pass and shared by all layers."""
        return position_ids

    def rotate(self, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        return x

    def step_prepare(self, max_len: int) -> Callable[[torch.Tensor], Any]:
        """`prepare` for decode steps at positions below max_len: by default `prepare` itself."""
        return self.prepare

    def score_bias(self, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor | None:
        return None


class Sinusoidal(PositionScheme):
    """Fixed sin/cos table (Vaswani et al.) added to the token embeddings."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(pos * div)
        table[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def embed(self, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return h + self.table[position_ids].to(h.dtype)  # (B, T, D)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) along the last dim: one `roll` (chunk + cat were two ops; in a CPU decode step,
    where every op is slow after the weights stream through the caches, -0.05 ms a token; in training
    within 0.1 ms a step)."""
    return x.roll(x.shape[-1] // 2, -1)


class Rotary(PositionScheme):
    """RoPE with given inverse frequencies and an attention temperature (1 for plain RoPE)."""

    def __init__(self, inv_freq: torch.Tensor, attn_factor: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attn_factor = attn_factor

    def prepare(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin, (B, 1, T, hd) in fp32: rotate_half(x) * sin == swap(x) * signed_sin,
        where swap exchanges the halves and signed_sin is (-sin, sin) (negation is exact)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attn_factor != 1.0:
            cos, sin = cos * self.attn_factor, sin * self.attn_factor
        return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]

    def step_prepare(self, max_len: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """`prepare` for decode steps at positions below max_len, as two row lookups in cos/sin tables made
        once (the same values: each entry is the same element-wise computation); per step that is two
        ops instead of `prepare`'s eight."""
        cos, sin = self.prepare(torch.arange(max_len, device=self.inv_freq.device)[None])
        cos, sin = cos[0, 0], sin[0, 0]  # (max_len, hd)
        return lambda position_ids: (F.embedding(position_ids, cos)[:, None], F.embedding(position_ids, sin)[:, None])

    def rotate(self, x: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: (B, heads, T, hd); cos, signed_sin: (B, 1, T, hd)
        cos, sin = prepared
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + _swap_halves(x) * sin


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and attention factor ("NTK-by-parts" interpolation + temperature)."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor
    orig = cfg.yarn_original_len

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = rope_inv_freq(dim, base)
    interpolation = extrapolation / factor
    keep = 1.0 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    attn_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attn_factor


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.: geometric slopes 2^(-8i/n); for non powers of two, interleave from the next one."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


class ALiBi(PositionScheme):
    """No position embedding; score bias -slope_h * (i - j) for key j before query i."""

    has_score_bias = True

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def score_bias(self, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
        distance = (q_slots[:, None] - k_slots[None, :]).clamp(min=0).float()  # (Tq, Tk)
        return -self.slopes[:, None, None] * distance[None]  # (H, Tq, Tk)


def build_positions(cfg: ModelConfig) -> PositionScheme:
    def yarn() -> PositionScheme:
        inv_freq, attn_factor = yarn_inv_freq(cfg)
        return Rotary(inv_freq, attn_factor)

    schemes = {
        "sinusoidal": lambda: Sinusoidal(cfg.d_model, cfg.max_seq_len),
        "rope": lambda: Rotary(rope_inv_freq(cfg.head_dim, cfg.rope_theta)),
        "yarn": yarn,
        "alibi": lambda: ALiBi(cfg.n_heads),
    }
    return schemes[cfg.positional_encoding]()
