"""Every RLHF option reaches the computation it names: Sophia refreshes its Hessian in the RLHF updates,
the stages pass their config values to the rollouts and the maths (spies around the functions they
call), each optimizer updates policy and value head, the reference checkpoint is the one DPO compares
against, GRPO without a KL penalty builds no reference, and LoRA's dropout off is announced."""

from __future__ import annotations

import copy
import json
import typing

import pytest
import torch
from torch import nn

import llmlab.rlhf.rollout as rollout_mod
import llmlab.rlhf.updates as updates_mod
from llmlab.config import OptimizerName, RLHFConfig
from llmlab.model import build_model
from llmlab.optim import build_optimizer
from llmlab.rlhf.dpo import dpo_step
from llmlab.rlhf.ppo import ppo_advantages, ppo_update
from llmlab.rlhf.rollout import generate_rollout
from llmlab.rlhf.run import disable_dropout, dropout_notice, needs_reference, run_rlhf
from llmlab.rlhf.scoring import build_reference
from llmlab.rlhf.updates import UpdateCount
from llmlab.rlhf.value_head import value_head_for
from llmlab.train.metrics import read_metrics
from test_rlhf_dpo import pairs_fixture  # noqa: F401 - provides `pairs`
from test_rlhf_grpo import reward_file_fixture  # noqa: F401 - provides `reward_file`
from test_rlhf_rollout import policy_dir_fixture  # noqa: F401 - provides `policy_dir`

PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [3, 4], [12]]

# Rewards that differ between random completions from the first step (the text's length), so advantages,
# gradients and clipping are all non-zero in a one-step run.
LENGTH_REWARD = '''
def length(prompts, completions, **columns):
    return [len(text) / 10 for text in completions]
'''


