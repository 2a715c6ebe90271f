"""GGUF export for llama.cpp (and anything else that reads GGUF), through the `gguf` package.

    llm-lab export-gguf runs/sft/best --out runs/sft.gguf            # f16 matrices, f32 norms and biases

Architecture `llama` (or `qwen2` when q/k/v have bias). Tensor names come from gguf's own HF->GGUF name
map. llama.cpp's `llama` graph applies rotary embeddings to interleaved pairs, while LLM-Lab (like HF)
rotates halves, so q_proj and k_proj rows are permuted per head on the way out; transformers' GGUF loader
applies the inverse, so a round trip is exact. `qwen2` uses the halves layout in llama.cpp and is written
unpermuted. The tokenizer is written as llama.cpp metadata when it is a byte-level BPE (the kind LLM-Lab
trains and Llama-3/Qwen2/SmolLM use), with its chat template; otherwise the file holds weights only and a
warning says so. Reading back: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import load_model, model_state_for_saving, read_checkpoint
from llmlab.config import ModelConfig
from llmlab.errors import CheckpointError, ConfigError
from llmlab.hf import llmlab_key_to_hf
from llmlab.interop.hf_io import Report, check_output, checkpoint_tokenizer

GGUF_SUPPORTED = "export-gguf supports rope, rmsnorm, swiglu, mha/gqa/mqa, q/k/v bias, no sliding window"
DTYPES = ("f32", "f16")

# gguf.TokenType values (llama.cpp): 1 normal, 3 control, 4 user-defined, 5 unused
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_architecture(cfg: ModelConfig) -> str:
    """`llama` or `qwen2` for a config llama.cpp and transformers' GGUF loader both reproduce exactly, or a
    ConfigError naming the option with no GGUF equivalent."""
    checks = [
        (cfg.positional_encoding == "rope", f"positional_encoding={cfg.positional_encoding!r}"),
        (cfg.norm_type == "rmsnorm", f"norm_type={cfg.norm_type!r}"),
        (cfg.activation == "swiglu", f"activation={cfg.activation!r}"),
        (cfg.sliding_window is None, f"sliding_window={cfg.sliding_window}"),
    ]
    for ok, option in checks:
        if not ok:
            raise ConfigError(f"{option} has no GGUF llama/qwen2 equivalent that transformers reads back; "
                              f"{GGUF_SUPPORTED} (use export-hf instead)")
    return "qwen2" if cfg.attention_bias else "llama"


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k (weight or bias) from rotate-half order to llama.cpp's interleaved pairs, per head."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _pre_tokenizer_name(spec: dict[str, Any]) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level pre-tokenizer, matched against transformers' own
    table of split patterns; None when the tokenizer is not byte-level."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if "ByteLevel" not in kinds:
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2" if parts[0].get("use_regex", True) else "default"
    splits = [p for p in parts if p.get("type") == "Split"]
    if len(splits) == 1:
        pattern = splits[0].get("pattern", {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == pattern:
                return name
    return "default"


def tokenizer_metadata(tok: Any, vocab_size: int) -> dict[str, Any] | None:
    """llama.cpp tokenizer fields for a byte-level BPE tokenizer, padded to the model's vocab_size; None
    for other kinds."""
    from llmlab.data.tokenizer import chat_template_of

    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    pre = _pre_tokenizer_name(spec)
    if model.get("type") != "BPE" or pre is None:
        return None
    vocab = dict(model["vocab"])
    kinds = {}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        kinds[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        if i < vocab_size:
            tokens[i], types[i] = text, kinds.get(i, NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id,
            "add_bos": bool(getattr(tok, "add_bos_token", False)), "chat_template": chat_template_of(tok)}


def _write(path: Path, arch: str, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: str,
           tok_meta: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Write the GGUF file; returns {GGUF tensor name: the numpy array written} for `check_gguf`."""
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.n_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    if tok_meta is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok_meta["pre"])
        w.add_token_list(tok_meta["tokens"])
        w.add_token_types(tok_meta["types"])
        w.add_token_merges(tok_meta["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                         ("unk", w.add_unk_token_id)):
            if tok_meta[key] is not None:
                add(tok_meta[key])
        w.add_add_bos_token(tok_meta["add_bos"])
        # HOOK(chat-template): tok_meta's template comes from data.tokenizer.chat_template_of (what SFT/chat use)
        w.add_chat_template(tok_meta["chat_template"])
    written = {}
    for key, t in state.items():
        hf_name = llmlab_key_to_hf(key)
        base, suffix = hf_name.rsplit(".", 1)
        g = names.get_name(base)
        if g is None:
            raise ConfigError(f"tensor {key} has no GGUF {arch} name; {GGUF_SUPPORTED}")
        t = t.detach().float()
        if arch == "llama" and base.endswith("self_attn.q_proj"):
            t = permute_rotary(t, cfg.n_heads)
        elif arch == "llama" and base.endswith("self_attn.k_proj"):
            t = permute_rotary(t, cfg.n_kv_heads)
        arr = t.numpy()
        if dtype == "f16" and t.dim() == 2:  # llama.cpp keeps norms and biases in f32
            arr = arr.astype("float16")
        written[f"{g}.{suffix}"] = arr
        w.add_tensor(f"{g}.{suffix}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def check_gguf(path: Path, written: dict[str, Any], where: str) -> dict[str, tuple[int, int]]:
    """Read the file back with gguf's reader: the same tensor names, and each tensor's shape, dtype and values
    equal to what was written; a CheckpointError naming the first difference, else {dtype: (tensors, values)}
    of what was compared."""
    import gguf
    import numpy as np

    try:
        tensors = {t.name: t.data for t in gguf.GGUFReader(str(path)).tensors}
    except Exception as e:  # noqa: BLE001 - a truncated or malformed file
        raise CheckpointError(f"{where}: the GGUF file written does not read back ({e}); nothing was written") from None
    if set(tensors) != set(written):
        diff = sorted(set(tensors) ^ set(written))
        raise CheckpointError(f"{where}: the GGUF file read back has different tensors ({', '.join(diff[:4])}); "
                              f"nothing was written")
    compared: dict[str, tuple[int, int]] = {}
    for name, arr in written.items():
        got = tensors[name]
        if got.shape != arr.shape or got.dtype != arr.dtype or not np.array_equal(got, arr):
            raise CheckpointError(f"{where}: GGUF tensor {name} reads back as {got.dtype}{list(got.shape)} with "
                                  f"other values than the {arr.dtype}{list(arr.shape)} written; nothing was written")
        count, values = compared.get(str(arr.dtype), (0, 0))
        compared[str(arr.dtype)] = (count + 1, values + int(arr.size))
    return compared


GGUF_DTYPE_NOTE = {
    "f32": "f32 holds the fp32 weights unchanged",
    "f16": "f16 rounds the fp32 matrices to half precision, relative error about 2^-11 = 4.9e-04; norms and "
           "biases stay f32",
}


def describe_gguf_check(compared: dict[str, tuple[int, int]], dtype: str) -> str:
    """The line `llm-lab export-gguf` prints after `checked:`: what `check_gguf` read back and compared."""
    tensors = sum(n for n, _ in compared.values())
    values = sum(v for _, v in compared.values())
    kinds = ", ".join(f"{n} {name.replace('float', 'f')}" for name, (n, _) in sorted(compared.items()))
    return (f"read back with gguf's reader, {tensors} tensors ({kinds}; {values:,} values): names, shapes, dtypes "
            f"and values equal to what was written, exactly (tolerance 0; {GGUF_DTYPE_NOTE[dtype]})")


def export_gguf(checkpoint: str | os.PathLike, out_file: str | os.PathLike, *, force: bool = False,
                dtype: str = "f16", check: bool = True, report: Report | None = None) -> Path:
    """An LLM-Lab checkpoint (a LoRA adapter is merged) -> one GGUF file (`dtype` f16 or f32 matrices).
    `check` reads the file back (`check_gguf`) before it appears under `out_file`; `report` then gets one
    line saying what was compared."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    ckpt = read_checkpoint(checkpoint)
    cfg = ckpt.model_config
    arch = gguf_architecture(cfg)
    out = check_output(out_file, force)
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"--out {out}: a GGUF file name must end in .gguf")
    tok = checkpoint_tokenizer(ckpt)
    tok_meta = tokenizer_metadata(tok, cfg.vocab_size)
    if tok_meta is None:
        warnings.warn(f"{ckpt.path}: the tokenizer is not a byte-level BPE; the GGUF holds weights only "
                      f"(llama.cpp will need a tokenizer from elsewhere)", stacklevel=2)
    state = model_state_for_saving(load_model(ckpt.path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    compared = None
    try:
        written = _write(tmp, arch, cfg, state, dtype, tok_meta, name=f"llmlab-{ckpt.path.name}")
        if check:
            compared = check_gguf(tmp, written, str(ckpt.path))
        del written
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    if compared is not None and report is not None:
        report(describe_gguf_check(compared, dtype))
    return out
