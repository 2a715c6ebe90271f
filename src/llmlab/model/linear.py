"""The model's linear layer: `nn.Linear` (same parameters, state-dict keys, and LoRA / HF compatibility)
whose products run on oneDNN for fp32 tensors on CPU (`linear`), and that multiplies by a decode weight
while generating on CPU (see `llmlab.model.decode`); the helpers that make and use decode weights.

Why oneDNN. PyTorch's CPU `F.linear` / `mm` call MKL's sgemm. On this project's 2-core AMD EPYC (AVX-512)
oneDNN's fp32 inner product, the primitive `torch.ops.mkldnn._linear_pointwise` runs (the op
`torch.compile`'s CPU backend emits for linear layers), was faster at every training shape of the bench
model (2,048 rows, interleaved medians, GFLOP/s, MKL -> oneDNN): forward 151-190 -> 195-208, the input
gradient `g @ W` 168-184 -> 184-211, the LM head's 8,192-wide forward 126 -> 144, and 1.5x at 256 rows.
The weight gradient `g^T @ x` was not faster through it (strided operands), so it stays on MKL. oneDNN
sums in another order than MKL: results differ by float rounding (~1e-6 relative). `linear` checks the op
once against `F.linear` and falls back to it when the op is missing or disagrees, for products below
ONEDNN_MIN_MACS (MKL's call is cheaper there); LLMLAB_CPU_MATMUL=mkl turns it off.

Under `torch.compile` the product is the custom op `llmlab::onednn_linear` (`onednn_linear`), with its
gradient registered: inductor calls it as an opaque kernel and fuses the element-wise work around it.
Left to itself inductor lowers a training step's linear layers to MKL's `mm` (its oneDNN lowering needs
constant weights, i.e. inference with frozen parameters), which lost the products' oneDNN gain: the
compiled CPU step was no faster than eager (bench/README.md).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import ConfigError


@functools.cache
def onednn_ready() -> bool:
    """oneDNN's fp32 inner product is there and agrees with F.linear (checked once per process)."""
    choice = os.environ.get("LLMLAB_CPU_MATMUL", "onednn").lower()
    if choice not in ("onednn", "mkl"):
        raise ConfigError(f"LLMLAB_CPU_MATMUL: expected 'onednn' or 'mkl', got {choice!r}; unset it for the default")
    if choice == "mkl" or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 16, generator=g), torch.randn(7, 16, generator=g), torch.randn(7, generator=g)
        y = _product(x, w, b)
        y_t = _product(x.t().contiguous().t(), w.t().contiguous().t())  # strided operands
        return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-4) and torch.allclose(y_t, F.linear(x, w), atol=1e-4))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@torch.compiler.assume_constant_result
def _onednn_on() -> bool:
    """`onednn_ready()`, which torch.compile takes as a constant (its check's products stay out of graphs)."""
    return onednn_ready()


# Below this many multiply-adds MKL's call was as fast or faster (1024 x 96 x 96: 130 vs 150 us; 1024 x
# 96 x 256, 2^24.6: 354 vs 355 us); with a floor of 2^24 the demo's tiny model stepped 4 % slower, with
# 2^25 even (its layers stay on MKL, its LM head goes to oneDNN).
ONEDNN_MIN_MACS = 1 << 25
# oneDNN builds (JIT-compiles) a kernel the first time it sees a product shape, 0.3-0.7 ms measured, and
# keeps up to 1,024 of them; above the floor that is repaid within one or two calls (a new 2000 x 384 x
# 1024 shape: 8.5 ms on oneDNN, kernel build included, 10.1 ms on MKL), so new shapes (SFT batches
# padded per batch) go to oneDNN too.


def _onednn(x: torch.Tensor, w: torch.Tensor, min_macs: int | None = None) -> bool:
    """Whether x @ w^T goes to oneDNN: fp32 on CPU, large enough."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.numel() * w.shape[0] >= (ONEDNN_MIN_MACS if min_macs is None else min_macs)
            and _onednn_on())


def _product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ w (out, in)^T (+ bias) on oneDNN, unchecked; `w` may be a strided view."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


@torch.library.custom_op("llmlab::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`_product` as an op torch.compile keeps whole (see the module docstring); differentiable."""
    return _product(x, w, bias)


