"""The model's linear layer: `nn.Linear` (same parameters, state-dict keys, and LoRA / HF compatibility)
that multiplies by a decode weight while generating on CPU (see `llmlab.model.decode`), and the two
helpers that make and use decode weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def decode_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) times a decode weight w (P, out / P, in): the (out, in) weight cut into P row blocks.
    `torch.bmm` over the blocks reads the weight at close to memory bandwidth where MKL's one-row
    product does not (see `llmlab.model.decode`)."""
    P, n, K = w.shape
    R = x.numel() // K
    # the rows enter as the transpose of (R, in), strides (0, 1, in): given as a fresh (in, R) column
    # instead, strides (in, R, 1), MKL's batched product took a path 10x slower here
    if R == 1 and x.stride(-1) == 1:  # the decode step at batch 1: views only around the product
        y = torch.bmm(w, x.as_strided((P, K, 1), (0, 1, K)))  # (P, n, 1): the output's memory order
        return y.view(*x.shape[:-1], P * n)
    y = torch.bmm(w, x.reshape(1, R, K).transpose(1, 2).expand(P, K, R))  # (P, n, R)
    return y.permute(2, 0, 1).reshape(*x.shape[:-1], P * n)


def split_count(out_features: int, threads: int) -> int:
    """Row blocks for a decode weight: one per thread, at least 4 (a split pays even on one thread)."""
    for p in (max(4, threads), 4, 2):
        if out_features % p == 0:
            return p
    return 1


def pack(weights: list[torch.Tensor], threads: int) -> torch.Tensor:
    """(out_i, in) weights -> the decode weight of their concatenated outputs, (P, out / P, in). A single
    weight is only viewed (no copy); several are concatenated (one copy)."""
    w = weights[0] if len(weights) == 1 else torch.cat(weights, 0)
    P = split_count(w.shape[0], threads)
    return w.view(P, w.shape[0] // P, w.shape[1])


def plain(*modules: nn.Module, kind: type | None = None) -> bool:
    """Exactly `kind` (default: our Linear), with no hooks: computing its product elsewhere (fused with
    its siblings while decoding) changes nothing. A PEFT-wrapped or hooked projection is never fused."""
    kind = kind or Linear
    return all(type(m) is kind and not (m._forward_hooks or m._forward_pre_hooks) for m in modules)


class Linear(nn.Linear):
    decode_weight: torch.Tensor | None = None  # set by `llmlab.model.decode.decode_weights` while decoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt = self.decode_weight
        if wt is None or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        y = decode_mm(x, wt)
        return y if self.bias is None else y + self.bias
