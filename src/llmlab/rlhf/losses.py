"""The maths of RLHF as pure functions on tensors: masked statistics, KL estimators, PPO (token rewards,
GAE, clipped policy and value losses, explained variance, KL controllers), DPO and GRPO. The log-probs
they take come from `llmlab.train.losses.token_logprobs` (the LM head chunk by chunk).

Nothing here touches a model, an optimizer or a config object: the PPO, DPO and GRPO loops gather
tensors and call these functions, and every function is unit-tested on hand-computed numbers
(tests/test_rlhf_losses.py).

Conventions
-----------
- Shapes: ``B`` sequences, ``T`` response tokens, ``V`` vocabulary.
- ``mask`` is 1 (or True) on the response tokens that count and 0 on padding; any dtype works.
- ``logp`` / ``old_logp`` / ``ref_logp`` are log-probabilities of the *sampled* tokens, shape (B, T),
  under the current policy, the policy that sampled them, and the frozen reference.
- Statistics are returned as detached 0-dim tensors (no GPU sync inside the loss); call ``float()``
  when logging.
- A per-sequence tensor (``scores``, GRPO's ``advantages``) given where a per-token one is expected, or
  the other way round, is a ValueError naming the shapes: broadcasting would otherwise give a number
  without an error (a (B, 1) column against (B, T) tokens).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _check_shape(where: str, name: str, x: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{where}: expected {name} of shape {shape} ({what}), got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set (over everything, or along ``dim``)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set; 0 (not NaN) where nothing is set."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of ``x`` over the masked positions (all dims together).

    ``unbiased=False`` (the default) divides by N, the plain variance of the numbers selected;
    ``unbiased=True`` applies Bessel's correction N / (N - 1).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over the masked positions.

    PPO whitens advantages per batch so the policy-gradient scale does not depend on the reward scale.
    With ``shift_mean=False`` the mean is kept (only the spread is rescaled). Positions outside the
    mask are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020)
# --------------------------------------------------------------------------------------------------
# For tokens sampled from the policy, with log r = ref_logp - logp, each estimator's expectation
# approximates KL(policy || ref). All are elementwise.


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi(y) - log pi_ref(y): unbiased, high variance, can be negative per token."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 (log pi - log pi_ref)^2: always >= 0, low variance, biased for large KL."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = r - log r - 1 with r = pi_ref / pi: unbiased, always >= 0, zero when the two agree.

    This is the estimator of the GRPO paper (Shao et al. 2024, eq. 4). The log-ratio is clamped to
    [-20, 20] so that one wildly improbable token cannot overflow ``exp``.
    """
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(log_ratio) - log_ratio - 1.0


# --------------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------------


def ppo_token_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: a KL penalty on every token plus the sequence score on its last token.

    As in Ziegler et al. 2019 / InstructGPT: r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)), and the
    reward model's scalar score is added at the last valid response token. A sequence whose mask is
    all zero (empty response) gets no score and no penalty.

    Args: scores (B,), logp / ref_logp / mask (B, T).
    Returns: (rewards (B, T), kl (B, T)), both zero outside the mask; ``kl`` is the k1 estimate.
    """
    _check_shape("ppo_token_rewards", "scores", scores, tuple(mask.shape[:1]), "one score per sequence")
    m = mask.to(logp.dtype)
    kl = kl_k1(logp, ref_logp) * m
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (positions * (mask != 0)).argmax(dim=-1)  # (B,) index of the last valid token, 0 if none
    has_tokens = (mask != 0).any(dim=-1).to(rewards.dtype)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype) * has_tokens
    return rewards, kl


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the valid response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V_t.
    The recursion runs backwards over the tokens where ``mask`` is set: masked positions are skipped
    (the next valid token is the "next step"), and the value after the last valid token is 0 (the
    episode ends there). With gamma = lam = 1, A_t is the reward-to-go minus V_t.

    Args: rewards, values, mask (B, T). Returns (advantages, returns), (B, T), 0 outside the mask.
    The returns are the value-function targets; whiten the advantages afterwards if wanted.
    """
    valid = mask != 0
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid[:, t], adv, torch.zeros_like(adv))
        next_adv = torch.where(valid[:, t], adv, next_adv)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
    m = valid.to(values.dtype)
    returns = (advantages + values) * m
    return advantages.detach(), returns.detach()


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ratio = exp(logp - old_logp); per token loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),
    i.e. the negative of the pessimistic min of the two surrogates. Averaged over all valid tokens
    of the batch.

    Stats: ``clipfrac`` (share of tokens where the clipped term is the active one), ``approx_kl``
    (k3 estimate of KL(old || new) from the tokens sampled by the old policy), ``ratio`` (mean).
    """
    _check_shape("ppo_policy_loss", "advantages", advantages, tuple(logp.shape), "one per response token, as logp")
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(kl_k3(old_logp, logp), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), mean over valid tokens.

    V_clipped = old_V + clip(V - old_V, -c, c) keeps the critic from moving further than the policy's
    trust region in one rollout (as in the OpenAI baselines PPO2 and the InstructGPT setup).
    Stats: ``vf_clipfrac`` (share of tokens where the clipped error is the larger one).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """PPO's critic diagnostic, a float for logging: 1 - Var(returns - values) / Var(returns) over the
    valid tokens (1 = perfect critic, <= 0 useless; 0 when the returns do not vary)."""
    var_r = masked_var(returns, mask)
    var_d = masked_var(returns - values, mask)
    return float(1.0 - var_d / var_r) if float(var_r) > 0 else 0.0


class FixedKLController:
    """A KL coefficient that never changes (``adaptive_kl=False``)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-tuning LMs from human preferences").

    After each batch: e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + e * n_steps / horizon),
    so beta grows when the policy drifts past ``target`` nats and shrinks when it stays below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10000) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """``current_kl``: mean per-sequence KL of the batch; ``n_steps``: samples in the batch."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(
    kl_coef: float, adaptive: bool, target: float, horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    """The controller for RLHFConfig's ``kl_coef``, ``adaptive_kl`` and ``target_kl``."""
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)


