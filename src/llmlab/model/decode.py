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

The concatenated copies are cached on the modules and reused while the source parameters are unchanged
(same storage, same in-place version counter): an optimizer step, `load_state_dict` or any in-place edit
makes the next call rebuild them. `keep=False` frees them on exit (generation from a model in training
mode, e.g. RL rollouts, whose weights change after every rollout), and so does a model whose copies
exceed KEEP_MAX_BYTES (a large model's fused copies are a lot of memory to hold between replies, and
rebuilding them is small next to its generation time). A module wrapped by PEFT or carrying
forward hooks is never fused or bypassed: it runs its own forward (its plain base `Linear` still gets the
fast path). Never used with gradients enabled or off CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from llmlab.model.attention import Attention
from llmlab.model.linear import Linear, pack, plain
from llmlab.model.mlp import GatedMLP
from llmlab.model.norms import RMSNorm


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


def _build(module: nn.Module, sources: list[nn.Module], threads: int) -> torch.Tensor:
    if isinstance(module, RMSNorm):
        return torch.cat((module.weight, module.weight))
    return pack([s.weight for s in sources], threads)


def _copies(module: nn.Module, sources: list[nn.Module]) -> bool:
    """Whether the decode weight is a copy (not a view of the parameter)."""
    return len(sources) > 1 or isinstance(module, RMSNorm)


def _key(sources: list[nn.Module], threads: int) -> tuple:
    return (threads,) + tuple((s.weight.data_ptr(), s.weight._version, tuple(s.weight.shape)) for s in sources)


KEEP_MAX_BYTES = 1 << 30  # fused copies larger than this are freed after each call even when keep=True


@contextlib.contextmanager
def decode_weights(model: nn.Module, keep: bool = True) -> Iterator[None]:
    """Within the block, CPU decoding of `model` reads the decode weights (built or reused on entry: do
    not change the weights inside the block). keep=False (or copies over KEEP_MAX_BYTES) frees the
    cached copies on exit."""
    threads = torch.get_num_threads()
    targets = _targets(model)
    try:
        with torch.no_grad(), torch.inference_mode(False):  # plain tensors, reusable in any mode
            for module, attr, sources in targets:
                cache = module.__dict__.setdefault("_decode_cache", {})
                key = _key(sources, threads)
                if attr not in cache or cache[attr][0] != key:
                    cache.pop(attr, None)  # free the stale copy before making the new one
                    cache[attr] = (key, _build(module, sources, threads))
                setattr(module, attr, cache[attr][1])
                if attr == "qkv_decode":  # set even when None: the same instance state at every call
                    has_bias = sources[0].bias is not None
                    module.qkv_decode_bias = torch.cat([s.bias for s in sources]) if has_bias else None
        copies = sum(module._decode_cache[attr][1].nbytes for module, attr, sources in targets if _copies(module, sources))
        keep = keep and copies <= KEEP_MAX_BYTES
        yield
    finally:
        for module, attr, _ in targets:
            setattr(module, attr, None)
            if attr == "qkv_decode":
                module.qkv_decode_bias = None
            if not keep:
                module.__dict__.get("_decode_cache", {}).pop(attr, None)
