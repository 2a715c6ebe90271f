"""Token-weighted causal-LM cross entropy, chunked over rows so the (N, V) fp32 logits never exist at once.

    hidden = model(input_ids, output_hidden=True)            # (B, T, D), final norm applied
    loss_sum, n_tokens = causal_lm_loss(hidden, model.lm_head, labels)
    (loss_sum / n_tokens).backward()                           # mean over label tokens

Labels are aligned with `input_ids` (as the data iterators yield them): position t predicts
`labels[:, t + 1]`, and `-100` marks positions that do not count (prompt tokens in SFT, padding).
Returning the *sum* and the token count, not a mean, is what lets the loop weight every token equally
across micro-batches and ranks: the step's loss is the sum over all its tokens divided by their number.

How the memory stays small. A plain `F.cross_entropy(lm_head(h), y)` materialises the logits (N, V),
their fp32 copy, the softmax and its gradient: several N x V tensors (N = B x T; with V = 150k and
N = 16k that is ~10 GB each in fp32). `linear_cross_entropy` walks over chunks of rows instead. For
each chunk it computes the logits (n, V) in fp32, the loss, and right away the gradients
(softmax - onehot) @ W for the hidden states and (softmax - onehot)^T @ h for the weight, then drops the
chunk. Backward only scales those stored gradients by the incoming scalar: three matmuls per chunk in
total, as unchunked, and peak extra memory of one chunk's logits plus one weight-sized gradient buffer.
The gradients are computed only when grad is enabled and an input needs them (evaluation pays for the
loss alone). Under CUDA autocast the matmuls run in the autocast dtype (bf16), as `lm_head` would, and
everything after them (log-sum-exp, softmax, the weight-gradient sum) in fp32.

Rows without a label cost nothing. SFT masks its prompt tokens and right padding with -100 (often half
of a batch or more); their logits would be computed and then ignored. `label_rows` finds the positions
that carry a loss from the labels while they are still on the CPU (no wait for the device), and
`causal_lm_loss(..., rows=...)` gathers those hidden states before the head, so the three products per
chunk run on the counted rows only: with half of every sequence a prompt, the bench model's training
step (vocab 8,192) ran 1.11x as many tokens/s as on every row (bench/README.md, `sft_masked_prompts`);
the larger the vocabulary, the larger the share. Same loss and gradients (the gather's backward scatters
them back). Where fewer than 1/16 of the rows are skipped
(pretraining: one position per sequence) the rows are all kept.

A head that is not a plain `nn.Linear` (a PEFT LoRA-wrapped lm_head, say) goes through
`checkpointed_cross_entropy`: the same chunks, each under activation checkpointing, so only one chunk's
logits live at a time and backward recomputes them. Sophia's Hessian estimate (`chunked_gnb_loss`) is
chunked the same way around `llmlab.optim.gnb_sampled_loss`; checkpointing replays the RNG, so backward
sees the labels that forward sampled.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmlab.model.linear import matmul_t
from llmlab.optim import gnb_sampled_loss

IGNORE_INDEX = -100
CHUNK_BYTES = 256 * 2**20  # target size of one chunk's fp32 logits
# The fused loss's chunk on CUDA: 4x fewer, larger chunks ran 5.5 % faster compiled on an H200 (bench/README.md);
# a card with less than 64 GiB gets 1/64 of its memory (not under CHUNK_BYTES): 256 MiB on a 16 GiB card
CUDA_CHUNK_BYTES = 2**30
MIN_CHUNK_ROWS = 128
# The fused loss on CPU: at most this many rows a chunk. Fewer, larger chunks were slower there (one
# fwd+bwd of the loss, 2 threads, ms, 256 rows vs the 256 MiB budget's rows): vocab 8,192 x d 384 over
# 2,048 rows 215 vs 233 (the bench model's step -1.7 %), 32,000 x 384 902 vs 963, 32,000 x 768 1,742 vs
# 1,805, 49,152 x 576 2,111 vs 2,228 (512 rows 2,060), 151,936 x 384 over 1,024 rows 2,386 vs 2,437 (441)
CPU_MAX_CHUNK_ROWS = 256
MIN_SKIPPED_FRACTION = 1 / 16  # below this share of label-less positions, `label_rows` keeps every row


def default_chunk_rows(vocab_size: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about `budget` bytes (CHUNK_BYTES)."""
    return max(MIN_CHUNK_ROWS, budget // (4 * max(1, vocab_size)))


@functools.cache
def _card_memory(index: int | None) -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).total_memory