@pytest.fixture(scope="module")
def length_reward(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "length_reward.py"
    path.write_text(LENGTH_REWARD)
    return f"{path}:length"


def _cfg(**kw) -> RLHFConfig:
    base = dict(reward_model_name=None, learning_rate=1e-2, batch_size=4, mini_batch_size=2)
    base.update(kw)
    return RLHFConfig(**base)


def _ppo_setup(tiny_cfg, cfg: RLHFConfig):
    """A tiny policy with its value head, one optimizer over both (as PPOStage builds it), a scored rollout."""
    model = build_model(tiny_cfg)
    head = value_head_for(model)
    trainable = nn.ModuleDict({"policy": model, "value_head": head})
    optimizer = build_optimizer(trainable, cfg)
    rollout = generate_rollout(model, PROMPTS, max_new_tokens=4, pad_id=0, reference=build_reference(model),
                               value_head=head, generator=torch.Generator().manual_seed(0))
    adv, ret, _ = ppo_advantages(rollout, torch.tensor([1.0, 0.0, 0.5, -1.0]), kl_coef=0.0, gamma=1.0, lam=0.95)
    return model, head, trainable, optimizer, rollout, adv, ret


def _update(model, head, optimizer, rollout, adv, ret, *, vf_coef=0.1, ppo_epochs=1, mini_batch_size=2,
            updates=None):
    return ppo_update(model, head, optimizer, rollout, adv, ret, clip_range=0.2, cliprange_value=0.2,
                      vf_coef=vf_coef, ppo_epochs=ppo_epochs, mini_batch_size=mini_batch_size,
                      generator=torch.Generator().manual_seed(0), updates=updates)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Sophia in the RLHF updates
# --------------------------------------------------------------------------------------------------


def _hessians(optimizer, module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: optimizer.state[p]["hessian"] for n, p in module.named_parameters() if p in optimizer.state}


def test_sophia_in_ppo_update_refreshes_its_hessian_and_steps_below_sign_momentum(tiny_cfg, monkeypatch):
    """sophia_update_k=1: a Gauss-Newton-Bartlett refresh after every update. With a large rho the
    curvature shrinks the second update well below lr per coordinate; without the refresh the Hessian
    stays 0 and every moved coordinate moves by exactly lr (the sign of the momentum)."""
    cfg = _cfg(optimizer="sophia", sophia_update_k=1, sophia_rho=1e4)
    model, head, trainable, optimizer, rollout, adv, ret = _ppo_setup(tiny_cfg, cfg)
    start = copy.deepcopy(trainable.state_dict())
    lr = cfg.learning_rate

    def second_step(opt) -> torch.Tensor:
        """|change| of every policy weight that the second update moved."""
        counter = UpdateCount()
        _update(model, head, opt, rollout, adv, ret, mini_batch_size=4, updates=counter)  # update 0
        before = _snapshot(model)
        _update(model, head, opt, rollout, adv, ret, mini_batch_size=4, updates=counter)  # update 1
        delta = torch.cat([(p.detach() - before[n]).abs().flatten() for n, p in model.named_parameters()])
        return delta[delta > 0]

    torch.manual_seed(1)
    moved = second_step(optimizer)
    policy_h = _hessians(optimizer, model)
    assert policy_h and all(bool((h >= 0).all()) for h in policy_h.values())
    assert sum(float(h.sum()) for h in policy_h.values()) > 0
    # the critic has no likelihood in the GNB loss: no curvature, Sophia's clipped sign steps there
    assert all(float(h.abs().sum()) == 0 for h in _hessians(optimizer, head).values())
    assert moved.numel() > 0 and float(moved.mean()) < 0.5 * lr

    trainable.load_state_dict(start)
    monkeypatch.setattr(updates_mod, "refresh_hessian_if_due", lambda *a, **k: False)
    plain = build_optimizer(trainable, cfg)
    moved_plain = second_step(plain)
    assert all(float(h.abs().sum()) == 0 for h in _hessians(plain, model).values())
    torch.testing.assert_close(moved_plain, torch.full_like(moved_plain, lr), rtol=1e-3, atol=0)  # lr * sign(m)


def test_sophia_refreshes_every_update_k_updates_of_the_run(tiny_cfg, monkeypatch):
    """Two calls of two updates each share the run's count: with update_k=4 only update 0 refreshes
    (a count restarting per call would refresh twice); update_k=2 refreshes updates 0 and 2."""
    for k, expected in ((4, 1), (2, 2)):
        cfg = _cfg(optimizer="sophia", sophia_update_k=k)
        model, head, _, optimizer, rollout, adv, ret = _ppo_setup(tiny_cfg, cfg)
        calls = []
        real = optimizer.refresh_hessian
        monkeypatch.setattr(optimizer, "refresh_hessian", lambda closure, batch_tokens, calls=calls, real=real:
                            calls.append(batch_tokens) or real(closure, batch_tokens))
        counter = UpdateCount()
        for _ in range(2):
            _update(model, head, optimizer, rollout, adv, ret, mini_batch_size=2, updates=counter)
        assert counter.n == 4 and len(calls) == expected, k
        # the estimate averages over the response tokens of the two rows just updated
        assert all(0 < t <= 2 * rollout.response_mask.shape[1] for t in calls)


def _preference_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    other = ids.clone()
    other[:, 6:] = torch.randint(3, 100, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    return {"chosen_input_ids": ids, "chosen_labels": labels, "chosen_attention_mask": mask,
            "rejected_input_ids": other, "rejected_labels": torch.where(labels == -100, labels, other),
            "rejected_attention_mask": mask}


def test_sophia_in_dpo_step_estimates_the_hessian_on_response_tokens(tiny_cfg, monkeypatch):
    cfg = _cfg(optimizer="sophia", sophia_update_k=1)
    policy = build_model(tiny_cfg)
    reference = build_reference(policy)
    optimizer = build_optimizer(policy, cfg)
    seen = []
    real = optimizer.refresh_hessian
    monkeypatch.setattr(optimizer, "refresh_hessian",
                        lambda closure, batch_tokens: seen.append(batch_tokens) or real(closure, batch_tokens))
    dpo_step(policy, reference, optimizer, _preference_batch(), beta=0.1, mini_batch_size=2, updates=UpdateCount())
    assert seen == [2 * 4 * 6]  # chosen + rejected rows x 6 labelled response tokens each
    h = _hessians(optimizer, policy)
    assert float(h["lm_head.weight"].sum()) > 0 and float(h["layers.0.mlp.up_proj.weight"].sum()) > 0


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "dpo"])
def test_every_stage_refreshes_sophia_and_saves_its_update_count(algorithm, policy_dir, reward_file, pairs, tmp_path,
                                                                 monkeypatch):
    from llmlab.optim import SophiaG

    calls = []
    real = SophiaG.refresh_hessian
    monkeypatch.setattr(SophiaG, "refresh_hessian",
                        lambda self, closure, batch_tokens: calls.append(batch_tokens) or real(self, closure,
                                                                                               batch_tokens))
    common = dict(algorithm=algorithm, policy_checkpoint=str(policy_dir), reward_model_name=None,
                  output_dir=str(tmp_path), batch_size=4, mini_batch_size=2, max_steps=2, max_new_tokens=4,
                  val_fraction=0.0, optimizer="sophia", sophia_update_k=4, ppo_epochs=1, group_size=2)
    data = dict(datasets=[pairs]) if algorithm == "dpo" else dict(datasets=["bundled:prompts"],
                                                                    reward_functions=[reward_file])
    out = run_rlhf(RLHFConfig(**common, **data), progress=False)
    per_step = 1 if algorithm == "dpo" else 2  # PPO, GRPO: 1 epoch x 2 mini-batches
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["stage"]["updates"] == 2 * per_step
    # update_k=4: only update 0 of the run is due (a count restarting every step would refresh twice)
    assert len(calls) == 1 and calls[0] > 0


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "dpo"])
def test_sophia_refresh_schedule_continues_across_a_resume(algorithm, policy_dir, reward_file, pairs, tmp_path,
                                                           monkeypatch):
    """sophia_update_k=3, 2 steps, then a resume from latest/ to 4 steps: the run's update count comes back
    from trainer_state.json, so the refreshes fall on updates 0, 3, 6, ... of the whole run (a count restarting
    at the resume would refresh at its own 0 and 3 again). With --no-optimizer-state the fresh Sophia (h = 0)
    refreshes at its first update too, then keeps the run's schedule."""
    import shutil

    import llmlab.rlhf.dpo as dpo_mod
    from llmlab.optim import refresh_hessian_if_due

    refreshed: list[int] = []

    def spy(optimizer, update, estimate):
        did = refresh_hessian_if_due(optimizer, update, estimate)
        if did:
            refreshed.append(update)
        return did

    monkeypatch.setattr(updates_mod, "refresh_hessian_if_due", spy)
    monkeypatch.setattr(dpo_mod, "refresh_hessian_if_due", spy)
    common = dict(algorithm=algorithm, policy_checkpoint=str(policy_dir), reward_model_name=None,
                  batch_size=4, mini_batch_size=2, max_new_tokens=4, val_fraction=0.0, optimizer="sophia",
                  sophia_update_k=3, ppo_epochs=1, group_size=2, save_best_only=False)
    data = dict(datasets=[pairs]) if algorithm == "dpo" else dict(datasets=["bundled:prompts"],
                                                                    reward_functions=[reward_file])
    per_step = 1 if algorithm == "dpo" else 2  # PPO, GRPO: 1 epoch x 2 mini-batches
    run_rlhf(RLHFConfig(**common, **data, output_dir=str(tmp_path / "run"), max_steps=2), progress=False)
    first = list(range(0, 2 * per_step, 3))
    assert refreshed == first
    start = tmp_path / "start"
    shutil.copytree(tmp_path / "run" / "latest", start)
    later = list(range(2 * per_step, 4 * per_step))  # the resumed run's updates
    for load_state, out in ((True, "resumed"), (False, "fresh_optimizer")):
        refreshed.clear()
        run_rlhf(RLHFConfig(**common, **data, output_dir=str(tmp_path / out), max_steps=4), resume=str(start),
                 progress=False, load_optimizer_state=load_state)
        due = [u for u in later if u % 3 == 0]
        assert refreshed == (due if load_state else sorted({later[0], *due}))
        state = json.loads((tmp_path / out / "latest" / "trainer_state.json").read_text())
        assert state["stage"]["updates"] == 4 * per_step


