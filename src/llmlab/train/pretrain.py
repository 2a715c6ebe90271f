"""Base training (pretraining): a model config and a training config in, checkpoints and metrics out.

    python -m llmlab.train.pretrain --config train_config.json --model-config model_config.json
    torchrun --nproc_per_node=2 -m llmlab.train.pretrain --config train_config.json --model-config model_config.json
    python -m llmlab.train.pretrain --resume checkpoints/latest max_steps=20000 [--no-optimizer-state]

`run_pretrain` is what `llm-lab pretrain` calls. It builds the tokenizer (`model_cfg.tokenizer_name`),
the model, and packed train/validation batches from `cfg.datasets` (`llmlab.data.pretrain`, each rank
reading its own part), saves `model_config.json` and the resolved `train_config.json` into `output_dir`,
prints the resolved config, and hands over to the shared loop (`llmlab.train.loop`: steps, evaluation,
checkpoints, resume, NaN handling, Ctrl-C/SIGTERM). Under torchrun the same function trains data-parallel
(DDP, or FSDP2 with `distributed=fsdp`); rank 0 logs and saves.

Resuming: `run_pretrain(cfg, resume="checkpoints/latest")` takes the model config and tokenizer from the
checkpoint and restores the weights, optimizer (unless `load_optimizer_state=False`, needed to switch
optimizer), schedule position, RNG states and data position; `cfg` may raise `max_steps`. The training
config saved in the checkpoint is `train_config_from_checkpoint(path)`, the starting point for overrides.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.checkpoint import load_state_into, read_checkpoint
from llmlab.config import ModelConfig, TrainConfig
from llmlab.data.pretrain import PretrainBatches
from llmlab.errors import ConfigError, LLMLabError
from llmlab.model import build_model
from llmlab.train.distributed import DistInfo, init_distributed, rank0_print, shutdown
from llmlab.train.loop import resume_state, train_loop


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), numpy and Python RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_config_from_checkpoint(path: str | Path) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (its training_config.json)."""
    ckpt = read_checkpoint(path)
    data = ckpt.training_config()
    if data is None:
        raise ConfigError(f"{ckpt.path}: no training_config.json; pass --config with the training config")
    stage = data.pop("stage", "TrainConfig")
    if stage != "TrainConfig":
        raise ConfigError(f"{ckpt.path}: was written by {stage}, not by pretraining; resume it with its own stage")
    return TrainConfig.from_dict(data, source=str(ckpt.path / "training_config.json"))


def _check_same_model(given: ModelConfig, saved: ModelConfig, where: Path) -> None:
    a, b = given.to_dict(), saved.to_dict()
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"{k}: the model config says {a[k]!r} but the checkpoint {where} has {b[k]!r}; "
                          f"leave out --model-config when resuming (it is read from the checkpoint)")


def _tokenizer_for(model_cfg: ModelConfig, ckpt: Any) -> Any:
    from llmlab.data.tokenizer import load_tokenizer

    if ckpt is not None and ckpt.tokenizer_path is not None:
        return load_tokenizer(str(ckpt.tokenizer_path))
    return load_tokenizer(model_cfg.tokenizer_name)


