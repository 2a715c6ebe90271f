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

Continued pretraining: `init_checkpoint` starts a new run (step 0, a fresh optimizer and schedule) from
a checkpoint's weights, model config and tokenizer: a pretrain/SFT/RLHF checkpoint, a merged LoRA model
or an `llm-lab import-hf` folder.

Resuming: `run_pretrain(cfg, resume="checkpoints/latest")` takes the model config and tokenizer from the
checkpoint and restores the weights, optimizer (unless `load_optimizer_state=False`, needed to switch
optimizer), schedule position, RNG states and data position; `cfg` may raise `max_steps`. The training
config saved in the checkpoint is `train_config_from_checkpoint(path)`, the starting point for overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from llmlab.checkpoint import load_state_into, read_checkpoint
from llmlab.config import ModelConfig, TrainConfig
from llmlab.data.pretrain import PretrainBatches
from llmlab.data.sources import reset_notices
from llmlab.errors import ConfigError
from llmlab.model import build_model
from llmlab.train.distributed import init_distributed, rank0_print, shutdown
from llmlab.train.loop import resume_state, train_loop
from llmlab.train.stage import (
    check_config_type,
    check_optimizer_switch,
    check_vocab_size,
    save_resolved,
    seed_everything,
    stage_config_from_checkpoint,
    stage_main,
    stage_seq_len,
    tokenizer_for,
    unused_settings,
)


def train_config_from_checkpoint(path: str | Path) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (its training_config.json)."""
    return stage_config_from_checkpoint(path, TrainConfig)


def _check_same_model(given: ModelConfig, saved: ModelConfig, where: Path, when: str = "resuming") -> None:
    a, b = given.to_dict(), saved.to_dict()
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"{k}: the model config says {a[k]!r} but the checkpoint {where} has {b[k]!r}; "
                          f"leave out --model-config when {when} (it is read from the checkpoint)")


def run_pretrain(cfg: TrainConfig, model_cfg: ModelConfig | None = None, *, resume: str | None = None,
                 load_optimizer_state: bool = True, tokenizer: Any = None, progress: bool = True,
                 show_config: bool = True) -> Path:
    """Pretrain (or resume pretraining); returns the output folder. See the module docstring.
    show_config=False prints the saved config files' paths instead of the resolved config itself."""
    check_config_type(cfg, TrainConfig)
    info = init_distributed()
    reset_notices()  # this run says its data notices again, also after another run in this process
    try:
        ckpt = read_checkpoint(resume) if resume is not None else None
        # init_checkpoint: a new run from a checkpoint's weights (resuming continues the run instead)
        init = read_checkpoint(cfg.init_checkpoint) if cfg.init_checkpoint and ckpt is None else None
        source = ckpt or init
        if model_cfg is None:
            if source is None:
                raise ConfigError("model config: pass one (--model-config) unless resuming from a checkpoint or "
                                  "starting from one (init_checkpoint)")
            model_cfg = source.model_config
        elif source is not None:
            _check_same_model(model_cfg, source.model_config, source.path,
                              "resuming" if ckpt is not None else "starting from init_checkpoint")
        tok = tokenizer if tokenizer is not None else tokenizer_for(model_cfg, source)
        for notice in (check_vocab_size(model_cfg, len(tok)), unused_settings(cfg)):  # vocab: raises when too small
            if notice:
                rank0_print(info, notice)
        seq_len = stage_seq_len(cfg, model_cfg)

        start = None
        if ckpt is not None:
            start = resume_state(ckpt.path, optimizer=load_optimizer_state)
            check_optimizer_switch(start, ckpt, cfg, load_optimizer_state)

        out = Path(cfg.output_dir)
        save_resolved(out, cfg, model_cfg, info, seq_len=seq_len, n_tokens=len(tok), resumed_from=ckpt,
                      show_config=show_config)

        seed_everything(cfg.seed)  # same initial weights on every rank
        model = build_model(model_cfg)
        if source is not None:
            load_state_into(model, source.state_dict(), where=str(source.path))
        if init is not None:
            rank0_print(info, f"starting from the weights of {init.path} (init_checkpoint): step 0, a new optimizer")
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


def main(argv: list[str] | None = None) -> int:
    """Console-less entry for torchrun: `python -m llmlab.train.pretrain ...`; exit 0 also on Ctrl-C/SIGTERM."""
    return stage_main(argv, TrainConfig, run_pretrain, prog="python -m llmlab.train.pretrain",
                      description=__doc__.splitlines()[0], model_config=True)


if __name__ == "__main__":
    sys.exit(main())