# --------------------------------------------------------------------------------------------------
# The stages pass their config through
# --------------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name: str, calls: list):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _clip_spy(monkeypatch, seen: list):
    """Record every clipping threshold and the gradient norm left after clipping."""
    import llmlab.train.loop as loop

    real = loop.grad_norm_and_clip

    def wrapper(params, max_norm):
        norm = real(params, max_norm)
        after = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        seen.append((max_norm, float(norm), float(after)))
        return norm

    monkeypatch.setattr(loop, "grad_norm_and_clip", wrapper)


def _clipped_to(clips: list, max_norm: float) -> bool:
    """Every update clipped at `max_norm`: gradients left at or below it, and some were above it."""
    return (all(c == max_norm and after <= max_norm * 1.001 for c, _, after in clips)
            and any(norm > max_norm for _, norm, _ in clips))


def _rl_cfg(policy_dir, reward_file, out, **kw):
    base = dict(policy_checkpoint=str(policy_dir), datasets=["bundled:prompts"], reward_model_name=None,
                reward_functions=[reward_file], output_dir=str(out), batch_size=4, mini_batch_size=2, ppo_epochs=2,
                max_new_tokens=4, max_steps=1, val_fraction=0.0, learning_rate=1e-2, max_grad_norm=0.01,
                temperature=0.7, grpo_temperature=1.3, top_k=5, top_p=0.9, clip_range=0.13, kl_coef=0.02)
    base.update(kw)
    return RLHFConfig(**base)


