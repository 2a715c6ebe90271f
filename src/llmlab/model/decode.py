"""CPU decoding weights: the same parameters, read in a way that suits products with a few rows.

Decoding multiplies one row per sequence by every weight matrix, so on CPU a decode step is bound by
reading the weights (the bench model streams ~50 MB of fp32 weights per token), not by arithmetic.
Measured on this project's 2-core machine (`bench/generation.py`): MKL's one-row product `x @ W.T`
reads about 10 GB/s on one thread whatever the thread count, while `torch.bmm` over the same (out, in)
weight cut into P row blocks, (P, out / P, in) (a view, no copy), reads at close to the memory
bandwidth: 2x faster on one thread, 4x on two. `decode_weights(model)` resolves, once per generation
call, what each module multiplies by:

- o_proj, down_proj, plain MLPs and the LM head: their own weight, viewed in P blocks (no memory);
- q/k/v and gate/up: one concatenated weight each, one product instead of three / two (one copy of those
  weights; the modules and their names stay as they are: LoRA, HF conversion and checkpoints see
  nothing);
- RMSNorms: their weight twice over, (2 D,), for `llmlab.model.norms.rms_norm_by_layer_norm` (one
  fused op per norm instead of about ten small ones in a decode step).

With `packed=True` (generation of PACK_MIN_ROWS or more sequences, eager, fp32, oneDNN there) every
projection and the LM head multiply instead by a copy of their (concatenated) weight in oneDNN's packed
layout: products of a few rows by a plain weight ran at 8-10 GB/s in every library call tried, by the
packed weight about twice as fast (numbers at PACK_MIN_ROWS). That costs one copy of all those
weights (0.66x of the layers' weights without packing), cached and freed by the same rules.

The copies are cached on the modules and reused while the source parameters are unchanged
(same storage, same in-place version counter): an optimizer step, `load_state_dict` or any in-place edit
makes the next call rebuild them. `keep=False` frees them on exit (generation from a model in training
mode, e.g. RL rollouts, whose weights change after every rollout), and so does a model whose copies
exceed KEEP_MAX_BYTES (a large model's fused copies are a lot of memory to hold between replies, and
rebuilding them is small next to its generation time). A module wrapped by PEFT or carrying
forward hooks is never fused or bypassed: it runs its own forward (its plain base `Linear` still gets the
fast path). Never used with gradients enabled or off CPU.

`decode_step(model, max_len)` (inside `decode_weights`) gives the generation loop a `DecodeStep`: the model's
forward for one new token per sequence with the module calls taken out (see its docstring), for a
plain model (no hooks, no PEFT wrappers); None otherwise, and the model's own forward runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from llmlab.model.attention import Attention
from llmlab.model.cache import KVCache
from llmlab.model.linear import Linear, decode_mm, onednn_ready, pack, plain
from llmlab.model.mlp import GatedMLP
from llmlab.model.norms import RMSNorm
from llmlab.model.transformer import Transformer


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, list[nn.Module]]]:
    """(module, attribute to set, source linears) for every decode weight of `model`."""
    out: list[tuple[nn.Module, str, list[nn.Module]]] = []
    fused: set[int] = set()
    for m in model.modules():
        if isinstance(m, Attention) and plain(m.q_proj, m.k_proj, m.v_proj):
            out.append((m, "qkv_decode", [m.q_proj, m.k_proj, m.v_proj]))
            fused.update(map(id, (m.q_proj, m.k_proj, m.v_proj)))
        elif isinstance(m, GatedMLP) and plain(m.gate_proj, m.up_proj):
            out.append((m, "gate_up_decode", [m.gate_proj, m.up_proj]))
            fused.update(map(id, (m.gate_proj, m.up_proj)))
        elif hasattr(m, "head_decode_weight") and plain(m.lm_head, kind=nn.Linear):
            out.append((m, "head_decode_weight", [m.lm_head]))
        elif isinstance(m, RMSNorm):
            out.append((m, "decode_weight", [m]))
    for m in model.modules():
        if isinstance(m, Linear) and id(m) not in fused:
            out.append((m, "decode_weight", [m]))
    return [t for t in out if all(s.weight.device.type == "cpu" for s in t[2])]


# From this many rows a decode step (the batch size) multiplies by oneDNN-packed weights. Measured on a
# 2048 x 384 weight not in cache, 2 threads, us per product (blocked bmm / oneDNN on the plain weight /
# oneDNN on the packed weight): 2 rows 109 / 204 / 167, 4 rows 235 / 390 / 179, 8 rows 307 / 404 / 167,
# 16 rows 417 / 388 / 209; one row stays on the blocked bmm (126 / 200 / 189).
PACK_MIN_ROWS = 4


def packs(model: nn.Module, rows: int) -> bool:
    """Whether decoding `rows` rows a step multiplies by packed weights (`decode_weights(packed=True)`):
    PACK_MIN_ROWS or more rows, an fp32 model, oneDNN there."""
    weight = next(model.parameters(), None)
    return rows >= PACK_MIN_ROWS and weight is not None and weight.dtype == torch.float32 and onednn_ready()


def _packable(sources: list[nn.Module]) -> bool:
    return all(s.weight.dtype == torch.float32 for s in sources) and onednn_ready()


def _build(module: nn.Module, sources: list[nn.Module], threads: int, packed: bool) -> torch.Tensor:
    if isinstance(module, RMSNorm):
        return torch.cat((module.weight, module.weight))
    if packed and _packable(sources):  # oneDNN's own blocked layout of the (concatenated) weight
        w = sources[0].weight if len(sources) == 1 else torch.cat([s.weight for s in sources], 0)
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
    return pack([s.weight for s in sources], threads)


def _copy_bytes(module: nn.Module, sources: list[nn.Module], weight: torch.Tensor) -> int:
    """Bytes the decode weight holds besides the parameters (0 for a view of the parameter)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._nbytes(weight)
    return weight.nbytes if len(sources) > 1 or isinstance(module, RMSNorm) else 0