@onednn_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _onednn_linear_setup(ctx, inputs, output) -> None:
    x, w, bias = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad: torch.Tensor):
    x, w = ctx.saved_tensors
    return _CPULinear.gradients(ctx, grad, x, w, onednn_linear)


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


def _mm_t(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oneDNN product, as the custom op under torch.compile."""
    return onednn_linear(x, w, bias) if torch.compiler.is_compiling() else _product(x, w, bias)


def matmul_t(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ w (out, in)^T (+ bias), no autograd: oneDNN for large fp32 products on CPU, else
    F.linear. `w` may be a strided view (e.g. `W.t()` for an input gradient)."""
    return _mm_t(x, w, bias) if _onednn(x, w) else F.linear(x, w, bias)


class _CPULinear(torch.autograd.Function):
    """F.linear with the forward and the input gradient on oneDNN and the weight gradient on MKL (for
    products `linear` has checked: the input gradient has the forward's size, device and dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return _CPULinear.gradients(ctx, grad, x, weight, _product)

    @staticmethod
    def gradients(ctx, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, product):
        """(input, weight, bias) gradients: the input's through `product` (oneDNN), the weight's on MKL."""
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = product(g, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            gw = g.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def transposed(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x (R, C) -> x^T (C, R), contiguous. `x.t().contiguous()` reads x a column at a time (one cache line
    per element): 1 ms for 2,048 x 384 in a training step. Two passes that each read whole cache lines
    (column blocks of `block` first, then each block's (R, block) slab, which fits in L2) take about
    two thirds of that (0.46 -> 0.31 ms warm). Falls back to the plain copy when C does not split."""
    rows, cols = x.shape
    if cols % block or not x.is_contiguous():
        return x.t().contiguous()
    slabs = x.view(rows, cols // block, block).permute(1, 0, 2).contiguous()  # (C / block, R, block)
    return slabs.transpose(1, 2).reshape(cols, rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, with its products on oneDNN for fp32 tensors on CPU (see the module docstring)."""
    if not _onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return onednn_linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _CPULinear.apply(x, weight, bias)
    return _product(x, weight, bias)


DECODE_MIN_MACS = 1 << 20  # batched decoding: the bench model's smallest product at 8 rows is 2^20.2


def decode_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) times a decode weight w (P, out / P, in): the (out, in) weight cut into P row blocks
    (or w packed by oneDNN, see `llmlab.model.decode`).
    `torch.bmm` over the blocks reads the weight at close to memory bandwidth where MKL's one-row
    product does not (see `llmlab.model.decode`). Several rows on a plain decode weight (a prefill, or 2
    to 3 sequences a step; from 4 the weights are packed) go to oneDNN's product over the whole weight
    from DECODE_MIN_MACS, where it is available."""
    if w.is_mkldnn:  # oneDNN's packed layout (decoding several rows a step, `decode_weights(packed=True)`)
        return _product(x, w)
    P, n, K = w.shape
    R = x.numel() // K
    # the rows enter as the transpose of (R, in), strides (0, 1, in): given as a fresh (in, R) column
    # instead, strides (in, R, 1), MKL's batched product took a path 10x slower here
    if R == 1 and x.stride(-1) == 1:  # the decode step at batch 1: views only around the product
        y = torch.bmm(w, x.as_strided((P, K, 1), (0, 1, K)))  # (P, n, 1): the output's memory order
        return y.view(*x.shape[:-1], P * n)
    whole = w.view(P * n, K)
    if _onednn(x, whole, min_macs=DECODE_MIN_MACS):  # several rows: oneDNN (1.4-2x the bmm at 8 rows)
        return _mm_t(x, whole)
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
            return linear(x, self.weight, self.bias)
        y = decode_mm(x, wt)
        return y if self.bias is None else y + self.bias
