"""GRPO: a checkable reward rises, zero-variance groups give no gradient, group statistics, and a
SIGTERM during a rollout saves latest/ so that the resumed LoRA run repeats the uninterrupted one exactly
(base weights bit-identical)."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch

from llmlab.config import RLHFConfig
from llmlab.model import build_model
from llmlab.rlhf.grpo import group_reward_stats, grpo_update
from llmlab.rlhf.rollout import generate_rollout
from llmlab.rlhf.run import run_rlhf
from llmlab.rlhf.scoring import build_reference, response_logprobs
from llmlab.train.loop import last_run_status
from llmlab.train.metrics import read_metrics
from test_rlhf_rollout import (
    PROMPTS,
    policy_dir_fixture,  # noqa: F401 - provides `policy_dir`
)

# Pays the share of digits in the completion: a random tiny model emits some digit tokens by chance,
# so groups differ and GRPO has a signal from the first step; the optimum is all digits (1.0).
REWARD_SOURCE = '''
def digits(prompts, completions, **columns):
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]
'''


@pytest.fixture(scope="module", name="reward_file")
def reward_file_fixture(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "digit_reward.py"
    path.write_text(REWARD_SOURCE)
    return f"{path}:digits"


def _cfg(policy_dir, reward_file, out, **kw):
    base = dict(algorithm="grpo", policy_checkpoint=str(policy_dir), datasets=["bundled:prompts"],
                reward_model_name=None, reward_functions=[reward_file], output_dir=str(out), batch_size=8,
                mini_batch_size=8, group_size=4, ppo_epochs=1, max_new_tokens=8, kl_coef=0.01, learning_rate=1e-2,
                max_steps=24, log_every=4, eval_every=12, eval_steps=1, val_fraction=0.05)
    base.update(kw)
    return RLHFConfig(**base)


def test_grpo_raises_mean_reward(policy_dir, reward_file, tmp_path):
    run_rlhf(_cfg(policy_dir, reward_file, tmp_path), progress=False)
    logged = [r for r in read_metrics(tmp_path) if "reward" in r]
    first, last = logged[0], logged[-1]
    assert len(logged) == 6
    assert first["reward"] < 0.2 and last["reward"] > first["reward"] + 0.3
    assert last["kl"] > 0  # k3 per token to the reference: the policy moved
    assert (tmp_path / "best" / "config.json").is_file()


def test_zero_variance_groups_give_no_gradient(tiny_cfg):
    model = build_model(tiny_cfg)
    before = [p.detach().clone() for p in model.parameters()]
    rollout = generate_rollout(model, PROMPTS * 2, max_new_tokens=4, pad_id=0, reference=build_reference(model),
                               generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = grpo_update(model, opt, rollout, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=3,
                        clip_range=0.2, kl_coef=0.0, ppo_epochs=1, mini_batch_size=2)
    assert stats["grad_norm"] == 0 and stats["zero_var_groups"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    stats = grpo_update(model, opt, rollout, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), group_size=3,
                        clip_range=0.2, kl_coef=0.0, ppo_epochs=1, mini_batch_size=2)
    assert stats["grad_norm"] > 0 and stats["zero_var_groups"] == 0.5


def test_kl_coef_binds():
    """The same rollout and advantages, 12 updates: without the penalty the policy drifts ~16 nats (k3 per
    token) from the reference; kl_coef 0.1 keeps it under 1."""
    import copy

    from tests.conftest import tiny_config

    base = build_model(tiny_config(init_std=0.2))
    rollout = generate_rollout(base, PROMPTS * 2, max_new_tokens=4, pad_id=0, reference=build_reference(base),
                               generator=torch.Generator().manual_seed(0))

    def kl_after(kl_coef):
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            grpo_update(model, opt, rollout, torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), group_size=3,
                        clip_range=0.2, kl_coef=kl_coef, ppo_epochs=4, mini_batch_size=2)
        with torch.no_grad():
            logp, _ = response_logprobs(model, rollout.sequences, rollout.prompt_len, rollout.attention_mask)
        d = rollout.ref_logprobs - logp
        return float(((d.exp() - d - 1) * rollout.response_mask).sum() / rollout.response_mask.sum())

    free, bound = kl_after(0.0), kl_after(0.1)
    assert free > 5 and bound < 0.2 * free, (free, bound)


def test_group_reward_stats_by_hand():
    stats = group_reward_stats(torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0]), group_size=4)
    assert stats["reward"] == pytest.approx(2.0)
    assert stats["reward_std"] == pytest.approx((0.5 ** 0.5) / 2)  # group 1 std sqrt(0.5), group 2 std 0
    assert stats["best_of_n"] == pytest.approx(2.5)
    assert stats["zero_var_groups"] == pytest.approx(0.5)


def test_sigterm_during_rollout_saves_and_lora_resume_is_exact(policy_dir, reward_file, tmp_path, monkeypatch):
    from llmlab.checkpoint import read_checkpoint
    from llmlab.rlhf import grpo

    lora = dict(use_lora=True, lora_preset="minimal", lora_r=4, max_steps=4, log_every=1, eval_every=100,
                save_best_only=True)
    run_rlhf(_cfg(policy_dir, reward_file, tmp_path / "full", **lora), progress=False)

    real = grpo.generate_rollout
    calls = {"rollouts": 0, "tokens": 0}

    def rollout_with_signal(*args, **kwargs):
        calls["rollouts"] += 1
        if calls["rollouts"] == 3:  # SIGTERM arrives in the middle of step 3's generation
            inner = kwargs["on_tokens"]

            def on_tokens(ids):
                calls["tokens"] += 1
                if calls["tokens"] == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                inner(ids)

            kwargs["on_tokens"] = on_tokens
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "generate_rollout", rollout_with_signal)
    part = _cfg(policy_dir, reward_file, tmp_path / "part", **lora)
    run_rlhf(part, progress=False)
    latest = read_checkpoint(tmp_path / "part" / "latest")
    assert latest.trainer_state()["step"] == 2 and [r["step"] for r in read_metrics(tmp_path / "part")] == [1, 2]
    assert last_run_status(tmp_path / "part").stopped == "interrupted"
    monkeypatch.setattr(grpo, "generate_rollout", real)
    run_rlhf(part, resume="latest", progress=False)
    assert last_run_status(tmp_path / "part").stopped == "finished"

    def numbers(d):
        return [(r["step"], r["loss"], r["reward"], r["kl"]) for r in read_metrics(tmp_path / d)]

    assert len(numbers("full")) == 4 and numbers("full") == numbers("part")
    start = read_checkpoint(policy_dir).state_dict()
    final = read_checkpoint(tmp_path / "part" / "best")  # save_best_only: the final evaluation wrote best/
    assert final.trainer_state()["step"] == 4 and final.has_adapter
    assert all(torch.equal(start[k], v) for k, v in final.state_dict().items())  # base weights bit-identical


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="needs a C++ compiler")
def test_compile_samples_rollouts_through_the_compiled_decoder(policy_dir, reward_file, tmp_path, monkeypatch):
    import llmlab.model.decode as decode

    # on CPU, 4+ rows a step decode eagerly with packed weights even under compile (faster there):
    # raise that floor so these rollouts take the compiled decoder the option asks for
    monkeypatch.setattr(decode, "PACK_MIN_ROWS", 1 << 20)
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or real_compile(model, **kw))
    run_rlhf(_cfg(policy_dir, reward_file, tmp_path, compile=True, max_steps=4, eval_every=4), progress=False)
    assert len(compiled) >= 5  # 4 rollouts and the greedy evaluation
    logged = [r for r in read_metrics(tmp_path) if "reward" in r]
    assert logged
    assert (tmp_path / "best" / "config.json").is_file()
