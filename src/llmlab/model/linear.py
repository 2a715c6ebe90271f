"""The model's linear layer: `nn.Linear` (same parameters, state-dict keys, and LoRA / HF compatibility)
that can multiply by a transposed copy of its weight while generating on CPU.

Decoding multiplies one row per sequence by every weight matrix. On CPU the BLAS computes
`x @ W.T` with W stored (out, in) for so few rows markedly slower than `x @ Wt` with Wt stored
(in, out), contiguous (about 2x per matrix on this project's 2-core AMD machine, see
`bench/generation.py`). `decode_weights(model)` holds such copies for the duration of one generation
call, so decoding reads the fast layout; it costs one extra copy of the linear weights while it runs
and is never used with gradients enabled, so training and everything outside generation see plain
`nn.Linear`.

The LM head stays a plain `nn.Linear` (the chunked loss in `llmlab.train.losses` takes its fused path
only for exactly that type); its transposed copy lives on the transformer (`head_decode_weight`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    decode_weight: torch.Tensor | None = None  # (in, out) contiguous copy, set by `decode_weights`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt = self.decode_weight
        if wt is None or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        y = x @ wt  # (..., out)
        return y if self.bias is None else y + self.bias


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


@contextlib.contextmanager
def decode_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, every CPU `Linear` of `model` multiplies by a transposed copy of its weight
    (taken on entry: do not change the weights inside the block). Freed on exit."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.weight.device.type == "cpu"]
    # the head's copy bypasses lm_head.forward, so a head with hooks (user code, tests) keeps its module
    heads = [m for m in model.modules() if hasattr(m, "head_decode_weight") and type(m.lm_head) is nn.Linear
             and m.lm_head.weight.device.type == "cpu" and not _has_hooks(m.lm_head)]
    try:
        with torch.no_grad():
            for m in layers:
                m.decode_weight = m.weight.t().contiguous()
            for m in heads:
                m.head_decode_weight = m.lm_head.weight.t().contiguous()
        yield
    finally:
        for m in layers:
            m.decode_weight = None
        for m in heads:
            m.head_decode_weight = None
