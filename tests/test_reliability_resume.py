"""Resume works from every kind of checkpoint each stage writes (issue 9, "Faults").

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_reliability_resume.py -q

For each (stage, checkpoint kind) a tiny run A trains FULL steps uninterrupted. Run B, with the same
config, stops at max_steps=PART (latest/ every 2 steps, best/ at each evaluation, every step, that
improves the stage's held-out metric) and is resumed from its latest/ or best/ to max_steps=FULL. On CPU
the resumed run must repeat A exactly: every per-step number in metrics.jsonl (loss, lr, grad_norm,
validation metrics, rewards, KL and PPO's KL coefficient; only wall-clock fields excepted), and the final
weights (model, adapter, PPO's value head). The checkpoint's step says where B continues from:
metrics.jsonl keeps B's records up to it and the resumed run redoes the rest, so a best/ behind latest/
also proves that weights and records are rewound.

The cases complement the stage tests, which cover pretrain latest/ (test_train_loop.py), SFT and DPO with
LoRA (test_sft.py, test_rlhf_dpo.py) and GRPO with LoRA after SIGTERM (test_rlhf_grpo.py). Here: pretrain
best/, full (non-LoRA) SFT, PPO (full, and LoRA with its value head) and full DPO and GRPO, from latest/
and best/. The schedule has warmup and no decay, so stopping at PART does not change the learning rates
(a decaying schedule depends on max_steps).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llmlab.checkpoint import read_checkpoint, save_checkpoint
from llmlab.config import ModelConfig, RLHFConfig, SFTConfig, TrainConfig
from llmlab.train.metrics import read_metrics

FULL, PART = 6, 4  # steps of the uninterrupted run A; where run B stops before it is resumed
TIMING = ("tokens_per_sec", "elapsed_s")  # wall-clock: the only per-step numbers allowed to differ


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from llmlab.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("resume-tok") / "tok"
    train_tokenizer(["bundled:shakespeare", "bundled:sft"], 300, out, max_docs=150)
    return out


def model_config(tokenizer_dir: Path) -> ModelConfig:
    return ModelConfig(tokenizer_name=str(tokenizer_dir), d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2,
                       vocab_size=320, max_seq_len=64, dropout=0.1)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random-init checkpoint with its tokenizer: the starting model of SFT and RLHF."""
    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.model import build_model

    folder = tmp_path_factory.mktemp("resume-base") / "base"
    torch.manual_seed(0)
    save_checkpoint(folder, build_model(model_config(tokenizer_dir)), kind="pretrain",
                    tokenizer=load_tokenizer(str(tokenizer_dir)))
    return folder


# --------------------------------------------------------------------------------------------------
# One config per stage, and how to run and resume it
# --------------------------------------------------------------------------------------------------

COMMON = dict(max_steps=FULL, warmup_steps=2, scheduler="none", log_every=1, eval_every=1, eval_steps=1,
              save_every=2, save_best_only=False, seed=3)
# High enough that the held-out metric stops improving within PART steps, so that best/ lies behind
# latest/ and resuming from it rewinds weights and metrics.jsonl (the step each case resumes from is
# asserted below).
LR = {"pretrain": 1e-1, "sft": 2e-1, "ppo": 1e-2, "ppo_lora": 1e-2, "dpo": 3e-2, "grpo": 3e-2}


def stage_config(stage: str, out: Path, tokenizer_dir: Path, base: Path, **kw: Any) -> Any:
    if stage == "pretrain":
        cfg = TrainConfig(output_dir=str(out), lr=LR[stage], batch_size=2, gradient_accumulation_steps=1,
                          datasets=["bundled:shakespeare"], val_fraction=0.1, **COMMON)
    elif stage == "sft":
        cfg = SFTConfig(output_dir=str(out), policy_checkpoint=str(base), learning_rate=LR[stage], batch_size=2,
                        gradient_accumulation_steps=1, datasets=["bundled:sft"], val_fraction=0.1, **COMMON)
    else:
        rl: dict[str, Any] = dict(algorithm=stage.removesuffix("_lora"), policy_checkpoint=str(base),
                                  reward_model_name=None, output_dir=str(out), learning_rate=LR[stage], batch_size=4,
                                  mini_batch_size=2, val_fraction=0.05, **COMMON)
        if stage == "dpo":
            rl.update(datasets=["bundled:preference"], beta=0.5)
        else:
            rl.update(datasets=["bundled:prompts"], reward_functions=["length_penalty"], max_new_tokens=6,
                      kl_coef=0.05, ppo_epochs=2)
        if stage == "grpo":
            rl.update(group_size=2)
        if stage.startswith("ppo"):
            rl.update(adaptive_kl=True, target_kl=0.01)  # the coefficient moves every step: its restore matters
        if stage.endswith("_lora"):
            rl.update(use_lora=True, lora_preset="attention_only", lora_r=4)
        cfg = RLHFConfig(**rl)
    return cfg.with_overrides([f"{k}={v}" for k, v in kw.items()]) if kw else cfg


