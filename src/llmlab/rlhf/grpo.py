"""GRPO (Shao et al. 2024): sample a group of responses per prompt, score them, and push the policy towards
the responses that beat their group's average. No value function.

    rollout = generate_rollout(policy, [p for p in prompts for _ in range(G)], temperature=cfg.grpo_temperature, ...)
    rewards = torch.tensor(reward_fn(prompt_texts, completions, **columns))
    metrics = grpo_update(policy, optimizer, rollout, rewards, group_size=G, ...)

Advantages are group-normalised rewards, (r - mean) / (std + eps) within each prompt's group; a group
whose rewards are all equal gets zero advantage and so no policy gradient (only the KL term acts on it).
The loss per token is the clipped importance ratio times the advantage minus kl_coef x k3 KL to the
reference, averaged per sequence then over sequences (`rlhf.losses.grpo_loss`). The rollout's log-probs
are the "old" policy: `ppo_epochs` passes over mini-batches of `mini_batch_size` prompts (whole groups)
each re-score the responses and take one optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llmlab.rlhf.losses import group_advantages, grpo_loss
from llmlab.rlhf.rollout import Rollout, generate_rollout, rollout_stats, score_rollout, source_rewards
from llmlab.rlhf.scoring import response_logprobs
from llmlab.rlhf.updates import UpdateCount, group_minibatches, minibatch_updates, rollout_hessian

if TYPE_CHECKING:
    from llmlab.rlhf.run import Session


def group_reward_stats(rewards: Tensor, group_size: int) -> dict[str, float]:
    """Mean reward, mean within-group std (population), best-of-N (mean of each group's max) and the
    share of groups with zero variance (which give no policy gradient)."""
    groups = rewards.float().reshape(-1, group_size)  # (N, G)
    return {
        "reward": float(groups.mean()),
        "reward_std": float(groups.std(dim=-1, unbiased=False).mean()),
        "best_of_n": float(groups.amax(dim=-1).mean()),
        "zero_var_groups": float((groups.amax(-1) == groups.amin(-1)).float().mean()),
    }


def grpo_update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    rewards: Tensor,
    *,
    group_size: int,
    clip_range: float,
    kl_coef: float,
    ppo_epochs: int,
    mini_batch_size: int,
    temperature: float = 1.0,
    clip_norm: float = 0.0,
    params: Sequence[nn.Parameter] | None = None,
    generator: torch.Generator | None = None,
    updates: UpdateCount | None = None,
) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in mini-batches of `mini_batch_size` prompts (x group_size
    responses), one optimizer step each. Returns loss, KL (k3, mean per token), clip fraction, ratio,
    gradient norm, the reward statistics and the number of non-finite (skipped) updates.
    `updates`: the run's update count (Sophia's Hessian refresh schedule; a fresh count when None)."""
    params = [p for p in (params if params is not None else policy.parameters()) if p.requires_grad]
    rewards = rewards.to(rollout.logprobs.device).float()
    advantages = group_advantages(rewards, group_size)
    n_groups = rewards.numel() // group_size

    def loss_fn(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        rows = rows.to(rollout.logprobs.device)
        mb = rollout.select(rows)
        logp, _ = response_logprobs(policy, mb.sequences, mb.prompt_len, mb.attention_mask, temperature=temperature)
        return grpo_loss(logp, mb.logprobs, mb.ref_logprobs, advantages[rows], mb.response_mask, clip_range, kl_coef)

    batches = (rows for _ in range(ppo_epochs)
               for rows in group_minibatches(n_groups, group_size, mini_batch_size, generator))
    out = minibatch_updates(optimizer, params, clip_norm, batches, loss_fn,
                            hessian=rollout_hessian(policy, rollout, temperature), updates=updates)
    out.update(group_reward_stats(rewards, group_size))
    return out


class GRPOStage:
    """GRPO inside `run_rlhf`: one step = one batch of prompts x group_size samples, scored, then
    `grpo_update`. Evaluation is the greedy reward on held-out prompts (best checkpoint by it)."""

    best_metric = "val_reward"

    def __init__(self, s: Session) -> None:
        from llmlab.optim import build_optimizer
        from llmlab.rlhf.rewards import build_reward_fn

        self.s, cfg = s, s.cfg
        self.reward_fn = build_reward_fn(cfg, s.device)
        self.prompts = s.prompt_batches("train")
        self.optimizer = build_optimizer(s.policy, cfg)
        self.params = [p for p in s.policy.parameters() if p.requires_grad]
        self.updates = UpdateCount()

    def step(self) -> dict[str, float]:
        s, cfg = self.s, self.s.cfg
        examples = next(self.prompts)
        G = cfg.group_size
        rollout = generate_rollout(
            s.policy, [ex["prompt_ids"] for ex in examples for _ in range(G)], max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.grpo_temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop_ids=s.stop_ids,
            pad_id=s.pad_id, generator=s.sample_gen, reference=s.reference, on_tokens=s.on_tokens,
            compile=cfg.compile)
        rewards, _ = score_rollout(self.reward_fn, s.tokenizer, examples, rollout, s.stop_ids, repeat=G)
        s.policy.train()
        metrics = grpo_update(s.policy, self.optimizer, rollout, rewards, group_size=G, clip_range=cfg.clip_range,
                              kl_coef=cfg.kl_coef, ppo_epochs=cfg.ppo_epochs, mini_batch_size=cfg.mini_batch_size,
                              temperature=cfg.grpo_temperature, clip_norm=cfg.clip_norm, params=self.params,
                              generator=s.shuffle_gen, updates=self.updates)
        if s.reference is None:  # kl_coef = 0: no reference was built, the k3 "KL" above is to the old policy
            metrics.pop("kl", None)
        return {**metrics, **source_rewards(self.reward_fn), **rollout_stats(rollout),
                "tokens": int(rollout.sequences.numel())}

    def evaluate(self) -> dict[str, float]:
        return self.s.evaluate_reward(self.reward_fn)

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.state_dict(), "updates": self.updates.n}

    def load_state_dict(self, state: dict[str, Any], folder: Path | None) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.updates.n = int(state.get("updates", 0))

    def write_extra(self, folder: Path) -> None:
        """Nothing beyond the policy (GRPO has no critic)."""
