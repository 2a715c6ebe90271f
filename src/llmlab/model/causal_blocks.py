"""Causal attention on CPU that skips the masked half.

PyTorch's CPU flash-attention kernel cuts the keys into blocks of up to 512 and, under `is_causal`,
still computes (then masks) every key of a block that any query of the tile can see: for sequences up
to 512 it computes the whole T x T score matrix, and at 1,024 most of it. Measured on this project's
2-core machine (fwd + bwd, 2,048 tokens, 6 heads of 64): `is_causal` took as long as no mask at all at
T = 256 and longer at T = 512.

`block_causal_attention` computes the same attention as a sum of pieces that need no mask except on
the diagonal. With the sequence cut into 2^L blocks:

- the diagonal blocks: causal attention of each block on itself (one kernel call, the blocks stacked
  as a batch);
- at each level l = 0 .. L-1, the sequence is cut into 2^l segments, and the second half of each
  segment attends to its first half with no mask (one call per level, segments stacked as a batch).

Every (query, key) pair below the diagonal is in exactly one piece. The pieces' outputs are merged with
their log-sum-exps (o = sum_i o_i exp(lse_i - lse), lse = logaddexp of the lse_i), which is exact.
Backward calls the kernel's own backward on each piece with the merged output and log-sum-exp: the
softmax gradient of a row needs only those two and the piece's own scores, so the pieces' gradients
sum to the exact gradient. Work: 1/2 + 1/2^(L+1) of the full matrix instead of all of it.

All the pieces are views of the (B, T, heads, head_dim) projections: the kernel takes strided inputs.
Used by `Attention` for fp32 causal self-attention with gradients on CPU, without a mask or dropout,
for sequences of 256 to 512 that split evenly (`levels_for`); everything else goes to
`scaled_dot_product_attention`. Measured (fwd + bwd, 2,048 tokens, 6 heads, 2 KV heads, 2 threads):
T = 256 20.3 -> 18.4 ms, T = 512 47 -> 33 ms; T = 128 slower (tiny tiles); T = 1,024 0 to 18 % less
across four runs and T = 2,048 1 to 9 % across three, not settled, so left on the kernel; in the
whole training step of the bench model +2 % at T = 256 and +3 % at T = 512. Forward alone gains
nothing, so inference keeps the plain kernel.
"""

from __future__ import annotations

import torch

MIN_BLOCK = 64  # smallest diagonal block: smaller tiles run the kernel's products inefficiently
MIN_LEN, MAX_LEN = 256, 512  # measured: slower at 128 (small tiles), unsettled from 1,024 (the kernel skips)


def levels_for(seq_len: int) -> int:
    """How many times to halve a sequence of `seq_len` (0: use the plain kernel)."""
    if not MIN_LEN <= seq_len <= MAX_LEN:
        return 0
    levels = 0
    while seq_len % (2 ** (levels + 1)) == 0 and seq_len // 2 ** (levels + 1) >= MIN_BLOCK:
        levels += 1
    return levels


def _flash(q, k, v, causal: bool):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


def _flash_backward(g, q, k, v, o, lse, causal: bool):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(g, q, k, v, o, lse, 0.0, causal)


def _blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, h, ...) -> the n consecutive blocks stacked as a batch: (B n, h, T / n, ...), a view."""
    B, T = x.shape[:2]
    return x.view(B * n, T // n, *x.shape[2:]).transpose(1, 2)


def _half(x: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """Half i (0 first, 1 second) of each of n segments: (B n, h, T / 2n, ...), a view."""
    B, T = x.shape[:2]
    return x.view(B * n, 2, T // (2 * n), *x.shape[2:])[:, i].transpose(1, 2)


class BlockCausalAttention(torch.autograd.Function):
    """q (B, H, T, hd), k and v (B, Hkv, T, hd) -> causal attention (B, H, T, hd); see the module doc."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: int) -> torch.Tensor:
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, T, h, hd): views here
        B, T, H, hd = qt.shape
        nb = 2**levels
        o, lse = _flash(_blocks(qt, nb), _blocks(kt, nb), _blocks(vt, nb), True)
        out = o.transpose(1, 2).reshape(B, T, H, hd)
        lse_all = lse.transpose(1, 2).reshape(B, T, H)
        for level in range(levels):
            n = 2**level
            o_l, lse_l = _flash(_half(qt, n, 1), _half(kt, n, 0), _half(vt, n, 0), False)
            out_v, lse_v = _half(out, n, 1), _half(lse_all, n, 1)
            merged = torch.logaddexp(lse_v, lse_l)
            out_v.mul_((lse_v - merged).exp_().unsqueeze(-1))
            out_v.add_(o_l.mul_((lse_l - merged).exp_().unsqueeze(-1)))
            lse_v.copy_(merged)
        ctx.save_for_backward(qt, kt, vt, out, lse_all)
        ctx.levels = levels
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qt, kt, vt, out, lse = ctx.saved_tensors
        nb = 2**ctx.levels
        g = grad.transpose(1, 2).contiguous()  # (B, T, H, hd)
        B, T, H, hd = qt.shape
        pieces = _flash_backward(*(_blocks(x, nb) for x in (g, qt, kt, vt, out, lse)), True)
        dq, dk, dv = (d.transpose(1, 2).reshape(B, T, d.shape[1], hd) for d in pieces)
        for level in range(ctx.levels):
            n = 2**level
            gq, gk, gv = _flash_backward(_half(g, n, 1), _half(qt, n, 1), _half(kt, n, 0), _half(vt, n, 0),
                                         _half(out, n, 1), _half(lse, n, 1), False)
            _half(dq, n, 1).add_(gq)
            _half(dk, n, 0).add_(gk)
            _half(dv, n, 0).add_(gv)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: int) -> torch.Tensor:
    """Causal attention equal to `F.scaled_dot_product_attention(q, k, v, is_causal=True,
    enable_gqa=True)` (up to rounding), for CPU tensors whose length splits into 2^levels blocks."""
    return BlockCausalAttention.apply(q, k, v, levels)
