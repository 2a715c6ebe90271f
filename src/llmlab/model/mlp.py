"""Feed-forward blocks. SwiGLU is gated (gate_proj, up_proj, down_proj, as in Llama); the other
activations use up_proj -> activation -> down_proj.

CPU training runs the gated block as one autograd function (`GatedMLPFunction`): the same products on
oneDNN as `Linear`, with the element-wise work on buffers it owns. Autograd's form allocates five fresh
(tokens x d_ff) tensors a layer (silu, the product, and three in backward) and saves silu(gate) for
backward; this one allocates two (h, and silu(gate) recomputed in backward, then turned into the up
gradient in place), writes the gate gradient into the down product's input gradient, and saves one
(tokens x d_ff) tensor less. On this CPU a fresh 8 MB tensor costs ~1.5 ms of page faults in a training
step, more than the pass over it: the bench model's MLP fwd+bwd 83 -> 79 ms, its step +1.1-3.3 %
(interleaved, bench/README.md).

Its weight gradients run on oneDNN too. MKL takes g^T @ x with the transposed operand as it is (the
`Linear` layers' weight gradients stay there); oneDNN reorders both operands of that form and was slower.
Given one operand made contiguous in transposed form, oneDNN's product is faster: gate and up share one
transposed copy of the block's input (x^T, 3 MB for the bench model) and give their gradients transposed
(gate-shaped products 180 -> 197 GFLOP/s), the down projection transposes its output gradient (176 vs
157). The step +1.1 % more (interleaved, two runs). Same values as autograd's form up to float rounding
(tested)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.config import ModelConfig
from llmlab.model import linear as products
from llmlab.model.linear import Linear, decode_mm, plain


class GatedMLPFunction(torch.autograd.Function):
    """down(silu(x gate^T) * (x up^T)) for fp32 CPU tensors, products on oneDNN (see the module doc;
    `products` is read at call time: tests and benches turn its oneDNN switch off)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        gate, up = products._product(x2, w_gate), products._product(x2, w_up)
        h = F.silu(gate).mul_(up)
        ctx.save_for_backward(x2, gate, up, h, w_gate, w_up, w_down)
        return products._product(h, w_down).view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, gate, up, h, w_gate, w_up, w_down = ctx.saved_tensors
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad[:4]
        g2 = grad.reshape(-1, grad.shape[-1])
        d_down = products._product(products.transposed(g2), h.t()) if need_down else None
        dh = products._product(g2, w_down.t())  # a fresh buffer: it becomes the gate's gradient in place
        d_up_out = F.silu(gate).mul_(dh)  # dL/d(up output) = dh * silu(gate)
        d_gate_out = torch.ops.aten.silu_backward.grad_input(dh.mul_(up), gate, grad_input=dh)
        dx = None
        if need_x:
            dx = products._product(d_gate_out, w_gate.t()).add_(products._product(d_up_out, w_up.t()))
            dx = dx.view(*grad.shape[:-1], x2.shape[-1])
        x_t = products.transposed(x2) if need_gate or need_up else None  # shared by the two weight gradients
        # (in, out) products, transposed to the weights' layout here (autograd would copy them anyway)
        d_gate = products.transposed(products._product(x_t, d_gate_out.t())) if need_gate else None
        d_up = products.transposed(products._product(x_t, d_up_out.t())) if need_up else None
        return dx, d_gate, d_up, d_down


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    gate_up_decode: torch.Tensor | None = None  # gate/up weights fused for CPU decoding (llmlab.model.decode)

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff, bias=False)
        self.up_proj = Linear(d_model, d_ff, bias=False)
        self.down_proj = Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.one_function(x):
            return GatedMLPFunction.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        return self.down_proj(self.hidden(x))

    def one_function(self, x: torch.Tensor) -> bool:
        """CPU training of fp32 plain projections (not LoRA-wrapped or hooked: PEFT replaces the modules)
        whose products go to oneDNN, outside torch.compile (which fuses the element-wise work itself)."""
        return (products._onednn(x, self.gate_proj.weight) and plain(self.gate_proj, self.up_proj, self.down_proj)
                and not torch.compiler.is_compiling())

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
