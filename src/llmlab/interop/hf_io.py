"""Hugging Face checkpoints in and out of LLM-Lab.

    llm-lab import-hf HuggingFaceTB/SmolLM2-135M-Instruct --out runs/smollm   # hub id, folder or .gguf
    llm-lab export-hf runs/sft/best --out runs/sft-hf                         # loads with from_pretrained

Import goes through `transformers.AutoModelForCausalLM.from_pretrained` (the same code path for a hub
id, a local folder and a GGUF file, which transformers dequantises), translates the config with
`llmlab.hf.model_config_from_hf`, and checks logits against transformers before writing anything.
Export writes safetensors under HF's key names plus an HF config, so the folder needs nothing from
LLM-Lab to load; a LoRA checkpoint is merged first (`load_model` merges its adapter), unless `--adapter`
keeps the adapter apart:

    llm-lab export-hf runs/sft/best --adapter --out runs/sft-hf          # the checkpoint's own adapter/
    llm-lab export-hf runs/pretrain --adapter runs/sft/best_lora_adapters --out runs/sft-hf

writes the base the adapter was trained on and, in `adapter/`, the adapter under transformers' module
names, so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")` (and
vLLM, TGI) serve it unmerged.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmlab.atomic import atomic_dir
from llmlab.checkpoint import load_model, model_state_for_saving, read_checkpoint, save_checkpoint
from llmlab.errors import CheckpointError, ConfigError, DataError
from llmlab.hf import (
    hf_config_from_llmlab,
    hf_model_type,
    hf_state_to_llmlab,
    llmlab_adapter_state_to_hf,
    llmlab_key_to_hf,
    llmlab_state_to_hf,
    model_config_from_hf,
)

SOURCE_FILE = "imported_from.json"
PARITY_ATOL = 1e-3  # fp32 vs fp32 with a different attention kernel: ~1e-5 in practice

Report = Callable[[str], None]  # receives one line saying what a check compared and found (the CLI prints it)


def check_output(out: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite an existing path unless `force`."""
    p = Path(out)
    if p.exists() and not force:
        raise CheckpointError(f"{p} already exists; pass --force (force=True) to overwrite it or choose another --out")
    return p


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def pickle_only_folder(source: str | os.PathLike) -> bool:
    """True for a local transformers folder whose weights are only pickle files (pytorch_model.bin...): they
    are never unpickled (torch.load can run code), so loading asks transformers for safetensors only."""
    p = Path(source).expanduser()
    return (p.is_dir() and any((p / f).is_file() for f in PICKLE_WEIGHTS)
            and not any((p / f).is_file() for f in SAFE_WEIGHTS))


def pickle_refused(source: str | os.PathLike) -> str:
    return (f"{source}: its weights are only pickle files (pytorch_model.bin), which are not loaded (unpickling "
            f"can run code); convert them to safetensors (save_pretrained(..., safe_serialization=True)) or use "
            f"a model that publishes model.safetensors")


def is_gguf(source: str | os.PathLike) -> bool:
    return str(source).lower().endswith(".gguf")


def _from_pretrained_args(source: str) -> tuple[str, dict[str, Any]]:
    """(path or id, extra kwargs) for transformers' from_pretrained: a GGUF file is its folder + gguf_file."""
    if is_gguf(source):
        p = Path(source).expanduser()
        if not p.is_file():
            raise CheckpointError(f"{source}: GGUF file not found; pass an existing .gguf path")
        return str(p.parent), {"gguf_file": p.name}
    p = Path(source).expanduser()
    if p.exists():
        if (p / "llmlab.json").is_file():
            raise CheckpointError(f"{source} is an LLM-Lab checkpoint already (it holds llmlab.json): use it as it is "
                                  f"(chat, sft policy_checkpoint=...), or write it for transformers with "
                                  f"llm-lab export-hf {source} --out DIR")
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{source}: not a transformers model folder (no config.json); pass a folder "
                                  f"save_pretrained wrote, a hub id or a .gguf file")
        return str(p), {}
    if str(source).startswith((".", "/", "~")):
        raise CheckpointError(f"{source} does not exist; pass a hub id, a transformers folder or a .gguf file")
    return str(source), {}


