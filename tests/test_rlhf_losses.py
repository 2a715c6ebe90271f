"""RLHF maths on hand-computed numbers: every expected value below is worked out in the comments."""

import math

import pytest
import torch

from llmlab.rlhf.losses import (
    AdaptiveKLController,
    FixedKLController,
    dpo_loss,
    dpo_metrics,
    gae_advantages,
    group_advantages,
    grpo_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    make_kl_controller,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol
    )


# --- masked statistics -------------------------------------------------------------------------


def test_masked_sum_mean_var():
    x = t([1.0, 2.0, 100.0], [3.0, 4.0, 5.0])
    mask = t([1, 1, 0], [1, 1, 1])
    close(masked_sum(x, mask), 15.0)
    close(masked_mean(x, mask), 3.0)  # (1 + 2 + 3 + 4 + 5) / 5
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0])
    close(masked_var(x, mask), 2.0)  # deviations -2 -1 0 1 2 -> 10 / 5
    close(masked_var(x, mask, unbiased=True), 2.5)  # 10 / 4
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # nothing selected -> 0, not NaN


def test_masked_whiten():
    x = t([1.0, 3.0, 50.0])
    mask = t([1, 1, 0])  # mean 2, variance 1
    close(masked_whiten(x, mask, eps=0.0), [[-1.0, 1.0, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False, eps=0.0), [[1.0, 3.0, 0.0]])
    y = t([2.0, 6.0])  # mean 4, variance 4 -> (y - 4) / 2
    close(masked_whiten(y, torch.ones_like(y), eps=0.0), [[-1.0, 1.0]])
    close(masked_whiten(y, torch.ones_like(y), shift_mean=False, eps=0.0), [[3.0, 5.0]])


# --- KL estimators -----------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp = torch.tensor([0.0, -1.0, -2.0])
    ref = torch.tensor([0.0, -2.0, -1.0])
    close(kl_k1(logp, ref), [0.0, 1.0, -1.0])
    close(kl_k2(logp, ref), [0.0, 0.5, 0.5])
    # k3 = exp(d) - d - 1 with d = ref - logp = [0, -1, 1]
    close(kl_k3(logp, ref), [0.0, math.exp(-1) + 1 - 1, math.e - 2])


def test_kl_k3_is_non_negative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    logp, ref = -torch.rand(200, generator=g) * 5, -torch.rand(200, generator=g) * 5
    assert (kl_k3(logp, ref) >= 0).all()
    assert torch.equal(kl_k3(logp, logp), torch.zeros(200))
    assert torch.isfinite(kl_k3(torch.tensor([0.0]), torch.tensor([-1e4]))).all()


# --- PPO ---------------------------------------------------------------------------------------


def test_ppo_token_rewards_place_score_on_last_valid_token():
    scores = torch.tensor([2.0, 5.0, 7.0])
    logp = t([-1.0, -1.0, -1.0], [-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0])
    ref = t([-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])
    mask = t([1, 1, 0], [1, 1, 1], [0, 0, 0])
    rewards, kl = ppo_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # row 0: kl = [0.5, 0, (masked)] -> rewards [-0.05, 0 + 2, 0]
    # row 1: kl = [0, -1, -2] -> rewards [0, 0.1, 0.2 + 5]
    # row 2: empty response -> nothing placed
    close(kl, [[0.5, 0.0, 0.0], [0.0, -1.0, -2.0], [0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 2.0, 0.0], [0.0, 0.1, 5.2], [0.0, 0.0, 0.0]])


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards = t([1.0, 2.0, 3.0, 0.0])
    values = t([0.5, 0.5, 0.5, 99.0])  # the value under the padding must be ignored
    mask = t([1, 1, 1, 0])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[6 - 0.5, 5 - 0.5, 3 - 0.5, 0.0]])
    close(ret, [[6.0, 5.0, 3.0, 0.0]])


def test_gae_by_hand_gamma_half():
    # gamma = 0.5, lam = 1, r = [0, 0, 4], V = [1, 2, 3], value after the end = 0.
    # delta_2 = 4 + 0 - 3 = 1;   A_2 = 1
    # delta_1 = 0 + 0.5*3 - 2 = -0.5;  A_1 = -0.5 + 0.5*1 = 0
    # delta_0 = 0 + 0.5*2 - 1 = 0;     A_0 = 0 + 0.5*0 = 0
    rewards, values, mask = t([0.0, 0.0, 4.0]), t([1.0, 2.0, 3.0]), t([1, 1, 1])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0)
    close(adv, [[0.0, 0.0, 1.0]])
    close(ret, [[1.0, 2.0, 4.0]])  # discounted reward-to-go: [4/4, 4/2, 4]
    # lam = 0.5: A_2 = 1, A_1 = -0.5 + 0.25*1 = -0.25, A_0 = 0 + 0.25*(-0.25) = -0.0625
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.0625, -0.25, 1.0]])


