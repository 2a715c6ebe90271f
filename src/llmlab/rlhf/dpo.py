"""DPO (Rafailov et al. 2023): learn from preference pairs against a frozen reference, no reward model.

    logps = preference_logps(policy, batch)                # summed log-probs of chosen and rejected
    metrics = dpo_step(policy, reference, optimizer, batch, beta=0.1, mini_batch_size=4, clip_norm=1.0)

Each response is scored by the SUM of its tokens' log-probs (prompt and padding excluded through the
labels, -100). Chosen and rejected rows go through the model in one concatenated forward pass; the
reference's pass runs without gradient (for a LoRA policy it is the same model with its adapter disabled).
The loss, -log sigmoid(beta x margin), and the implicit-reward metrics come from `rlhf.losses`.

A step takes `batch_size` pairs and makes one optimizer update, accumulating gradients over
`mini_batch_size` pairs at a time (batch_size must divide by it; the config checks). Validation uses a
fixed set of held-out pairs (the `val` split), gathered once, so every evaluation scores the same pairs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llmlab.checkpoint import base_transformer
from llmlab.device import autocast, model_device
from llmlab.optim import refresh_hessian_if_due
from llmlab.rlhf.losses import dpo_loss, dpo_metrics
from llmlab.rlhf.scoring import Reference
from llmlab.rlhf.updates import UpdateCount, optimizer_update
from llmlab.train.losses import gather_rows, gnb_rows_loss, shift_labels, token_logprobs

if TYPE_CHECKING:
    from llmlab.rlhf.run import Session

IGNORE_INDEX = -100


def _trim(batch: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    """Rows of a preference batch, cut to the longest sequence among them (less padding to process)."""
    out = {k: v[rows] for k, v in batch.items()}
    keep = int(max(out["chosen_attention_mask"].sum(-1).max(), out["rejected_attention_mask"].sum(-1).max()))
    for k, v in out.items():
        if v.dim() == 2:
            out[k] = v[:, :keep]
    return out


Scored = tuple[Tensor, Tensor, Tensor]  # (ids (2B, T), targets (2B * T,), rows (M,)): `scored_rows`


def scored_rows(batch: dict[str, Tensor], device: torch.device | None = None) -> Scored:
    """The 2B concatenated rows (chosen, then rejected) of a preference batch: input ids (2B, T), the
    targets each position predicts (2B * T,) and the flat positions that predict a response token (M,).
    Found where the batch is (the CPU, as the data iterators yield it: no device sync), then moved to
    `device`."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    targets = shift_labels(labels, IGNORE_INDEX).reshape(-1)  # position t predicts labels[:, t + 1]
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if device is not None:
        ids, targets, rows = ids.to(device), targets.to(device), rows.to(device)
    return ids, targets, rows


def scored_logps(model: nn.Module, scored: Scored) -> tuple[Tensor, Tensor]:
    """`preference_logps` of rows already found (`scored_rows`): the LM head on the M scored positions
    only, chunk by chunk (`llmlab.train.losses.token_logprobs`)."""
    ids, targets, rows = scored
    with autocast(ids.device):
        hidden = model(ids, output_hidden=True)  # (2B, T, D)
        logp = token_logprobs(gather_rows(hidden, rows), base_transformer(model).lm_head, targets.index_select(0, rows))
    # each position written once, then summed per sequence: deterministic on CUDA (index_add is not)
    sums = logp.new_zeros(ids.numel()).index_copy(0, rows, logp).view(ids.shape).sum(-1)
    n = ids.shape[0] // 2
    return sums[:n], sums[n:]


