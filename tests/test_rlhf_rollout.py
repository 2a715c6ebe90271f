"""Rollouts: batched log-probs equal the sampling distribution, masks and empty/truncated responses,
the reference policy (frozen copy or disabled adapter), the value head.

Also holds `tiny_policy`, the small checkpoint (2 layers, width 32, a byte-level BPE tokenizer trained on
bundled:sft) that the PPO, DPO and GRPO tests start from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from llmlab.model import build_model
from llmlab.rlhf.rollout import decode_responses, generate_rollout, reward_columns
from llmlab.rlhf.scoring import build_reference, response_logprobs
from llmlab.rlhf.updates import group_minibatches
from llmlab.rlhf.value_head import ValueHead, value_head_for

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [3]]  # different lengths: left padding


def tiny_policy(root: Path) -> Path:
    """A tiny random policy checkpoint with its tokenizer under `root` (built once per root)."""
    from llmlab.checkpoint import save_checkpoint
    from llmlab.data.tokenizer import train_tokenizer

    folder = root / "rlhf-policy"
    if not (folder / "config.json").is_file():
        tok = train_tokenizer(["bundled:sft"], 300, root / "rlhf-tok", max_docs=300)
        torch.manual_seed(0)
        model = build_model(tiny_config(vocab_size=len(tok), max_seq_len=64))
        save_checkpoint(folder, model, kind="sft", tokenizer=tok)
    return folder


@pytest.fixture(scope="module", name="policy_dir")
def policy_dir_fixture(tmp_path_factory):
    """`tiny_policy` for a test module (shared by the modules of one pytest process)."""
    return tiny_policy(tmp_path_factory.getbasetemp())


def _recorded_steps(model):
    """Capture the (B, 1, V) logits the generation loop samples from (lm_head on the last position)."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    return seen, handle


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_logprobs_equal_sampling_logprobs(tiny_cfg, temperature):
    model = build_model(tiny_cfg)
    seen, handle = _recorded_steps(model)
    gen = torch.Generator().manual_seed(1)
    rollout = generate_rollout(model, PROMPTS, max_new_tokens=6, temperature=temperature, pad_id=0, generator=gen)
    handle.remove()
    steps = [s for s in seen if s.shape[1] == 1]  # the per-token generation calls
    assert len(steps) == 6 and rollout.logprobs.shape == (3, 6)
    sampled = rollout.response_tokens
    at_sampling = torch.stack([torch.log_softmax(s[:, 0].float() / temperature, -1).gather(-1, sampled[:, t:t + 1])[:, 0]
                               for t, s in enumerate(steps)], dim=1)
    torch.testing.assert_close(rollout.logprobs, at_sampling, atol=1e-5, rtol=0)
    # no reference given: zero KL by construction; no stop token: every response is truncated
    assert torch.equal(rollout.ref_logprobs, rollout.logprobs)
    assert rollout.truncated.all() and rollout.response_mask.eq(1).all()
    # one batched forward over any subset of rows gives the same numbers (mini-batches)
    sub = rollout.select(torch.tensor([2, 0]))
    again, _ = response_logprobs(model, sub.sequences, sub.prompt_len, sub.attention_mask, temperature=temperature)
    torch.testing.assert_close(again, rollout.logprobs[[2, 0]], atol=1e-5, rtol=0)


def _force_token(model, token: int, rows: list[int] | None = None):
    """Make `token` overwhelmingly likely (for the given batch rows, or all)."""

    def hook(mod, args, out):
        out = out.clone()
        if rows is None:
            out[..., token] += 1e4
        else:
            out[rows, ..., token] += 1e4
        return out

    return model.lm_head.register_forward_hook(hook)


def test_stop_tokens_masks_and_truncation(tiny_cfg):
    model = build_model(tiny_cfg)
    eos, pad = 1, 0
    handle = _force_token(model, eos, rows=[0])  # row 0 stops at once; the others never (eos is forced away)
    handle2 = _force_token(model, 2, rows=[1, 2])
    rollout = generate_rollout(model, PROMPTS, max_new_tokens=5, stop_ids=[eos], pad_id=pad,
                               generator=torch.Generator().manual_seed(0))
    handle.remove()
    handle2.remove()
    assert rollout.response_mask.tolist() == [[1, 0, 0, 0, 0], [1] * 5, [1] * 5]
    assert rollout.response_tokens[0].tolist() == [eos, pad, pad, pad, pad]
    assert rollout.truncated.tolist() == [False, True, True]
    assert rollout.responses()[0] == [eos]
    assert (rollout.logprobs[0, 1:] == 0).all()  # padding carries no log-prob
    assert torch.isfinite(rollout.logprobs).all()


