"""What the pretraining and SFT stages share around the loop: configs from checkpoints, the resolved-config
printout, tokenizer choice, seeding, the optimizer-switch check and the `python -m` entry.

    python -m llmlab.train.pretrain --resume checkpoints/latest max_steps=20000
    python -m llmlab.train.sft --resume sft_checkpoints/latest max_steps=8000

Each stage module keeps its own setup (which model, which batches); this module holds the steps whose
logic is the same for both, so a fix lands in both stages at once.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from llmlab.config import ConfigBase, ModelConfig, vocab_slack
from llmlab.errors import ConfigError, LLMLabError
from llmlab.train.distributed import DistInfo, rank0_print
from llmlab.train.loop import StartState, replaced_run_notice

C = TypeVar("C", bound=ConfigBase)


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), numpy and Python RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_config_from_checkpoint(path: str | Path, cls: type[C]) -> C:
    """The `cls` config a checkpoint was trained with (its training_config.json), the starting point for
    resuming; a checkpoint written by another stage is refused."""
    from llmlab.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    data = ckpt.training_config()
    if data is None:
        raise ConfigError(f"{ckpt.path}: no training_config.json; pass --config with the training config")
    stage = data.pop("stage", cls.__name__)
    if stage != cls.__name__:
        raise ConfigError(f"{ckpt.path}: was written by {stage}, not {cls.__name__}; resume it with its own command")
    return cls.from_dict(data, source=str(ckpt.path / "training_config.json"))


def tokenizer_for(model_cfg: ModelConfig, ckpt: Any) -> Any:
    """The checkpoint's own tokenizer/ folder when it has one, else `model_cfg.tokenizer_name`."""
    from llmlab.data.tokenizer import load_tokenizer

    if ckpt is not None and ckpt.tokenizer_path is not None:
        return load_tokenizer(str(ckpt.tokenizer_path))
    return load_tokenizer(model_cfg.tokenizer_name)


def check_vocab_size(model_cfg: ModelConfig, n_tokens: int) -> str | None:
    """A ConfigError when vocab_size is below the tokenizer's `n_tokens` (ids past the embedding); a one-line
    notice (returned) when it is more than `vocab_slack` rows above, since those embedding and lm_head rows
    are never used; None when it fits."""
    v = model_cfg.vocab_size
    if v < n_tokens:
        raise ConfigError(f"vocab_size: {v} is smaller than the tokenizer's {n_tokens} tokens "
                          f"({model_cfg.tokenizer_name}); set vocab_size to at least {n_tokens}")
    if v > n_tokens + vocab_slack(n_tokens):
        return (f"note: vocab_size: {v} is {v - n_tokens} more than the tokenizer's {n_tokens} tokens "
                f"({model_cfg.tokenizer_name}); those embedding and lm_head rows are never used; set "
                f"vocab_size={n_tokens} (or up to {n_tokens + vocab_slack(n_tokens)}) to drop them")
    return None


def check_tokenizer_fits(vocab_size: int, n_tokens: int) -> None:
    """A ConfigError when a checkpoint's model (SFT's and RLHF's policy_checkpoint) has fewer embedding rows
    than its tokenizer has tokens: ids past the embedding. Pretraining sizes vocab_size itself
    (`check_vocab_size`)."""
    if vocab_size < n_tokens:
        raise ConfigError(f"policy_checkpoint: the model has {vocab_size} embedding rows but the tokenizer has "
                          f"{n_tokens} tokens; use the tokenizer the model was trained with")


def stage_seq_len(cfg: Any, model_cfg: ModelConfig) -> int:
    """The training sequence length: `cfg.max_seq_len`, else the model's; longer than the model is an error."""
    seq_len = cfg.max_seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"max_seq_len: {seq_len} is longer than the model's max_seq_len "
                          f"{model_cfg.max_seq_len}; lower it or leave it None")
    return seq_len


def check_saved_optimizer(saved: Any, cfg: Any) -> None:
    """Refuse to load optimizer state written by another optimizer (`saved`: the trainer state's
    "optimizer", None in checkpoints that did not record it)."""
    if saved is not None and saved != cfg.optimizer:
        raise ConfigError(f"optimizer: the checkpoint was trained with {saved!r}, the config has "
                          f"{cfg.optimizer!r}; resume with optimizer={saved}, or pass --no-optimizer-state "
                          f"(load_optimizer_state=False) to switch to {cfg.optimizer} with a fresh optimizer")


