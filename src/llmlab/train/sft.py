"""Supervised fine-tuning, full or LoRA: a pretrained checkpoint and chat data in, a chat model out.

    python -m llmlab.train.sft --config sft_config.json
    torchrun --nproc_per_node=2 -m llmlab.train.sft --config sft_config.json
    python -m llmlab.train.sft --resume sft_checkpoints/latest max_steps=8000

`run_sft` is what `llm-lab sft` calls. It starts from the *weights* of `policy_checkpoint` (the optimizer
starts afresh; a checkpoint holding a LoRA adapter is merged first), takes the tokenizer from the
checkpoint's `tokenizer/` folder (else `model_config.tokenizer_name`), wraps the model with LoRA adapters
when `use_lora` (base frozen, only the adapters in the optimizer, see `llmlab.lora`), and hands over to
the shared loop (`llmlab.train.loop`: accumulation, evaluation, best/ and latest/, exact resume,
progress, metrics.jsonl, loss.png, torchrun) with SFT batches (`llmlab.data.sft`: chat template, loss on
the assistant tokens and their `<|im_end|>` only, labels -100 elsewhere).

With LoRA every checkpoint keeps the base weights in model.safetensors and the adapter in `adapter/`; each
new best also writes `{output_dir}/best_lora_adapters/` (PEFT format). Resuming restores base + adapter
with the same trainable set, the optimizer, schedule, RNG and data position.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from llmlab.checkpoint import load_model, load_state_into, read_checkpoint
from llmlab.config import ModelConfig, SFTConfig
from llmlab.data.sources import reset_notices
from llmlab.errors import ConfigError
from llmlab.train.distributed import DistInfo, init_distributed, rank0_print, shutdown
from llmlab.train.loop import resume_state, train_loop
from llmlab.train.stage import (
    check_config_type,
    check_optimizer_switch,
    check_tokenizer_fits,
    save_resolved,
    seed_everything,
    stage_main,
    stage_seq_len,
    tokenizer_for,
    unused_lora_targets,
    unused_settings,
)


def sft_batches(cfg: SFTConfig, tokenizer: Any, seq_len: int, split: str, info: DistInfo | None = None):
    """This rank's SFT batches of one split (`llmlab.data.sft.SFTBatches`) for `cfg`."""
    from llmlab.data.sft import SFTBatches

    info = info or DistInfo()
    return SFTBatches(cfg.datasets, tokenizer, seq_len=seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                      split=split, val_fraction=cfg.val_fraction, rank=info.rank, world_size=info.world_size,
                      skip_invalid=cfg.skip_invalid_records)


def _policy_model(cfg: SFTConfig, info: DistInfo):
    """The starting model (weights only) and its checkpoint; says how the spec's file name was mapped."""
    ckpt = read_checkpoint(cfg.policy_checkpoint)
    given = Path(cfg.policy_checkpoint)
    if given.resolve() != ckpt.path.resolve():
        rank0_print(info, f"policy_checkpoint: {given} -> {ckpt.path} (LLM-Lab checkpoints are folders; the "
                          f"spec's file name stands for this one)")
    if ckpt.has_adapter:
        rank0_print(info, f"policy_checkpoint: {ckpt.path} holds a LoRA adapter; starting from base + adapter merged")
    return load_model(ckpt.path).train(), ckpt


def _resumed_model(cfg: SFTConfig, ckpt: Any):
    """The model of a resumed run: its weights, and under LoRA its trainable adapter, which must have been
    trained with this config's LoRA settings (`llmlab.lora.check_lora_resume`)."""
    from llmlab.lora import check_lora_resume, load_lora_checkpoint
    from llmlab.model import build_model

    has_adapter = (ckpt.path / "adapter").is_dir()
    if cfg.use_lora != has_adapter:
        raise ConfigError(f"use_lora: {ckpt.path} was trained {'with' if has_adapter else 'without'} LoRA; resume "
                          f"it with use_lora={'true' if has_adapter else 'false'}")
    if has_adapter:
        check_lora_resume(cfg, ckpt)
        return load_lora_checkpoint(ckpt.path, trainable=True).train()
    model = build_model(ckpt.model_config)
    load_state_into(model, ckpt.state_dict(), where=str(ckpt.path))
    return model.train()


