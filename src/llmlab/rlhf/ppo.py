"""PPO for language models (Ziegler et al. 2019; InstructGPT): a policy with a value head, a KL-penalised
reward at the final token, GAE, and clipped policy and value updates.

    rollout = generate_rollout(policy, prompts, ..., reference=reference, value_head=head)
    scores = torch.tensor(reward_fn(prompt_texts, completions, **columns))
    adv, returns, info = ppo_advantages(rollout, scores, kl_coef=kl_ctl.value, gamma=1.0, lam=0.95)
    metrics = ppo_update(policy, head, optimizer, rollout, adv, returns, ...)
    kl_ctl.update(info["kl"], n_steps=len(scores))

Per token, r_t = -kl_coef x (log pi - log pi_ref) and the reward score is added at the last response
token; GAE (gamma, gae_lambda) turns rewards and the rollout's values into advantages and value targets;
advantages are whitened over the batch (`whiten_advantages`). Each of `ppo_epochs` passes over random
mini-batches of `mini_batch_size` responses re-scores them in one forward pass (log-probs and values)
and minimises the clipped surrogate plus vf_coef x the clipped value loss. The KL coefficient is fixed
or adaptive (`rlhf.losses.make_kl_controller`). All the maths is in `rlhf.losses` (including the critic's
`explained_variance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llmlab.rlhf.losses import (
    explained_variance,
    gae_advantages,
    make_kl_controller,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)
from llmlab.rlhf.rollout import Rollout, generate_rollout, rollout_stats, score_rollout, source_rewards
from llmlab.rlhf.scoring import response_logprobs
from llmlab.rlhf.updates import UpdateCount, minibatch_updates, minibatches, rollout_hessian
from llmlab.rlhf.value_head import value_head_for

if TYPE_CHECKING:
    from llmlab.rlhf.run import Session


def ppo_advantages(rollout: Rollout, scores: Tensor, *, kl_coef: float, gamma: float, lam: float,
                   whiten: bool = True) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Advantages (B, N), value targets (B, N) and batch facts: the mean per-sequence KL to the
    reference (k1 summed over tokens, what the adaptive controller tracks), the mean non-score reward
    and the mean score."""
    if rollout.values is None:
        raise ValueError("ppo_advantages: the rollout has no values; generate it with value_head=...")
    mask = rollout.response_mask
    scores = scores.to(mask.device).float()
    rewards, kl = ppo_token_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
    advantages, returns = gae_advantages(rewards, rollout.values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    seq_kl = kl.sum(dim=-1)
    info = {"kl": float(seq_kl.mean()), "non_score_reward": float((-kl_coef * seq_kl).mean()),
            "score": float(scores.mean())}
    return advantages, returns, info


def ppo_update(
    policy: nn.Module,
    value_head: nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: Tensor,
    returns: Tensor,
    *,
    clip_range: float,
    cliprange_value: float,
    vf_coef: float,
    ppo_epochs: int,
    mini_batch_size: int,
    temperature: float = 1.0,
    clip_norm: float = 0.0,
    params: Sequence[nn.Parameter] | None = None,
    generator: torch.Generator | None = None,
    updates: UpdateCount | None = None,
) -> dict[str, float]:
    """`ppo_epochs` passes over random mini-batches of `mini_batch_size` responses, one optimizer step
    each on pg_loss + vf_coef x vf_loss. Returns the mean losses, clip fractions, approximate KL between
    old and new policy, gradient norm and explained variance of the values, plus skipped updates.
    `updates`: the run's update count (Sophia's Hessian refresh schedule; a fresh count when None)."""
    if params is None:
        params = [*policy.parameters(), *value_head.parameters()]
    params = [p for p in params if p.requires_grad]

    def loss_fn(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        rows = rows.to(rollout.logprobs.device)
        mb = rollout.select(rows)
        logp, values = response_logprobs(policy, mb.sequences, mb.prompt_len, mb.attention_mask,
                                         temperature=temperature, value_head=value_head)
        pg_loss, pg_stats = ppo_policy_loss(logp, mb.logprobs, advantages[rows], mb.response_mask, clip_range)
        vf_loss, vf_stats = ppo_value_loss(values, mb.values, returns[rows], mb.response_mask, cliprange_value)
        stats = {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), **pg_stats, **vf_stats}
        return pg_loss + vf_coef * vf_loss, stats

    n = rollout.sequences.shape[0]
    batches = (rows for _ in range(ppo_epochs) for rows in minibatches(n, mini_batch_size, generator))
    out = minibatch_updates(optimizer, params, clip_norm, batches, loss_fn,
                            hessian=rollout_hessian(policy, rollout, temperature), updates=updates)
    out["explained_var"] = explained_variance(rollout.values, returns, rollout.response_mask)
    return out


class PPOStage:
    """PPO inside `run_rlhf`: one step = one batch of prompts sampled at `temperature`, scored, turned
    into advantages, then `ppo_update`; the KL coefficient adapts after each batch when `adaptive_kl`.
    The value head is saved beside each checkpoint. Evaluation is the greedy reward on held-out prompts."""

    best_metric = "val_reward"

    def __init__(self, s: Session) -> None:
        from llmlab.optim import build_optimizer
        from llmlab.rlhf.rewards import build_reward_fn

        self.s, cfg = s, s.cfg
        self.reward_fn = build_reward_fn(cfg, s.device)
        self.prompts = s.prompt_batches("train")
        self.value_head = value_head_for(s.policy)
        # one container so the optimizer (and its saved state) covers policy and critic in a fixed order
        self.trainable = nn.ModuleDict({"policy": s.policy, "value_head": self.value_head})
        self.optimizer = build_optimizer(self.trainable, cfg)
        self.params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl)
        self.updates = UpdateCount()

    def step(self) -> dict[str, float]:
        s, cfg = self.s, self.s.cfg
        examples = next(self.prompts)
        rollout = generate_rollout(
            s.policy, [ex["prompt_ids"] for ex in examples], max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop_ids=s.stop_ids, pad_id=s.pad_id,
            generator=s.sample_gen, reference=s.reference, value_head=self.value_head, on_tokens=s.on_tokens,
            compile=cfg.compile)
        scores, _ = score_rollout(self.reward_fn, s.tokenizer, examples, rollout, s.stop_ids)
        kl_coef = self.kl_ctl.value
        advantages, returns, info = ppo_advantages(rollout, scores, kl_coef=kl_coef, gamma=cfg.gamma,
                                                   lam=cfg.gae_lambda, whiten=cfg.whiten_advantages)
        s.policy.train()
        metrics = ppo_update(s.policy, self.value_head, self.optimizer, rollout, advantages, returns,
                             clip_range=cfg.clip_range, cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                             ppo_epochs=cfg.ppo_epochs, mini_batch_size=cfg.mini_batch_size,
                             temperature=cfg.temperature, clip_norm=cfg.clip_norm, params=self.params,
                             generator=s.shuffle_gen, updates=self.updates)
        self.kl_ctl.update(info["kl"], n_steps=len(examples))
        return {**metrics, **info, "reward": info["score"], **source_rewards(self.reward_fn), "kl_coef": kl_coef,
                **rollout_stats(rollout), "tokens": int(rollout.sequences.numel())}

    def evaluate(self) -> dict[str, float]:
        return self.s.evaluate_reward(self.reward_fn)

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.state_dict(), "kl_coef": self.kl_ctl.value, "updates": self.updates.n}

    def load_state_dict(self, state: dict[str, Any], folder: Path | None) -> None:
        """Data position and KL coefficient; the value head too when resuming from `folder`."""
        self.prompts.load_state_dict(state["prompts"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.updates.n = int(state.get("updates", 0))
        if folder is not None:
            self.value_head.load(folder)

    def write_extra(self, folder: Path) -> None:
        """The critic, as value_head.safetensors beside the policy."""
        self.value_head.save(folder)