def test_ppo_stage_passes_its_options_through(policy_dir, length_reward, tmp_path, monkeypatch):
    import llmlab.rlhf.ppo as ppo

    spies = {name: [] for name in ("generate_tokens", "response_logprobs", "ppo_policy_loss", "ppo_value_loss",
                                   "gae_advantages", "ppo_update")}
    _spy(monkeypatch, rollout_mod, "generate_tokens", spies["generate_tokens"])
    for name in ("response_logprobs", "ppo_policy_loss", "ppo_value_loss", "gae_advantages", "ppo_update"):
        _spy(monkeypatch, ppo, name, spies[name])
    clips = []
    _clip_spy(monkeypatch, clips)
    run_rlhf(_rl_cfg(policy_dir, length_reward, tmp_path, algorithm="ppo", cliprange_value=0.17, gamma=0.9,
                     gae_lambda=0.8, vf_coef=0.3), progress=False)
    (args, gen), = spies["generate_tokens"]
    assert (gen["temperature"], gen["top_k"], gen["top_p"]) == (0.7, 5, 0.9) and len(args[1]) == 4
    assert [kw["temperature"] for _, kw in spies["response_logprobs"]] == [0.7] * 4  # the update re-scores
    assert [a[4] for a, _ in spies["ppo_policy_loss"]] == [0.13] * 4  # ppo_epochs 2 x 2 mini-batches
    assert [a[4] for a, _ in spies["ppo_value_loss"]] == [0.17] * 4
    (args, _), = spies["gae_advantages"]
    assert args[3:] == (0.9, 0.8)  # gamma, lambda
    (_, kw), = spies["ppo_update"]
    assert kw["vf_coef"] == 0.3 and kw["ppo_epochs"] == 2 and kw["mini_batch_size"] == 2
    assert len(clips) == 4 and _clipped_to(clips, 0.01)