def preference_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the chosen and rejected responses, (B,) each, in one forward pass over the
    2B concatenated rows (right-padded, so causal attention needs no mask). The LM head runs only on the
    positions that predict a response token (labels != -100), chunk by chunk: prompts and padding cost
    no logits, and the (2B, T, V) logits never exist at once."""
    return scored_logps(model, scored_rows(batch, model_device(model)))


def preference_hessian(policy: nn.Module, batch: dict[str, Tensor], mini_batch_size: int):
    """Sophia's Gauss-Newton-Bartlett estimate for DPO: `(closure, tokens)`, the closure running forward
    and backward of the GNB loss (labels sampled from the policy) over the response tokens of the
    batch's chosen and rejected sequences (labels != -100), a mean over all `tokens` of them, one
    mini-batch at a time, the head on those positions only, in chunks (`gnb_rows_loss`)."""
    n, device = batch["chosen_input_ids"].shape[0], model_device(policy)
    subs = [scored_rows(_trim(batch, slice(start, start + mini_batch_size)), device)
            for start in range(0, n, mini_batch_size)]
    tokens = sum(int(rows.numel()) for _, _, rows in subs)

    def closure() -> None:
        for ids, _, rows in subs:
            with autocast(ids.device):
                hidden = policy(ids, output_hidden=True)  # (2b, T, D)
                loss = gnb_rows_loss(gather_rows(hidden, rows), base_transformer(policy).lm_head)
            (loss * rows.numel() / max(tokens, 1)).backward()

    return closure, tokens


def dpo_step(
    policy: nn.Module,
    reference: Reference,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    *,
    beta: float,
    mini_batch_size: int,
    clip_norm: float = 0.0,
    params: Iterable[nn.Parameter] | None = None,
    updates: UpdateCount | None = None,
) -> dict[str, float]:
    """One DPO update over `batch` (gradients accumulated over mini-batches). Returns the batch's loss,
    reward accuracy, margin, mean chosen/rejected implicit rewards, gradient norm and token count.
    `updates`: the run's update count; with Sophia the Hessian is refreshed after updates 0, k, 2k, ...
    (`preference_hessian` on this batch).

    A non-finite loss leaves the weights untouched and is reported as loss = nan (the loop decides
    whether to stop or skip)."""
    device = model_device(policy)
    n = batch["chosen_input_ids"].shape[0]  # the batch stays where it is (the CPU): rows are found there
    params = [p for p in (params if params is not None else policy.parameters()) if p.requires_grad]
    updates = updates if updates is not None else UpdateCount()
    index = updates.n
    updates.n += 1
    optimizer.zero_grad(set_to_none=True)
    losses, chosen_r, rejected_r = [], [], []
    tokens = 0
    for start in range(0, n, mini_batch_size):
        sub = _trim(batch, slice(start, start + mini_batch_size))
        scored = scored_rows(sub, device)
        with torch.no_grad(), reference.active() as ref_model:
            ref_c, ref_r = scored_logps(ref_model, scored)
        pol_c, pol_r = scored_logps(policy, scored)
        loss, c_rew, r_rew = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
        rows = sub["chosen_input_ids"].shape[0]
        (loss * rows / n).backward()
        losses.append(loss.detach() * rows)
        chosen_r.append(c_rew)
        rejected_r.append(r_rew)
        tokens += int(sub["chosen_attention_mask"].sum() + sub["rejected_attention_mask"].sum())
    total = torch.stack(losses).sum() / n
    if not torch.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float("nan"), "tokens": tokens}
    grad_norm = optimizer_update(optimizer, params, clip_norm)
    refresh_hessian_if_due(optimizer, index, lambda: preference_hessian(policy, batch, mini_batch_size))
    stats = dpo_metrics(torch.cat(chosen_r), torch.cat(rejected_r))
    return {"loss": float(total), **{k: float(v) for k, v in stats.items()}, "grad_norm": grad_norm,
            "tokens": tokens}


@torch.no_grad()
def dpo_evaluate(policy: nn.Module, reference: Reference, batches: Iterable[dict[str, Tensor]], *,
                 beta: float, mini_batch_size: int) -> dict[str, float]:
    """DPO loss, reward accuracy and margin over held-out pairs (every pair weighs the same)."""
    device = model_device(policy)
    was_training = policy.training
    policy.eval()
    losses, chosen_r, rejected_r = [], [], []
    for batch in batches:
        n = batch["chosen_input_ids"].shape[0]
        for start in range(0, n, mini_batch_size):
            scored = scored_rows(_trim(batch, slice(start, start + mini_batch_size)), device)
            with reference.active() as ref_model:
                ref_c, ref_r = scored_logps(ref_model, scored)
            pol_c, pol_r = scored_logps(policy, scored)
            loss, c_rew, r_rew = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
            losses.append(loss * c_rew.shape[0])
            chosen_r.append(c_rew)
            rejected_r.append(r_rew)
    policy.train(was_training)
    if not chosen_r:
        return {}
    chosen, rejected = torch.cat(chosen_r), torch.cat(rejected_r)
    stats = dpo_metrics(chosen, rejected)
    return {"val_loss": float(torch.stack(losses).sum() / chosen.shape[0]),
            "val_reward_accuracy": float(stats["reward_accuracy"]),
            "val_reward_margin": float(stats["reward_margin"]),
            "val_pairs": int(chosen.shape[0])}


def beta_of(cfg: Any, notice=print) -> float:
    """`cfg.beta`, or `clip_range` when beta is None (the spec reuses clip_range as DPO's beta), with a
    notice so the fallback is never silent."""
    if cfg.beta is None:
        notice(f"DPO: beta is not set, using clip_range = {cfg.clip_range} as beta (the spec reuses it); "
               f"set beta to choose it explicitly")
    return cfg.dpo_beta


class DPOStage:
    """DPO inside `run_rlhf`: one step = `batch_size` preference pairs, one update. Evaluation scores a
    fixed set of held-out pairs (eval_steps batches of the `val` split); the best checkpoint is the one
    with the highest validation reward accuracy."""

    best_metric = "val_reward_accuracy"

    def __init__(self, s: Session) -> None:
        from llmlab.data.preference import PreferenceBatches
        from llmlab.optim import build_optimizer

        self.s, cfg = s, s.cfg
        self.beta = beta_of(cfg, s.notice)
        self.seq_len = min(cfg.max_seq_len or s.model_max_len, s.model_max_len)
        self.pairs = PreferenceBatches(cfg.datasets, s.tokenizer, self.seq_len, cfg.batch_size, seed=cfg.seed,
                                       split="train", val_fraction=cfg.val_fraction, max_prompt_len=cfg.max_prompt_len)
        self.optimizer = build_optimizer(s.policy, cfg)
        self.params = [p for p in s.policy.parameters() if p.requires_grad]
        self.updates = UpdateCount()
        self._val: list | None = None

    def step(self) -> dict[str, float]:
        cfg = self.s.cfg
        self.s.policy.train()
        return dpo_step(self.s.policy, self.s.reference, self.optimizer, next(self.pairs), beta=self.beta,
                        mini_batch_size=cfg.mini_batch_size, clip_norm=cfg.clip_norm, params=self.params,
                        updates=self.updates)

    def _held_out(self) -> list:
        from llmlab.data.preference import PreferenceBatches
        from llmlab.errors import DataError

        cfg = self.s.cfg
        if cfg.val_fraction <= 0:
            return []
        try:
            val = PreferenceBatches(cfg.datasets, self.s.tokenizer, self.seq_len, cfg.batch_size, seed=cfg.seed,
                                    split="val", val_fraction=cfg.val_fraction, max_prompt_len=cfg.max_prompt_len)
            return [next(val) for _ in range(cfg.eval_steps)]
        except DataError as e:
            self.s.notice(f"DPO: no validation pairs ({e}); the best checkpoint follows training accuracy")
            return []

    def evaluate(self) -> dict[str, float]:
        if self._val is None:
            self._val = self._held_out()
        return dpo_evaluate(self.s.policy, self.s.reference, self._val, beta=self.beta,
                            mini_batch_size=self.s.cfg.mini_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs.state_dict(), "updates": self.updates.n}

    def load_state_dict(self, state: dict[str, Any], folder: Path | None) -> None:
        self.pairs.load_state_dict(state["pairs"])
        self.updates.n = int(state.get("updates", 0))

    def write_extra(self, folder: Path) -> None:
        """Nothing beyond the policy."""
