"""Mini-batch updates shared by PPO and GRPO (DPO uses `optimizer_update` and `UpdateCount`): one
optimizer step per mini-batch of rollout rows; with optimizer=sophia the Hessian estimate is refreshed
every `sophia_update_k` updates of the run, from the policy's own sampled labels on the response tokens
just updated (`rollout_hessian`).

    stats = minibatch_updates(optimizer, params, clip_norm, minibatches(n, size, gen), loss_fn,
                              hessian=rollout_hessian(policy, rollout), updates=count)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.checkpoint import base_transformer
from llmlab.device import autocast
from llmlab.optim import refresh_hessian_if_due
from llmlab.rlhf.rollout import Rollout
from llmlab.rlhf.scoring import response_hidden
from llmlab.train.losses import gather_rows, gnb_rows_loss

# --------------------------------------------------------------------------------------------------
# Mini-batch updates shared by PPO and GRPO (and DPO's optimizer step)
# --------------------------------------------------------------------------------------------------


def minibatches(n: int, size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """A random permutation of range(n) cut into index tensors of `size` rows (one PPO epoch)."""
    order = torch.randperm(n, generator=generator)
    return [order[i : i + size] for i in range(0, n, size)]


def group_minibatches(n_groups: int, group_size: int, groups_per_batch: int,
                      generator: torch.Generator | None = None) -> list[Tensor]:
    """Like `minibatches`, but whole groups stay together (GRPO: each prompt's samples in one update)."""
    batches = []
    for groups in minibatches(n_groups, groups_per_batch, generator):
        rows = groups[:, None] * group_size + torch.arange(group_size)[None, :]  # (g, G)
        batches.append(rows.reshape(-1))
    return batches


def optimizer_update(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip_norm: float) -> float:
    """Clip the gradient norm of `params` (when clip_norm > 0), step, clear gradients. Returns the norm
    before clipping."""
    from llmlab.train.loop import grad_norm_and_clip

    norm = grad_norm_and_clip(list(params), clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


LossFn = Callable[[Tensor], tuple[Tensor, dict[str, Any]]]
HessianFn = Callable[[Tensor], tuple[Callable[[], Any], int]]


@dataclass
class UpdateCount:
    """Optimizer updates of a run so far, skipped ones included. Sophia refreshes its Hessian after
    updates 0, k, 2k, ... of the run (not of each rollout batch); stages save `n` with their state, so a
    resumed run refreshes on the same updates."""

    n: int = 0


def rollout_hessian(policy: nn.Module, rollout: Rollout, temperature: float = 1.0) -> HessianFn:
    """Sophia's Gauss-Newton-Bartlett estimate for PPO and GRPO: `fn(rows) -> (closure, tokens)`, the
    closure running forward and backward of the GNB loss on the policy's response logits of those rows
    (at `temperature`, the distribution the updates train; the head on the response tokens only, in
    chunks: `gnb_rows_loss`), labels sampled from the policy itself, averaged over the `tokens` response
    tokens (prompt and padding excluded). Only the LM logits enter,
    so a value head gets no curvature estimate (Sophia moves it by lr * clip(m / eps, 1) = sign steps)."""

    def fn(rows: Tensor) -> tuple[Callable[[], Tensor], int]:
        mb = rollout.select(rows.to(rollout.logprobs.device))

        def closure() -> Tensor:
            scored = mb.response_mask.reshape(-1).nonzero().squeeze(1)  # the response tokens
            with autocast(mb.sequences.device):
                hidden, _ = response_hidden(policy, mb.sequences, mb.prompt_len, mb.attention_mask)
                loss = gnb_rows_loss(gather_rows(hidden, scored), base_transformer(policy).lm_head,
                                     temperature=temperature if temperature > 0 else 1.0)
            loss.backward()
            return loss

        return closure, int(mb.response_mask.sum())

    return fn


def minibatch_updates(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip_norm: float,
                      batches: Iterable[Tensor], loss_fn: LossFn, *, hessian: HessianFn | None = None,
                      updates: UpdateCount | None = None) -> dict[str, float]:
    """One optimizer step per mini-batch of rows: `loss_fn(rows) -> (loss, stats)`. A non-finite loss
    skips its update (counted in `skipped_updates`). With Sophia, after each update that the run's count
    `updates` makes due (`llmlab.optim.refresh_hessian_if_due`), `hessian(rows)` gives the closure that
    refreshes its Hessian on the same rows. Returns the mean loss, gradient norm and stats over the updates
    made (loss = nan when none was)."""
    updates = updates if updates is not None else UpdateCount()
    sums: dict[str, float] = {}
    made = skipped = 0
    for rows in batches:
        index = updates.n
        updates.n += 1
        loss, stats = loss_fn(rows)
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        loss.backward()
        values = {"loss": float(loss.detach()), "grad_norm": optimizer_update(optimizer, params, clip_norm),
                  **{k: float(v) for k, v in stats.items()}}
        if hessian is not None:
            refresh_hessian_if_due(optimizer, index, lambda rows=rows: hessian(rows))
        made += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
    out = {k: v / max(made, 1) for k, v in sums.items()}
    if made == 0:
        out["loss"] = float("nan")
    out["skipped_updates"] = skipped
    return out
