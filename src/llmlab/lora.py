"""LoRA through PEFT: presets to a `LoraConfig`, adapters on an LLM-Lab model, adapter files, merging.

    llm-lab merge-lora --adapter sft_checkpoints/best_lora_adapters --base checkpoints/best --out merged
    llm-lab merge-lora --checkpoint sft_checkpoints/best --out merged

LoRA is a transform of the plain model, not a second model hierarchy: `apply_lora` wraps the
Transformer in a `peft.PeftModel` (base weights frozen, only `lora_A`/`lora_B` trainable). The adapter
folder is PEFT's own format (`adapter_config.json` + `adapter_model.safetensors`), so
`peft.PeftModel.from_pretrained(build_model(cfg), folder)` loads it. DPO's reference model is the same
PeftModel under `with model.disable_adapter():`.

A LoRA checkpoint keeps the base weights in `model.safetensors` under their plain names (no `lora_`
tensors, no `base_layer.` in the keys) and the adapter in `adapter/`; the best adapter is also written to
`{output_dir}/best_lora_adapters/`. Merging gives W + (B A) alpha / r in every targeted layer and writes a
plain checkpoint (kind "merged") that `llmlab.load_model` reads.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from llmlab.atomic import atomic_dir, atomic_write_text
from llmlab.checkpoint import (
    META_FILE,
    MODEL_FILE,
    attach_adapter,
    base_transformer,
    check_adapter_folder,
    load_model,
    load_state_into,
    read_checkpoint,
    read_json,
    save_checkpoint,
    unwrap_model,
)
from llmlab.config import LoraFields
from llmlab.errors import CheckpointError, ConfigError, LLMLabError
from llmlab.model.estimate import LORA_TARGETS

LORA_PRESETS: dict[str, tuple[str, ...]] = LORA_TARGETS  # plus "custom", which reads lora_target_modules
ADAPTER_DIR = "adapter"
BEST_ADAPTERS = "best_lora_adapters"
ADAPTER_META = "training_metadata.json"  # LLM-Lab's note beside PEFT's files: kind, step, metrics
LORA_FIELDS = tuple(f for f in LoraFields.__dataclass_fields__)


# --------------------------------------------------------------------------------------------------
# Presets and PEFT config
# --------------------------------------------------------------------------------------------------


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's Linear layers (`q_proj`, `up_proj`, ...), in first-seen order."""
    names: dict[str, None] = {}
    for name, module in base_transformer(model).named_modules():
        if isinstance(module, nn.Linear) and name:
            names.setdefault(name.rsplit(".", 1)[-1], None)
    return list(names)


def target_modules(cfg: Any, model: nn.Module) -> list[str]:
    """The module names LoRA adapts for `cfg.lora_preset` on this model.

    Presets keep only the names the model has, so `ffn_only` and `all` on a non-gated MLP (relu, gelu,
    ...) adapt its two projections up_proj and down_proj. A custom name must match a module, either by
    its leaf name (`q_proj`) or a dotted suffix (`self_attn.q_proj`).
    """
    base = base_transformer(model)
    existing = linear_names(base)
    if cfg.lora_preset == "custom":
        wanted = list(cfg.lora_target_modules or [])
        if not wanted:
            raise ConfigError('lora_target_modules: the custom preset needs module names, e.g. ["q_proj", "v_proj"]')
        full = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n]
        for t in wanted:
            if not any(n == t or n.endswith("." + t) for n in full):
                raise ConfigError(f"lora_target_modules: {t!r} matches no module of this model; "
                                  f"modules that exist: {', '.join(existing)}")
        if base.config.tie_embeddings and "lm_head" in wanted:
            # merging B A into a tied lm_head would change the input embeddings too
            raise ConfigError("lora_target_modules: lm_head shares its weight with embed_tokens "
                              "(tie_embeddings=true), so a merged adapter would also change the input "
                              "embeddings; leave lm_head out or use a model with tie_embeddings=false")
        return wanted
    if cfg.lora_preset not in LORA_PRESETS:
        raise ConfigError(f"lora_preset: {cfg.lora_preset!r} is not one of "
                          f"{', '.join([*LORA_PRESETS, 'custom'])}")
    targets = [t for t in LORA_PRESETS[cfg.lora_preset] if t in existing]
    if not targets:
        raise ConfigError(f"lora_preset: {cfg.lora_preset!r} matches no module of this model; use the custom "
                          f"preset with some of: {', '.join(existing)}")
    return targets


