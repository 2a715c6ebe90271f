"""Checkpoint folders. A checkpoint describes itself:

    model.safetensors       weights (base weights when LoRA was used; tied lm_head stored once)
    config.json             the ModelConfig
    llmlab.json             format version, kind (pretrain/sft/rlhf/merged/imported), step, metrics
    training_config.json    the stage config that produced it (optional)
    trainer_state.json      step, data position, best metric, RNG seeds... (optional, JSON)
    trainer_state.pt        optimizer / scheduler / RNG tensors, loaded with torch.load(weights_only=True)
    adapter/                PEFT adapter (adapter_config.json + adapter_model.safetensors) when LoRA was used
    tokenizer/              the tokenizer, loadable with AutoTokenizer

Writes are atomic (`atomic_dir`): a crash leaves a `.name.tmp-*` folder, never a half checkpoint under
the real name. Loading never unpickles: safetensors and JSON, and `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmlab.atomic import atomic_dir, leftovers
from llmlab.config import FORMAT_VERSION, ModelConfig, read_config_json
from llmlab.errors import CheckpointError, CheckpointWriteError, ConfigError

MODEL_FILE = "model.safetensors"
META_FILE = "llmlab.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"
_TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed writing|file write failed")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (PEFT wrappers are kept)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def base_transformer(model: nn.Module) -> nn.Module:
    """The LLM-Lab Transformer under any wrapper (DDP, compile, PEFT)."""
    model = unwrap_model(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain model's state dict, contiguous, with a tied lm_head stored once (under embed_tokens)."""
    model = unwrap_model(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model, "config", None) is not None and getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def spec_checkpoint_folder(path: str | os.PathLike) -> Path | None:
    """The folder a spec file name stands for, or None when the name is not one of the spec's:
    `X_model.pt` -> `X/` (best_model.pt -> best/), `X_model_merged.pt` -> `X_merged/` (the menu's
    default output folder when merging the full checkpoint X/) and `model_merged.pt` -> `merged/` (its
    default for an adapter-folder merge), each beside the file name."""
    p = Path(path)
    m = re.fullmatch(r"(?:(.+)_)?model(_merged)?\.pt", p.name)
    if m is None or (m.group(1) is None and m.group(2) is None):
        return None
    name = m.group(1) or ""
    if m.group(2):
        name = f"{name}_merged" if name else "merged"
    return p.parent / name


def checkpoint_folders(folder: Path) -> list[str]:
    """Names of the checkpoint folders (holding config.json) directly inside `folder`, sorted."""
    try:
        return sorted(c.name for c in folder.iterdir()
                      if not c.name.startswith(".") and (c / "config.json").is_file())
    except OSError:
        return []


def _not_found(p: Path, why: str) -> CheckpointError:
    """`p` names no checkpoint: say why and list the checkpoint folders that do exist beside it."""
    found = checkpoint_folders(p.parent) if p.parent.is_dir() else []
    if found:
        return CheckpointError(f"{p}: {why}; checkpoint folders in {p.parent}: {', '.join(found)}; pass one of them")
    there = f"no checkpoint folders in {p.parent}" if p.parent.is_dir() else f"{p.parent} does not exist"
    return CheckpointError(f"{p}: {why}; {there}; pass a checkpoint folder such as checkpoints/best")