def load_hf(source: str, *, with_tokenizer: bool = True) -> tuple[Any, Any]:
    """(transformers model in fp32 eval mode, tokenizer or None) for a hub id, folder or .gguf file (which
    transformers dequantises to fp32).

    For a hub id or folder the config is read and translated first, so an unsupported architecture fails
    before any weights are downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmlab.hub import hub_kwargs, offline_note

    where, extra = _from_pretrained_args(source)
    if not extra:  # a GGUF's config costs a full metadata read, so it is checked after loading instead
        extra = hub_kwargs(where)  # offline: the local cache only, at once
        try:
            hf_cfg = AutoConfig.from_pretrained(where, **extra)
        except Exception as e:  # noqa: BLE001 - offline, unknown id, unreadable file
            raise CheckpointError(f"cannot read a transformers config from {source!r} "
                                  f"({offline_note(where) or _first_line(e)}); check the hub id / path and the "
                                  f"network") from None
        model_config_from_hf(hf_cfg)  # raises ConfigError naming what has no LLM-Lab equivalent
    gguf = "gguf_file" in extra
    if not gguf and pickle_only_folder(where):
        raise CheckpointError(pickle_refused(source))
    try:
        # safetensors only: never unpickle a pytorch_model.bin (a GGUF is read by transformers' own parser)
        safe = {} if gguf else {"use_safetensors": True}
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra, **safe)
    except Exception as e:  # noqa: BLE001
        if not gguf and "use_safetensors" in str(e):  # a hub model that publishes no safetensors
            raise CheckpointError(pickle_refused(source)) from None
        raise CheckpointError(f"cannot load the weights of {source!r} with transformers ({_first_line(e)})") from None
    tok = None
    if with_tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(where, **extra)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{source!r} has no loadable tokenizer ({_first_line(e)}); import needs the "
                            f"tokenizer files (tokenizer.json, tokenizer_config.json) beside the weights") from None
    return model.eval(), tok


PROBE_MIN, PROBE_MAX = 16, 512  # probe tokens: past any sliding window, capped for speed on CPU


def parity_ids(vocab_size: int, n: int = PROBE_MIN) -> torch.Tensor:
    """A fixed, spread-out probe sequence (no RNG, so the check is reproducible)."""
    return (torch.arange(n, dtype=torch.long) * 7919 + 11).remainder(vocab_size)[None]


def probe_length(ours: torch.nn.Module, hf_model: Any) -> int:
    """Probe tokens for the parity check: 16 past the wider of both sides' sliding windows (so a window on
    one side only changes the logits), at most PROBE_MAX and the model's max_seq_len."""
    windows = [ours.config.sliding_window, getattr(hf_model.config, "sliding_window", None)]
    widest = max((w for w in windows if w), default=0)
    return max(1, min(ours.config.max_seq_len, PROBE_MAX, max(PROBE_MIN, widest + PROBE_MIN)))


@dataclass(frozen=True)
class LogitCheck:
    """What a logit comparison on the parity probe found, for the line the CLI prints."""

    max_abs_diff: float  # max |ours - transformers| over the probe's logits
    scale: float  # max |transformers logit|
    tokens: int  # probe length
    allowed: float  # the largest max_abs_diff the check accepts

    def numbers(self) -> str:
        return f"max abs diff {self.max_abs_diff:.1e} on {self.tokens} tokens, allowed {self.allowed:.1e}"


def logit_check(ours: torch.nn.Module, hf_model: Any) -> tuple[float, float, int]:
    """(max |ours - transformers| logit difference, max |transformers logit|, probe tokens) on the probe."""
    ids = parity_ids(ours.config.vocab_size, probe_length(ours, hf_model))
    return (*logit_diff_and_scale(ours, hf_model, ids), ids.shape[1])


