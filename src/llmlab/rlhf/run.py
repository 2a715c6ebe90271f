"""`run_rlhf`: PPO, DPO or GRPO on an LLM-Lab policy, full or LoRA, with the life cycle of every stage.

    llm-lab rlhf --config rlhf_config.json algorithm=grpo max_steps=200

    from llmlab.rlhf.run import run_rlhf
    best = run_rlhf(RLHFConfig.load("rlhf_config.json"), resume=None, progress=True)

Setup: the policy is `policy_checkpoint` (an adapter it holds is merged first, so the starting policy is
what SFT produced); with `use_lora` fresh adapters go on top and only they (and PPO's value head) train.
The reference is that starting policy: the same PeftModel with its adapter disabled under LoRA, a frozen
copy otherwise, or `reference_checkpoint` when given. The policy checkpoint's tokenizer renders prompts
and decodes completions for the reward functions / reward model (`rlhf.rewards.build_reward_fn`).
Dropout is switched off in the policy (as TRL does) so that log-probs at sampling time and in the update
agree and PPO/GRPO ratios start at exactly 1; LoRA's dropout too, with a notice when lora_dropout > 0.
GRPO with kl_coef = 0 builds no reference (`needs_reference`).

The loop follows `llmlab.train.loop`'s conventions and reuses its pieces (`MetricsLogger`, `StopFlag`,
RNG capture, `TrainingError`): one step is one algorithm step (a rollout batch and its updates, or one
DPO batch); `metrics.jsonl`, TensorBoard, a progress bar and `loss.png` plus `rewards.png`;
`best/` after an evaluation that improves the stage's metric (greedy reward on held-out prompts for PPO
and GRPO, validation reward accuracy for DPO), with `best_lora_adapters/` beside it under LoRA; `latest/`
every save_every steps unless save_best_only, and always on Ctrl-C/SIGTERM. A signal during a rollout
abandons that rollout (nothing was updated yet), rewinds its data and sampling state and saves, so the
resumed run redoes exactly that step. Resume restores weights, optimizer, data positions, random
generators, PPO's value head and KL coefficient: on CPU a resumed run repeats an uninterrupted one exactly.
A checkpoint trained with another optimizer is refused unless `load_optimizer_state=False`
(`--no-optimizer-state`), which starts the optimizer afresh. Out of memory in a step or an evaluation is a
one-line `TrainingError` naming the fields to lower and the last good checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmlab.checkpoint import base_transformer, read_checkpoint, save_checkpoint, saved_step
from llmlab.config import RLHFConfig
from llmlab.errors import CheckpointError, ConfigError, LLMLabError
from llmlab.generate import check_compiler
from llmlab.lora import BEST_ADAPTERS
from llmlab.optim import set_lr
from llmlab.rlhf.rollout import greedy_reward, prompt_budget
from llmlab.rlhf.scoring import Reference, build_reference
from llmlab.train.loop import (
    StopFlag,
    StopReason,
    TrainingError,
    capture_rng,
    free_memory,
    is_out_of_memory,
    lr_clip_fields,
    nan_hint,
    oom_text,
    replaced_run_notice,
    restore_rng,
    resume_command,
    setup_oom_message,
    smaller_batch,
    write_run_status,
)
from llmlab.train.metrics import MetricsLogger, plot_curves, read_metrics
from llmlab.train.stage import (
    check_config_type,
    check_saved_optimizer,
    check_tokenizer_fits,
    set_values,
    unused_lora_targets,
    unused_settings,
)

REWARD_PLOT = "rewards.png"


class RolloutAborted(Exception):
    """Raised from the token callback when a stop signal arrives during generation."""


# --------------------------------------------------------------------------------------------------
# What every algorithm stage gets
# --------------------------------------------------------------------------------------------------


@dataclass
class Session:
    """The pieces of one RLHF run that the PPO, DPO and GRPO stages share."""

    cfg: RLHFConfig
    policy: nn.Module
    reference: Reference | None  # None only for GRPO with kl_coef = 0 (`needs_reference`)
    tokenizer: Any
    device: torch.device
    stop_ids: list[int]
    pad_id: int
    model_max_len: int
    sample_gen: torch.Generator  # on the device: sampling in rollouts
    shuffle_gen: torch.Generator  # on the CPU: mini-batch order
    notice: Callable[[str], None] = print
    on_tokens: Callable[[torch.Tensor], None] | None = None
    _val_prompts: list | None = field(default=None, repr=False)

    def prompt_batches(self, split: str):
        """Prompt batches (PPO/GRPO) of `split`, prompts cut to fit max_new_tokens into the model."""
        from llmlab.data.prompts import PromptBatches

        cfg = self.cfg
        budget = prompt_budget(cfg.max_prompt_len, cfg.max_new_tokens, self.model_max_len)
        return PromptBatches(cfg.datasets, self.tokenizer, cfg.batch_size, max_prompt_len=budget, seed=cfg.seed,
                             split=split, val_fraction=cfg.val_fraction)

    def held_out_prompts(self) -> list:
        """eval_steps batches of validation prompts, read once (every evaluation scores the same ones)."""
        from llmlab.errors import DataError

        if self._val_prompts is None:
            self._val_prompts = []
            if self.cfg.val_fraction > 0:
                try:
                    val = self.prompt_batches("val")
                    self._val_prompts = [next(val) for _ in range(self.cfg.eval_steps)]
                except DataError as e:
                    self.notice(f"rlhf: no validation prompts ({e}); best/ follows the training reward")
        return self._val_prompts

    def evaluate_reward(self, reward_fn: Callable[..., Any]) -> dict[str, Any]:
        """Greedy reward on the held-out prompts ({} when there are none)."""
        batches = self.held_out_prompts()
        if not batches:
            return {}
        return greedy_reward(self.policy, self.tokenizer, reward_fn, batches, max_new_tokens=self.cfg.max_new_tokens,
                             stop_ids=self.stop_ids, pad_id=self.pad_id, compile=self.cfg.compile)


def _stage_class(algorithm: str) -> type:
    from llmlab.rlhf.dpo import DPOStage
    from llmlab.rlhf.grpo import GRPOStage
    from llmlab.rlhf.ppo import PPOStage

    stages = {"ppo": PPOStage, "dpo": DPOStage, "grpo": GRPOStage}
    if algorithm not in stages:
        raise ConfigError(f"algorithm: {algorithm!r} is not one of 'ppo', 'dpo', 'grpo'")
    return stages[algorithm]


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout in the model (nn.Dropout modules, the attention's dropout_p, LoRA dropout)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0


def dropout_notice(cfg: RLHFConfig) -> str | None:
    """The line saying that RLHF switches LoRA's dropout off too, when the config asks for some other than
    the default (said on every LoRA run, the default's line was noise)."""
    if cfg.use_lora and cfg.lora_dropout > 0 and cfg.lora_dropout != RLHFConfig().lora_dropout:
        return (f"rlhf: lora_dropout={cfg.lora_dropout} is not applied: RLHF switches every dropout off (as TRL "
                f"does) so that sampling-time and update-time log-probs agree; set lora_dropout=0 to silence this")
    return None


# Settings of one algorithm that the others never read (the reward, rollout and PPO fields mean nothing to DPO).
UNREAD_BY: dict[str, tuple[str, ...]] = {
    "ppo": ("grpo_temperature", "beta", "group_size"),
    "grpo": ("temperature", "adaptive_kl", "target_kl", "vf_coef", "cliprange_value", "gamma", "gae_lambda",
             "whiten_advantages", "beta"),
    "dpo": ("reward_functions", "reward_model_weight", "reward_answer_column", "ppo_epochs", "group_size",
            "temperature", "grpo_temperature", "top_k", "top_p", "kl_coef", "adaptive_kl", "target_kl", "vf_coef",
            "cliprange_value", "gamma", "gae_lambda", "whiten_advantages", "max_new_tokens"),
}


def unread_by_algorithm(cfg: RLHFConfig) -> str | None:
    """One notice naming the settings given a non-default value that cfg.algorithm never reads (GRPO samples
    at grpo_temperature, not temperature; its KL coefficient is never adaptive; ...); None when there are none."""
    shown = set_values(cfg, UNREAD_BY[cfg.algorithm])
    if not shown:
        return None
    hint = ""
    if cfg.algorithm != "dpo" and set_values(cfg, ("temperature", "grpo_temperature")):
        hint = "; GRPO samples at grpo_temperature, PPO at temperature"
    return f"notice: set but unused by algorithm={cfg.algorithm}: {', '.join(shown)}{hint}"


def resumed_step(resume_dir: Path | None) -> int:
    """The step a resumed run starts from (0 for a fresh run, or when its trainer state is unreadable)."""
    if resume_dir is None:
        return 0
    try:
        return saved_step(resume_dir, read_checkpoint(resume_dir).trainer_state() or {})
    except LLMLabError:
        return 0


def needs_reference(cfg: RLHFConfig) -> bool:
    """False for GRPO with kl_coef = 0 (and adaptive_kl off): nothing reads the reference's log-probs,
    so no frozen copy is built (nor, under LoRA, the adapter-disabled forward pass). PPO always has one:
    its logged KL is the drift the user watches even at kl_coef = 0; DPO's loss needs it."""
    return not (cfg.algorithm == "grpo" and cfg.kl_coef == 0 and not cfg.adaptive_kl)


def load_policy_tokenizer(policy_checkpoint: str) -> Any:
    """The tokenizer saved with the policy checkpoint, else the one its model config names."""
    from llmlab.data.tokenizer import load_tokenizer

    ckpt = read_checkpoint(policy_checkpoint)
    source = ckpt.tokenizer_path or ckpt.model_config.tokenizer_name
    return load_tokenizer(str(source))


def load_policy(cfg: RLHFConfig, resume_dir: Path | None, device: torch.device) -> nn.Module:
    """The trainable policy: fresh from policy_checkpoint (adapter merged, new LoRA adapters when
    use_lora), or the resumed checkpoint's weights (with its trainable adapter)."""
    from llmlab.checkpoint import load_model
    from llmlab.lora import apply_lora, check_lora_resume, load_lora_checkpoint

    if resume_dir is not None:
        has_adapter = read_checkpoint(resume_dir).has_adapter
        if has_adapter != cfg.use_lora:
            raise CheckpointError(f"{resume_dir}: written with use_lora={has_adapter}, but the config has "
                                  f"use_lora={cfg.use_lora}; resume with the same setting")
        if cfg.use_lora:
            check_lora_resume(cfg, resume_dir, skip=("lora_dropout",))  # RLHF switches dropout off anyway
            return load_lora_checkpoint(resume_dir, device, trainable=True)
        return load_model(resume_dir, device).requires_grad_(True)
    policy = load_model(cfg.policy_checkpoint, device).requires_grad_(True)
    if cfg.use_lora:
        policy = apply_lora(policy, cfg)
    return policy


def _resume_dir(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume in ("latest", "best"):
        return read_checkpoint(output_dir / resume).path
    return read_checkpoint(resume).path


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def save_rlhf_checkpoint(path: Path, session: Session, stage: Any, *, trainer_state: dict[str, Any],
                         metrics: dict[str, Any], best: bool) -> Path:
    """latest/ or best/: the policy (base weights + adapter/ under LoRA), trainer state, tokenizer, and
    what the stage adds (PPO's value head). A new best LoRA adapter also goes to best_lora_adapters/."""
    from llmlab.lora import BEST_ADAPTERS, is_lora_model, save_lora_checkpoint

    tensors = {"optimizer": stage.optimizer.state_dict(), "rng": capture_rng(session.device),
               "sample_gen": session.sample_gen.get_state(), "shuffle_gen": session.shuffle_gen.get_state()}
    common = dict(kind="rlhf", train_config=session.cfg, trainer_state=trainer_state, trainer_tensors=tensors,
                  tokenizer=session.tokenizer, metrics=metrics, write_extra=stage.write_extra)
    if is_lora_model(session.policy):
        best_dir = path.parent / BEST_ADAPTERS if best else None
        return save_lora_checkpoint(path, session.policy, best_adapter_dir=best_dir, **common)
    return save_checkpoint(path, session.policy, **common)


REWARD_CURVES = {k: k for k in ("reward", "best_of_n", "val_reward", "reward_accuracy", "val_reward_accuracy", "kl")}
BAR_FIELDS = {"ppo": ("reward", "kl"), "grpo": ("reward", "kl"), "dpo": ("reward_accuracy",)}


def plot_rewards(output_dir: Path) -> Path | None:
    """rewards.png: training reward, held-out reward / accuracy and KL against step, from metrics.jsonl."""
    return plot_curves(output_dir / REWARD_PLOT, read_metrics(output_dir), REWARD_CURVES)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def oom_message(cfg: RLHFConfig, *, where: str, device: torch.device, last_good: Any) -> str:
    """The one-line TrainingError text for an out-of-memory in an RLHF run: the fields to lower for the
    algorithm (a smaller mini_batch_size keeps batch_size), gradient_checkpointing, the last good checkpoint."""
    fixes = []
    split = smaller_batch(cfg.mini_batch_size, 1)
    if split is not None:
        fixes.append(f"mini_batch_size={split[0]} (keeps batch_size={cfg.batch_size})")
    fixes.append(f"a lower batch_size (now {cfg.batch_size}; mini_batch_size must divide it)")
    if cfg.algorithm == "dpo":
        fixes.append(f"a lower max_seq_len (now {cfg.max_seq_len or 'the model max'})")
    else:
        fixes.append(f"a lower max_new_tokens (now {cfg.max_new_tokens})")
        if cfg.algorithm == "grpo":
            fixes.append(f"a lower group_size (now {cfg.group_size})")
    return oom_text(cfg, where=where, device=device, setting=cfg.algorithm, fixes=fixes, last_good=last_good)


def load_optimizer(optimizer: torch.optim.Optimizer, state: Any, cfg: RLHFConfig, saved_name: Any,
                   where: Path) -> None:
    """Load a resumed run's optimizer state: refused when written by another optimizer (or when it does not
    fit); the config's hyperparameters (weight_decay, betas, ...) win over the saved ones."""
    check_saved_optimizer(saved_name, cfg)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        if is_out_of_memory(e):
            raise
        raise CheckpointError(f"optimizer state in {where} does not fit this optimizer ({cfg.optimizer}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; resume with "
                              f"--no-optimizer-state (load_optimizer_state=False)") from None
    for group, hp in zip(optimizer.param_groups, fresh):
        group.update(hp)


def run_rlhf(cfg: RLHFConfig, *, resume: str | None = None, progress: bool = True,
             load_optimizer_state: bool = True) -> Path:
    """Train with cfg.algorithm (ppo, dpo or grpo) for cfg.max_steps steps; returns best/ (or latest/
    when no evaluation ran). `resume`: a checkpoint folder written by this stage, or "latest"/"best" in
    cfg.output_dir. load_optimizer_state=False starts the optimizer afresh on resume (needed to switch
    optimizer); a checkpoint written by another optimizer is refused otherwise."""
    from llmlab.data.sources import reset_notices
    from llmlab.data.tokenizer import stop_token_ids
    from llmlab.train.distributed import init_distributed

    check_config_type(cfg, RLHFConfig)
    info = init_distributed()
    reset_notices()  # this run says its data notices again, also after another run in this process
    if info.distributed:
        raise LLMLabError("rlhf: runs in a single process; start it without torchrun (one GPU or the CPU)")
    device = info.device
    output_dir = Path(cfg.output_dir)
    resume_dir = _resume_dir(resume, output_dir)
    if resume_dir is None and (notice := replaced_run_notice(output_dir)):
        print(notice)
    torch.manual_seed(cfg.seed)

    tokenizer = load_policy_tokenizer(cfg.policy_checkpoint)
    oom: str | None = None
    stage = None
    try:  # the policy, the frozen reference, the optimizer and its saved state: an out-of-memory is one line
        policy = load_policy(cfg, resume_dir, device)
        disable_dropout(policy)
        fresh_lora = unused_lora_targets(cfg) if resume_dir is None else None
        messages: list[str] = [m for m in [dropout_notice(cfg), unused_settings(cfg), unread_by_algorithm(cfg),
                                            fresh_lora] if m]
        base = base_transformer(policy)
        base.gradient_checkpointing = cfg.gradient_checkpointing
        check_tokenizer_fits(base.config.vocab_size, len(tokenizer))
        # The reference is the starting policy: after a resume without LoRA, read it back from disk.
        ref_source = cfg.reference_checkpoint or (cfg.policy_checkpoint if resume_dir and not cfg.use_lora else None)
        reference = build_reference(policy, ref_source, device) if needs_reference(cfg) else None
        if reference is None:
            messages.append("rlhf: GRPO with kl_coef=0 builds no reference model (nothing uses it), so no kl is "
                            "logged; set kl_coef > 0 for a KL penalty to the reference")
        stop_ids = stop_token_ids(tokenizer)
        sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
        shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        session = Session(cfg=cfg, policy=policy, reference=reference, tokenizer=tokenizer, device=device,
                          stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, model_max_len=base.config.max_seq_len,
                          sample_gen=sample_gen, shuffle_gen=shuffle_gen, notice=messages.append)
        stage = _stage_class(cfg.algorithm)(session)
        if cfg.compile:
            if cfg.algorithm == "dpo":
                messages.append("rlhf: compile has no effect on dpo (it generates nothing; its forward shapes "
                                "change every step)")
            else:
                check_compiler(device)
                messages.append("rlhf: compile applies to generation (rollouts, greedy evaluation); the update "
                                "runs eager (its shapes change every step)")

        step, best, nan_skips = 0, None, 0
        if resume_dir is not None:
            ckpt = read_checkpoint(resume_dir)
            state = ckpt.trainer_state()
            if not state or state.get("algorithm") != cfg.algorithm:
                raise CheckpointError(f"{resume_dir}: not a {cfg.algorithm} RLHF checkpoint with trainer state; resume "
                                      f"from latest/ of a {cfg.algorithm} run, or start from it with policy_checkpoint")
            tensors, note = ckpt.resume_tensors(load_optimizer_state)
            if note:  # the prompt order starts afresh too
                messages.append(f"rlhf: {note}; so does the prompt order")
            step = saved_step(ckpt.path, state)
            best, nan_skips = state.get("best_metric"), int(state.get("nan_skips", 0))
            if load_optimizer_state:
                load_optimizer(stage.optimizer, tensors["optimizer"], cfg, state.get("optimizer"), ckpt.path)
            stage.load_state_dict(state["stage"], ckpt.path)
            if tensors is not None:  # CPU: RNG states load only from there
                restore_rng(tensors["rng"], device)
                sample_gen.set_state(tensors["sample_gen"])
                shuffle_gen.set_state(tensors["shuffle_gen"])
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        what = "the policy" + (", its frozen reference" if needs_reference(cfg) else "") + f", the {cfg.optimizer} "
        what += "optimizer" + (" and its saved state" if resume_dir is not None and load_optimizer_state else "")
        oom = setup_oom_message(cfg, device=device, what=f"{what} on {device.type}", last_good=resume_dir)
    if oom is not None:  # raised outside the except clause, so what was allocated can be freed
        write_run_status(output_dir, "oom", step=resumed_step(resume_dir), max_steps=cfg.max_steps, kind="rlhf")
        free_memory(stage.optimizer if stage is not None else None)
        raise TrainingError(oom)
    if cfg.max_steps <= step:
        raise ConfigError(f"max_steps: {cfg.max_steps} is not above the checkpoint's step {step}; pass "
                          f"max_steps=N with N > {step} to train further")

    output_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(output_dir / cfg.config_name)
    logger = MetricsLogger(output_dir, total_steps=cfg.max_steps, start_step=step, progress=progress,
                           description=f"rlhf {cfg.algorithm}", extra_fields=BAR_FIELDS[cfg.algorithm],
                           tb_prefix="rlhf")
    for m in messages:
        logger.message(m, always=True)
    session.notice = lambda m: logger.message(m, always=True)
    stop = StopFlag(lambda m: logger.message(m, always=True))

    def abort_rollout(_: torch.Tensor) -> None:
        if stop.requested:
            raise RolloutAborted

    session.on_tokens = abort_rollout
    paths: dict[str, Path | None] = {"best": None, "latest": None}
    last_metrics: dict[str, Any] = {}
    best_key = stage.best_metric  # the metric `best` is of: the training one when nothing is held out

    def trainer_state(stage_state: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, "algorithm": cfg.algorithm, "best_metric": best, "best_key": stage.best_metric,
                "nan_skips": nan_skips, "stage": stage_state, "max_steps": cfg.max_steps, "optimizer": cfg.optimizer}

    def save(which: str, stage_state: dict[str, Any] | None = None) -> None:
        path = output_dir / which
        save_rlhf_checkpoint(path, session, stage, trainer_state=trainer_state(stage_state or stage.state_dict()),
                             metrics={"step": step, stage.best_metric: best, **last_metrics}, best=which == "best")
        paths[which] = path

    def consider_best(value: float | None, key: str) -> None:
        nonlocal best, best_key
        if value is not None and math.isfinite(value) and (best is None or value > best):
            best, best_key = value, key
            save("best")

    config_path = output_dir / cfg.config_name

    def record_status(stopped: StopReason) -> None:
        write_run_status(output_dir, stopped, step=step, max_steps=cfg.max_steps, kind="rlhf",
                         resume=resume_command("rlhf", output_dir, config_path) if stopped == "interrupted" else None)

    record_status("running")
    stopped: StopReason = "finished"
    window: list[dict[str, Any]] = []
    interval_time, interval_tokens = time.perf_counter(), 0
    oom = None
    where = f"step {step + 1}"  # what an out-of-memory error interrupted
    stop.install()
    try:
        while step < cfg.max_steps:
            where = f"step {step + 1}"
            before = stage.state_dict() if cfg.algorithm != "dpo" else None
            gen_before = sample_gen.get_state()
            set_lr(stage.optimizer, step, cfg)
            try:
                metrics = stage.step()
            except RolloutAborted:
                _rewind(stage, before)
                sample_gen.set_state(gen_before)
                save("latest", before)
                stopped = "interrupted"
                break
            if not math.isfinite(metrics.get("loss", 0.0)) or metrics.get("skipped_updates"):
                nan_skips += 1
                if cfg.nan_policy == "stop" or nan_skips >= cfg.max_nan_skips:
                    record_status("nan")
                if cfg.nan_policy == "stop":
                    last = paths["latest"] or paths["best"] or resume_dir
                    raise TrainingError(f"loss became NaN/Inf at step {step + 1}; stopped without saving that model. "
                                        f"Last good checkpoint: {last or 'none'}. {nan_hint(cfg)}")
                logger.message(f"step {step + 1}: non-finite loss, update skipped ({nan_skips}/{cfg.max_nan_skips})",
                               always=True)
                if nan_skips >= cfg.max_nan_skips:
                    raise TrainingError(f"{nan_skips} steps had a NaN/Inf loss (max_nan_skips={cfg.max_nan_skips}); "
                                        f"stopped at step {step + 1}. Try a lower {lr_clip_fields(cfg)[0]} or more "
                                        f"warmup_steps")
            step += 1
            interval_tokens += int(metrics.pop("tokens", 0))
            window.append(metrics)
            logger.advance(step)
            final = step == cfg.max_steps
            record: dict[str, Any] = {}
            if step % cfg.log_every == 0 or final:
                now = time.perf_counter()
                record = {"step": step, **_mean_metrics(window), "lr": stage.optimizer.param_groups[0]["lr"],
                          "tokens_per_sec": interval_tokens / max(now - interval_time, 1e-9)}
                window, interval_tokens, interval_time = [], 0, now
            paused = time.perf_counter()
            where = f"the evaluation or save after step {step}"
            if step % cfg.eval_every == 0 or final:
                evaluated = stage.evaluate()
                if evaluated:
                    record = {"step": step, **record, **evaluated}
                    last_metrics = {k: v for k, v in evaluated.items() if isinstance(v, (int, float))}
                    consider_best(evaluated.get(stage.best_metric), stage.best_metric)
                elif record:  # no held-out data: best by the training metric
                    train_key = stage.best_metric.removeprefix("val_")
                    consider_best(record.get(train_key), train_key)
            if record:
                logger.log(record)
            if (not cfg.save_best_only and (step % cfg.save_every == 0 or final)) or stop.requested:
                save("latest")
            interval_time += time.perf_counter() - paused
            if stop.requested and not final:
                stopped = "interrupted"
                break
    except Exception as e:
        if not is_out_of_memory(e):
            if not isinstance(e, TrainingError):  # (NaN stops recorded "nan" themselves)
                record_status("error")
            raise
        oom = oom_message(cfg, where=where, device=device, last_good=paths["latest"] or paths["best"] or resume_dir)
    finally:
        stop.restore()
        logger.close()
        plot_rewards(output_dir)
    if oom is not None:  # raised here, outside the except clause, so the failed step's tensors can be freed
        record_status("oom")
        free_memory(stage.optimizer)
        raise TrainingError(oom)
    record_status(stopped)
    if stopped == "interrupted":
        print(f"interrupted at step {step}; saved {output_dir / 'latest'}. Resume with:\n"
              f"  {resume_command('rlhf', output_dir, config_path)}")
    result = paths["best"] or paths["latest"]
    fallback = result is None
    if fallback:  # save_best_only and nothing evaluated better: keep the final policy anyway
        save("latest")
        result = paths["latest"]
    if stopped == "finished":
        saved = [name for name, path in paths.items() if path is not None]
        if paths["best"] is not None and (output_dir / BEST_ADAPTERS).is_dir():
            saved.insert(1, BEST_ADAPTERS)
        logger.message(done_message(cfg.algorithm, step, best_key, best, saved, output_dir, fallback=fallback))
        data = getattr(stage, "pairs", None) or getattr(stage, "prompts", None)
        counts = []
        if getattr(data, "truncated", 0):
            what = ("preference pair(s) cut to max_prompt_len/max_seq_len" if cfg.algorithm == "dpo"
                    else "prompt(s) cut from the left")
            counts.append(f"{data.truncated} {what} in this run")
        if getattr(data, "skipped_empty", 0) and cfg.algorithm == "dpo":
            counts.append(f"{data.skipped_empty} pair(s) skipped: a blank answer, or the same answer twice")
        if counts:
            logger.message(f"data: {'; '.join(counts)} (rank 0's counts)")
    return result


def done_message(algorithm: str, step: int, best_key: str, best: float | None, saved: list[str],
                 output_dir: Path, *, fallback: bool = False) -> str:
    """The last line of a finished run, as pretrain and sft end: steps, the best metric, what was saved where.
    `fallback`: save_best_only found no best, so the final policy went to latest/."""
    where = ", ".join(f"{name}/" for name in saved) or "no checkpoint"
    value = best if best is None else round(best, 4)
    metric = best_key.replace("_", " ")
    if fallback and best is not None:  # resumed: the best it started from stood
        where += (f" (no evaluation of this run beat the best {metric} it started from, {value}, "
                  f"so no new best/: the final policy went to latest/ despite save_best_only)")
    elif fallback:
        where += " (no evaluation set a best, so no best/: the final policy went to latest/ despite save_best_only)"
    best_part = f"best {metric} {value}" if best is not None else f"no {metric} (no evaluation ran)"
    return f"done: {algorithm}, {step} step{'' if step == 1 else 's'}; {best_part}; saved {where} in {output_dir}"


def _rewind(stage: Any, state: dict[str, Any] | None) -> None:
    """Put the stage's data position back to before the abandoned step (folder None: weights stay)."""
    if state is not None:
        stage.load_state_dict(state, None)


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, float]:
    """Per-key mean of the numeric metrics of the steps since the last log."""
    keys: dict[str, None] = {}
    for m in window:
        keys.update(dict.fromkeys(k for k, v in m.items() if isinstance(v, (int, float))))
    out = {}
    for k in keys:
        values = [m[k] for m in window if isinstance(m.get(k), (int, float))]
        out[k] = sum(values) / len(values)
    return out