def saved_step(folder: Path, trainer_state: dict[str, Any]) -> int:
    """The step a checkpoint's trainer_state.json records, or a one-line CheckpointError."""
    try:
        return int(trainer_state["step"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{folder / 'trainer_state.json'}: no valid \"step\" (a whole number), so training "
                              f"cannot resume from it; restore the file or resume from another latest/ or best/ "
                              f"folder") from None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept an LLM-Lab checkpoint folder, or a spec file name (`best_model.pt` -> `best/`,
    `best_model_merged.pt` -> `best_merged/`, see `spec_checkpoint_folder`) beside that folder. Any
    other missing path is an error listing the checkpoint folders there. Pickle files are never loaded."""
    p = Path(path)
    if ".tmp-" in p.name:
        raise CheckpointError(f"{p}: a half-written checkpoint left by an interrupted save; pass the folder "
                              f"beside it (e.g. {p.parent / 'latest'}) instead")
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        moved = _interrupted_swap(p)
        if moved is not None:
            return moved
    spec = spec_checkpoint_folder(p)
    if spec is not None:
        if (spec / "config.json").is_file():
            return spec
        if not spec.exists() and (moved := _interrupted_swap(spec)) is not None:
            return moved
    if p.is_file() and p.suffix in (".pt", ".bin", ".pth", ".pkl"):
        raise CheckpointError(
            f"{p}: LLM-Lab checkpoints are folders (model.safetensors + config.json); pickle files "
            f"are not loaded for safety. Convert the weights to safetensors or pass a checkpoint folder")
    if spec is not None:
        raise _not_found(p, f"the spec's file name for the checkpoint folder {spec.name}/, which does not exist "
                            f"(not trained or merged yet?)")
    if p.is_dir():
        for sub in ("best", "latest", "final"):
            if (p / sub / "config.json").is_file():
                return p / sub
            if not (p / sub).exists() and (moved := _interrupted_swap(p / sub)) is not None:
                return moved
        raise CheckpointError(f"{p}: not a checkpoint folder (no config.json); pass a folder such as "
                              f"checkpoints/best")
    if p.is_file() and p.suffix.lower() == ".gguf":
        raise CheckpointError(f"{p}: a GGUF file, not a checkpoint folder; convert it with `llm-lab import-hf {p} "
                              f"--out DIR` and pass DIR")
    if p.is_file():
        raise CheckpointError(f"{p}: a file, not a checkpoint folder (model.safetensors + config.json); pass a "
                              f"checkpoint folder such as checkpoints/best")
    raise _not_found(p, "checkpoint not found")


def _interrupted_swap(p: Path) -> Path | None:
    """The previous folder of `p` when a save was killed between its two renames (`.name.old-PID`, see
    `llmlab.atomic`); the next save to `p` puts it back under its name."""
    for old in reversed(leftovers(p, ".old-")):
        if (old / "config.json").is_file() and (old / MODEL_FILE).is_file():
            return old
    return None


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    kind: str = "pretrain",
    train_config: Any = None,
    trainer_state: dict[str, Any] | None = None,
    trainer_tensors: dict[str, Any] | None = None,
    tokenizer: Any = None,
    metrics: dict[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint folder atomically. `state_dict` overrides the model's own (FSDP gathers it,
    LoRA passes base weights); `write_extra(tmp_dir)` adds files (e.g. the PEFT adapter) before the
    folder becomes visible."""
    cfg: ModelConfig = base_transformer(model).config
    state = state_dict if state_dict is not None else model_state_for_saving(model)
    try:
        _write_checkpoint(path, cfg, state, kind=kind, train_config=train_config, trainer_state=trainer_state,
                          trainer_tensors=trainer_tensors, tokenizer=tokenizer, metrics=metrics,
                          write_extra=write_extra)
    except (OSError, SafetensorError, RuntimeError) as e:  # disk full, quota, permissions, read-only fs
        if isinstance(e, RuntimeError) and not isinstance(e, SafetensorError) and not _TORCH_WRITE_FAILED.search(str(e)):
            raise  # only torch.save's own write failure is an I/O error; anything else is not ours to rename
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in str(e).lower()
        why = getattr(e, "strerror", None) or " ".join(str(e).split())[:160] or type(e).__name__
        hint = "free disk space" if full else "check that the folder is writable and the disk not full"
        err = CheckpointWriteError(f"{path}: cannot write the checkpoint ({why}); {hint}; the previous "
                                   f"checkpoint there (if any) is unchanged")
        err.errno = getattr(e, "errno", None)
        raise err from None
    return Path(path)


def _write_checkpoint(path: str | os.PathLike, cfg: ModelConfig, state: dict[str, torch.Tensor], *, kind: str,
                      train_config: Any, trainer_state: dict[str, Any] | None, trainer_tensors: dict[str, Any] | None,
                      tokenizer: Any, metrics: dict[str, Any] | None,
                      write_extra: Callable[[Path], None] | None) -> None:
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / MODEL_FILE),
                  metadata={"format": "pt", "llmlab_format_version": str(FORMAT_VERSION)})
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if train_config is not None:
            (tmp / "training_config.json").write_text(
                json.dumps({"stage": type(train_config).__name__, **train_config.to_dict()}, indent=2) + "\n")
        if trainer_state is not None:
            (tmp / STATE_JSON).write_text(json.dumps(trainer_state, indent=2, default=str) + "\n")
        if trainer_tensors is not None:
            torch.save(trainer_tensors, tmp / STATE_TENSORS)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            _carry_generation_config(tokenizer, tmp)
        if write_extra is not None:
            write_extra(tmp)
        meta = {"format_version": FORMAT_VERSION, "kind": kind, "metrics": metrics or {},
                "step": (trainer_state or {}).get("step"), "has_adapter": (tmp / "adapter").is_dir()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _carry_generation_config(tokenizer: Any, folder: Path) -> None:
    """Copy the generation_config.json that came with the tokenizer (an imported model's: its eos ids, such
    as Llama-3.1's <|eom_id|>, which the chat template does not reveal) into the new checkpoint, so chat and
    export-hf still stop on them after SFT, RLHF or a merge."""
    import shutil

    from llmlab.data.tokenizer import generation_config_file

    source = generation_config_file(tokenizer)
    if source is not None:
        shutil.copyfile(source, folder / "generation_config.json")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict; a truncated or hand-broken file is a one-line CheckpointError."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); use "
                              f"another checkpoint (latest/ or best/)") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{p}: not valid JSON (not UTF-8 text); use another checkpoint (latest/ or "
                              f"best/)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: not valid JSON for this file (a {type(data).__name__}, expected an object); "
                              f"use another checkpoint (latest/ or best/)")
    return data