def test_gae_skips_holes_in_the_mask():
    # The masked middle token is skipped: with gamma = lam = 1 the first token sees r_2 directly.
    adv, _ = gae_advantages(t([1.0, 50.0, 2.0]), t([0.0, 7.0, 0.0]), t([1, 0, 1]), gamma=1.0, lam=1.0)
    close(adv, [[3.0, 0.0, 2.0]])


def test_ppo_policy_loss_clipping_depends_on_ratio_and_sign():
    eps = 0.2
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.5, 1.5, 0.5, 1.1]])
    logp = ratios.log()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    # token 0: ratio 1.5, A = +1 -> max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: ratio 1.5, A = -1 -> max(1.5, 1.2) = 1.5 (unclipped: pessimistic side)
    # token 2: ratio 0.5, A = -1 -> max(0.5, 0.8) = 0.8 (clipped)
    # token 3: ratio 1.1 inside [0.8, 1.2] -> -1.1
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip_range=eps)
    close(loss, (-1.2 + 1.5 + 0.8 - 1.1) / 4)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], (1.5 + 1.5 + 0.5 + 1.1) / 4)
    # the gradient flows only through unclipped tokens: d/dlogp of -A*ratio = -A*ratio
    logp = logp.clone().requires_grad_(True)
    ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip_range=eps)[0].backward()
    close(logp.grad, [[0.0, 1.5 / 4, 0.0, -1.1 / 4]])


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    loss, stats = ppo_policy_loss(logp, logp, t([2.0, 4.0, 100.0]), t([1, 1, 0]), clip_range=0.2)
    close(loss, -3.0)
    close(stats["approx_kl"], 0.0)
    close(stats["clipfrac"], 0.0)


def test_ppo_value_loss_by_hand():
    values = t([1.0, 3.0, 2.0])
    old_values = t([0.0, 2.9, 0.0])
    returns = t([0.0, 3.0, 0.0])
    mask = t([1, 1, 0])
    # token 0: v = 1, clipped to 0 + 0.2 = 0.2; errors 1 and 0.04 -> 1
    # token 1: v = 3, clip(0.1) keeps 3.0; errors 0 and 0 -> 0
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    close(loss, 0.5 * (1.0 + 0.0) / 2)
    close(stats["vf_clipfrac"], 0.0)
    # now the clipped error is the larger one: old 0, v = 1, R = 2 -> errors 1 and (0.2 - 2)^2 = 3.24
    loss, stats = ppo_value_loss(t([1.0]), t([0.0]), t([2.0]), t([1]), clip_range_value=0.2)
    close(loss, 0.5 * 3.24)
    close(stats["vf_clipfrac"], 1.0)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(9.0, n_steps=10)  # error = 9/6 - 1 = 0.5 -> clipped 0.2; x (1 + 0.2 * 10/100)
    close(ctl.value, 0.1 * 1.02)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(5.4, n_steps=50)  # error = -0.1 -> x (1 - 0.1 * 0.5)
    close(ctl.value, 0.1 * 0.95)
    assert isinstance(make_kl_controller(0.1, adaptive=True, target=6.0), AdaptiveKLController)
    assert isinstance(make_kl_controller(0.1, adaptive=False, target=6.0), FixedKLController)


# --- DPO ---------------------------------------------------------------------------------------


def test_dpo_loss_zero_margin_is_log_two():
    z = torch.tensor([-3.0, -7.0])
    loss, chosen, rejected = dpo_loss(z, z, z, z, beta=0.1)
    close(loss, LN2)
    close(chosen, [0.0, 0.0])


def test_dpo_loss_by_hand():
    # chosen log-ratio 1 - 0 = 1, rejected log-ratio -2 - (-1) = -1 -> margin 2; beta = 0.5 -> z = 1
    # loss = -log sigmoid(1) = log(1 + e^-1)
    pc, pr = torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])
    rc, rr = torch.tensor([0.0, 0.0]), torch.tensor([-1.0, 2.0])
    # second pair: chosen 0, rejected 0 - 2 = -2 -> margin 2 -> z = 1 too
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    close(loss, math.log(1 + math.exp(-1)))
    close(chosen, [0.5, 0.0])
    close(rejected, [-0.5, -1.0])
    metrics = dpo_metrics(chosen, rejected)
    close(metrics["reward_accuracy"], 1.0)
    close(metrics["reward_margin"], (1.0 + 1.0) / 2)
    close(metrics["chosen_reward"], 0.25)
    close(metrics["rejected_reward"], -0.75)
    close(dpo_metrics(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))["reward_accuracy"], 0.5)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.2)[0].backward()
    # d/dpc of -logsigmoid(beta * (pc - pr)) at 0 = -beta * sigmoid(0) = -0.1
    close(pc.grad, [-0.1])
    close(pr.grad, [0.1])


# --- GRPO --------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    # groups [1, 0] and [1, 0]: mean 0.5, std 0.5 -> +-0.5 / (0.5 + eps)
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), group_size=2, eps=1e-4)
    close(adv, [0.5 / 0.5001, -0.5 / 0.5001] * 2)
    # one group [0, 0, 0, 3]: mean 0.75, std sqrt((3 * 0.5625 + 5.0625) / 4) = sqrt(1.6875)
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 3.0]), group_size=4, eps=0.0)
    s = math.sqrt(1.6875)
    close(adv, [-0.75 / s] * 3 + [2.25 / s])