def _key(sources: list[nn.Module], threads: int, packed: bool) -> tuple:
    return (threads, packed) + tuple((s.weight.data_ptr(), s.weight._version, tuple(s.weight.shape)) for s in sources)


KEEP_MAX_BYTES = 1 << 30  # fused copies larger than this are freed after each call even when keep=True


@contextlib.contextmanager
def decode_weights(model: nn.Module, keep: bool = True, packed: bool = False) -> Iterator[None]:
    """Within the block, CPU decoding of `model` reads the decode weights (built or reused on entry: do
    not change the weights inside the block). keep=False (or copies over KEEP_MAX_BYTES) frees the
    cached copies on exit. packed=True (decoding PACK_MIN_ROWS or more rows a step, eagerly): every
    projection's decode weight is a copy in oneDNN's packed layout instead (fp32, where oneDNN is
    there), which multiplies several rows 1.3-2.3x faster than the blocked bmm."""
    threads = torch.get_num_threads()
    targets = _targets(model)
    try:
        with torch.no_grad(), torch.inference_mode(False):  # plain tensors, reusable in any mode
            for module, attr, sources in targets:
                cache = module.__dict__.setdefault("_decode_cache", {})
                key = _key(sources, threads, packed)
                if attr not in cache or cache[attr][0] != key:
                    cache.pop(attr, None)  # free the stale copy before making the new one
                    cache[attr] = (key, _build(module, sources, threads, packed))
                setattr(module, attr, cache[attr][1])
                if attr == "qkv_decode":  # set even when None: the same instance state at every call
                    has_bias = sources[0].bias is not None
                    module.qkv_decode_bias = torch.cat([s.bias for s in sources]) if has_bias else None
        copies = sum(_copy_bytes(module, sources, module._decode_cache[attr][1]) for module, attr, sources in targets)
        keep = keep and copies <= KEEP_MAX_BYTES
        yield
    finally:
        for module, attr, _ in targets:
            setattr(module, attr, None)
            if attr == "qkv_decode":
                module.qkv_decode_bias = None
            if not keep:
                module.__dict__.get("_decode_cache", {}).pop(attr, None)


class DecodeStep:
    """`Transformer.forward(ids, attention_mask, position_ids, cache, last_only=True)` for one new token
    per sequence (ids (B, 1)), on a plain model inside `decode_weights`: the same operations on the same
    tensors in the same order, with the parts of each block reached through methods (`Attention.attend`,
    the MLP's `hidden`, the projections' and norms' `forward`) instead of module calls, none of the
    forward's general paths (mask kinds, prefill, checkpointing), and RoPE's cos/sin looked up in tables
    made once (`PositionScheme.step_prepare`). A module call (hook bookkeeping, `__getattr__` lookups)
    costs several microseconds in a decode step, where the weights just streamed through the caches; the
    bench model's forward made ~50 of them a token. Measured at batch 1 as paired medians of whole
    generation calls: the methods -0.31 ms a token (3.41 -> 3.10), the projections and tables another
    -0.13 ms, same tokens. Only for models `decode_step` accepts: no module carries hooks, so skipping
    the calls changes nothing."""

    def __init__(self, model: Transformer, max_len: int) -> None:
        self.model = model
        self.blocks = [(b.input_layernorm, b.self_attn, b.post_attention_layernorm, b.mlp) for b in model.layers]
        self.prepare = model.positions.step_prepare(max_len)

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor, key_padding: torch.Tensor | None,
                 cache: KVCache) -> torch.Tensor:
        """ids, position_ids (B, 1) (positions below max_len); key_padding (B, >= filled slots + 1) or
        None -> logits (B, 1, V)."""
        m = self.model
        spec = cache.attention_mask(m.attention_mask, 1, key_padding, ids.device)
        h = m.positions.embed(F.embedding(ids, m.embed_tokens.weight), position_ids)
        rope: Any = self.prepare(position_ids)
        for in_norm, attn, post_norm, mlp in self.blocks:
            h = h + attn.o_proj.forward(attn.attend(in_norm.forward(h), rope, spec, cache))
            h = h + mlp.down_proj.forward(mlp.hidden(post_norm.forward(h)))
        cache.advance(1)
        return decode_mm(m.norm.forward(h), m.head_decode_weight)


def decode_step(model: nn.Module, max_len: int) -> DecodeStep | None:
    """A `DecodeStep` for `model` over positions below max_len (call inside `decode_weights`), or None
    where it does not apply: not an LLM-Lab Transformer itself (PEFT or other wrappers), in training mode
    (dropout), a module that is not LLM-Lab's or torch's (e.g. PEFT's LoRA layers injected into the
    model), or forward hooks anywhere (on a module or global)."""
    if type(model) is not Transformer or model.training or model.head_decode_weight is None:
        return None
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return None
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or not type(m).__module__.startswith(("llmlab.", "torch.nn.")):
            return None
    return DecodeStep(model, max_len)