def run_stage(stage: str, cfg: Any, tokenizer_dir: Path, resume: Path | None = None) -> None:
    if stage == "pretrain":
        from llmlab.train.pretrain import run_pretrain

        model_cfg = None if resume is not None else model_config(tokenizer_dir)
        run_pretrain(cfg, model_cfg, resume=None if resume is None else str(resume), progress=False,
                     show_config=False)
    elif stage == "sft":
        from llmlab.train.sft import run_sft

        run_sft(cfg, resume=None if resume is None else str(resume), progress=False, show_config=False)
    else:
        from llmlab.rlhf.run import run_rlhf

        run_rlhf(cfg, resume=None if resume is None else str(resume), progress=False)


def per_step(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor file of a checkpoint (model, adapter, value head), keyed by file and name."""
    out = {}
    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "value_head.safetensors"):
        if (folder / name).is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(str(folder / name)).items()})
    return out


_runs: dict[tuple[str, int], Path] = {}


def run_once(stage: str, max_steps: int, root: Path, tokenizer_dir: Path, base: Path) -> Path:
    """The output folder of a fresh run of `stage` to `max_steps`, run once per session and shared by the
    stage's cases (never written to again: cases resume from it into copies)."""
    if (stage, max_steps) not in _runs:
        out = root / f"{stage}-{max_steps}-steps"
        run_stage(stage, stage_config(stage, out, tokenizer_dir, base, max_steps=max_steps), tokenizer_dir)
        _runs[stage, max_steps] = out
    return _runs[stage, max_steps]


CASES = [
    ("pretrain", "best"),
    ("sft", "latest"),
    ("sft", "best"),
    ("ppo", "latest"),
    ("ppo_lora", "best"),
    ("dpo", "latest"),
    ("dpo", "best"),
    ("grpo", "latest"),
    ("grpo", "best"),
]


@pytest.mark.parametrize(("stage", "kind"), CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_resume_repeats_the_uninterrupted_run(stage, kind, tokenizer_dir, base_dir, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "resume-runs"
    full = run_once(stage, FULL, root, tokenizer_dir, base_dir)  # run A
    stopped = run_once(stage, PART, root, tokenizer_dir, base_dir)  # run B before its resume
    expected = per_step(full)
    assert [r["step"] for r in expected] == list(range(1, FULL + 1))
    assert per_step(stopped) == expected[:PART]  # up to PART, B is A

    saved = stopped / kind
    at = int(read_checkpoint(saved).trainer_state()["step"])
    if kind == "latest":
        assert at == PART
    else:  # best/ behind latest/: the resumed run must rewind the weights and metrics.jsonl to it
        assert 0 < at < PART, f"best/ is at step {at}: pick an LR for {stage} whose held-out metric peaks earlier"

    part = tmp_path_factory.mktemp(f"{stage}-{kind}") / "B"
    shutil.copytree(stopped, part)
    run_stage(stage, stage_config(stage, part, tokenizer_dir, base_dir), tokenizer_dir, resume=saved)
    resumed = per_step(part)
    assert [r["step"] for r in resumed] == list(range(1, FULL + 1))  # continued from `at`, nothing twice
    for got, want in zip(resumed, expected):
        assert got == want, f"step {want['step']} (resumed from {kind}/ at step {at})"
    a, b = weights(full / "latest"), weights(part / "latest")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    a_state, b_state = (read_checkpoint(d / "latest").trainer_state() for d in (full, part))
    assert b_state["step"] == FULL
    if stage.startswith("ppo"):
        assert any(k.startswith("value_head") for k in a)
        assert b_state["stage"]["kl_coef"] == a_state["stage"]["kl_coef"] != 0.05  # adapted, and restored