def run_pretrain(cfg: TrainConfig, model_cfg: ModelConfig | None = None, *, resume: str | None = None,
                 load_optimizer_state: bool = True, tokenizer: Any = None, progress: bool = True) -> Path:
    """Pretrain (or resume pretraining); returns the output folder. See the module docstring."""
    info = init_distributed()
    try:
        ckpt = read_checkpoint(resume) if resume is not None else None
        if model_cfg is None:
            if ckpt is None:
                raise ConfigError("model config: pass one (--model-config) unless resuming from a checkpoint")
            model_cfg = ckpt.model_config
        elif ckpt is not None:
            _check_same_model(model_cfg, ckpt.model_config, ckpt.path)
        tok = tokenizer if tokenizer is not None else _tokenizer_for(model_cfg, ckpt)
        if model_cfg.vocab_size < len(tok):
            raise ConfigError(f"vocab_size: {model_cfg.vocab_size} is smaller than the tokenizer's {len(tok)} tokens "
                              f"({model_cfg.tokenizer_name}); set vocab_size to at least {len(tok)}")
        seq_len = cfg.max_seq_len or model_cfg.max_seq_len
        if seq_len > model_cfg.max_seq_len:
            raise ConfigError(f"max_seq_len: {seq_len} is longer than the model's max_seq_len "
                              f"{model_cfg.max_seq_len}; lower it or leave it None")

        start = None
        if ckpt is not None:
            start = resume_state(ckpt.path)
            saved_opt = (ckpt.trainer_state() or {}).get("optimizer")
            if not load_optimizer_state:
                start.optimizer = None
            elif saved_opt is not None and saved_opt != cfg.optimizer:
                raise ConfigError(f"optimizer: the checkpoint was trained with {saved_opt!r}; to switch to "
                                  f"{cfg.optimizer!r} resume without its optimizer state (--no-optimizer-state)")

        out = Path(cfg.output_dir)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            model_cfg.save(out / "model_config.json")
            cfg.save(out / "train_config.json")
            _print_resolved(info, cfg, model_cfg, seq_len, len(tok), ckpt)

        seed_everything(cfg.seed)  # same initial weights on every rank
        model = build_model(model_cfg)
        if ckpt is not None:
            load_state_into(model, ckpt.state_dict(), where=str(ckpt.path))
        seed_everything(cfg.seed + info.rank)  # per-rank dropout and sampling

        def batches(split: str) -> PretrainBatches:
            return PretrainBatches(cfg.datasets, tok, seq_len=seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                                   split=split, val_fraction=cfg.val_fraction, rank=info.rank,
                                   world_size=info.world_size, text_column=cfg.text_column)

        train = batches("train")
        val = batches("val") if cfg.val_fraction > 0 else None
        train_loop(model, cfg, train, val, output_dir=out, kind="pretrain", tokenizer=tok, start_state=start,
                   progress=progress, dist_info=info)
        return out
    finally:
        shutdown(info)


def _print_resolved(info: DistInfo, cfg: TrainConfig, model_cfg: ModelConfig, seq_len: int, n_tok: int,
                    ckpt: Any) -> None:
    from llmlab.model.estimate import count_parameters

    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size
    lines = [
        "resolved training config:",
        json.dumps(cfg.to_dict(), indent=2),
        f"model: {json.dumps(model_cfg.to_dict())}",
        f"tokenizer: {n_tok} tokens; sequence length {seq_len}; device {info.device}; processes {info.world_size}"
        + (f" ({cfg.distributed})" if info.distributed else ""),
        f"one step = {per_step} sequences = {per_step * seq_len:,} tokens",
    ]
    lines.append(f"parameters: {count_parameters(model_cfg):,}")
    if ckpt is not None:
        lines.append(f"resuming from {ckpt.path}")
    rank0_print(info, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Console-less entry for torchrun: `python -m llmlab.train.pretrain ...`; exit 0 also on Ctrl-C/SIGTERM."""
    p = argparse.ArgumentParser(prog="python -m llmlab.train.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="train_config.json (default: the checkpoint's when resuming)")
    p.add_argument("--model-config", help="model_config.json (default: the checkpoint's when resuming)")
    p.add_argument("--resume", help="checkpoint folder to continue from (e.g. checkpoints/latest)")
    p.add_argument("--no-optimizer-state", action="store_true", help="start the optimizer afresh when resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-step lines")
    p.add_argument("overrides", nargs="*", help="key=value training config overrides, e.g. max_steps=2000")
    args = p.parse_args(argv)
    try:
        if args.config:
            cfg = TrainConfig.load(args.config)
        elif args.resume:
            cfg = train_config_from_checkpoint(args.resume)
        else:
            raise ConfigError("--config: give a training config (or --resume CHECKPOINT)")
        cfg = cfg.with_overrides(args.overrides)
        model_cfg = ModelConfig.load(args.model_config) if args.model_config else None
        run_pretrain(cfg, model_cfg, resume=args.resume, load_optimizer_state=not args.no_optimizer_state,
                     progress=not args.no_progress)
    except LLMLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