def check_optimizer_switch(start: StartState, ckpt: Any, cfg: Any, load_optimizer_state: bool) -> None:
    """Drop the saved optimizer state when asked; otherwise refuse to load one written by another optimizer."""
    if not load_optimizer_state:
        start.optimizer = None
    else:
        check_saved_optimizer((ckpt.trainer_state() or {}).get("optimizer"), cfg)


def unused_lora_targets(cfg: Any) -> str | None:
    """The notice for lora_target_modules given with a preset other than custom, which never reads them
    (PEFT users expect target_modules to win); None when nothing is ignored."""
    if not getattr(cfg, "use_lora", False) or cfg.lora_preset == "custom" or not cfg.lora_target_modules:
        return None
    from llmlab.lora import LORA_PRESETS

    return (f"notice: lora_target_modules {json.dumps(cfg.lora_target_modules)} is unused: lora_preset="
            f"{cfg.lora_preset} adapts {', '.join(LORA_PRESETS[cfg.lora_preset])}; set lora_preset=custom to adapt "
            f"the listed modules")


def check_config_type(cfg: Any, cls: type) -> None:
    """A stage called from Python with a dict (or another stage's config) gets one line, not an
    AttributeError deep in the run."""
    if not isinstance(cfg, cls):
        raise ConfigError(f"cfg: expected a {cls.__name__}, got a {type(cfg).__name__}; build one with "
                          f"{cls.__name__}(...), {cls.__name__}.from_dict(d) or {cls.__name__}.load(path)")


def set_values(cfg: Any, names: Any) -> list[str]:
    """`name=value` (JSON) for each of `names` that `cfg` has and holds at other than its dataclass default
    (the user set it): what the set-but-unused notices name."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cfg)}
    shown = []
    for name in names:
        f = fields.get(name)
        if f is None:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if getattr(cfg, name) != default:
            shown.append(f"{name}={json.dumps(getattr(cfg, name))}")
    return shown


def unused_settings(cfg: Any) -> str | None:
    """One notice naming the settings given a non-default value that this configuration never reads (another
    optimizer's parameters, poly_power without the polynomial schedule, min_lr_ratio with none, max_nan_skips
    without nan_policy=skip, LoRA settings without use_lora); None when every set value is read."""
    from llmlab.config import OPTIMIZER_PARAMS

    unused: list[str] = []

    def check(names: Any, why: str) -> None:
        if shown := set_values(cfg, names):
            unused.append(f"{', '.join(shown)} ({why})")

    for name, params in OPTIMIZER_PARAMS.items():
        if name != cfg.optimizer:
            check(params, f"optimizer={cfg.optimizer}")
    check(["poly_power"] if cfg.scheduler != "polynomial" else [], f"scheduler={cfg.scheduler}")
    check(["min_lr_ratio"] if cfg.scheduler == "none" else [], "scheduler=none keeps the lr flat")
    if hasattr(cfg, "nan_policy") and cfg.nan_policy != "skip":
        check(["max_nan_skips"], f"nan_policy={cfg.nan_policy}")
    if hasattr(cfg, "use_lora") and not cfg.use_lora:
        check(["lora_preset", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"], "use_lora=false")
    return f"notice: set but unused: {'; '.join(unused)}" if unused else None


# Settings that choose the validation batches: changed on resume, val losses measure other data than the
# checkpoint's best val loss did
VAL_DATA_FIELDS = ("datasets", "val_fraction", "seed", "text_column", "batch_size", "max_seq_len", "eval_steps")


def resume_changes(cfg: Any, ckpt: Any, out: Path) -> list[str]:
    """Notes for a resumed run whose settings differ from the checkpoint's training config: which changed,
    the learning rate the closed-form schedule now gives the next step (max_steps, warmup_steps, scheduler,
    ... reshape the whole curve), that validation reads other batches, and where the run writes when that
    is not the checkpoint's own run folder (a copied checkpoint resumes into the output_dir it names)."""
    from llmlab.optim import lr_factor

    lines = []
    if ckpt.path.parent.resolve() != out.resolve():
        lines.append(f"note: this run writes to output_dir={out}, not {ckpt.path.parent} where the checkpoint is")
    saved = {k: v for k, v in (ckpt.training_config() or {}).items() if k != "stage"}
    now = cfg.to_dict()
    changed = [k for k in now if k in saved and saved[k] != now[k] and k != "output_dir"]
    if not changed:
        return lines
    lines.append("changed since the checkpoint: " + ", ".join(f"{k} {json.dumps(saved[k])} -> {json.dumps(now[k])}"
                                                              for k in changed))
    step = (ckpt.trainer_state() or {}).get("step")
    try:
        old = type(cfg).from_dict(saved)
        lr_then, lr_now = (c.peak_lr * lr_factor(step, c) for c in (old, cfg))
    except (LLMLabError, TypeError):  # an older config, or no step: nothing to compare
        lr_then = lr_now = None
    if lr_then is not None and not math.isclose(lr_then, lr_now, rel_tol=1e-6, abs_tol=0.0):
        lines.append(f"note: the learning rate of step {step + 1} is {lr_now:.3g} with these settings (the checkpoint's "
                     f"schedule gave {lr_then:.3g}): the schedule is a closed form of the step and max_steps, "
                     f"warmup_steps, scheduler, lr")
    if val := [k for k in changed if k in VAL_DATA_FIELDS]:
        best = (ckpt.trainer_state() or {}).get("best_val_loss")
        lines.append(f"note: {', '.join(val)} changed, so validation reads other batches; its losses compare with "
                     f"the checkpoint's best val loss ({best if best is None else round(best, 4)}), which decides "
                     f"best/, only roughly")
    return lines


