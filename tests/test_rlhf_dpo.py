"""DPO: held-out reward accuracy rises, LoRA trains only adapters (every preset) and keeps the base
bit-identical, adapters load with PEFT and merge, resume from latest/ repeats the uninterrupted run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmlab.config import RLHFConfig
from llmlab.errors import ConfigError
from llmlab.rlhf.dpo import beta_of, dpo_step, preference_logps
from llmlab.rlhf.run import run_rlhf
from llmlab.rlhf.scoring import build_reference
from llmlab.train.metrics import read_metrics
from test_rlhf_rollout import policy_dir_fixture  # noqa: F401 - provides `policy_dir`

WORDS = "cat dog sun moon tree fish bird star book milk rain snow king ship home door hand ring bell lamp".split()


@pytest.fixture(scope="module", name="pairs")
def pairs_fixture(tmp_path_factory):
    """A generated preference set: the same answer, praised (chosen) or not (rejected). Held-out pairs
    (by content hash) are about other word/number combinations."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    lines = []
    for _ in range(400):
        w, n = rng.choice(WORDS), rng.randint(0, 99)
        lines.append(json.dumps({"prompt": f"Tell me about {w} {n}.", "chosen": f"{w} {n} is good",
                                 "rejected": f"{w} {n} is bad"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cfg(policy_dir, pairs, out, **kw):
    base = dict(algorithm="dpo", policy_checkpoint=str(policy_dir), datasets=[pairs], reward_model_name=None,
                output_dir=str(out), batch_size=8, mini_batch_size=4, beta=0.5, learning_rate=1e-2, max_steps=10,
                log_every=1, eval_every=5, eval_steps=2, val_fraction=0.1, save_best_only=False, save_every=5)
    base.update(kw)
    return RLHFConfig(**base)


def test_dpo_raises_heldout_reward_accuracy(policy_dir, pairs, tmp_path):
    out = run_rlhf(_cfg(policy_dir, pairs, tmp_path / "run"), progress=False)
    records = read_metrics(tmp_path / "run")
    evals = [r for r in records if "val_reward_accuracy" in r]
    # at the start policy == reference, so every margin is 0 and the accuracy (chosen > rejected) is 0
    assert [r["step"] for r in evals] == [5, 10]
    assert evals[-1]["val_reward_accuracy"] > 0.9 and evals[-1]["val_pairs"] == 16
    assert evals[-1]["val_reward_margin"] > 0
    assert records[-1]["loss"] < records[0]["loss"]
    assert out == tmp_path / "run" / "best"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_key"] == "val_reward_accuracy" and state["best_metric"] > 0.9
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "rewards.png").is_file()
    assert any(p.name.startswith("events") for p in (tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.parametrize("preset", ["minimal", "attention_only", "ffn_only", "all"])
def test_lora_dpo_step_moves_only_adapters(preset, tiny_cfg):
    from llmlab.lora import apply_lora
    from llmlab.model import build_model
    from llmlab.optim import build_optimizer

    cfg = RLHFConfig(use_lora=True, lora_preset=preset, reward_model_name=None, learning_rate=1e-2,
                     batch_size=4, mini_batch_size=2)
    policy = apply_lora(build_model(tiny_cfg), cfg, verbose=False)
    reference = build_reference(policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ids = torch.randint(3, 100, (4, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    other = ids.clone()
    other[:, 6:] = torch.randint(3, 100, (4, 6))
    mask = torch.ones_like(ids)
    batch = {"chosen_input_ids": ids, "chosen_labels": labels, "chosen_attention_mask": mask,
             "rejected_input_ids": other, "rejected_labels": torch.where(labels == -100, labels, other),
             "rejected_attention_mask": mask}
    for _ in range(2):  # lora_B starts at 0: the second step moves lora_A too
        stats = dpo_step(policy, reference, build_optimizer(policy, cfg), batch, beta=0.1, mini_batch_size=2)
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert stats["reward_accuracy"] == 1.0  # chosen pushed up, rejected down, on the training pairs
    chosen, _ = preference_logps(policy, batch)
    assert chosen.shape == (4,)


def test_dpo_lora_resume_exact_base_untouched_adapters_merge(policy_dir, pairs, tmp_path):
    from peft import PeftModel

    from llmlab.checkpoint import load_model, read_checkpoint
    from llmlab.lora import merge_full_checkpoint
    from llmlab.model import build_model

    lora = dict(use_lora=True, lora_preset="all", lora_r=4, max_steps=6, save_every=3, eval_every=3)
    run_rlhf(_cfg(policy_dir, pairs, tmp_path / "full", **lora), progress=False)
    run_rlhf(_cfg(policy_dir, pairs, tmp_path / "part", **{**lora, "max_steps": 3}), progress=False)
    with pytest.raises(ConfigError, match="lora_alpha: .* was trained with lora_alpha=16"):  # would be ignored
        run_rlhf(_cfg(policy_dir, pairs, tmp_path / "part", **{**lora, "lora_alpha": 32}),
                 resume=str(tmp_path / "part" / "latest"), progress=False)
    run_rlhf(_cfg(policy_dir, pairs, tmp_path / "part", **lora), resume=str(tmp_path / "part" / "latest"),
             progress=False)
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("full", "part")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]  # bit-exact on CPU

    latest = read_checkpoint(tmp_path / "full" / "latest")
    start = read_checkpoint(policy_dir).state_dict()
    assert latest.has_adapter
    assert all(torch.equal(start[k], v) for k, v in latest.state_dict().items())  # base bit-identical
    base = build_model(latest.model_config)
    base.load_state_dict(start)
    peft_model = PeftModel.from_pretrained(base, str(latest.path / "adapter"))
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    merged = load_model(merge_full_checkpoint(latest.path, tmp_path / "merged"))
    ids = torch.randint(3, 200, (2, 10))
    torch.testing.assert_close(merged(ids), peft_model.eval()(ids), atol=1e-5, rtol=0)
    assert (tmp_path / "full" / "best_lora_adapters" / "adapter_config.json").is_file()


def test_preference_logps_ignore_right_padding_exactly():
    """A short chosen answer right-padded to a longer rejected one: each summed log-prob equals the one
    computed by hand on the unpadded sequence (prompt and padding contribute nothing)."""
    from tests.conftest import tiny_config

    from llmlab.model import build_model

    model = build_model(tiny_config(init_std=0.2)).eval()
    prompt, chosen, rejected = [5, 6, 7], [20, 21], [30, 31, 32, 33, 34, 35]
    pad = 9  # a real token id: only the labels can hide it

    def row(answer, length):
        ids = prompt + answer
        labels = [-100] * len(prompt) + answer
        return ids + [pad] * (length - len(ids)), labels + [-100] * (length - len(ids)), len(ids)

    T = len(prompt) + len(rejected)
    c_ids, c_labels, c_len = row(chosen, T)
    r_ids, r_labels, r_len = row(rejected, T)
    batch = {"chosen_input_ids": torch.tensor([c_ids]), "chosen_labels": torch.tensor([c_labels]),
             "rejected_input_ids": torch.tensor([r_ids]), "rejected_labels": torch.tensor([r_labels])}
    assert c_len < T
    with torch.no_grad():
        got_c, got_r = preference_logps(model, batch)

        def by_hand(ids, answer):
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)  # unpadded forward
            return sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(answer))

        want_c, want_r = by_hand(prompt + chosen, chosen), by_hand(prompt + rejected, rejected)
    assert got_c.item() == pytest.approx(want_c, abs=1e-4) and got_r.item() == pytest.approx(want_r, abs=1e-4)
    assert abs(want_c) > 1 and abs(want_c - want_r) > 1  # non-trivial sums, distinguishable


def test_preference_logps_score_only_response_positions_with_the_full_logits_values_and_gradients(monkeypatch):
    """The head runs on the positions that predict a response token, in checkpointed chunks: the sums and
    their gradients equal those from the full (2B, T, V) logits."""
    from tests.conftest import tiny_config

    import llmlab.train.losses as losses
    from llmlab.model import build_model

    model = build_model(tiny_config(init_std=0.2))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (6, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompts
    labels[1, 9:] = -100  # padding
    batch = {"chosen_input_ids": ids[:3], "chosen_labels": labels[:3],
             "rejected_input_ids": ids[3:], "rejected_labels": labels[3:]}
    monkeypatch.setattr(losses, "default_chunk_rows", lambda vocab, budget=0: 8)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    got_c, got_r = preference_logps(model, batch)
    (got_c.sum() - 2 * got_r.sum()).backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    counted = int((labels[:, 1:] != -100).sum())  # 6 x 7 - 3
    assert counted == 39 and sum(seen) == 2 * counted and max(seen) == 8  # forward + recomputation

    model.zero_grad(set_to_none=True)
    logp = torch.log_softmax(model(ids)[:, :-1], -1)  # the full logits
    keep = labels[:, 1:] != -100
    per_token = logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * keep
    want = per_token.sum(-1)
    (want[:3].sum() - 2 * want[3:].sum()).backward()
    torch.testing.assert_close(torch.cat([got_c, got_r]), want, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got_grads[n], p.grad, rtol=1e-4, atol=1e-4, msg=n)  # grads of ~10


def test_beta_falls_back_to_clip_range_with_a_notice():
    said = []
    assert beta_of(RLHFConfig(clip_range=0.3, reward_model_name=None), said.append) == 0.3
    assert "clip_range" in said[0]
    said.clear()
    assert beta_of(RLHFConfig(beta=0.1, reward_model_name=None), said.append) == 0.1 and not said


def test_cli_rlhf_ends_with_a_done_line_like_pretrain_and_sft(policy_dir, pairs, tmp_path, capsys):
    """`llm-lab rlhf` (every algorithm goes through run_rlhf) ends as pretrain and sft do: steps, the best
    metric and what was saved where (best_lora_adapters/ beside best/ under LoRA)."""
    from llmlab.cli.main import main

    out = tmp_path / "run"
    overrides = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in dict(
        algorithm="dpo", policy_checkpoint=str(policy_dir), datasets=[pairs], output_dir=str(out), batch_size=8,
        mini_batch_size=4, beta=0.5, learning_rate=1e-2, max_steps=2, log_every=1, eval_every=2, eval_steps=2,
        val_fraction=0.1, save_best_only=False, use_lora=True).items()]
    assert main(["rlhf", *overrides, "reward_model_name=null"]) == 0
    best = json.loads((out / "best" / "trainer_state.json").read_text())["best_metric"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"done: dpo, 2 steps; best val reward accuracy {round(best, 4)}; saved best/, "
                    f"best_lora_adapters/, latest/ in {out}")


def test_done_message_names_a_training_metric_and_the_save_best_only_fallback():
    from pathlib import Path

    from llmlab.rlhf.run import done_message

    assert done_message("grpo", 24, "reward", 0.123456, ["best", "latest"], Path("runs/g")) == (
        "done: grpo, 24 steps; best reward 0.1235; saved best/, latest/ in runs/g")
    assert done_message("ppo", 3, "val_reward", None, ["latest"], Path("o"), fallback=True) == (
        "done: ppo, 3 steps; no val reward (no evaluation ran); saved latest/ (no evaluation set a best, so no best/: the final "
        "policy went to latest/ despite save_best_only) in o")
    assert done_message("dpo", 1, "val_reward_accuracy", 0.5, ["latest"], Path("o")).startswith("done: dpo, 1 step;")
    # resumed from best/, never beaten: best/ exists, from before, and the message says so
    assert done_message("grpo", 9, "val_reward", 0.75, ["latest"], Path("o"), fallback=True) == (
        "done: grpo, 9 steps; best val reward 0.75; saved latest/ (no evaluation of this run beat the best val "
        "reward it started from, 0.75, so no new best/: the final policy went to latest/ despite save_best_only) in o")


def test_max_prompt_len_cuts_dpo_prompts_from_the_left(policy_dir, pairs, tmp_path, capsys, monkeypatch):
    """max_prompt_len was read by PPO/GRPO only: DPO kept whole prompts up to max_seq_len (TRL's
    max_prompt_length cuts them). A second run in the same process says its first cut again (the notice is
    once per run, not once per Python session)."""
    for run in ("run", "again"):
        run_rlhf(_cfg(policy_dir, pairs, tmp_path / run, max_steps=1, eval_every=1, eval_steps=1, max_prompt_len=4))
        out, err = capsys.readouterr()
        assert "max_prompt_len=4 (the prompt); its prompt keeps its last 4 tokens" in err, run
    assert "8 preference pair(s) cut to max_prompt_len/max_seq_len" in out + err  # one step's batch_size