def run_sft(cfg: SFTConfig, *, resume: str | None = None, progress: bool = True,
            load_optimizer_state: bool = True, tokenizer: Any = None, show_config: bool = True) -> Path:
    """Fine-tune (or resume fine-tuning); returns the output folder. See the module docstring.
    show_config=False prints the saved config files' paths instead of the resolved config itself."""
    from llmlab.lora import apply_lora, lora_save_hook

    check_config_type(cfg, SFTConfig)
    info = init_distributed()
    reset_notices()  # this run says its data notices again, also after another run in this process
    try:
        if cfg.use_lora and info.distributed and cfg.distributed == "fsdp":
            raise ConfigError("distributed: LoRA trains with ddp (the adapters are small); set distributed=ddp")
        if resume is not None:
            ckpt = read_checkpoint(resume)
            model = _resumed_model(cfg, ckpt)
            start = resume_state(ckpt.path, optimizer=load_optimizer_state)
            check_optimizer_switch(start, ckpt, cfg, load_optimizer_state)
        else:
            model, ckpt = _policy_model(cfg, info)
            start = None
        model_cfg: ModelConfig = ckpt.model_config
        tok = tokenizer if tokenizer is not None else tokenizer_for(model_cfg, ckpt)
        check_tokenizer_fits(model_cfg.vocab_size, len(tok))
        seq_len = stage_seq_len(cfg, model_cfg)

        out = Path(cfg.output_dir)
        save_resolved(out, cfg, model_cfg, info, seq_len=seq_len, n_tokens=len(tok),
                      resumed_from=ckpt if resume is not None else None, show_config=show_config)
        for notice in (unused_settings(cfg), unused_lora_targets(cfg) if resume is None else None):
            if notice:
                rank0_print(info, notice)
        if cfg.use_lora and resume is None:
            seed_everything(cfg.seed)  # the same adapter initialisation on every rank
            model = apply_lora(model, cfg, verbose=info.is_main)
        seed_everything(cfg.seed + info.rank)  # per-rank dropout

        train = sft_batches(cfg, tok, seq_len, "train", info)
        val = sft_batches(cfg, tok, seq_len, "val", info) if cfg.val_fraction > 0 else None
        if val is not None:  # an empty validation split fails now, not at the first evaluation
            position = copy.deepcopy(val.state_dict())
            next(val)
            val.load_state_dict(position)
        train_loop(model, cfg, train, val, output_dir=out, kind="sft", tokenizer=tok, start_state=start,
                   save_hook=lora_save_hook if cfg.use_lora else None, progress=progress, dist_info=info)
        _report_skipped(train, info)
        return out
    finally:
        shutdown(info)


def _report_skipped(batches: Any, info: DistInfo) -> None:
    """Say how many records this rank's training data skipped (invalid format, or no answer left after
    truncation to the sequence length)."""
    invalid = getattr(batches, "skipped_invalid", 0)
    empty = getattr(batches, "skipped_empty", getattr(batches, "skipped_truncated", 0))
    if invalid or empty:
        rank0_print(info, f"data: skipped {invalid} record(s) in no known SFT format and {empty} with no answer "
                          f"token left within max_seq_len (counts of rank 0)")


def main(argv: list[str] | None = None) -> int:
    """Console-less entry for torchrun: `python -m llmlab.train.sft ...`; exit 0 also on Ctrl-C/SIGTERM."""
    return stage_main(argv, SFTConfig, run_sft, prog="python -m llmlab.train.sft",
                      description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