@torch.compiler.assume_constant_result  # read once while tracing (`compile: true`), not traced into
def _cuda_memory(index: int | None) -> int:
    return _card_memory(index)


def fused_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk of the fused loss (`linear_cross_entropy`) on `device`: `chunk_budget(device)` bytes
    of fp32 logits, and on CPU at most CPU_MAX_CHUNK_ROWS rows."""
    rows = default_chunk_rows(vocab_size, chunk_budget(device))
    return min(rows, CPU_MAX_CHUNK_ROWS) if device.type == "cpu" else rows


def chunk_budget(device: torch.device) -> int:
    """Bytes of fp32 logits per chunk of the fused loss on `device`: CHUNK_BYTES, and on CUDA up to
    CUDA_CHUNK_BYTES as the card's memory allows (1/64 of it)."""
    if device.type != "cuda":
        return CHUNK_BYTES
    return max(CHUNK_BYTES, min(CUDA_CHUNK_BYTES, _cuda_memory(device.index) // 64))


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, T) labels aligned with the inputs -> (B, T) targets: position t gets labels[t + 1], the last
    position ignore_index. Keeps the hidden states unshifted (a contiguous view, no copy)."""
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def count_label_tokens(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of positions that carry a loss (labels[:, 1:] != ignore_index), as a 0-d int64 tensor on
    the labels' device (no host synchronisation)."""
    return (labels[:, 1:] != ignore_index).sum()


def label_rows(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor | None:
    """Flat (B*T) indices of the positions that carry a loss (their next label counts), for `rows=` of
    `causal_lm_loss`; None where finding them would wait for the device (labels not on the CPU), where
    fewer than MIN_SKIPPED_FRACTION of the positions are skipped (computing those rows costs less than
    gathering the others) or where none counts (every row then gives the loss its zero gradient)."""
    if labels.device.type != "cpu":
        return None
    counted = (shift_labels(labels, ignore_index) != ignore_index).reshape(-1)
    kept = int(counted.sum())
    if kept == 0 or counted.numel() - kept < MIN_SKIPPED_FRACTION * counted.numel():
        return None
    return counted.nonzero().squeeze(1)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(x @ W^T + b, target), gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk_rows: int,
                ignore_index: int, compute_dtype: torch.dtype) -> Tensor:
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows = x.shape[0]
        acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = None  # the first chunk's product, then accumulated in place
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        no_autocast = (torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu")
                       else contextlib.nullcontext())
        with no_autocast:
            for start in range(0, n_rows, chunk_rows):
                end = min(start + chunk_rows, n_rows)
                h = x[start:end].to(compute_dtype)  # (n, D)
                logits = matmul_t(h, w).to(acc)  # (n, V); oneDNN on CPU fp32 (llmlab.model.linear)
                if bias is not None:
                    logits += bias.to(acc)
                t = target[start:end]
                valid = t != ignore_index  # (n,)
                t_safe = torch.where(valid, t, torch.zeros_like(t))
                picked = logits.gather(1, t_safe[:, None]).squeeze(1)
                # one exp pass serves both the log-sum-exp and the softmax (in place on the fresh logits)
                top = logits.amax(-1, keepdim=True)
                e = logits.sub_(top).exp_()  # (n, V)
                total = e.sum(-1)  # (n,)
                lse = top.squeeze(1) + total.log()
                loss += ((lse - picked) * valid).sum()
                if not (need_x or need_w or need_b):
                    continue
                # d loss / d logits = softmax - onehot(target), zero on ignored rows
                keep = valid.to(acc)
                probs = e.mul_((keep / total)[:, None])
                probs[torch.arange(end - start, device=probs.device), t_safe] -= keep
                g = probs.to(compute_dtype)
                if grad_x is not None:
                    grad_x[start:end] = matmul_t(g, w.t()).to(x.dtype)
                if need_w:
                    if grad_w is None:  # a fresh product: faster than zeros + addmm_ (MKL 185 vs 160 GFLOP/s)
                        grad_w = (g.t() @ h).to(acc)
                    elif g.dtype == acc:  # accumulate in place: no (V, D) temporary per chunk
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).to(acc)
                if grad_b is not None:
                    grad_b += probs.sum(0)
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        ctx.save_for_backward(*(t for t in (grad_x, grad_w, grad_b) if t is not None))
        ctx.has = (grad_x is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss.to(torch.float64 if acc == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = list(ctx.saved_tensors)
        grads = []
        for has, dtype in zip(ctx.has, ctx.dtypes):
            grads.append((saved.pop(0) * grad_out).to(dtype) if has else None)
        return grads[0], grads[1], grads[2], None, None, None, None


def linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, *,
                         chunk_rows: int | None = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sum over rows of cross_entropy(x @ weight^T + bias, target), ignoring `ignore_index` rows.

    x (N, D), weight (V, D), bias (V,) or None, target (N,) -> 0-d fp32 (fp64 for fp64 inputs) tensor,
    differentiable in x, weight and bias. Never holds more than `chunk_rows` rows of logits; by default
    `fused_chunk_rows`: about `chunk_budget(x.device)` bytes of fp32 logits (larger on a CUDA card with the
    memory for it: fewer launches and passes), on CPU at most CPU_MAX_CHUNK_ROWS rows (faster there).
    """
    if x.dim() != 2 or target.shape != x.shape[:1]:
        raise ValueError(f"expected x (N, D) and target (N,), got {tuple(x.shape)} and {tuple(target.shape)}")
    rows = chunk_rows or fused_chunk_rows(weight.shape[0], x.device)
    return _LinearCrossEntropy.apply(x, weight, bias, target, rows, ignore_index, _compute_dtype(x, weight))


def _chunk_logits(head: nn.Module, h: Tensor, temperature: float = 1.0) -> Tensor:
    logits = head(h)  # (n, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    return logits / temperature if temperature != 1.0 else logits


def _head_chunk_rows(head: nn.Module, chunk_rows: int | None) -> int:
    """`chunk_rows`, else rows for about CHUNK_BYTES of fp32 logits of `head` (its weight's rows; 32,768
    when it has none)."""
    if chunk_rows:
        return chunk_rows
    weight = getattr(head, "weight", None)
    return default_chunk_rows(weight.shape[0] if isinstance(weight, Tensor) else 32768)


def _chunks(fn, head: nn.Module, rows: int, x: Tensor, per_row: tuple[Tensor, ...], *extra) -> list[Tensor]:
    """fn(head, x_chunk, *per_row_chunks, *extra) for each chunk of `rows` rows of x, each checkpointed
    while gradients are on (backward recomputes its logits, replaying the RNG): one chunk's logits exist
    at a time."""
    out = []
    for start in range(0, x.shape[0], rows):
        args = (head, x[start:start + rows], *(t[start:start + rows] for t in per_row), *extra)
        out.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    return out


def _chunk_sum(fn, head: nn.Module, rows: int, x: Tensor, per_row: tuple[Tensor, ...], *extra) -> Tensor:
    """The sum of `_chunks`' scalars; no rows give head(x)'s empty sum, a zero still in the graph (backward
    runs and gives zero gradients)."""
    if x.shape[0] == 0:
        return head(x).float().sum()
    parts = _chunks(fn, head, rows, x, per_row, *extra)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _chunk_ce(head: nn.Module, h: Tensor, t: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(_chunk_logits(head, h), t, ignore_index=ignore_index, reduction="sum")


def checkpointed_cross_entropy(x: Tensor, head: nn.Module, target: Tensor, *, chunk_rows: int | None = None,
                               ignore_index: int = IGNORE_INDEX, vocab_size: int | None = None) -> Tensor:
    """Like `linear_cross_entropy` for any head module: chunks under activation checkpointing."""
    rows = chunk_rows or default_chunk_rows(vocab_size or 32768)
    return _chunk_sum(_chunk_ce, head, rows, x, (target,), ignore_index)


def _chunk_logprobs(head: nn.Module, h: Tensor, t: Tensor, temperature: float) -> Tensor:
    logits = _chunk_logits(head, h, temperature)
    return logits.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(x: Tensor, head: nn.Module, targets: Tensor, *, temperature: float = 1.0,
                   chunk_rows: int | None = None) -> Tensor:
    """log softmax(head(x) / temperature)[target] for every row: x (N, D), targets (N,) -> (N,) in fp32
    (fp64 for fp64). What RLHF scores responses with (DPO's sums, PPO's and GRPO's ratios and KL).

    Rows go through the head in chunks of about CHUNK_BYTES of fp32 logits; with more than one chunk and
    gradients on, each chunk is checkpointed (backward recomputes its logits), so one chunk's logits
    exist at a time: at Qwen's 151,936-token vocabulary a 4,096-token batch would otherwise hold ~2.5 GB
    of logits, plus as much again for their gradient. A batch that fits in one chunk runs unchunked (no
    recomputation)."""
    rows = _head_chunk_rows(head, chunk_rows)
    if x.shape[0] <= rows:
        return _chunk_logprobs(head, x, targets, temperature)
    return torch.cat(_chunks(_chunk_logprobs, head, rows, x, (targets,), temperature))


def gather_rows(hidden: Tensor, rows: Tensor) -> Tensor:
    """hidden (..., D) flattened to (N, D), then the `rows` (M,) of it: the states of the scored positions."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def causal_lm_loss(hidden: Tensor, head: nn.Module, labels: Tensor, *, chunk_rows: int | None = None,
                   ignore_index: int = IGNORE_INDEX, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """hidden (B, T, D) after the final norm, the lm_head module, labels (B, T) aligned with the inputs
    -> (sum of token losses, number of label tokens). Chunked: see the module docstring. `rows`
    (`label_rows(labels)`, on the hidden states' device): the head runs on those positions only."""
    targets = shift_labels(labels, ignore_index).reshape(-1)
    x = hidden.reshape(-1, hidden.shape[-1])  # (B*T, D), a view
    if rows is not None:  # the positions that carry a loss: the others' logits would be thrown away
        x, targets = gather_rows(x, rows), targets.index_select(0, rows)
    if type(head) is nn.Linear:  # a plain projection (not a LoRA or other wrapper): the fused path
        loss_sum = linear_cross_entropy(x, head.weight, head.bias, targets, chunk_rows=chunk_rows,
                                        ignore_index=ignore_index)
    else:
        loss_sum = checkpointed_cross_entropy(x, head, targets, chunk_rows=_head_chunk_rows(head, chunk_rows),
                                              ignore_index=ignore_index)
    return loss_sum, count_label_tokens(labels, ignore_index)


def chunked_lm_loss(head: nn.Module, hidden: Tensor, labels: Tensor, *, chunk_rows: int | None = None) -> Tensor:
    """Mean next-token cross entropy over the label tokens: `causal_lm_loss` divided by the token count.
    The drop-in for `F.cross_entropy(lm_head(hidden)[:, :-1], labels[:, 1:])` without the full logits."""
    loss_sum, n = causal_lm_loss(hidden, head, labels, chunk_rows=chunk_rows)
    return loss_sum / n.clamp(min=1)


def _gnb_chunk(head: nn.Module, h: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    return gnb_sampled_loss(_chunk_logits(head, h, temperature), mask) * mask.sum()  # the chunk's sum


def chunked_gnb_loss(hidden: Tensor, head: nn.Module, labels: Tensor, *, chunk_rows: int | None = None,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sophia's Gauss-Newton-Bartlett loss (`gnb_sampled_loss`: cross entropy against labels sampled from
    the model's softmax), mean over the label positions, one checkpointed chunk of rows at a time."""
    mask = (shift_labels(labels, ignore_index) != ignore_index).reshape(-1)  # (B*T,)
    x = hidden.reshape(-1, hidden.shape[-1])
    return _chunk_sum(_gnb_chunk, head, _head_chunk_rows(head, chunk_rows), x, (mask,)) / mask.sum().clamp(min=1)


def gnb_rows_loss(x: Tensor, head: nn.Module, *, temperature: float = 1.0, chunk_rows: int | None = None) -> Tensor:
    """`chunked_gnb_loss` over rows that all count: x (N, D), the states of the scored positions (RLHF's
    response tokens), logits divided by `temperature` -> the mean over the N rows (0, still differentiable,
    for N = 0)."""
    mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    total = _chunk_sum(_gnb_chunk, head, _head_chunk_rows(head, chunk_rows), x, (mask,), temperature)
    return total / max(x.shape[0], 1)