def _hf_model_folder(folder: Path) -> str | None:
    """The model_type (or architecture) when `folder`/config.json is a transformers model config, else None."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or not ("model_type" in cfg or "architectures" in cfg):
        return None
    archs = cfg.get("architectures")
    return str(cfg.get("model_type") or (archs[0] if isinstance(archs, list) and archs else "transformers"))


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read without building anything."""

    path: Path
    model_config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_adapter(self) -> bool:
        return (self.path / "adapter" / "adapter_config.json").is_file()

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / "tokenizer"
        return p if p.is_dir() else None

    def training_config(self) -> dict[str, Any] | None:
        p = self.path / "training_config.json"
        return read_json(p) if p.is_file() else None

    def trainer_state(self) -> dict[str, Any] | None:
        p = self.path / STATE_JSON
        return read_json(p) if p.is_file() else None

    def trainer_tensors(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        p = self.path / STATE_TENSORS
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal or corruption
            raise CheckpointError(f"{p}: cannot be read safely ({type(e).__name__}); resume with "
                                  f"--no-optimizer-state or from another checkpoint") from None

    def resume_tensors(self, optimizer: bool) -> tuple[dict[str, Any] | None, str | None]:
        """(trainer_tensors, None) to resume from; missing or unreadable they are an error while the optimizer
        state is wanted, else (None, a note that the optimizer, as asked, and the random states start afresh):
        --no-optimizer-state, which the unreadable-file error recommends, needs only the RNG states from it."""
        problem = "is missing"
        try:
            tensors = self.trainer_tensors()
        except CheckpointError:
            if optimizer:
                raise
            tensors, problem = None, "cannot be read"
        if tensors is not None:
            return tensors, None
        if optimizer:
            raise CheckpointError(f"{self.path / STATE_TENSORS} (optimizer and RNG states) is missing, so the "
                                  f"optimizer cannot continue; resume with --no-optimizer-state "
                                  f"(load_optimizer_state=False) to start it afresh, or from another checkpoint")
        return None, f"{self.path / STATE_TENSORS} {problem}: the optimizer (as asked) and the random states start afresh"

    def state_dict(self) -> dict[str, torch.Tensor]:
        p = self.path / MODEL_FILE
        if not p.is_file():
            raise CheckpointError(f"{self.path}: {MODEL_FILE} is missing; the checkpoint is incomplete")
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: corrupt or truncated safetensors file ({e}); use another "
                                  f"checkpoint (e.g. latest/ or best/)") from None


_YARN_NOTED: set[Path] = set()