def lora_config_from(cfg: Any, model: nn.Module):
    """`peft.LoraConfig` for a stage config's LoRA fields (r, alpha, dropout, preset targets)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules(cfg, model), bias="none")


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each parameter counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _print_summary(model: nn.Module, how: str) -> None:
    trainable, total = trainable_summary(model)
    print(f"LoRA {how}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")


def apply_lora(model: nn.Module, cfg: Any, *, verbose: bool = True):
    """Wrap a plain LLM-Lab model in a PeftModel with adapters per `cfg`; the base is frozen and only
    adapter parameters train. Prints trainable and total parameters."""
    from peft import get_peft_model

    model = unwrap_model(model)
    if hasattr(model, "peft_config"):
        raise LLMLabError("use_lora: the model already has LoRA adapters; merge them first (llm-lab merge-lora) "
                          "or resume the LoRA checkpoint")
    targets = target_modules(cfg, model)
    peft_model = get_peft_model(model, lora_config_from(cfg, model))
    if verbose:
        _print_summary(peft_model, f"({cfg.lora_preset}: {', '.join(targets)}; r={cfg.lora_r}, "
                                   f"alpha={cfg.lora_alpha})")
    return peft_model


def is_lora_model(model: nn.Module) -> bool:
    return hasattr(unwrap_model(model), "peft_config")


def _targets_of(cfg: Any, model_config: Any) -> set[str]:
    """The module names `cfg` adapts on a model of `model_config` (built on the meta device: no memory)."""
    from llmlab.model import build_model

    try:
        with torch.device("meta"):
            skeleton = build_model(model_config)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built for real
        skeleton = build_model(model_config)
    return set(target_modules(cfg, skeleton))


def check_lora_resume(cfg: Any, checkpoint: Any, *, skip: tuple[str, ...] = ()) -> None:
    """Refuse to resume a LoRA checkpoint with other LoRA settings than it was trained with.

    Resuming rebuilds the adapter from the checkpoint's adapter/adapter_config.json, so a changed lora_r,
    lora_alpha, lora_dropout, lora_preset or lora_target_modules would be ignored by the training yet
    written to the new checkpoints' training_config.json. Raises a one-line ConfigError naming the field,
    the checkpoint's value and the fix. `checkpoint` is a `Checkpoint` or a path; nothing is checked
    without use_lora or without an adapter (that mismatch is the caller's own error). `skip` names fields
    the stage does not apply (RLHF switches dropout off: skip=("lora_dropout",))."""
    ckpt = checkpoint if hasattr(checkpoint, "has_adapter") else read_checkpoint(checkpoint)
    if not getattr(cfg, "use_lora", False) or not ckpt.has_adapter:
        return
    source = ckpt.path / ADAPTER_DIR / "adapter_config.json"
    try:
        saved = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: unreadable ({type(e).__name__}); resume from another checkpoint "
                              f"(e.g. latest/ or best/)") from None
    other = ("or merge it (llm-lab merge-lora) and start a new LoRA run from the merged checkpoint to train "
             "with other LoRA settings")
    for name, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        if name not in skip and saved.get(key) is not None and float(getattr(cfg, name)) != float(saved[key]):
            raise ConfigError(f"{name}: {ckpt.path} was trained with {name}={saved[key]} (its "
                              f"{ADAPTER_DIR}/adapter_config.json) but the config has {name}={getattr(cfg, name)}; "
                              f"resume with {name}={saved[key]}, {other}")
    trained = saved.get("target_modules")
    if not isinstance(trained, list):  # None, or a regex string: not something this config writes
        return
    wanted = _targets_of(cfg, ckpt.model_config)
    if wanted == set(trained):
        return
    tc = ckpt.training_config() or {}
    if tc.get("lora_preset") not in (None, "custom"):
        keep = f"lora_preset={tc['lora_preset']}"
    else:
        keep = f"lora_preset=custom lora_target_modules={json.dumps(tc.get('lora_target_modules') or sorted(trained))}"
    name = "lora_preset" if tc.get("lora_preset", cfg.lora_preset) != cfg.lora_preset else "lora_target_modules"
    raise ConfigError(f"{name}: {ckpt.path} was trained with LoRA on {', '.join(sorted(trained))} but the config "
                      f"(lora_preset={cfg.lora_preset}) adapts {', '.join(sorted(wanted))}; resume with {keep}, "
                      f"{other}")


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights of a PeftModel under the plain model's names (no LoRA tensors); a tied
    lm_head is stored once, as `checkpoint.save_checkpoint` expects."""
    base = base_transformer(model)
    state = {}
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v.detach().contiguous()
    if getattr(base.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def _write_adapter(model: nn.Module, folder: Path, meta: dict[str, Any] | None, train_config: Any) -> None:
    unwrap_model(model).save_pretrained(str(folder), save_embedding_layers=False)  # vocab never resized
    if meta is not None:
        (folder / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if train_config is not None:
        (folder / "training_config.json").write_text(
            json.dumps({"stage": type(train_config).__name__, **train_config.to_dict()}, indent=2) + "\n")


def save_adapter(model: nn.Module, folder: str | os.PathLike, *, meta: dict[str, Any] | None = None,
                 train_config: Any = None) -> Path:
    """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), atomically.
    `meta` (kind, step, metrics) and the stage config are kept beside it for `merge_adapter_folder`."""
    if not is_lora_model(model):
        raise LLMLabError("save_adapter: the model has no LoRA adapters (train with use_lora=true)")
    with atomic_dir(folder) as tmp:
        _write_adapter(model, tmp, meta, train_config)
    return Path(folder)


def save_lora_checkpoint(path: str | os.PathLike, model: nn.Module, *, best_adapter_dir: str | os.PathLike | None = None,
                         **kwargs: Any) -> Path:
    """A full LoRA checkpoint: base weights in model.safetensors, the adapter in `adapter/`, in one atomic
    folder write (`kwargs` go to `save_checkpoint`: kind, train_config, trainer_state, metrics, ...).
    With `best_adapter_dir` (after a new best) the adapter is also written there, atomically."""
    extra = kwargs.pop("write_extra", None)

    def write_extra(tmp: Path) -> None:
        (tmp / ADAPTER_DIR).mkdir()
        _write_adapter(model, tmp / ADAPTER_DIR, None, None)
        if extra is not None:
            extra(tmp)

    out = save_checkpoint(path, model, state_dict=base_state_dict(model), write_extra=write_extra, **kwargs)
    if best_adapter_dir is not None:
        state = kwargs.get("trainer_state") or {}
        meta = {"kind": kwargs.get("kind", "sft"), "step": state.get("step"), "metrics": kwargs.get("metrics") or {},
                "checkpoint": str(Path(out).resolve())}
        save_adapter(model, best_adapter_dir, meta=meta, train_config=kwargs.get("train_config"))
    return out


def lora_save_hook(path: str | os.PathLike, model: nn.Module, *, state_dict: Any = None, **kwargs: Any) -> Path:
    """`save_hook` for `llmlab.train.loop.train_loop`: a full LoRA checkpoint, and after a new best (the
    `best/` folder) also `best_lora_adapters/` beside it. The loop's gathered `state_dict` (FSDP only) is
    not used: LoRA trains with DDP, where the model holds every weight."""
    path = Path(path)
    best = path.parent / BEST_ADAPTERS if path.name == "best" else None
    return save_lora_checkpoint(path, model, best_adapter_dir=best, **kwargs)


def load_lora_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None, *,
                         trainable: bool = True):
    """A full LoRA checkpoint back into a PeftModel: the base weights, then `adapter/` with the same
    trainable set `apply_lora` gives (for exact resume; PEFT injects layers in the same order, so an
    optimizer state saved for those parameters loads back in order)."""
    from llmlab.model import build_model

    ckpt = read_checkpoint(path)
    if not (ckpt.path / ADAPTER_DIR).is_dir():
        raise CheckpointError(f"{ckpt.path}: no {ADAPTER_DIR}/ folder, so not a LoRA checkpoint; resume it "
                              f"with use_lora=false")
    model = build_model(ckpt.model_config)
    load_state_into(model, ckpt.state_dict(), where=str(ckpt.path))
    peft_model = attach_adapter(model, ckpt.path / ADAPTER_DIR, trainable=trainable, where=str(ckpt.path))
    if device is not None:
        peft_model = peft_model.to(device)
    return peft_model


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def _check_out(out_dir: Path, force: bool, *sources: Path) -> None:
    out = out_dir.resolve()
    for s in sources:
        if s.resolve() == out:
            raise LLMLabError(f"--out {out_dir} is the input itself; choose another output folder")
    if out_dir.exists() and not force:
        raise LLMLabError(f"--out {out_dir} already exists; pass --force to overwrite it or choose another folder")


def _lora_free_training_config(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {k: v for k, v in data.items() if k not in LORA_FIELDS} | {"use_lora": False}


def _write_merged(out_dir: Path, merged: nn.Module, *, step: Any, metrics: dict[str, Any],
                  training_config: dict[str, Any] | None, tokenizer_dir: Path | None) -> Path:
    merged = unwrap_model(merged)
    leftovers = [k for k in merged.state_dict() if "lora_" in k]
    if leftovers:  # pragma: no cover - merge_and_unload always removes them
        raise CheckpointError(f"merge left LoRA tensor {leftovers[0]}; the adapter could not be merged")

    def write_extra(tmp: Path) -> None:
        if training_config is not None:
            (tmp / "training_config.json").write_text(json.dumps(training_config, indent=2) + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")

    out = save_checkpoint(out_dir, merged, kind="merged", metrics=metrics, write_extra=write_extra)
    # No trainer_state.json (a merged model is a starting point, not a run to resume), so the step of the
    # training that produced it goes into llmlab.json directly.
    meta_file = out / META_FILE
    atomic_write_text(meta_file, json.dumps({**read_json(meta_file), "step": step}, indent=2) + "\n")
    return out


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors (names, shapes, values), read one at a time;
    an unreadable file is a one-line CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    if a.resolve() == b.resolve():
        return True
    try:
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                return False
            return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{a} or {b}: unreadable safetensors ({str(e).splitlines()[0][:120]}); pass "
                              f"checkpoints whose weights load, or re-save them") from None


def _adapter_training_checkpoints(adapter_dir: Path) -> list[Path]:
    """LoRA checkpoints saved with `adapter_dir` by the run that trained it: their model.safetensors holds
    the frozen weights the adapter was trained on. training_metadata.json names the checkpoint (best/);
    best_lora_adapters/ sits beside best/, and a checkpoint's adapter/ inside it."""
    found = []
    if adapter_dir.name == BEST_ADAPTERS:
        found.append(adapter_dir.parent / "best")
    if adapter_dir.name == ADAPTER_DIR:
        found.append(adapter_dir.parent)
    meta_path = adapter_dir / ADAPTER_META
    meta = read_json(meta_path) if meta_path.is_file() else {}
    # a relative path was relative to where that run was started, not to here: only absolute ones count
    if isinstance(meta.get("checkpoint"), str) and Path(meta["checkpoint"]).is_absolute():
        found.append(Path(meta["checkpoint"]))
    return [c for c in found if (c / MODEL_FILE).is_file() and (c / ADAPTER_DIR / "adapter_config.json").is_file()]




def adapter_trained_on_plain_base(adapter_dir: str | os.PathLike, base: Any) -> bool:
    """Whether `adapter_dir` was trained on the same plain (frozen) weights as the adapter a base checkpoint
    holds, e.g. best_lora_adapters/ with latest/ of the same LoRA run: then the base must be loaded WITHOUT
    its adapter, or two adapters trained on one base would be stacked. Otherwise (an adapter trained on the
    LoRA checkpoint with its adapter merged, as RLHF on an SFT-LoRA checkpoint is) the adapters stack.
    Decided by, in order: the same adapter tensors; the frozen weights of the checkpoint the adapter was
    saved with against the base's (`_adapter_training_checkpoints`); else the adapter folder
    (best_lora_adapters/) sitting in the base checkpoint's run folder with the same stage recorded."""
    if not base.has_adapter:
        return False
    adapter_dir = Path(adapter_dir)
    ours = base.path / ADAPTER_DIR / "adapter_model.safetensors"
    theirs = adapter_dir / "adapter_model.safetensors"
    if ours.is_file() and theirs.is_file() and _same_tensors(ours, theirs):
        return True
    trained_with = _adapter_training_checkpoints(adapter_dir)
    if trained_with:
        return _same_tensors(trained_with[0] / MODEL_FILE, base.path / MODEL_FILE)
    if adapter_dir.name != BEST_ADAPTERS or adapter_dir.resolve().parent != base.path.resolve().parent:
        return False
    tc_path = adapter_dir / "training_config.json"
    mine, theirs = read_json(tc_path) if tc_path.is_file() else {}, base.training_config() or {}
    return bool(mine.get("stage")) and mine.get("stage") == theirs.get("stage")


def base_model_for_adapter(adapter_dir: str | os.PathLike, base: Any) -> nn.Module:
    """The model an adapter folder goes onto (plain Transformer, eval mode): the base checkpoint with its
    own adapter merged, as a run that started from it trained on, unless the adapter was trained on the same
    base weights as that own adapter (`adapter_trained_on_plain_base`): then the base weights alone. Used by
    `merge_adapter_folder` and `chat --adapter`. A plain base whose weights are not the ones the adapter
    was trained on (those its run saved beside it: the base trained further since, or another model of
    the same shape) is refused: the result would not be the model that was trained."""
    if not base.has_adapter:
        trained_with = _adapter_training_checkpoints(Path(adapter_dir))
        if trained_with and not _same_tensors(trained_with[0] / MODEL_FILE, base.path / MODEL_FILE):
            raise CheckpointError(
                f"{adapter_dir} was trained on other weights than {base.path} holds (its run saved them in "
                f"{trained_with[0]}; was {base.path} trained further since?); merge that full checkpoint "
                f"instead (`llm-lab merge-lora --checkpoint {trained_with[0]} --out DIR`) or pass the base it "
                f"was trained on")
        return load_model(base.path)
    if adapter_trained_on_plain_base(adapter_dir, base):
        print(f"{adapter_dir} was trained on the same base weights as the adapter {base.path} holds; using "
              f"those weights without that adapter", file=sys.stderr)
        return load_model(base.path, with_adapter=False)
    # e.g. an RLHF adapter trained on an SFT-LoRA checkpoint: RLHF started from both merged
    print(f"{base.path} holds its own LoRA adapter; merging it first, then {adapter_dir} on top", file=sys.stderr)
    model = load_model(base.path)
    trained_with = _adapter_training_checkpoints(Path(adapter_dir))
    if trained_with and not _weights_match(model, trained_with[0] / MODEL_FILE):
        raise CheckpointError(
            f"{adapter_dir} was trained on other weights than {base.path} gives with its own adapter merged (its "
            f"run saved them in {trained_with[0]}; was {base.path} trained again since?); merge that full "
            f"checkpoint instead (`llm-lab merge-lora --checkpoint {trained_with[0]} --out DIR`) or pass the base "
            f"it was trained on")
    return model


def _weights_match(model: nn.Module, weights_file: Path) -> bool:
    """Whether the model's weights are the file's (every tensor the file holds), up to the rounding of a
    merge done on another device (rtol 1e-5); an unreadable file is a one-line CheckpointError."""
    from safetensors import SafetensorError, safe_open

    state = model.state_dict()
    try:
        with safe_open(str(weights_file), "pt") as f:
            return all(k in state and list(state[k].shape) == list(f.get_slice(k).get_shape()) and
                       torch.allclose(state[k].float(), f.get_tensor(k).float(), rtol=1e-5, atol=1e-7)
                       for k in f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_file}: unreadable safetensors ({str(e).splitlines()[0][:120]}); re-save "
                              f"that checkpoint") from None


def merge_adapter_folder(adapter_dir: str | os.PathLike, base_checkpoint: str | os.PathLike,
                         out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Option 1: an adapter folder (e.g. best_lora_adapters/) plus the base checkpoint it was trained on
    -> a plain merged checkpoint in `out_dir`. Returns `out_dir`. A base checkpoint that holds a LoRA
    adapter itself (a LoRA run trained on a LoRA checkpoint) is loaded with that adapter merged, as
    `load_model` and the training that started from it do, so the result is the stacked model; unless the
    adapter comes from the same run as that own adapter (`base_model_for_adapter`)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_adapter_folder(adapter_dir)
    base = read_checkpoint(base_checkpoint)
    _check_out(out_dir, force, adapter_dir, base.path)
    model = base_model_for_adapter(adapter_dir, base)
    merged = attach_adapter(model, adapter_dir, where=f"base checkpoint {base.path}").merge_and_unload()
    meta_path = adapter_dir / ADAPTER_META
    meta = read_json(meta_path) if meta_path.is_file() else base.meta
    tc_path = adapter_dir / "training_config.json"
    training_config = read_json(tc_path) if tc_path.is_file() else base.training_config()
    tokenizer_dir = adapter_dir / "tokenizer" if (adapter_dir / "tokenizer").is_dir() else base.tokenizer_path
    out = _write_merged(out_dir, merged, step=meta.get("step"), metrics=meta.get("metrics") or {},
                        training_config=_lora_free_training_config(training_config), tokenizer_dir=tokenizer_dir)
    print(f"merged {adapter_dir} into {base.path} -> {out}")
    return out


def _config_error(path: Path, why: str) -> LLMLabError:
    return CheckpointError(f"Could not load LoRA config from {path} ({why}); use option 1: --adapter DIR "
                           f"--base CHECKPOINT")


def _lora_config_of_checkpoint(ckpt: Any, model: nn.Module):
    """The LoraConfig of a full checkpoint: adapter/adapter_config.json, which PEFT writes with the adapter
    weights from the live model; else the LoRA fields of training_config.json. When both exist and
    disagree on r, alpha or the target modules (a run resumed with changed LoRA settings before that was
    refused), the adapter's own file is what was trained: it wins, and a line says so."""
    from peft import LoraConfig

    tc = ckpt.training_config()
    from_tc, tc_error = None, None
    if tc and tc.get("use_lora") and tc.get("lora_r"):
        fields = {f: tc[f] for f in LORA_FIELDS if f in tc}
        try:
            from_tc = lora_config_from(SimpleNamespace(**{**_lora_defaults(), **fields}), model)
        except ConfigError as e:
            tc_error = f"training_config.json: {e}"
    if not (ckpt.path / ADAPTER_DIR / "adapter_config.json").is_file():
        if from_tc is None:
            raise _config_error(ckpt.path, tc_error or "no LoRA fields in training_config.json and no "
                                                       "adapter/adapter_config.json")
        return from_tc
    try:
        own = LoraConfig.from_pretrained(str(ckpt.path / ADAPTER_DIR))
    except Exception as e:  # noqa: BLE001 - PEFT raises several types for a bad file
        raise _config_error(ckpt.path, f"adapter_config.json: {str(e).splitlines()[0][:160]}") from None
    if from_tc is not None:
        ours = (own.r, own.lora_alpha, set(own.target_modules or ()))
        theirs = (from_tc.r, from_tc.lora_alpha, set(from_tc.target_modules or ()))
        if ours != theirs:
            print(f"note: {ckpt.path}: training_config.json says r={theirs[0]}, alpha={theirs[1]}, targets "
                  f"{sorted(theirs[2])}, but the adapter was saved with r={ours[0]}, alpha={ours[1]}, targets "
                  f"{sorted(ours[2])}; merging with the adapter's own config ({ADAPTER_DIR}/adapter_config.json)")
    return own


def _lora_defaults() -> dict[str, Any]:
    return {name: f.default for name, f in LoraFields.__dataclass_fields__.items()}


def merge_full_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Option 2: a full LoRA checkpoint (base weights + `adapter/`) -> a plain merged checkpoint. The LoRA
    config comes from its adapter/adapter_config.json (falling back to training_config.json)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from llmlab.model import build_model

    ckpt = read_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    weights = ckpt.path / ADAPTER_DIR / "adapter_model.safetensors"
    if not (ckpt.path / ADAPTER_DIR).is_dir():
        raise CheckpointError(f"Checkpoint doesn't have LoRA parameters: {ckpt.path} has no {ADAPTER_DIR}/ folder; "
                              f"it may be merged already or trained without LoRA, so use it as it is")
    _check_out(out_dir, force, ckpt.path)
    model = build_model(ckpt.model_config)
    load_state_into(model, ckpt.state_dict(), where=str(ckpt.path))
    lcfg = _lora_config_of_checkpoint(ckpt, model)
    if not weights.is_file():
        raise CheckpointError(f"Checkpoint doesn't have LoRA parameters: {weights} is missing; it may be merged "
                              f"already or trained without LoRA, or use option 1 with another adapter folder")
    peft_model = get_peft_model(model, lcfg)
    adapter_state = load_file(str(weights))
    result = set_peft_model_state_dict(peft_model, adapter_state)
    expected = {k for k in peft_model.state_dict() if "lora_" in k}
    missing = [k for k in result.missing_keys if k in expected]
    if result.unexpected_keys or missing or not adapter_state:
        bad = (result.unexpected_keys or missing or ["(no tensors)"])[0]
        raise CheckpointError(f"{weights}: adapter tensor {bad} does not match the checkpoint's LoRA "
                              f"config; use option 1: --adapter DIR --base CHECKPOINT")
    merged = peft_model.merge_and_unload()
    out = _write_merged(out_dir, merged, step=ckpt.meta.get("step"), metrics=ckpt.meta.get("metrics") or {},
                        training_config=_lora_free_training_config(ckpt.training_config()),
                        tokenizer_dir=ckpt.tokenizer_path)
    print(f"merged the LoRA adapter of {ckpt.path} -> {out}")
    return out
