"""Causal attention for CPU training, in blocks of query rows that skip the masked part.

PyTorch's CPU flash-attention kernel runs its products as many small GEMMs (a 64-query tile against up
to 512 keys) and reaches ~55-70 GFLOP/s on this project's 2-core machine (6 heads of 64, T = 256),
against ~150 for one batched product of the same sizes.

`block_causal_attention` computes plain attention (scores, softmax, weighted values) with batched
products, block by block of `rows` queries:

- block [a, b) of the queries attends to keys [0, b) only: the keys after its last query are never
  computed, so the work is (n + 1) / 2n of the full score matrix for n blocks (9/16 at T = 256 in
  blocks of 32), and each query row sees all its keys in one piece (no log-sum-exp merging);
- inside the block's last `rows` keys the causal triangle is masked;
- the query heads that share a KV head (GQA) are stacked as rows of one product against that head's
  keys, so K and V are never repeated;
- the softmax of each block is saved for backward (dV = P^T dO, dS = P (dP - rowsum(dP P)),
  dQ = dS K, dK = dS^T Q): about B H T^2 (n + 1) / 2n floats a layer, 7 MB for the bench model's
  8 x 256 tokens. Lengths above MAX_LEN stay on the kernel, which saves only its output and
  log-sum-exp.

Measured (fwd + bwd of one layer, 2,048 tokens, 2 threads, ms, flash kernel -> this):
6 heads / 2 KV heads of 64: T = 128 13.3 -> 10.2, T = 256 20.6 -> 14.3, T = 512 39.7 -> 23.0;
MHA 6 x 64: T = 128 16.0 -> 14.6 (blocks of 64), T = 256 21.3 -> 18.6, T = 512 41.8 -> 28.2;
3 heads / 1 KV head of 128 at T = 256 17.8 -> 11.8; at T = 64 the kernel was faster. The bench
model's training step +3 % (interleaved). Used by `Attention` for fp32 causal self-attention with
gradients on CPU, without a mask or dropout, for MIN_LEN <= T <= MAX_LEN (`rows_for`); everything else
goes to `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch

MIN_LEN, MAX_LEN = 128, 512  # measured: the kernel wins at 64; above 512 the saved softmax grows as T^2


def rows_for(seq_len: int, group: int) -> int:
    """Query rows per block for a sequence of `seq_len` with `group` query heads per KV head (0: use
    the plain kernel). Blocks of 32, or 64 without GQA (a product needs 64 or more rows)."""
    if not MIN_LEN <= seq_len <= MAX_LEN:
        return 0
    return 64 if group == 1 else 32


class BlockCausalAttention(torch.autograd.Function):
    """q (B, H, T, hd), k and v (B, Hkv, T, hd) -> causal attention (B, H, T, hd); see the module doc."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
        B, H, T, hd = q.shape
        Hk = k.shape[1]
        G, BH = H // Hk, B * Hk
        scale = 1 / math.sqrt(hd)
        q5 = q.view(B, Hk, G, T, hd)
        kk, vv = k.reshape(BH, T, hd), v.reshape(BH, T, hd)
        out = q.new_empty(B, T, Hk, G, hd)  # the layout the output projection reads as (B, T, H hd)
        out5 = out.permute(0, 2, 3, 1, 4)  # (B, Hk, G, T, hd), a view
        saved = []
        for a in range(0, T, rows):
            b = min(a + rows, T)
            n = b - a
            qs = (q5[:, :, :, a:b] * scale).reshape(BH, G * n, hd)  # the block's queries scaled, a group's heads stacked
            s = torch.bmm(qs, kk[:, :b].transpose(1, 2))  # (BH, G n, b): keys up to the block's end
            upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)  # keys a query may not see
            s.view(BH, G, n, b)[..., a:].masked_fill_(upper, float("-inf"))
            p = torch.softmax(s, -1)
            del s
            out5[:, :, :, a:b] = torch.bmm(p, vv[:, :b]).view(B, Hk, G, n, hd)
            saved += [qs, p]
        ctx.save_for_backward(kk, vv, *saved)
        ctx.shape, ctx.rows, ctx.scale = (B, H, Hk, T, hd), rows, scale
        return out.view(B, T, H, hd).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kk, vv, *saved = ctx.saved_tensors
        B, H, Hk, T, hd = ctx.shape
        G, BH = H // Hk, B * Hk
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        g5 = grad.reshape(B, Hk, G, T, hd)
        dq = grad.new_empty(B, T, Hk, G, hd) if need_q else None
        dk = grad.new_zeros(BH, T, hd) if need_k else None
        dv = grad.new_zeros(BH, T, hd) if need_v else None
        for i, a in enumerate(range(0, T, ctx.rows)):
            b = min(a + ctx.rows, T)
            n = b - a
            qs, p = saved[2 * i], saved[2 * i + 1]
            gs = g5[:, :, :, a:b].reshape(BH, G * n, hd)
            if dv is not None:
                dv[:, :b] += torch.bmm(p.transpose(1, 2), gs)  # (baddbmm_ into the slice ran as one addmm_ per batch)
            ds = torch.bmm(gs, vv[:, :b].transpose(1, 2))  # dP, then dS in place
            torch.ops.aten._softmax_backward_data.out(ds, p, -1, p.dtype, grad_input=ds)
            if dq is not None:
                dq.permute(0, 2, 3, 1, 4)[:, :, :, a:b] = torch.bmm(ds, kk[:, :b]).mul_(ctx.scale).view(B, Hk, G, n, hd)
            if dk is not None:
                dk[:, :b] += torch.bmm(ds.transpose(1, 2), qs)  # qs carries the scale
        return (None if dq is None else dq.view(B, T, H, hd).transpose(1, 2),
                None if dk is None else dk.view(B, Hk, T, hd),
                None if dv is None else dv.view(B, Hk, T, hd), None)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """Causal attention equal to `F.scaled_dot_product_attention(q, k, v, is_causal=True,
    enable_gqa=True)` (up to rounding), computed in blocks of `rows` queries (see the module doc)."""
    return BlockCausalAttention.apply(q, k, v, rows)