def logit_diff_and_scale(ours: torch.nn.Module, hf_model: Any, ids: torch.Tensor | None = None) -> tuple[float, float]:
    """(max |ours - transformers| logit difference, max |transformers logit|) on the probe, both in fp32."""
    ids = parity_ids(ours.config.vocab_size, probe_length(ours, hf_model)) if ids is None else ids
    with torch.no_grad():
        ref = hf_model(ids).logits.float()
        got = ours(ids).float()
    return float((ref - got).abs().max()), float(ref.abs().max())


def import_hf(source: str, out_dir: str | os.PathLike, *, force: bool = False, check: bool = True,
              report: Report | None = None) -> Path:
    """Hub id, transformers folder or .gguf file -> an LLM-Lab checkpoint folder (kind "imported") with the
    tokenizer and its chat template in `tokenizer/`. `check` compares logits with transformers on a probe
    sequence and refuses to write a checkpoint that disagrees; `report` then gets one line with its numbers."""
    from llmlab.checkpoint import load_state_into
    from llmlab.model import build_model

    out = check_output(out_dir, force)
    hf_model, tok = load_hf(source)
    check_vocab(tok, hf_model.config.vocab_size, str(source))
    tokenizer_name = str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else source
    cfg = model_config_from_hf(hf_model.config, tokenizer_name=tokenizer_name)
    model = build_model(cfg)
    load_state_into(model, hf_state_to_llmlab(hf_model.state_dict()), where=str(source))
    model.eval()
    checked = None
    if check:
        diff, scale, tokens = logit_check(model, hf_model)
        if not diff < PARITY_ATOL:
            raise CheckpointError(f"{source}: imported logits differ from transformers by {diff:.2e} (> {PARITY_ATOL}); "
                                  f"the architecture has a feature LLM-Lab does not reproduce")
        checked = LogitCheck(diff, scale, tokens, PARITY_ATOL)
    info = {"source": str(source), "model_type": hf_model.config.model_type,
            "architectures": getattr(hf_model.config, "architectures", None), "gguf": is_gguf(source)}
    gen = getattr(hf_model, "generation_config", None)

    def extra(tmp: Path) -> None:
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if gen is not None:
            gen.save_pretrained(str(tmp))  # generation_config.json: the model's own stop tokens

    del hf_model
    path = save_checkpoint(out, model, kind="imported", tokenizer=tok, write_extra=extra)
    if checked is not None and report is not None:
        report(f"logits match transformers' load of {source} ({checked.numbers()})")
    return path


def check_vocab(tok: Any, vocab_size: int, where: str) -> None:
    """A ConfigError when the tokenizer has ids past the model's embedding rows (its ids from vocab_size on
    would fail inside the model at the first such token)."""
    if len(tok) > vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {len(tok)} tokens but vocab_size is {vocab_size}; the "
                          f"model and tokenizer do not belong together")


def checkpoint_tokenizer(ckpt: Any) -> Any:
    """The tokenizer a checkpoint was trained with: its `tokenizer/` folder, else `tokenizer_name`."""
    from llmlab.data.tokenizer import load_tokenizer

    src = ckpt.tokenizer_path or ckpt.model_config.tokenizer_name
    try:
        return load_tokenizer(str(src))
    except DataError as e:
        raise DataError(f"{ckpt.path}: no tokenizer/ folder and {e}") from None


def generation_config_for(tok: Any) -> Any:
    """A GenerationConfig that stops where LLM-Lab's chat stops (eos and <|im_end|>)."""
    from transformers import GenerationConfig

    from llmlab.data.tokenizer import stop_token_ids

    stops = stop_token_ids(tok)
    return GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                            eos_token_id=stops[0] if len(stops) == 1 else (stops or None))


EXPORT_RTOL = 1e-4  # export check: max logit difference allowed, relative to the largest |logit| (>= 1)


