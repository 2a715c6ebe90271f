"""Failures in a training stage are one-line errors that name the fields to change: out of memory (CUDA and
CPU), NaN hints in the stage's own field names, hand-edited trainer state, optimizer switches on resume,
and the --no-optimizer-state flag of every stage command."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.config import SFTConfig
from llmlab.errors import CheckpointError
from llmlab.train import loop
from llmlab.train.loop import TrainingError, resume_state, train_loop
from test_train_loop import Poisoned, RuleBatches, make_cfg, poisoned_model, tiny_model

CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")


def sft_cfg(tmp_path, **kw) -> SFTConfig:
    base = dict(output_dir=str(tmp_path / "sft"), max_steps=6, learning_rate=1e-2, warmup_steps=0, scheduler="none",
                batch_size=4, gradient_accumulation_steps=2, eval_every=1000, eval_steps=2, log_every=1,
                save_every=1000, save_best_only=True, weight_decay=0.0, datasets=["unused"])
    base.update(kw)
    return SFTConfig(**base)


def failing_step(monkeypatch, error, at_call):
    """forward_backward runs (so gradients exist) and then raises `error` on call `at_call` (1-based)."""
    real, calls = loop.forward_backward, []

    def step(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        if len(calls) == at_call:
            raise error
        return out

    monkeypatch.setattr(loop, "forward_backward", step)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), CPU_OOM],
                         ids=["cuda", "cpu"])
def test_out_of_memory_in_a_step_is_a_one_line_training_error(tmp_path, monkeypatch, error):
    failing_step(monkeypatch, error, at_call=3)
    cfg = make_cfg(tmp_path, max_steps=6, save_every=2, save_best_only=False, batch_size=4,
                   gradient_accumulation_steps=3)
    model = tiny_model()
    with pytest.raises(TrainingError) as info:
        train_loop(model, cfg, RuleBatches(4), None, output_dir=cfg.output_dir, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and info.value.__cause__ is None
    assert "out of memory on cpu in step 3" in msg
    assert "batch_size=2 gradient_accumulation_steps=6 (the same 12 sequences a step)" in msg
    assert "max_seq_len (now 16)" in msg and "gradient_checkpointing=true" in msg
    assert f"Last good checkpoint: {tmp_path / 'run' / 'latest'}" in msg
    assert all(p.grad is None for p in model.parameters())  # the failed step's gradients were freed
    assert loop.last_run_status(cfg.output_dir).stopped == "oom"  # not left at "running"


@pytest.mark.parametrize("where", ["to_device", "build_optimizer", "load_optimizer_state"])
def test_out_of_memory_while_setting_up_is_a_one_line_training_error(tmp_path, monkeypatch, where):
    """Moving the model to the device, building the optimizer, loading its saved state: an out-of-memory there
    is the same one-line TrainingError (not a traceback, not 'optimizer state does not fit'), status "oom"."""
    cfg = make_cfg(tmp_path, max_steps=1, save_best_only=False)
    start = None
    if where == "load_optimizer_state":
        train_loop(tiny_model(), cfg, RuleBatches(4), None, output_dir=cfg.output_dir, progress=False)
        start = resume_state(tmp_path / "run" / "latest")
        cfg = make_cfg(tmp_path, max_steps=2, save_best_only=False)
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    def fail(*args, **kw):
        raise error

    model = tiny_model()
    if where == "to_device":
        monkeypatch.setattr(model, "to", fail)
    else:
        monkeypatch.setattr(loop, where, fail)
    with pytest.raises(TrainingError) as info:
        train_loop(model, cfg, RuleBatches(4), None, output_dir=cfg.output_dir, start_state=start, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and info.value.__cause__ is None
    assert msg.startswith("out of memory on cpu while setting up the run (the model on cpu, the adamw optimizer")
    assert "lion or adafactor" in msg and "a smaller model" in msg
    assert msg.endswith(f"Last good checkpoint: {start.checkpoint if start else 'none'}")
    assert loop.last_run_status(cfg.output_dir).stopped == "oom"


def test_out_of_memory_in_sft_names_sft_fields_and_skips_what_is_set(tmp_path, monkeypatch):
    failing_step(monkeypatch, CPU_OOM, at_call=1)
    cfg = sft_cfg(tmp_path, batch_size=1, gradient_checkpointing=True, max_seq_len=16)
    with pytest.raises(TrainingError, match=r"^out of memory on cpu in step 1 \(batch_size=1, "
                                            r"gradient_accumulation_steps=2\); try a lower max_seq_len \(now 16\)\. "
                                            r"Last good checkpoint: none$"):
        train_loop(tiny_model(), cfg, RuleBatches(1), None, output_dir=cfg.output_dir, kind="sft", progress=False)


def test_other_runtime_errors_are_not_reported_as_out_of_memory(tmp_path, monkeypatch):
    failing_step(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied"), at_call=1)
    cfg = make_cfg(tmp_path, max_steps=2)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train_loop(tiny_model(), cfg, RuleBatches(4), None, output_dir=cfg.output_dir, progress=False)


def test_sft_nan_hint_uses_sft_field_names(tmp_path):
    flag = {"on": False}
    cfg = sft_cfg(tmp_path, gradient_accumulation_steps=1)
    with pytest.raises(TrainingError) as info:
        train_loop(poisoned_model(flag), cfg, Poisoned(4, bad={1}, flag=flag), None, output_dir=cfg.output_dir,
                   kind="sft", progress=False)
    msg = str(info.value)
    assert "lower learning_rate" in msg and "max_grad_norm > 0" in msg
    assert "grad_clip" not in msg and "lower lr," not in msg
    cfg.with_overrides(["learning_rate=1e-4", "max_grad_norm=0.5"])  # what the hint names is accepted


def test_trainer_state_without_step_is_a_checkpoint_error(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=1, save_best_only=False)
    train_loop(tiny_model(), cfg, RuleBatches(4), None, output_dir=cfg.output_dir, progress=False)
    state_file = tmp_path / "run" / "latest" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["step"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r'trainer_state.json: no valid "step"') as info:
        resume_state(tmp_path / "run" / "latest")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# RLHF: out of memory, optimizer switch on resume (tiny DPO runs)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", name="dpo_setup")
def dpo_setup_fixture(tmp_path_factory):
    from test_rlhf_rollout import tiny_policy

    root = tmp_path_factory.getbasetemp()
    pairs = root / "stage-errors-pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Tell me about {w} {n}.", "chosen": f"{w} {n} is good",
                                         "rejected": f"{w} {n} is bad"}) + "\n"
                             for w in ("cat", "dog", "sun", "moon") for n in range(10)))
    return tiny_policy(root), str(pairs)


def dpo_cfg(dpo_setup, out, **kw):
    from llmlab.config import RLHFConfig

    policy, pairs = dpo_setup
    base = dict(algorithm="dpo", policy_checkpoint=str(policy), datasets=[pairs], reward_model_name=None,
                output_dir=str(out), batch_size=4, mini_batch_size=2, learning_rate=1e-3, max_steps=1, log_every=1,
                eval_every=1000, val_fraction=0.0, save_best_only=False, save_every=1, max_seq_len=32)
    base.update(kw)
    return RLHFConfig(**base)


def test_rlhf_out_of_memory_is_a_one_line_training_error(dpo_setup, tmp_path, monkeypatch):
    from llmlab.rlhf.dpo import DPOStage
    from llmlab.rlhf.run import run_rlhf

    real, calls = DPOStage.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self)

    monkeypatch.setattr(DPOStage, "step", step)
    with pytest.raises(TrainingError) as info:
        run_rlhf(dpo_cfg(dpo_setup, tmp_path / "run", max_steps=3), progress=False)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("out of memory on cpu in step 2 (dpo)")
    for fix in ("mini_batch_size=1 (keeps batch_size=4)", "batch_size (now 4", "max_seq_len (now 32)",
                "gradient_checkpointing=true", f"Last good checkpoint: {tmp_path / 'run' / 'latest'}"):
        assert fix in msg
    assert loop.last_run_status(tmp_path / "run").stopped == "oom"


@pytest.mark.parametrize("where", ["build_reference", "load_optimizer"])
def test_rlhf_out_of_memory_while_setting_up_is_a_one_line_training_error(dpo_setup, tmp_path, monkeypatch, where):
    """The frozen reference copy, or the resumed optimizer state, not fitting: one line, status "oom"."""
    from llmlab.rlhf import run

    resume = None
    if where == "load_optimizer":
        run.run_rlhf(dpo_cfg(dpo_setup, tmp_path / "run"), progress=False)
        resume = str(tmp_path / "run" / "latest")

    def fail(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    if where == "load_optimizer":  # inside load_state_dict, which load_optimizer's except clause wraps
        monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", fail)
    else:
        monkeypatch.setattr(run, "build_reference", fail)
    with pytest.raises(TrainingError) as info:
        run.run_rlhf(dpo_cfg(dpo_setup, tmp_path / "run", max_steps=2), resume=resume, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and info.value.__cause__ is None
    assert msg.startswith("out of memory on cpu while setting up the run (the policy, its frozen reference, the "
                          "adamw optimizer")
    assert ("and its saved state" in msg) == (resume is not None)
    assert "use_lora=true" in msg and msg.endswith(f"Last good checkpoint: {resume or 'none'}")
    assert loop.last_run_status(tmp_path / "run").stopped == "oom"


def test_rlhf_nan_hint_uses_rlhf_field_names(dpo_setup, tmp_path, monkeypatch):
    from llmlab.rlhf.dpo import DPOStage
    from llmlab.rlhf.run import run_rlhf

    monkeypatch.setattr(DPOStage, "step", lambda self: {"loss": float("nan"), "tokens": 0})
    with pytest.raises(TrainingError) as info:
        run_rlhf(dpo_cfg(dpo_setup, tmp_path / "run", max_steps=2), progress=False)
    msg = str(info.value)
    assert msg.startswith("loss became NaN/Inf at step 1") and "\n" not in msg
    assert msg.endswith(loop.nan_hint(dpo_cfg(dpo_setup, tmp_path / "run")))
    assert "lower learning_rate, more warmup_steps, max_grad_norm > 0, or nan_policy=skip" in msg
    assert loop.last_run_status(tmp_path / "run").stopped == "nan"


def test_rlhf_resume_refuses_another_optimizer_unless_its_state_is_dropped(dpo_setup, tmp_path):
    from llmlab.errors import ConfigError
    from llmlab.rlhf.run import run_rlhf

    run_rlhf(dpo_cfg(dpo_setup, tmp_path / "run"), progress=False)
    latest = tmp_path / "run" / "latest"
    assert json.loads((latest / "trainer_state.json").read_text())["optimizer"] == "adamw"
    for other in ("lion", "muon"):  # lion would silently load AdamW's moments; muon raised a raw ValueError
        with pytest.raises(ConfigError, match=r"optimizer: .*'adamw'.*resume with optimizer=adamw, or pass "
                                              r"--no-optimizer-state") as info:
            run_rlhf(dpo_cfg(dpo_setup, tmp_path / "run", optimizer=other, max_steps=2), resume=str(latest),
                     progress=False)
        assert "\n" not in str(info.value)
    state_file = latest / "trainer_state.json"  # a checkpoint from before the optimizer was recorded
    old = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in old.items() if k != "optimizer"}))
    with pytest.raises(CheckpointError, match=r"does not fit this optimizer \(muon\).*--no-optimizer-state") as info:
        run_rlhf(dpo_cfg(dpo_setup, tmp_path / "run", optimizer="muon", max_steps=2), resume=str(latest),
                 progress=False)
    assert "\n" not in str(info.value)
    run_rlhf(dpo_cfg(dpo_setup, tmp_path / "run", optimizer="lion", max_steps=2), resume=str(latest),
             progress=False, load_optimizer_state=False)
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["optimizer"] == "lion"


# --------------------------------------------------------------------------------------------------
# --no-optimizer-state on every stage command (the hints above tell users to pass it)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command,module,name", [("sft", "llmlab.train.sft", "run_sft"),
                                                 ("rlhf", "llmlab.rlhf.run", "run_rlhf"),
                                                 ("pretrain", "llmlab.train.pretrain", "run_pretrain")])
def test_no_optimizer_state_flag_reaches_the_stage(command, module, name, monkeypatch, tmp_path):
    import importlib

    from llmlab.cli.main import main

    seen = []
    monkeypatch.setattr(importlib.import_module(module), name,
                        lambda cfg, *a, **kw: seen.append(kw["load_optimizer_state"]) or tmp_path)
    from conftest import tiny_config
    from llmlab.config import RLHFConfig, TrainConfig

    cls = {"sft": SFTConfig, "rlhf": RLHFConfig, "pretrain": TrainConfig}[command]
    cfg = cls(reward_model_name=None) if command == "rlhf" else cls()
    files = ["--config", str(cfg.save(tmp_path / "c.json"))]
    if command == "pretrain":
        files += ["--model-config", str(tiny_config().save(tmp_path / "model_config.json"))]
    missing = str(tmp_path / "missing")  # the estimate skips a checkpoint it cannot read
    for flag in (["--no-optimizer-state"], []):
        assert main([command, *files, "--resume", missing, *flag]) == 0
    assert seen == [False, True]
