"""A static key/value cache for generation: one preallocated buffer per layer, filled left to right.

Slots are shared by the whole batch (prompts are left-padded), so causality and sliding windows are
slot arithmetic; padding is masked through the attention mask the generation engine keeps.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0  # filled slots
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, T, hd) at slots [length, length+T); return the filled prefix of the buffers."""
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_empty(shape)
            self.v[layer] = v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} slots needed, {self.max_len} allocated")
        kb, vb = self.k[layer], self.v[layer]
        kb.narrow(2, self.length, k.shape[2]).copy_(k)
        vb.narrow(2, self.length, v.shape[2]).copy_(v)
        return kb.narrow(2, 0, end), vb.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (drop finished sequences)."""
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if k is not None:
                self.k[i], self.v[i] = k[index], v[index]