def test_grpo_stage_passes_its_options_through(policy_dir, length_reward, tmp_path, monkeypatch):
    import llmlab.rlhf.grpo as grpo

    spies = {name: [] for name in ("generate_tokens", "response_logprobs", "grpo_loss", "grpo_update")}
    _spy(monkeypatch, rollout_mod, "generate_tokens", spies["generate_tokens"])
    for name in ("response_logprobs", "grpo_loss", "grpo_update"):
        _spy(monkeypatch, grpo, name, spies[name])
    clips = []
    _clip_spy(monkeypatch, clips)
    run_rlhf(_rl_cfg(policy_dir, length_reward, tmp_path, algorithm="grpo", group_size=2), progress=False)
    (args, gen), = spies["generate_tokens"]
    assert len(args[1]) == 4 * 2  # batch_size x group_size rows, each prompt twice in a row
    assert args[1][0] == args[1][1] and args[1][2] == args[1][3]
    assert (gen["temperature"], gen["top_k"], gen["top_p"]) == (1.3, 5, 0.9)  # grpo_temperature, not temperature
    assert [kw["temperature"] for _, kw in spies["response_logprobs"]] == [1.3] * 4
    assert [a[5:7] for a, _ in spies["grpo_loss"]] == [(0.13, 0.02)] * 4  # clip_range, kl_coef; 2 epochs x 2
    (a, kw), = spies["grpo_update"]
    assert a[2].sequences.shape[0] == 8 and kw["group_size"] == 2 and kw["ppo_epochs"] == 2
    assert len(clips) == 4 and _clipped_to(clips, 0.01)


def test_vf_coef_scales_the_value_head_gradient(tiny_cfg):
    """One plain SGD step: the value head only gets the value loss's gradient, so its step is
    proportional to vf_coef (and nil at 0)."""
    steps = {}
    for vf in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        cfg = _cfg()
        model, head, trainable, _, rollout, adv, ret = _ppo_setup(tiny_cfg, cfg)
        head.proj.bias.data.fill_(0.3)  # values away from the returns
        sgd = torch.optim.SGD(trainable.parameters(), lr=0.1)
        before = head.proj.bias.detach().clone()
        _update(model, head, sgd, rollout, adv, ret, vf_coef=vf, mini_batch_size=4)
        steps[vf] = head.proj.bias.detach() - before
    assert float(steps[0.0].abs().max()) == 0 and float(steps[1.0].abs().max()) > 0
    torch.testing.assert_close(steps[0.5], 0.5 * steps[1.0])


def test_ppo_epochs_times_mini_batches_is_the_number_of_optimizer_steps(tiny_cfg):
    cfg = _cfg()
    model, head, _, optimizer, rollout, adv, ret = _ppo_setup(tiny_cfg, cfg)
    steps = []
    real = optimizer.step
    optimizer.step = lambda *a, **k: steps.append(1) or real(*a, **k)
    counter = UpdateCount()
    _update(model, head, optimizer, rollout, adv, ret, ppo_epochs=2, mini_batch_size=2, updates=counter)
    assert len(steps) == 4 == counter.n
    _update(model, head, optimizer, rollout, adv, ret, ppo_epochs=3, mini_batch_size=4, updates=counter)
    assert len(steps) == 7 == counter.n


@pytest.mark.parametrize("name", typing.get_args(OptimizerName))
def test_one_ppo_update_with_each_optimizer_moves_policy_and_value_head(name, tiny_cfg):
    cfg = _cfg(optimizer=name, learning_rate=1e-3)
    model, head, trainable, optimizer, rollout, adv, ret = _ppo_setup(tiny_cfg, cfg)
    before = _snapshot(trainable)
    _update(model, head, optimizer, rollout, adv, ret, mini_batch_size=4)
    moved = {n for n, p in trainable.named_parameters() if not torch.equal(p, before[n])}
    assert "value_head.proj.weight" in moved and "policy.lm_head.weight" in moved
    assert any(n.startswith("policy.layers") for n in moved)
    if name == "muon":  # the (1, d_model) critic is an output head, like lm_head: AdamW at the full lr, not
        # orthogonalised; its 1-D bias is on AdamW at 0.1x lr, as every 1-D parameter under Muon
        by_id = {id(p): (type(o).__name__, g) for o in optimizer.optimizers for g in o.param_groups
                 for p in g["params"]}
        kind, group = by_id[id(head.proj.weight)]
        assert kind == "AdamW" and group["lr_scale"] == 1.0
        assert by_id[id(head.proj.bias)][0] == "AdamW" and by_id[id(head.proj.bias)][1]["lr_scale"] == 0.1
        assert by_id[id(model.layers[0].mlp.gate_proj.weight)][0] == "Muon"


