"""Feed-forward blocks. SwiGLU is gated (gate_proj, up_proj, down_proj, as in Llama); the other
activations use up_proj -> activation -> down_proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ModelConfig
from llmlab.model.linear import Linear, decode_mm


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    gate_up_decode: torch.Tensor | None = None  # gate/up weights fused for CPU decoding (llmlab.model.decode)

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff, bias=False)
        self.up_proj = Linear(d_model, d_ff, bias=False)
        self.down_proj = Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x), the input of down_proj."""
        if self.gate_up_decode is None or torch.is_grad_enabled():
            return F.silu(self.gate_proj(x)) * self.up_proj(x)
        gate, up = decode_mm(x, self.gate_up_decode).chunk(2, -1)  # one product for the two
        return F.silu(gate) * up


class MLP(nn.Module):
    """down(act(up(x)))."""

    def __init__(self, d_model: int, d_ff: int, act: nn.Module) -> None:
        super().__init__()
        self.up_proj = Linear(d_model, d_ff, bias=False)
        self.act = act
        self.down_proj = Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(up(x)), the input of down_proj."""
        return self.act(self.up_proj(x))


def build_mlp(cfg: ModelConfig) -> nn.Module:
    plain = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}
    if cfg.activation == "swiglu":
        return GatedMLP(cfg.d_model, cfg.d_ff)
    return MLP(cfg.d_model, cfg.d_ff, plain[cfg.activation]())