def test_group_advantages_zero_variance_group_is_exactly_zero():
    adv = group_advantages(torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 0.5]), group_size=3)
    assert torch.equal(adv[:3], torch.zeros(3))
    close(adv[3:].sum(), 0.0)
    with pytest.raises(ValueError, match="group_advantages"):
        group_advantages(torch.zeros(5), group_size=2)


def test_group_advantages_of_integer_or_boolean_rewards_equal_the_float_ones():
    want = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)  # was "mean(): could not infer ..."
    assert torch.equal(group_advantages(torch.tensor([1, 0, 1, 1]), group_size=2), want)
    assert torch.equal(group_advantages(torch.tensor([True, False, True, True]), group_size=2), want)


def test_grpo_loss_on_policy_by_hand():
    # On policy with ref == policy: ratio 1, KL 0 -> loss = -(mean over sequences of A_i).
    # The third response is empty: it is left out of the mean (else the loss would be 2/3).
    logp = t([-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0], [-1.0, -1.0, -1.0])
    adv = torch.tensor([1.0, -3.0, 10.0])
    mask = t([1, 1, 0], [1, 0, 0], [0, 0, 0])
    loss, stats = grpo_loss(logp, logp, logp, adv, mask, clip_range=0.2, kl_coef=0.1)
    close(loss, -(1.0 - 3.0) / 2)
    close(stats["kl"], 0.0)
    close(stats["clipfrac"], 0.0)


def test_grpo_loss_sequence_vs_token_normalisation_and_kl():
    # ratio 1 everywhere; ref differs on the first sequence: ref - logp = 1 -> k3 = e - 2 per token.
    logp = torch.zeros(2, 3)
    ref = t([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    adv = torch.tensor([0.0, 1.0])
    mask = t([1, 1, 1], [1, 0, 0])
    k3 = math.e - 2
    # per token loss: sequence 0 -> +0.5*k3 (3 tokens), sequence 1 -> -1 (1 token)
    seq, stats = grpo_loss(logp, logp, ref, adv, mask, clip_range=0.2, kl_coef=0.5)
    close(seq, (0.5 * k3 + (-1.0)) / 2)
    close(stats["kl"], 3 * k3 / 4)
    tok, _ = grpo_loss(logp, logp, ref, adv, mask, clip_range=0.2, kl_coef=0.5, normalization="token")
    close(tok, (3 * 0.5 * k3 - 1.0) / 4)


def test_grpo_loss_clipping_and_empty_sequences():
    old = torch.zeros(3, 2)
    logp = torch.log(t([1.5, 1.1], [1.5, 0.5], [9.0, 9.0]))
    adv = torch.tensor([1.0, -1.0, 5.0])
    mask = t([1, 1], [1, 1], [0, 0])  # the third (empty) sequence must not count
    # seq 0: min(1.5, 1.2) = 1.2 (clipped), min(1.1, 1.1) = 1.1 -> mean 1.15
    # seq 1: min(-1.5, -1.2) = -1.5, min(-0.5, -0.8) = -0.8 (clipped) -> mean -1.15
    loss, stats = grpo_loss(logp, old, old, adv, mask, clip_range=0.2, kl_coef=0.0)
    close(loss, -(1.15 - 1.15) / 2)
    close(stats["clipfrac"], 2 / 4)


def test_ppo_approx_kl_is_k3_of_old_against_new():
    # ratio new/old = 2 on one token: k3 = r - log r - 1 = 1 - ln 2
    _, stats = ppo_policy_loss(
        torch.tensor([[LN2]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2
    )
    close(stats["approx_kl"], 1 - LN2)


def test_a_per_sequence_tensor_where_per_token_ones_go_is_an_error_not_a_broadcast():
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    # GRPO advantages as a (B, 1) column broadcast to (B, B, T) and gave a loss of the wrong value
    with pytest.raises(ValueError, match=r"^grpo_loss: expected advantages of shape \(2,\) \(one per sequence, "
                                         r"e.g. group_advantages\(rewards, group_size\)\), got \(2, 1\)$"):
        grpo_loss(logp, logp, logp, torch.ones(2, 1), mask, clip_range=0.2, kl_coef=0.0)
    # PPO advantages per sequence on a square batch (B == T) broadcast along the tokens
    square = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"^ppo_policy_loss: expected advantages of shape \(3, 3\) \(one per "
                                         r"response token, as logp\), got \(3,\)$"):
        ppo_policy_loss(square, square, torch.ones(3), torch.ones(3, 3), 0.2)
    with pytest.raises(ValueError, match=r"^ppo_token_rewards: expected scores of shape \(2,\) \(one score per "
                                         r"sequence\), got \(2, 1\)$"):
        ppo_token_rewards(torch.ones(2, 1), logp, logp, mask, kl_coef=0.1)