# --------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimisation loss (Rafailov et al. 2023, eq. 7).

    loss = -log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)))),
    averaged over the batch; inputs are summed sequence log-probs, shape (B,). At zero margin the
    loss is log 2.

    Returns (loss, chosen_rewards, rejected_rewards): the implicit rewards beta * (log pi - log pi_ref)
    of each response, detached, for logging (accuracy = chosen > rejected).
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def dpo_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Batch summaries of DPO's implicit rewards: accuracy (share where chosen beats rejected),
    mean margin, and the mean reward of each side."""
    return {
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
    }


# --------------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): (r - group mean) / (group std + eps).

    ``rewards`` is (N * G,), the G samples of each prompt contiguous (integer rewards are read as
    floats). The std is the plain (population, divide-by-G) standard deviation of the group. A group
    whose rewards are all equal gets exactly zero advantage, so it contributes no policy gradient.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_advantages: expected a flat tensor of N * {group_size} rewards, "
            f"got shape {tuple(rewards.shape)}"
        )
    groups = rewards.reshape(-1, group_size)  # (N, G)
    if not groups.is_floating_point():  # 0/1 rewards as integers or booleans
        groups = groups.to(torch.get_default_dtype())
    mean = groups.mean(dim=-1, keepdim=True)
    std = groups.std(dim=-1, keepdim=True, unbiased=False)
    advantages = (groups - mean) / (std + eps)
    constant = groups.amax(dim=-1, keepdim=True) == groups.amin(dim=-1, keepdim=True)
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    kl_coef: float,
    normalization: Literal["sequence", "token"] = "sequence",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO objective (Shao et al. 2024, eq. 3), as a loss to minimise.

    Per token: min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - kl_coef * k3(pi || pi_ref), with
    ratio = exp(logp - old_logp) and A the sequence's group advantage, broadcast over its tokens.
    The loss is minus that objective.

    ``normalization="sequence"`` (the paper's 1/G sum_i 1/|o_i| sum_t): average over each sequence's
    tokens, then over the sequences that have at least one token. ``"token"``: one mean over every
    valid token of the batch, so long responses weigh more (the DAPO variant).

    Args: logp / old_logp / ref_logp / mask (B, T), advantages (B,).
    Stats: ``clipfrac`` (share of tokens where clipping is active), ``kl`` (mean k3), ``ratio``.
    """
    _check_shape("grpo_loss", "advantages", advantages, tuple(logp.shape[:1]),
                 "one per sequence, e.g. group_advantages(rewards, group_size)")
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(-1)  # (B, 1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * adv)
    kl = kl_k3(logp, ref_logp)
    per_token = -(surrogate - kl_coef * kl)  # (B, T)
    if normalization == "sequence":
        has_tokens = (mask != 0).any(dim=-1)
        loss = masked_mean(masked_mean(per_token, mask, dim=-1), has_tokens)
    elif normalization == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"normalization: expected 'sequence' or 'token', got {normalization!r}")
    with torch.no_grad():
        clipped = (ratio < 1.0 - clip_range) & (adv < 0) | (ratio > 1.0 + clip_range) & (adv > 0)
        stats = {
            "clipfrac": masked_mean(clipped.float(), mask),
            "kl": masked_mean(kl, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats
