"""Key/value caches for generation: one preallocated buffer per layer, filled left to right.

Slots are shared by the whole batch (prompts are left-padded), so causality and sliding windows are
slot arithmetic; padding is masked through the attention mask the generation engine keeps.

`KVCache` counts its fill level in Python and hands attention the filled prefix (the least work, eager).
`StaticKVCache` keeps the fill level in a 0-d tensor and hands attention the whole buffer with unfilled
slots masked: no shape and no Python number changes from one decode step to the next, so a
`torch.compile`d step is traced once (`generate_tokens(..., compile=True)`); `mark_dynamic()` lets that
one trace serve buffers of any length. On CUDA that step is replayed as a CUDA graph, which reads and
writes the cache at fixed addresses: `mark_static()` says so, and `reset()` lets the next generation reuse
the same buffers (and so the recorded graph).
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

    def attention_mask(self, builder, q_len: int, key_padding: torch.Tensor | None, device):
        """The mask for q_len new queries (`builder`: the model's `AttentionMask`)."""
        return builder(q_len, self.length, key_padding, device)


class StaticKVCache(KVCache):
    """Whole-buffer attention, fill level as a tensor (see the module docstring). `key_padding` given to
    the model must then cover all `max_len` slots."""

    def __init__(self, n_layers: int, max_len: int, device=None) -> None:
        super().__init__(n_layers, max_len)
        self.length = torch.zeros((), dtype=torch.long, device=device)  # filled slots, a 0-d tensor

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, T, hd) at slots [length, length+T); return the whole buffers."""
        if self.k[layer] is None or self.k[layer].dtype != k.dtype:  # a kept cache (graph_cache) meets a recast model
            # zeros: unfilled slots are read (and masked), never garbage
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        slots = self.length + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        self.length.add_(n)

    def reset(self) -> None:
        """Empty, for a new generation of the same batch size, in place (same buffers, same addresses)."""
        self.length.zero_()
        for buf in self.k + self.v:
            if buf is not None:
                buf.zero_()

    def mark_static(self) -> None:
        """Tell torch.compile the buffers and the fill level stay at their addresses between calls, so a
        CUDA graph may write them in place rather than skip graphing the step."""
        for buf in [*self.k, *self.v, self.length]:
            if buf is not None:
                torch._dynamo.mark_static_address(buf)

    def mark_dynamic(self) -> None:
        """Tell torch.compile the buffers' length varies between calls (after the prefill allocated them)."""
        for buf in self.k + self.v:
            if buf is not None:
                torch._dynamo.mark_dynamic(buf, 2)

    def attention_mask(self, builder, q_len: int, key_padding: torch.Tensor | None, device):
        slots = self.max_len if self.k[0] is None else self.k[0].shape[2]  # the buffer's own (maybe symbolic) size
        return builder.static(q_len, self.length, key_padding, slots, device)