def test_empty_responses_do_not_crash(tiny_cfg):
    """Every response is the stop token alone: one scored token each, text '', updates still run."""
    from llmlab.rlhf.grpo import grpo_update
    from llmlab.rlhf.ppo import ppo_advantages, ppo_update

    model = build_model(tiny_cfg)
    head = value_head_for(model)
    handle = _force_token(model, 1)
    rollout = generate_rollout(model, PROMPTS * 2, max_new_tokens=8, stop_ids=[1], pad_id=0,
                               reference=build_reference(model), value_head=head)
    handle.remove()
    # one scored token each; trailing columns (if the engine checked for "all stopped" late) are masked out
    assert rollout.response_mask[:, 0].eq(1).all() and rollout.response_mask[:, 1:].eq(0).all()
    assert not rollout.truncated.any()

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)

    assert decode_responses(Tok(), rollout.responses(), stop_ids=[1]) == [""] * 6
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
    stats = grpo_update(model, opt, rollout, torch.arange(6.0), group_size=3, clip_range=0.2, kl_coef=0.1,
                        ppo_epochs=1, mini_batch_size=1)
    assert stats["skipped_updates"] == 0
    adv, ret, _ = ppo_advantages(rollout, torch.ones(6), kl_coef=0.1, gamma=1.0, lam=0.95)
    stats = ppo_update(model, head, opt, rollout, adv, ret, clip_range=0.2, cliprange_value=0.2, vf_coef=0.1,
                       ppo_epochs=1, mini_batch_size=3)
    assert stats["skipped_updates"] == 0
    # no room for a response at all: empty (B, 0) tensors
    none = generate_rollout(model, PROMPTS, max_new_tokens=0, stop_ids=[1], pad_id=0)
    assert none.logprobs.shape == (3, 0) and none.responses() == [[], [], []]


def test_reference_is_frozen_copy_without_lora(tiny_cfg):
    model = build_model(tiny_cfg)
    reference = build_reference(model)
    assert reference.model is not model and not any(p.requires_grad for p in reference.model.parameters())
    rollout = generate_rollout(model, PROMPTS, max_new_tokens=4, pad_id=0, reference=reference,
                               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    again = reference.logprobs(rollout.sequences, rollout.prompt_len, rollout.attention_mask)
    moved, _ = response_logprobs(model, rollout.sequences, rollout.prompt_len, rollout.attention_mask)
    torch.testing.assert_close(again, rollout.ref_logprobs, atol=1e-5, rtol=0)
    assert (moved - again).abs().max() > 1e-3


def test_lora_reference_is_the_policy_with_adapter_disabled(tiny_cfg):
    from llmlab.config import RLHFConfig
    from llmlab.lora import apply_lora

    base = build_model(tiny_cfg)
    plain = build_model(tiny_cfg)
    plain.load_state_dict(base.state_dict())
    cfg = RLHFConfig(use_lora=True, lora_preset="all", lora_dropout=0.0, reward_model_name=None)
    policy = apply_lora(base, cfg, verbose=False)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    reference = build_reference(policy)
    assert reference.shares_policy  # no second copy in memory
    rollout = generate_rollout(policy, PROMPTS, max_new_tokens=4, pad_id=0, reference=reference,
                               generator=torch.Generator().manual_seed(0))
    expected, _ = response_logprobs(plain, rollout.sequences, rollout.prompt_len, rollout.attention_mask)
    torch.testing.assert_close(rollout.ref_logprobs, expected, atol=1e-5, rtol=0)
    assert (rollout.logprobs - rollout.ref_logprobs).abs().max() > 1e-3  # the adapter is back on afterwards


def test_value_head_on_final_hidden_states(tiny_cfg, tmp_path):
    model = build_model(tiny_cfg)
    head = value_head_for(model)
    rollout = generate_rollout(model, PROMPTS, max_new_tokens=3, pad_id=0, value_head=head)
    assert rollout.values.shape == (3, 3) and rollout.values.eq(0).all()  # zero-initialised
    with torch.no_grad():
        head.proj.weight.normal_()
    _, values = response_logprobs(model, rollout.sequences, rollout.prompt_len, rollout.attention_mask,
                                  value_head=head)
    hidden = model(rollout.sequences, attention_mask=rollout.attention_mask, output_hidden=True)
    torch.testing.assert_close(values, head(hidden[:, rollout.prompt_len - 1:-1]), atol=1e-5, rtol=0)
    head.save(tmp_path)
    other = ValueHead(tiny_cfg.d_model)
    other.load(tmp_path)
    assert torch.equal(other.proj.weight, head.proj.weight)


def test_group_minibatches_keep_groups_and_reward_columns():
    batches = group_minibatches(4, 3, 2, torch.Generator().manual_seed(0))
    rows = torch.cat(batches).tolist()
    assert sorted(rows) == list(range(12)) and len(batches) == 2
    for b in batches:
        groups = (b // 3).tolist()
        assert all(groups[i] == groups[i - i % 3] for i in range(len(groups)))
    prompts, columns = reward_columns([{"prompt": "a", "prompt_ids": [1], "answer": "7"},
                                       {"prompt": "b", "prompt_ids": [2], "task": "x"}], repeat=2)
    assert prompts == ["a", "a", "b", "b"]
    assert columns == {"answer": ["7", "7", None, None], "task": [None, None, "x", "x"]}
