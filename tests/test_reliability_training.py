"""Training faults: SIGTERM / Ctrl-C save a resumable latest/ and exit 0; NaN stops or is skipped and
counted; gradient clipping clips to the threshold.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_reliability_training.py -q

Signals are sent by the training process to itself at a chosen point (inside a training step, inside an
evaluation, inside an RL rollout), in a forked child that runs the real `llm-lab` entry point
(`llmlab.cli.main.main`), so the exit code is the command's.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal

import pytest
import torch
from tests.conftest import tiny_config

pytest.importorskip("llmlab.train.loop")

from llmlab.checkpoint import load_model, read_checkpoint, save_checkpoint  # noqa: E402
from llmlab.config import RLHFConfig, TrainConfig  # noqa: E402
from llmlab.model import build_model  # noqa: E402

# spawn, not fork: a child forked from a pytest worker that already ran torch/tokenizers thread pools can
# deadlock (it did, under xdist); spawn starts clean and re-imports this module for the target.
SPAWN = mp.get_context("spawn")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from llmlab.data.tokenizer import train_tokenizer

    os.environ.setdefault("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(["bundled:shakespeare", "bundled:sft | | 0.5"], 300, out, max_docs=150)
    return out


@pytest.fixture
def pretrain_files(tmp_path, tok_dir):
    model_cfg = tiny_config(vocab_size=512, tokenizer_name=str(tok_dir))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=6, batch_size=2, gradient_accumulation_steps=1,
                      lr=1e-3, warmup_steps=0, eval_every=3, eval_steps=1, save_every=3, save_best_only=False,
                      log_every=1, max_seq_len=32, datasets=["bundled:shakespeare"], val_fraction=0.1)
    model_cfg.save(tmp_path / "model.json")
    cfg.save(tmp_path / "train.json")
    return cfg, model_cfg, tmp_path


def _child_body(target, args) -> None:
    torch.set_num_threads(1)
    try:
        code = target(*args)
    except BaseException as e:  # noqa: BLE001 - report and fail
        print(f"child raised {type(e).__name__}: {e}", flush=True)
        code = 99
    os._exit(code)


def _in_child(target, *args) -> int:
    """Run target(*args) (a module-level function) in a fresh child process; its return value is the
    exit code."""
    child = SPAWN.Process(target=_child_body, args=(target, args))
    child.start()
    child.join(240)
    if child.exitcode is None:
        child.kill()
    return child.exitcode


def _signal_at(module, name: str, sig: int, call: int):
    """Replace module.name by a wrapper that sends `sig` to this process on its `call`-th call."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    setattr(module, name, wrapper)


def _pretrain_cli(files, point: str, sig: int) -> int:
    import llmlab.train.loop as loop
    from llmlab.cli.main import main

    _signal_at(loop, "forward_backward" if point == "training" else "evaluate", sig, 2 if point == "training" else 1)
    return main(["pretrain", "--config", str(files / "train.json"), "--model-config", str(files / "model.json"),
                 "log_every=1"])


@pytest.mark.parametrize("point,sig", [("training", signal.SIGTERM), ("evaluation", signal.SIGINT)])
def test_signal_during_pretraining_saves_latest_exits_0_and_resumes(pretrain_files, point, sig):
    from llmlab.train.pretrain import run_pretrain

    cfg, model_cfg, files = pretrain_files
    assert _in_child(_pretrain_cli, files, point, sig) == 0
    latest = read_checkpoint(files / "run" / "latest")
    stopped_at = latest.trainer_state()["step"]
    # training: the step in flight (2) finishes; evaluation: the eval of step 3 is cut short or finished
    assert stopped_at == (2 if point == "training" else 3)
    assert latest.trainer_tensors()["optimizer"] is not None
    run_pretrain(cfg, model_cfg, resume=str(latest.path), progress=False)
    assert read_checkpoint(files / "run" / "latest").trainer_state()["step"] == cfg.max_steps
    steps = [json.loads(line).get("step") for line in (files / "run" / "metrics.jsonl").read_text().splitlines()]
    assert cfg.max_steps in steps and stopped_at + 1 in steps


def _nan_after(model, n_train_calls: int, once: bool = False):
    """Make the model's output NaN on training forward passes after the first `n_train_calls`."""
    state = {"n": 0}

    def hook(module, args, output):
        if not module.training:
            return output
        state["n"] += 1
        if state["n"] > n_train_calls and (not once or state["n"] == n_train_calls + 1):
            return output * float("nan")
        return output

    model.norm.register_forward_hook(hook)
    return model


def _patched_build(monkeypatch, **kw):
    import llmlab.train.pretrain as pretrain

    real = pretrain.build_model
    monkeypatch.setattr(pretrain, "build_model", lambda cfg: _nan_after(real(cfg), **kw))