def load_exported(folder: str | os.PathLike, where: str) -> Any:
    """The exported folder through transformers (local, safetensors only, fp32, eval mode), or a one-line
    CheckpointError."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True,
                                                    local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where}: the exported folder does not load in transformers ({_first_line(e)}); "
                              f"nothing was written") from None


def compare_export(ours: torch.nn.Module, theirs: Any, where: str, what: str) -> LogitCheck:
    """Logits of `ours` (LLM-Lab) and `theirs` (the reloaded export) on the parity probe; a CheckpointError
    naming `what` (e.g. "transformers' logits for the exported folder") past EXPORT_RTOL of the scale."""
    diff, scale, tokens = logit_check(ours.float().eval(), theirs)
    allowed = EXPORT_RTOL * max(scale, 1.0)
    if not diff <= allowed:
        raise CheckpointError(f"{where}: {what} differ from LLM-Lab's by {diff:.2e} (logit scale {scale:.2e}, "
                              f"allowed {EXPORT_RTOL:g} of it); nothing was written (an export bug: please report "
                              f"it)")
    return LogitCheck(diff, scale, tokens, allowed)


def check_hf_export(model: torch.nn.Module, folder: str | os.PathLike, where: str, hf_model: Any = None) -> LogitCheck:
    """Load `folder` with transformers (or take `hf_model`, already loaded from it) and compare its logits
    with `model`'s on the parity probe; a CheckpointError when it does not load or differs by more than
    EXPORT_RTOL of the scale, else what it found."""
    hf_model = load_exported(folder, where) if hf_model is None else hf_model
    return compare_export(model, hf_model, where, "transformers' logits for the exported folder")


def describe_hf_export_check(checked: LogitCheck, how: str = "reloaded with transformers, logits match LLM-Lab's") -> str:
    """The line `llm-lab export-hf` prints after `checked:`."""
    return f"{how} ({checked.numbers()} = {EXPORT_RTOL:g} x logit scale {max(checked.scale, 1.0):.3g})"


# --------------------------------------------------------------------------------------------------
# A LoRA adapter beside the export, under transformers' module names
# --------------------------------------------------------------------------------------------------

HF_ADAPTER_DIR = "adapter"  # the export's subfolder holding the adapter (PEFT format)


def _lora_layer_names(model: torch.nn.Module) -> set[str]:
    """Names (relative to the plain model) of the modules carrying LoRA weights."""
    from peft.tuners.lora import LoraLayer

    from llmlab.checkpoint import base_transformer

    return {n for n, m in base_transformer(model).named_modules() if isinstance(m, LoraLayer)}


def adapter_to_export(ckpt: Any, adapter: str | os.PathLike | bool) -> tuple[torch.nn.Module, Path]:
    """(the plain model an adapter goes onto, the adapter folder): `adapter=True` is the checkpoint's own
    adapter/ on its own frozen weights (a LoRA run's pairing); a folder goes onto the base
    `lora.base_model_for_adapter` gives (the same-run pairing, the stacked one, and the check that the
    base's weights are the ones the adapter's run saved), as `merge-lora --adapter` and `chat --adapter`."""
    from llmlab.checkpoint import check_adapter_folder
    from llmlab.lora import ADAPTER_DIR, base_model_for_adapter

    if adapter is True:
        if not ckpt.has_adapter:
            raise CheckpointError(f"{ckpt.path} holds no LoRA adapter (no {ADAPTER_DIR}/adapter_config.json), so "
                                  f"there is none to export apart; drop --adapter, or pass --adapter DIR with an "
                                  f"adapter folder trained on it")
        folder = check_adapter_folder(ckpt.path / ADAPTER_DIR)
        return load_model(ckpt.path, with_adapter=False), folder
    folder = check_adapter_folder(Path(adapter))
    return base_model_for_adapter(folder, ckpt), folder


def write_hf_adapter(lora_model: torch.nn.Module, hf_model: Any, folder: Path, base_path: str, where: str) -> Any:
    """Write `lora_model`'s adapter (LLM-Lab names) into `folder` for the transformers model `hf_model` (the
    exported base, loaded from it) and return the PeftModel over `hf_model` it built.

    PEFT writes the folder itself (`get_peft_model` on the transformers model, `set_peft_model_state_dict`
    with the keys renamed by `llmlab.hf`, `save_pretrained`) rather than renaming keys in the files: the
    files are then what PEFT writes for a transformers model (its key layout, its version's config fields,
    its model card), and a key that does not convert is reported by PEFT as missing or unexpected instead
    of being skipped with a warning (PeftModel.from_pretrained only warns, and serves the bare base)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    lcfg = copy.deepcopy(lora_model.peft_config[lora_model.active_adapter])
    ours = _lora_layer_names(lora_model)
    if isinstance(lcfg.target_modules, str):  # a regex over LLM-Lab's full names: name the modules instead
        lcfg.target_modules = sorted(llmlab_key_to_hf(n) for n in ours)
    lcfg.task_type, lcfg.auto_mapping = "CAUSAL_LM", None  # a transformers causal LM now, not LLM-Lab's class
    # transformers (AutoModelForCausalLM / AutoPeftModelForCausalLM on adapter/) loads the base from this
    # field, read from the current directory, not from the adapter folder: a relative ".." would work only
    # from inside adapter/, so it is the export's absolute path (edit it after moving or uploading the
    # folder). PeftModel.from_pretrained(model, ...), vLLM and TGI take the base separately and ignore it.
    lcfg.base_model_name_or_path = base_path
    hf_model.name_or_path = hf_model.config._name_or_path = base_path  # PEFT's model card reads it
    state = llmlab_adapter_state_to_hf(get_peft_model_state_dict(lora_model, save_embedding_layers=False))
    hf_peft = get_peft_model(hf_model, lcfg)
    theirs = _lora_layer_names(hf_peft)
    if theirs != {llmlab_key_to_hf(n) for n in ours}:
        odd = sorted(theirs ^ {llmlab_key_to_hf(n) for n in ours})[0]
        raise CheckpointError(f"{where}: the adapter's target_modules ({lcfg.target_modules}) select other modules "
                              f"in the transformers model than in LLM-Lab's (e.g. {odd}); nothing was written "
                              f"(merge the adapter instead: export-hf without --adapter)")
    result = set_peft_model_state_dict(hf_peft, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing or not state:
        bad = (result.unexpected_keys or missing or ["(no tensors)"])[0]
        raise CheckpointError(f"{where}: adapter tensor {bad} has no place in the transformers model; nothing "
                              f"was written (an export bug: please report it)")
    hf_peft.save_pretrained(str(folder), save_embedding_layers=False, safe_serialization=True)
    return hf_peft


def check_hf_adapter(lora_model: torch.nn.Module, hf_peft: Any, folder: Path, where: str) -> LogitCheck:
    """Reload the written adapter folder with `PeftModel.from_pretrained` onto the transformers base (the
    model under `hf_peft`, its LoRA layers removed) and compare: every LoRA tensor arrived, and the logits
    equal `lora_model`'s (LLM-Lab with the adapter)."""
    from peft import PeftModel, get_peft_model_state_dict

    written = get_peft_model_state_dict(hf_peft, save_embedding_layers=False)
    try:
        reloaded = PeftModel.from_pretrained(hf_peft.unload(), str(folder)).eval()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where}: the exported adapter does not load with PEFT ({_first_line(e)}); nothing "
                              f"was written") from None
    loaded = get_peft_model_state_dict(reloaded, save_embedding_layers=False)
    if loaded.keys() != written.keys() or not all(torch.equal(loaded[k], written[k]) for k in written):
        bad = sorted(loaded.keys() ^ written.keys()) or [k for k in written if not torch.equal(loaded[k], written[k])]
        raise CheckpointError(f"{where}: PEFT reloads the exported adapter without tensor {bad[0]}; nothing was "
                              f"written (an export bug: please report it)")
    return compare_export(lora_model, reloaded, where,
                          "PEFT's logits for the exported adapter over the exported folder")


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False,
              check: bool = True, report: Report | None = None,
              adapter: str | os.PathLike | bool | None = None) -> Path:
    """An LLM-Lab checkpoint -> a folder `AutoModelForCausalLM.from_pretrained` loads (Llama, Mistral when
    windowed, Qwen2 when q/k/v have bias): model.safetensors, config.json, generation_config.json and the
    tokenizer with its chat template. A LoRA adapter is merged into the weights, unless `adapter` keeps one
    apart: True for the checkpoint's own adapter/, or an adapter folder trained on the checkpoint
    (`adapter_to_export`); the folder then holds the base that adapter goes onto, and `adapter/` the adapter
    in PEFT's format under transformers' module names. `check` reloads the written folder with transformers
    (and the adapter with PEFT over it) and compares logits before it appears under `out_dir`
    (`check_hf_export`, `check_hf_adapter`); `report` then gets one line per check with its numbers."""
    from safetensors.torch import save_file

    from llmlab.checkpoint import attach_adapter
    from llmlab.data.tokenizer import chat_template_of

    if adapter is None and (Path(checkpoint) / "adapter_config.json").is_file() \
            and not (Path(checkpoint) / "config.json").is_file():
        raise CheckpointError(f"{checkpoint} is a LoRA adapter folder, not a checkpoint; pass the checkpoint it "
                              f"was trained on and the adapter: llm-lab export-hf BASE --adapter {checkpoint} "
                              f"--out DIR")
    ckpt = read_checkpoint(checkpoint)
    hf_model_type(ckpt.model_config)  # fail on options with no equivalent before loading anything
    out = check_output(out_dir, force)
    tok = checkpoint_tokenizer(ckpt)
    check_vocab(tok, ckpt.model_config.vocab_size, str(ckpt.path))
    # HOOK(chat-template): the template SFT and chat use; data.tokenizer.chat_template_of is meant to return
    # data.chat.effective_chat_template(tok) (another change); the export follows it with no edit here.
    tok.chat_template = chat_template_of(tok)
    where = str(ckpt.path)
    if adapter is None:
        model, lora_model = load_model(ckpt.path), None  # merges a LoRA adapter
    else:
        model, adapter_dir = adapter_to_export(ckpt, adapter)
        where = f"{ckpt.path} with adapter {adapter_dir}"
    hf_cfg = hf_config_from_llmlab(ckpt.model_config, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    state = llmlab_state_to_hf(model_state_for_saving(model))
    if adapter is not None:  # after the base's state is taken: PEFT wraps the base's layers in place
        model = lora_model = attach_adapter(model, adapter_dir, where=str(ckpt.path)).eval()
    checks = []
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        hf_cfg.save_pretrained(str(tmp))
        generation_config_for(tok).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        # the checks run before the folder appears under its name: a mismatch leaves nothing behind
        if lora_model is None:
            if check:
                checks.append(describe_hf_export_check(check_hf_export(model, tmp, where)))
        else:
            hf_model = load_exported(tmp, where)
            if check:
                with lora_model.disable_adapter():  # the base alone, as written to model.safetensors
                    checks.append(describe_hf_export_check(check_hf_export(lora_model, tmp, where, hf_model)))
            hf_peft = write_hf_adapter(lora_model, hf_model, tmp / HF_ADAPTER_DIR, str(out.resolve()), where)
            if check:
                found = check_hf_adapter(lora_model, hf_peft, tmp / HF_ADAPTER_DIR, where)
                checks.append(describe_hf_export_check(
                    found, f"reloaded {out / HF_ADAPTER_DIR} with PEFT over it, logits match LLM-Lab's with the "
                           f"adapter"))
    for line in checks if report is not None else ():
        report(line)
    return out