def checkpoint_model_config(path: str | os.PathLike) -> ModelConfig:
    """A checkpoint's config.json as a ModelConfig. Checkpoints saved while yarn at rope_scaling_factor 1
    was allowed (it was the default) load as rope, the same frequencies and attention factor, with a note;
    a user's model config keeps refusing that pairing (`ModelConfig.validate`)."""
    p = Path(path)
    data = read_config_json(p)
    if isinstance(data, dict) and data.get("positional_encoding") == "yarn":
        factor = data.get("rope_scaling_factor", ModelConfig.rope_scaling_factor)
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor == 1:  # < 1 stays refused
            if p.resolve() not in _YARN_NOTED:  # once per checkpoint; on stderr, apart from generated text
                _YARN_NOTED.add(p.resolve())
                print(f"note: {p}: positional_encoding=yarn with rope_scaling_factor={factor} is plain RoPE; "
                      f"loading it as positional_encoding=rope (the same computation)", file=sys.stderr)
            data = {**data, "positional_encoding": "rope"}
    return ModelConfig.from_dict(data, source=str(p))


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    p = resolve_checkpoint(path)
    try:
        cfg = checkpoint_model_config(p / "config.json")
    except ConfigError as e:
        if (model_type := _hf_model_folder(p)) is not None:
            raise CheckpointError(f"{p}: a Hugging Face model folder ({model_type}), not an LLM-Lab checkpoint; "
                                  f"convert it with `llm-lab import-hf {p} --out DIR` first") from None
        raise CheckpointError(f"{p}: invalid model config ({e})") from None
    meta = {}
    if (p / META_FILE).is_file():
        meta = read_json(p / META_FILE)
        if meta.get("format_version", 1) > FORMAT_VERSION:
            raise CheckpointError(f"{p}: checkpoint format {meta['format_version']} is newer than this "
                                  f"LLM-Lab understands ({FORMAT_VERSION}); upgrade llmlab")
    return Checkpoint(p, cfg, meta)


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Strict load with messages that name the offending tensor."""
    own = model.state_dict()
    tied = getattr(model.config, "tie_embeddings", False)
    missing = [k for k in own if k not in state and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing); the "
                              f"weights do not match config.json")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected); "
                              f"the weights do not match config.json")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(v.shape)} but config.json implies "
                                  f"{tuple(own[k].shape)}; the config and weights disagree")
    model.load_state_dict(state, strict=False)


def check_adapter_folder(folder: str | os.PathLike) -> Path:
    """The spec's "Adapter folder not found" unless `folder` holds a PEFT adapter in safetensors."""
    folder = Path(folder)
    if not ((folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()):
        raise CheckpointError(f"Adapter folder not found: {folder} has no adapter_config.json and "
                              f"adapter_model.safetensors (pickle .bin adapters are not loaded); check that LoRA "
                              f"training completed and saved adapters (e.g. sft_checkpoints/best_lora_adapters)")
    return folder


def attach_adapter(model: nn.Module, folder: str | os.PathLike, *, trainable: bool = False,
                   where: str = "the base checkpoint") -> nn.Module:
    """A PEFT adapter folder onto `model` -> PeftModel. Only `adapter_model.safetensors` is read: a folder
    holding only PEFT's pickle fallback (`adapter_model.bin`) is refused, never unpickled."""
    folder = check_adapter_folder(folder)
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError, SafetensorError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{folder}: the adapter does not fit {where} ({reason}); pass the base checkpoint "
                              f"the adapter was trained on") from None


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               *, with_adapter: bool = True) -> nn.Module:
    """Any checkpoint folder LLM-Lab writes -> a model in eval mode (config at `model.config`).

    A checkpoint holding a LoRA adapter returns the base with the adapter merged (no PEFT wrapper);
    pass with_adapter=False for the base weights alone.
    """
    from llmlab.model import build_model

    ckpt = read_checkpoint(path)
    model = build_model(ckpt.model_config)
    load_state_into(model, ckpt.state_dict(), where=str(ckpt.path))
    if with_adapter and ckpt.has_adapter:
        model = attach_adapter(model, ckpt.path / "adapter", where=str(ckpt.path)).merge_and_unload()
    if device is not None:
        model = model.to(device)
    return model.eval()