# --------------------------------------------------------------------------------------------------
# Reference checkpoint, GRPO without reference, dropout
# --------------------------------------------------------------------------------------------------


def test_reference_checkpoint_is_the_one_dpo_compares_against(policy_dir, pairs, tmp_path):
    from llmlab.checkpoint import load_model, save_checkpoint
    from llmlab.rlhf.run import load_policy_tokenizer

    other = tmp_path / "other-ref"
    model = load_model(policy_dir, "cpu")
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    save_checkpoint(other, model, kind="sft", tokenizer=load_policy_tokenizer(policy_dir))
    margins = {}
    for name, ref in (("same", None), ("other", str(other))):
        cfg = RLHFConfig(algorithm="dpo", policy_checkpoint=str(policy_dir), reference_checkpoint=ref,
                         datasets=[pairs], reward_model_name=None, output_dir=str(tmp_path / name), batch_size=4,
                         mini_batch_size=4, beta=0.5, max_steps=1, log_every=1, val_fraction=0.0)
        run_rlhf(cfg, progress=False)
        (first,) = [r for r in read_metrics(tmp_path / name) if "reward_margin" in r]
        margins[name] = first["reward_margin"]
    assert margins["same"] == 0  # step 1 scores before its update: policy == its own starting weights
    assert abs(margins["other"]) > 1e-3


def test_grpo_without_kl_penalty_builds_no_reference(policy_dir, reward_file, tmp_path, monkeypatch, capsys):
    import llmlab.rlhf.run as run

    assert not needs_reference(_cfg(algorithm="grpo", kl_coef=0.0))
    assert needs_reference(_cfg(algorithm="grpo", kl_coef=0.01)) and needs_reference(_cfg(algorithm="ppo",
                                                                                         kl_coef=0.0))
    assert needs_reference(_cfg(algorithm="dpo", kl_coef=0.0))
    built = []
    _spy(monkeypatch, run, "build_reference", built)
    run_rlhf(_rl_cfg(policy_dir, reward_file, tmp_path / "free", algorithm="grpo", group_size=2, kl_coef=0.0,
                     ppo_epochs=1), progress=False)
    assert built == [] and "builds no reference model" in capsys.readouterr().out
    (record,) = read_metrics(tmp_path / "free")
    assert "kl" not in record and record["loss"] == record["loss"]  # trained, no misleading KL logged
    run_rlhf(_rl_cfg(policy_dir, reward_file, tmp_path / "kl", algorithm="grpo", group_size=2, ppo_epochs=1),
             progress=False)
    assert len(built) == 1 and "kl" in read_metrics(tmp_path / "kl")[0]


def test_lora_dropout_is_switched_off_with_a_notice(tiny_cfg, policy_dir, pairs, tmp_path, capsys):
    from llmlab.lora import apply_lora

    cfg = _cfg(use_lora=True, lora_dropout=0.3)
    assert "lora_dropout=0.3" in dropout_notice(cfg)
    assert dropout_notice(_cfg(use_lora=True, lora_dropout=0.0)) is None
    assert dropout_notice(_cfg(use_lora=False, lora_dropout=0.3)) is None
    assert dropout_notice(_cfg(use_lora=True)) is None  # the default's value: switched off without a line
    policy = apply_lora(build_model(tiny_cfg), cfg, verbose=False)
    drops = [m for n, m in policy.named_modules() if isinstance(m, nn.Dropout) and "lora_dropout" in n]
    assert drops and all(m.p == 0.3 for m in drops)
    disable_dropout(policy)
    assert all(m.p == 0.0 for m in drops)
    run_rlhf(RLHFConfig(algorithm="dpo", policy_checkpoint=str(policy_dir), datasets=[pairs], reward_model_name=None,
                        output_dir=str(tmp_path), batch_size=4, mini_batch_size=4, max_steps=1, val_fraction=0.0,
                        use_lora=True, lora_dropout=0.3), progress=False)
    out = capsys.readouterr().out
    assert out.count("lora_dropout=0.3 is not applied") == 1


