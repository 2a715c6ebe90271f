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
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused call
        y = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * y.to(x.dtype)


def build_norm(cfg: ModelConfig) -> nn.Module:
    norms = {
        "rmsnorm": lambda: RMSNorm(cfg.d_model, cfg.norm_eps),
        "layernorm": lambda: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
    }
    return norms[cfg.norm_type]()