def save_resolved(out: Path, cfg: Any, model_cfg: ModelConfig, info: DistInfo, *, seq_len: int, n_tokens: int,
                  resumed_from: Any = None, show_config: bool = True) -> None:
    """Rank 0: create `out`, save model_config.json and the stage config, and print what the run will do.

    show_config=False (the pipeline) names the saved config files instead of printing them in full."""
    if not info.is_main:
        return
    from llmlab.atomic import make_dir
    from llmlab.model.estimate import count_parameters

    make_dir(out, "output_dir")
    model_path = model_cfg.save(out / ModelConfig.config_name)
    cfg_path = cfg.save(out / type(cfg).config_name)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size
    if show_config:
        lines = ["resolved training config:", json.dumps(cfg.to_dict(), indent=2),
                 f"model: {json.dumps(model_cfg.to_dict())}"]
    else:
        lines = [f"resolved training config: {cfg_path}; model: {model_path}"]
    lines += [
        f"tokenizer: {n_tokens} tokens; sequence length {seq_len}; device {info.device}; processes {info.world_size}"
        + (f" ({cfg.distributed})" if info.distributed else ""),
        f"one step = {per_step} sequences = {per_step * seq_len:,} tokens",
        f"parameters: {count_parameters(model_cfg):,}",
    ]
    if resumed_from is not None:
        lines.append(f"resuming from {resumed_from.path}")
        lines += resume_changes(cfg, resumed_from, out)
    elif notice := replaced_run_notice(out):
        lines.append(notice)
    rank0_print(info, "\n".join(lines))


def stage_main(argv: list[str] | None, cls: type[C], run: Callable[..., Any], *, prog: str, description: str,
               model_config: bool = False) -> int:
    """The console-less entry of a stage (`python -m llmlab.train.<stage>`, torchrun): parse the flags,
    build the config (the file, else the resumed checkpoint's, then key=value overrides) and call
    `run(cfg, [model_cfg,] resume=..., load_optimizer_state=..., progress=...)`. Returns the exit code:
    0 (also after Ctrl-C/SIGTERM, which save latest/), 2 with a one-line error for bad input."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help=f"{cls.config_name} (default: the checkpoint's when resuming)")
    if model_config:
        p.add_argument("--model-config", help="model_config.json (default: the checkpoint's when resuming)")
    p.add_argument("--resume", help="checkpoint folder to continue from (e.g. checkpoints/latest)")
    p.add_argument("--no-optimizer-state", action="store_true", help="start the optimizer afresh when resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-step lines")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. max_steps=2000")
    args = p.parse_args(argv)
    try:
        from llmlab.device import set_threads

        set_threads()  # as the llm-lab CLI does: LLMLAB_THREADS, else OMP_NUM_THREADS, else usable cores
        if args.config:
            cfg = cls.load(args.config, args.overrides)  # validated after the overrides
        elif args.resume:
            cfg = stage_config_from_checkpoint(args.resume, cls).with_overrides(args.overrides)
        else:
            raise ConfigError("--config: give a config file (or --resume CHECKPOINT)")
        extra = [ModelConfig.load(args.model_config) if args.model_config else None] if model_config else []
        run(cfg, *extra, resume=args.resume, load_optimizer_state=not args.no_optimizer_state,
            progress=not args.no_progress)
    except LLMLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
