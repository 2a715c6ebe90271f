"""Normalisation layers: RMSNorm (Llama/Qwen) and LayerNorm, chosen once from `norm_type`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ModelConfig


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as HF Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(dtype)


def build_norm(cfg: ModelConfig) -> nn.Module:
    norms = {
        "rmsnorm": lambda: RMSNorm(cfg.d_model, cfg.norm_eps),
        "layernorm": lambda: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
    }
    return norms[cfg.norm_type]()