def test_nan_loss_stops_with_the_last_good_checkpoint(pretrain_files, monkeypatch):
    from llmlab.train.loop import TrainingError
    from llmlab.train.pretrain import run_pretrain

    cfg, model_cfg, files = pretrain_files
    _patched_build(monkeypatch, n_train_calls=4)  # steps 1-4 are fine, step 5 is NaN
    with pytest.raises(TrainingError) as info:
        run_pretrain(cfg, model_cfg, progress=False)
    message = str(info.value)
    assert "\n" not in message and "latest" in message and "step 5" in message
    latest = read_checkpoint(files / "run" / "latest")
    assert latest.trainer_state()["step"] == 3  # saved at step 3; the NaN model was never saved
    model = load_model(latest.path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_skip_policy_counts_skipped_steps(pretrain_files, monkeypatch):
    from llmlab.train.pretrain import run_pretrain

    cfg, model_cfg, files = pretrain_files
    _patched_build(monkeypatch, n_train_calls=1, once=True)  # only step 2 is NaN
    run_pretrain(cfg.with_overrides(["nan_policy=skip", "max_nan_skips=3"]), model_cfg, progress=False)
    latest = read_checkpoint(files / "run" / "latest")
    assert latest.trainer_state()["step"] == cfg.max_steps and latest.trainer_state()["nan_skips"] == 1
    records = [json.loads(line) for line in (files / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [2]
    assert all(torch.isfinite(p).all() for p in load_model(latest.path).parameters())


def test_nan_skip_policy_stops_after_max_nan_skips(pretrain_files, monkeypatch):
    from llmlab.train.loop import TrainingError
    from llmlab.train.pretrain import run_pretrain

    cfg, model_cfg, _ = pretrain_files
    _patched_build(monkeypatch, n_train_calls=0)  # every step is NaN
    with pytest.raises(TrainingError, match="max_nan_skips=2"):
        run_pretrain(cfg.with_overrides(["nan_policy=skip", "max_nan_skips=2"]), model_cfg, progress=False)


@pytest.mark.parametrize("max_norm", [0.5, 3.0])
def test_gradient_clipping_clips_to_the_threshold(max_norm):
    from llmlab.train.loop import grad_norm_and_clip

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p) * 0.5
    before = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    grads = [p.grad.clone() for p in params]
    norm = grad_norm_and_clip(params, max_norm)
    after = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert float(norm) == pytest.approx(before, rel=1e-5)  # the logged norm is the one before clipping
    if before > max_norm:
        assert after == pytest.approx(max_norm, rel=1e-4)
        for p, g in zip(params, grads):  # direction kept
            assert torch.allclose(p.grad, g * (max_norm / before), rtol=1e-4, atol=1e-7)
    else:
        assert after == pytest.approx(before, rel=1e-6)
    assert before == pytest.approx(2.75, abs=0.01)  # the data makes one case clip and the other not


# --------------------------------------------------------------------------------------------------
# RLHF: a signal during a rollout
# --------------------------------------------------------------------------------------------------


def _rlhf_cfg(tmp_path, tok_dir) -> RLHFConfig:
    from llmlab.data.tokenizer import load_tokenizer

    policy = tmp_path / "policy"
    save_checkpoint(policy, build_model(tiny_config(vocab_size=512, tokenizer_name=str(tok_dir))), kind="sft",
                    tokenizer=load_tokenizer(str(tok_dir)))
    return RLHFConfig(algorithm="grpo", policy_checkpoint=str(policy), reward_model_name=None,
                      reward_functions=["length_penalty"], datasets=["bundled:prompts"], batch_size=2,
                      mini_batch_size=2, group_size=2, max_new_tokens=4, max_prompt_len=32, max_steps=3,
                      save_every=1, eval_every=100, eval_steps=1, ppo_epochs=1, log_every=1, save_best_only=False,
                      output_dir=str(tmp_path / "rl"), val_fraction=0.1)


def _rlhf_cli(path) -> int:
    import llmlab.rlhf.grpo as grpo
    from llmlab.cli.main import main

    real = grpo.generate_rollout
    calls = {"n": 0}

    def rollout(*a, on_tokens=None, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # during step 2's rollout, at its first generated token
            def on_tok(t):
                os.kill(os.getpid(), signal.SIGTERM)
                return on_tokens(t)
            return real(*a, on_tokens=on_tok, **k)
        return real(*a, on_tokens=on_tokens, **k)

    grpo.generate_rollout = rollout
    return main(["rlhf", "--config", str(path)])


def test_sigterm_during_an_rl_rollout_saves_latest_exits_0_and_resumes(tmp_path, tok_dir):
    from llmlab.rlhf.run import run_rlhf

    cfg = _rlhf_cfg(tmp_path, tok_dir)
    cfg.save(tmp_path / "rl.json")
    assert _in_child(_rlhf_cli, tmp_path / "rl.json") == 0
    latest = read_checkpoint(tmp_path / "rl" / "latest")
    assert latest.trainer_state()["step"] == 1  # step 2 was abandoned mid-rollout and rewound
    run_rlhf(cfg, resume=str(latest.path), progress=False)
    assert read_checkpoint(tmp_path / "rl" / "latest").trainer_state()["step"] == cfg.max_steps


# --------------------------------------------------------------------------------------------------
# Data problems during training are counted and reported
# --------------------------------------------------------------------------------------------------


def test_sft_reports_skipped_records(tmp_path, tok_dir):
    from llmlab.config import SFTConfig
    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.train.sft import run_sft

    save_checkpoint(tmp_path / "base", build_model(tiny_config(vocab_size=512, tokenizer_name=str(tok_dir))),
                    tokenizer=load_tokenizer(str(tok_dir)))
    rows = [{"instruction": f"Say {i}.", "response": str(i)} for i in range(12)] + [{"bad": i} for i in range(6)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig(policy_checkpoint=str(tmp_path / "base"), datasets=[str(tmp_path / "sft.jsonl")],
                    skip_invalid_records=True, max_steps=3, batch_size=4, gradient_accumulation_steps=1,
                    warmup_steps=0, eval_every=100, eval_steps=1, save_every=100, log_every=1, max_seq_len=32,
                    output_dir=str(tmp_path / "sft"), val_fraction=0.0)
    run_sft(cfg, progress=False)
    # the count is only inside the saved data position (trainer_state.json "data"), which nobody reads
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped_invalid") for r in records)
