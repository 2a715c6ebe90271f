"""What each CLI action does, given configs: shared by the subcommands and the interactive menu.

    llm-lab estimate --model-config configs/model_tiny.json --config configs/pretrain_tiny.json

Stage modules are imported inside the functions, so a missing or broken stage only breaks its own
command. Every function raises LLMLabError subclasses for bad input; the caller prints them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmlab.config import (
    STAGE_CONFIGS,
    ConfigBase,
    ModelConfig,
    RLHFConfig,
    SFTConfig,
    TrainConfig,
    read_config_json,
)
from llmlab.errors import ConfigError, LLMLabError


def console():
    from rich.console import Console

    return Console(highlight=False)


# --------------------------------------------------------------------------------------------------
# Configs and estimates
# --------------------------------------------------------------------------------------------------

STAGE_BY_NAME = {cls.__name__: cls for cls in STAGE_CONFIGS.values()}


def load_stage_config(path: str | os.PathLike) -> ConfigBase:
    """A train/sft/rlhf config file, its class told by the `stage` key (checkpoints write it) or its keys."""
    p = Path(path)
    data = read_config_json(p)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a JSON object of config fields")
    stage = data.pop("stage", None)
    if stage in STAGE_BY_NAME:
        return STAGE_BY_NAME[stage].from_dict(data, source=str(p))
    keys = {k for k in data if not k.startswith("_")}  # "_comment" keys are allowed
    for cls in (RLHFConfig, SFTConfig, TrainConfig):
        if keys <= set(cls.field_names()) and (cls is TrainConfig or keys & _distinctive(cls)):
            return cls.from_dict(data, source=str(p))
    return TrainConfig.from_dict(data, source=str(p))  # raises naming the unknown keys


def _distinctive(cls: type[ConfigBase]) -> set[str]:
    if cls is RLHFConfig:
        return set(RLHFConfig.field_names()) - set(SFTConfig.field_names())
    return {"policy_checkpoint", "learning_rate", "use_lora"}


def config_from_checkpoint(cls: type[ConfigBase], path: str | os.PathLike) -> ConfigBase:
    """The stage config a checkpoint was trained with (its training_config.json), for resuming."""
    from llmlab.train.stage import stage_config_from_checkpoint

    return stage_config_from_checkpoint(path, cls)


def stage_estimate_args(stage: ConfigBase | None, model_cfg: ModelConfig) -> dict[str, Any]:
    """estimate_memory keyword arguments implied by a stage config (batch, length, optimizer, LoRA)."""
    if stage is None:
        return {}
    out: dict[str, Any] = {"optimizer": stage.optimizer,
                           "gradient_checkpointing": getattr(stage, "gradient_checkpointing", False)}
    if isinstance(stage, RLHFConfig):
        out["batch_size"] = stage.mini_batch_size * (2 if stage.algorithm == "dpo" else 1)
        seq = min(model_cfg.max_seq_len, stage.max_seq_len or model_cfg.max_seq_len)  # DPO pairs fit this
        out["seq_len"] = seq if stage.algorithm == "dpo" else min(seq, stage.max_prompt_len + stage.max_new_tokens)
    else:
        out["batch_size"] = stage.batch_size
        out["seq_len"] = stage.max_seq_len or model_cfg.max_seq_len
    if getattr(stage, "use_lora", False):
        out.update(lora_preset=stage.lora_preset, lora_r=stage.lora_r, lora_targets=stage.lora_target_modules)
    return out


def estimate_table(model_cfg: ModelConfig, stage: ConfigBase | None = None, *, batch_size: int | None = None,
                   seq_len: int | None = None, optimizer: str | None = None, dtype: str | None = None):
    """A rich table: parameters (total, trainable) and training memory by part."""
    from rich.table import Table

    from llmlab.model.estimate import estimate_memory

    kw = stage_estimate_args(stage, model_cfg)
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len), ("optimizer", optimizer)):
        if value is not None:
            kw[key] = value
    if dtype is None:
        import torch

        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    est = estimate_memory(model_cfg, dtype=dtype, **kw)
    table = Table(title="Model size and training memory (estimate)", show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{est.parameters:,} ({_human(est.parameters)})")
    table.add_row("trainable", f"{est.trainable:,} ({_human(est.trainable)})")
    setting = (f"batch {kw.get('batch_size', 1)} x {kw.get('seq_len') or model_cfg.max_seq_len} tokens, "
               f"{kw.get('optimizer', 'adamw')}, {dtype}" + (f", LoRA {kw['lora_preset']}" if 'lora_preset' in kw else ""))
    table.add_row("setting", setting)
    for name, gb in (("weights", est.weights_gb), ("gradients", est.gradients_gb),
                     ("optimizer states", est.optimizer_gb), ("activations", est.activations_gb),
                     ("total", est.total_gb)):
        table.add_row(name, f"{gb:.3f} GB")
    return table


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def print_estimate(model_cfg: ModelConfig, stage: ConfigBase | None = None, **kw: Any) -> None:
    from llmlab.model.estimate import shape_notice

    console().print(estimate_table(model_cfg, stage, **kw))
    notice = shape_notice(model_cfg)
    if notice:
        console().print(notice)


def configure(cfg: ModelConfig, out: str | os.PathLike = "model_config.json", *,
              vocab_from_tokenizer: bool = False, vocab_multiple_of: int | None = None, force: bool = False) -> Path:
    """Save a model config (optionally sizing vocab_size from its tokenizer) and print its estimate. An
    existing `out` is refused unless `force` (--force), like the other commands that write an --out."""
    if Path(out).exists() and not force:
        raise ConfigError(f"--out: {out} already exists; pass --force (force=True) to overwrite it or choose "
                          f"another --out")
    if vocab_from_tokenizer:
        from llmlab.data.tokenizer import load_tokenizer, model_vocab_size

        vocab = model_vocab_size(load_tokenizer(cfg.tokenizer_name), multiple_of=vocab_multiple_of)
        cfg = cfg.with_overrides({"vocab_size": vocab})
    path = cfg.save(out)
    print_estimate(cfg)
    console().print(f"saved model config to {path}")
    return path


# --------------------------------------------------------------------------------------------------
# Training stages
# --------------------------------------------------------------------------------------------------


class StageMissing(LLMLabError):
    """A stage this install does not have (its module or function is missing)."""


def _stage_function(module: str, name: str, what: str):
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise StageMissing(f"{what} is not available in this LLM-Lab install ({module} is missing)") from None
        raise
    fn = getattr(mod, name, None)
    if fn is None:
        raise StageMissing(f"{what} is not available in this LLM-Lab install ({module}.{name} is missing)")
    return fn


def default_model_config(resume: str | None, init_checkpoint: str | None = None) -> ModelConfig | None:
    """`./model_config.json` when it exists; None when resuming or starting from init_checkpoint (the
    checkpoint's config is used)."""
    if resume or init_checkpoint:
        return None
    p = Path("model_config.json")
    if p.is_file():
        return ModelConfig.load(p)
    raise ConfigError("pretrain: no model config; pass --model-config FILE (create one with `llm-lab configure`), "
                      "init_checkpoint=CHECKPOINT or --resume CHECKPOINT")


def pretrain(cfg: TrainConfig, model_cfg: ModelConfig | None = None, *, resume: str | None = None,
             load_optimizer_state: bool = True, progress: bool = True, estimate: bool = True,
             show_config: bool = True) -> Path:
    """Base training (the estimate first); returns the output folder. show_config=False names the saved
    resolved config instead of printing it (the pipeline)."""
    run = _stage_function("llmlab.train.pretrain", "run_pretrain", "base training")
    if model_cfg is None:
        model_cfg = default_model_config(resume, cfg.init_checkpoint)
    if estimate:
        show_stage_estimate(cfg, model_cfg, resume)
    return run(cfg, model_cfg, resume=resume, load_optimizer_state=load_optimizer_state, progress=progress,
               show_config=show_config)


def sft(cfg: SFTConfig, *, resume: str | None = None, load_optimizer_state: bool = True, progress: bool = True,
        estimate: bool = True, show_config: bool = True) -> Path:
    """Supervised fine-tuning (the estimate first); returns the output folder. show_config as for pretrain;
    load_optimizer_state=False (--no-optimizer-state) starts the optimizer afresh when resuming."""
    run = _stage_function("llmlab.train.sft", "run_sft", "SFT")
    if estimate:
        show_stage_estimate(cfg, None, resume)
    return run(cfg, resume=resume, load_optimizer_state=load_optimizer_state, progress=progress,
               show_config=show_config)


def rlhf(cfg: RLHFConfig, *, resume: str | None = None, load_optimizer_state: bool = True, progress: bool = True,
         estimate: bool = True) -> Path:
    """PPO, DPO or GRPO (the estimate first); returns what the stage returns. load_optimizer_state as for sft."""
    run = _stage_function("llmlab.rlhf.run", "run_rlhf", "RLHF")
    if estimate:
        show_stage_estimate(cfg, None, resume)
    return run(cfg, resume=resume, load_optimizer_state=load_optimizer_state, progress=progress)


def show_stage_estimate(cfg: ConfigBase, model_cfg: ModelConfig | None, resume: str | None = None) -> None:
    """The estimate for a stage: its model is `model_cfg`, else the resumed or policy checkpoint's."""
    from llmlab.checkpoint import read_checkpoint

    source = resume or getattr(cfg, "policy_checkpoint", None) or getattr(cfg, "init_checkpoint", None)
    if model_cfg is None and source:
        try:
            model_cfg = read_checkpoint(source).model_config
        except LLMLabError:
            return  # the stage reports the bad checkpoint itself
    if model_cfg is not None:
        print_estimate(model_cfg, cfg)


def merge_lora(*, adapter: str | None = None, base: str | None = None, checkpoint: str | None = None,
               out: str, force: bool = False) -> Path:
    """Option 1 (adapter folder + base checkpoint) or option 2 (full checkpoint with adapter/)."""
    if checkpoint and (adapter or base):
        raise ConfigError("merge-lora: give either --checkpoint (option 2) or --adapter with --base (option 1)")
    if checkpoint:
        fn = _stage_function("llmlab.lora", "merge_full_checkpoint", "LoRA merging")
        return fn(checkpoint, out, force=force)
    if not (adapter and base):
        raise ConfigError("merge-lora: option 1 needs both --adapter DIR and --base CHECKPOINT; option 2 needs "
                          "--checkpoint CHECKPOINT")
    fn = _stage_function("llmlab.lora", "merge_adapter_folder", "LoRA merging")
    return fn(adapter, base, out, force=force)


# --------------------------------------------------------------------------------------------------
# Data, tokenizer, interop
# --------------------------------------------------------------------------------------------------


def train_tokenizer(datasets: list[str], vocab_size: int, out: str, **kw: Any):
    from llmlab.data.tokenizer import train_tokenizer as train

    tok = train(datasets, vocab_size, out, **kw)
    console().print(f"trained a tokenizer of {len(tok)} tokens -> {out}")
    return tok


def data_preview(kind: str, datasets: list[str], tokenizer: str, *, n: int = 5, as_json: bool = False,
                 seq_len: int = 256) -> None:
    from llmlab.data.preview import preview

    for text in preview(kind, datasets, tokenizer, n, as_json, seq_len=seq_len):
        print(text)


def data_prepare(datasets: list[str], tokenizer: str, out: str, **kw: Any) -> Path:
    from llmlab.data.pretrain import prepare_shards
    from llmlab.data.tokenizer import load_tokenizer

    path = prepare_shards(datasets, load_tokenizer(tokenizer), out, tokenizer_name=tokenizer, **kw)
    index = json.loads((Path(path) / "index.json").read_text())
    counts = {s: sum(e["tokens"] for e in parts) for s, parts in index["splits"].items()}
    console().print(f"wrote token shards to {path}: " + ", ".join(f"{s} {n:,} tokens" for s, n in counts.items()))
    return Path(path)


INTEROP = {
    "import_hf": ("llmlab.interop.hf_io", "Hugging Face import"),
    "export_hf": ("llmlab.interop.hf_io", "Hugging Face export"),
    "export_gguf": ("llmlab.interop.gguf_io", "GGUF export"),
}


def interop(name: str, source: str, out: str, *, force: bool = False, **options: Any) -> Path:
    """Run one INTEROP function (`options`, e.g. export_gguf's dtype, passed through), say where it wrote and,
    after `checked:`, what its check of the output compared and found (the numbers it reports)."""
    module, what = INTEROP[name]
    fn = _stage_function(module, name, what)
    checks: list[str] = []
    result = fn(source, out, force=force, report=checks.append, **options)
    for line in [f"{what}: {source} -> {result}", *(f"checked: {c}" for c in checks)]:
        console().print(line, markup=False, soft_wrap=True)  # one line each, however narrow the terminal
    return Path(result)


def check_checkpoint(path: str) -> str:
    """The resolved checkpoint folder, or a CheckpointError (used to validate menu answers)."""
    from llmlab.checkpoint import resolve_checkpoint

    return str(resolve_checkpoint(path))