def test_a_reward_function_that_raises_leaves_the_run_recorded_as_an_error(policy_dir, tmp_path):
    """The exception is the user's own (its traceback stays), but run_state.json said "running" forever."""
    from llmlab.train.loop import last_run_status

    bad = tmp_path / "bad_reward.py"
    bad.write_text("def broken(prompts, completions, **columns):\n    return [1 / 0 for _ in completions]\n")
    cfg = _rl_cfg(policy_dir, f"{bad}:broken", tmp_path / "out", algorithm="grpo", group_size=2, ppo_epochs=1)
    with pytest.raises(ZeroDivisionError):
        run_rlhf(cfg, progress=False)
    status = last_run_status(tmp_path / "out")
    assert status is not None and status.stopped == "error" and status.step == 0


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_without_a_readable_trainer_state_pt(policy_dir, reward_file, tmp_path, damage, capsys):
    """RLHF --resume from a latest/ whose trainer_state.pt is gone or cut short: refused while the optimizer
    state is wanted (one line naming the file and --no-optimizer-state); with --no-optimizer-state, which that
    line recommends, the run continues from the saved step with fresh optimizer and random states, said."""
    from llmlab.errors import CheckpointError

    run_rlhf(_rl_cfg(policy_dir, reward_file, tmp_path / "run", algorithm="grpo", group_size=2, ppo_epochs=1,
                     save_best_only=False, save_every=1), progress=False)
    state_file = tmp_path / "run" / "latest" / "trainer_state.pt"
    if damage == "missing":
        state_file.unlink()
    else:
        state_file.write_bytes(state_file.read_bytes()[:100])
    longer = _rl_cfg(policy_dir, reward_file, tmp_path / "run", algorithm="grpo", group_size=2, ppo_epochs=1,
                     save_best_only=False, save_every=1, max_steps=2)
    with pytest.raises(CheckpointError, match="no-optimizer-state"):
        run_rlhf(longer, resume=str(tmp_path / "run" / "latest"), progress=False)
    capsys.readouterr()
    run_rlhf(longer, resume=str(tmp_path / "run" / "latest"), progress=False, load_optimizer_state=False)
    assert "trainer_state.pt" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "reward" in r] == [1, 2]


def test_reference_checkpoint_with_another_vocabulary_is_a_config_error(tiny_cfg, tmp_path):
    from conftest import tiny_config
    from llmlab.checkpoint import save_checkpoint
    from llmlab.errors import ConfigError

    save_checkpoint(tmp_path / "ref", build_model(tiny_config(vocab_size=96)))
    with pytest.raises(ConfigError, match=r"reference_checkpoint: .* vocab_size=96, the policy 128"):
        build_reference(build_model(tiny_cfg), str(tmp_path / "ref"))


def test_settings_another_algorithm_reads_are_named_in_one_notice():
    from pathlib import Path

    from llmlab.rlhf.run import unread_by_algorithm

    got = unread_by_algorithm(_cfg(algorithm="grpo", temperature=0.7, adaptive_kl=True, gamma=0.9, group_size=2))
    assert got == ("notice: set but unused by algorithm=grpo: temperature=0.7, adaptive_kl=true, gamma=0.9; GRPO "
                   "samples at grpo_temperature, PPO at temperature")
    assert "reward_functions=" in unread_by_algorithm(_cfg(algorithm="dpo", reward_functions=["exact_match"]))
    assert "grpo_temperature=0.8" in unread_by_algorithm(_cfg(algorithm="ppo", grpo_temperature=0.8))
    assert unread_by_algorithm(_cfg(algorithm="ppo", temperature=0.7, gamma=0.9)) is None
    for path in sorted((Path(__file__).parents[1] / "configs").glob("rlhf_*.json")):  # the shipped ones stay quiet
        assert unread_by_algorithm(RLHFConfig.load(path)) is None, path
