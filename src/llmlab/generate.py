"""Text generation with a KV cache (a growing `KVCache`; a `StaticKVCache` only with compile=True): prefill
the (left-padded) prompts once, then one token per step for the whole batch, each sequence stopping on
its own EOS / stop tokens.

Samplers are pure functions of logits. Generation sees only token ids; the chat REPL and RL rollouts
are thin layers over `generate_tokens`.

    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=20, temperature=0)  # greedy
"""

from __future__ import annotations

import numbers
import shutil
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.checkpoint import base_transformer
from llmlab.device import autocast, model_device
from llmlab.errors import ConfigError
from llmlab.model.cache import StaticKVCache
from llmlab.model.decode import decode_step, decode_weights, packs

# --------------------------------------------------------------------------------------------------
# Samplers (pure)
# --------------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (k <= 0: keep all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches p (always >= 1 token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    # drop a token if the mass before it already reaches p
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# top-p looks for its nucleus among the 1,024 most likely tokens, then the 16,384 most likely (partial
# selections), and sorts the whole vocabulary only for a row whose nucleus is larger still. At Qwen's
# 151,936 tokens on this 2-core CPU: a full sort 11.8-12.7 ms, the top 1,024 0.7 ms, the top 16,384 2.1 ms.
NUCLEUS_CANDIDATES = (1024, 16384)


def _nucleus(probs: torch.Tensor, ids: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (B, C) sorted descending, ids their token ids: zero every token after the mass reaches top_p."""
    drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before a token already reaches top_p
    return probs.masked_fill(drop, 0.0), ids


def sampling_distribution(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution `top_p_filter(top_k_filter(logits, top_k), top_p).softmax(-1)` samples from, as
    (weights (B, C), ids (B, C) or None): unnormalised weights over candidate token ids (None: all V ids
    in order), zero where a token is filtered out. Equal to the filters' distribution up to float
    rounding (tested), computed without sorting the whole vocabulary where the top-k or the nucleus lies
    within the NUCLEUS_CANDIDATES most likely tokens (for top-p alone on CPU only: checking that is a host
    sync, free there; on CUDA a full sort is cheap)."""
    V = logits.shape[-1]
    k = top_k if 0 < top_k < V else V
    if top_p >= 1.0:
        if k == V:
            return (logits - logits.amax(-1, keepdim=True)).exp(), None
        vals, ids = torch.topk(logits, k, dim=-1)
        return (vals - vals[:, :1]).exp(), ids
    if k < V and k <= NUCLEUS_CANDIDATES[-1]:  # the top-k distribution is exactly these k tokens
        vals, ids = torch.topk(logits, k, dim=-1)  # sorted, descending
        return _nucleus((vals - vals.logsumexp(-1, keepdim=True)).exp(), ids, top_p)
    if k == V and logits.device.type == "cpu":
        lse = logits.logsumexp(-1, keepdim=True)
        for c in (c for c in NUCLEUS_CANDIDATES if c < V):
            vals, ids = torch.topk(logits, c, dim=-1)
            probs = (vals - lse).exp()
            if bool((probs.sum(-1) >= top_p).all()):  # every row's nucleus lies among these c tokens
                return _nucleus(probs, ids, top_p)
    return top_p_filter(top_k_filter(logits, top_k), top_p).softmax(-1), None  # sorts all V


def sample_from(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C) non-negative weights -> (B,) column indices drawn in proportion to them: one uniform number
    per row against the cumulative sum (fp64). torch.multinomial drew from 151,936 weights in ~3 ms here,
    this in ~0.3."""
    cdf = weights.double().cumsum(-1)
    u = torch.rand((weights.shape[0], 1), generator=generator, dtype=torch.float64, device=weights.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=weights.shape[-1] - 1).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy; otherwise a draw from the temperature-
    scaled distribution after the top-k and nucleus (top-p) filters."""
    if temperature <= 0:
        return logits.argmax(-1)
    weights, ids = sampling_distribution(logits.float() / temperature, top_k, top_p)
    drawn = sample_from(weights, generator)
    return drawn if ids is None else ids.gather(-1, drawn[:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, P + N): left-padded prompts, then responses (pad after a stop)
    prompt_len: int  # P: responses start at this column
    response_mask: torch.Tensor  # (B, N) 1 for generated tokens (the stop token included)
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    prompt_tokens_cut: int = 0  # tokens cut from the left of the longest prompt to fit max_seq_len
    new_tokens_allowed: int | None = None  # max_new_tokens after capping to the room left in max_seq_len

    @property
    def responses(self) -> list[list[int]]:
        r = self.sequences[:, self.prompt_len:]
        return [row[m.bool()].tolist() for row, m in zip(r, self.response_mask)]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def _as_prompt_list(input_ids) -> list[list[int]]:
    if isinstance(input_ids, str | bytes) or isinstance(input_ids, list | tuple) and input_ids \
            and isinstance(input_ids[0], str | bytes):
        raise ConfigError("prompt: text given, but generation takes token ids; tokenize it first, e.g. "
                          "tokenizer(text, return_tensors='pt').input_ids")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2) or input_ids.is_floating_point() or input_ids.is_complex():
            raise ConfigError(f"prompt: expected token ids as a (B, T) or (T,) integer tensor, got shape "
                              f"{tuple(input_ids.shape)} of {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return input_ids.tolist()
    if len(input_ids) and isinstance(input_ids[0], numbers.Integral):
        return [list(input_ids)]
    return [list(p) for p in input_ids]


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int | None = None) -> None:
    """A one-line ConfigError for no prompt, an empty prompt row (nothing to condition the first token on),
    something that is not a token id (text, a float) or a token id outside the model's vocabulary (a
    tokenizer from another model; it failed in the embedding)."""
    if not prompts:
        raise ConfigError("prompt: no prompt given; pass at least one prompt of one or more tokens")
    for i, p in enumerate(prompts):
        where = "" if len(prompts) == 1 else f" (row {i})"
        if len(p) == 0:
            raise ConfigError(f"prompt: empty{where}; it tokenizes to no tokens, give some text (or token ids)")
        odd = [t for t in p if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if odd:
            raise ConfigError(f"prompt: {odd[0]!r}{where} is not a token id (an integer); tokenize text first, "
                              f"e.g. tokenizer(text).input_ids")
        bad = [t for t in p if not 0 <= t < vocab_size] if vocab_size is not None else []
        if bad:
            raise ConfigError(f"prompt: token id {bad[0]}{where} is outside the model's vocabulary (vocab_size "
                              f"{vocab_size}); the tokenizer does not belong to this model")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """A one-line ConfigError for settings no sampler reads as given (the chat REPL's limits; 0 new tokens
    allowed): a negative temperature would sample greedily and top_p 0 keep one token, without a word."""
    if not max_new_tokens >= 0:
        raise ConfigError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if not top_k >= 0:
        raise ConfigError(f"top_k: must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1] (1 = off), got {top_p}")


def fit_to_context(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> tuple[int, int]:
    """(tokens cut from the left of a prompt of `prompt_len` tokens, new tokens allowed) when prompt plus reply
    must fit in `max_seq_len`: the prompt keeps at most max_seq_len - 1 tokens (room for one new token), and
    max_new_tokens is capped to what is left. `generate_tokens` applies exactly this; the CLI uses it to say so."""
    cut = max(0, prompt_len - (max_seq_len - 1))
    return cut, max(0, min(max_new_tokens, max_seq_len - (prompt_len - cut)))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels: fail early, in one line, when no compiler is there."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cc", "gcc", "clang")):
        raise ConfigError("compile: torch.compile on CPU needs a C/C++ compiler (install g++ or clang), "
                          "or generate without --compile")


GRAPH_DEVICES = ("cuda",)  # where compile=True replays each decode step as a graph
GRAPH_SLOTS = 256  # compile=True on CUDA: cache slots rounded up to a multiple of this (one graph per size)
GRAPH_CACHES = 4  # caches (batch size, rounded length, device) kept per model
_graph_caches: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()
STOP_CHECK_EVERY = 8  # steps between "has every sequence stopped?" checks (each one syncs with the host)
DECODE_WEIGHTS_MIN_TOKENS = 8  # on CPU, from this many new tokens on decode with `decode_weights`


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    prompts,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.9,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    compile: bool = False,
) -> GenerationOutput:
    """Batched sampling. `prompts`: a (B, T) tensor or lists of token ids (different lengths are left-padded).
    Stops per sequence at any id in `eos_token_id`; bounded by max_new_tokens and the model's max_seq_len
    (prompts longer than max_seq_len - 1 are left-truncated; the output's `prompt_tokens_cut` and
    `new_tokens_allowed` say so, see `fit_to_context`); an empty prompt row, text instead of token ids and
    settings out of range (`check_sampling`) are a ConfigError.
    `on_tokens(next_ids (B,))` streams.

    Per step the loop only runs the model on one token per sequence, samples, and writes into
    preallocated buffers: positions are counted, not recomputed from the mask; without stop tokens
    nothing is checked; with them, "all stopped?" (a host sync) is asked every STOP_CHECK_EVERY steps
    (every step when streaming), and the result is cut where the last sequence stopped, as if asked
    every step. On CPU, calls of at least DECODE_WEIGHTS_MIN_TOKENS tokens multiply through
    `llmlab.model.decode` (each weight read in row blocks by `torch.bmm`; q/k/v and gate/up as one
    concatenated copy each; each step through `DecodeStep` where the model is plain): a model in eval
    mode keeps those copies (up to 1 GiB) for its next call (until its weights change), one in training
    mode (RL rollouts) frees them on return.

    compile=True runs the decode steps through `torch.compile` over a `StaticKVCache`: every step has
    the same shapes, the cache length is marked dynamic, so one compiled step serves every prompt and
    output length of a batch size and is reused by later calls; the prefill stays eager. On CUDA each step
    is replayed as a CUDA graph (mode "reduce-overhead": one launch a step instead of one a kernel),
    over cache buffers kept with the model for the next call (`graph_cache`). Worth it for long or
    repeated generation: the first call pays the compilation (10-20 s on this 2-core CPU). On
    CPU, batches of PACK_MIN_ROWS (4) or more rows decode eagerly with oneDNN-packed weights even with
    compile=True: that beat the compiled decode (`llmlab.model.decode`)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    cfg = base_transformer(model).config
    device = model_device(model)
    prompts = _as_prompt_list(prompts)
    check_prompts(prompts, cfg.vocab_size)
    stop_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    limit = cfg.max_seq_len
    cut, _ = fit_to_context(max(len(p) for p in prompts), max_new_tokens, limit)
    prompts = [p[-(limit - 1):] if len(p) > limit - 1 else p for p in prompts]
    ids, prompt_mask = left_pad(prompts, pad, device)
    B, P = ids.shape
    N = fit_to_context(P, max_new_tokens, limit)[1]
    padded = any(len(p) != P for p in prompts)
    was_training = model.training
    model.eval()
    check_every = 1 if on_tokens is not None else STOP_CHECK_EVERY
    with torch.inference_mode():
        seq = torch.cat([ids, torch.full((B, N), pad, dtype=torch.long, device=device)], 1)  # (B, P + N)
        mask = torch.cat([prompt_mask, torch.ones(B, N, dtype=torch.long, device=device)], 1).bool() if padded else None
        resp_mask = torch.zeros((B, N), dtype=torch.bool, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
        next_pos = prompt_mask.sum(1, keepdim=True)  # (B, 1): position of each row's first new token
        cpu_decode = device.type == "cpu" and N >= DECODE_WEIGHTS_MIN_TOKENS
        packed = cpu_decode and packs(model, B)  # several rows a step: oneDNN-packed weights, eager
        # the decode steps compiled, over a static cache; not where the packed eager decode runs (CPU,
        # 4+ rows), which measured faster than the compiled one (batch 16: 2,066 vs 1,630 tokens/s)
        static = compile and use_cache and not packed
        graphs = static and device.type in GRAPH_DEVICES  # each compiled decode step replayed as a CUDA graph
        step_model = model
        if static:
            check_compiler(device)
            cache = graph_cache(model, B, P + N, device) if graphs else StaticKVCache(cfg.n_layers, P + N, device)
            step_model = torch.compile(model, mode="reduce-overhead") if graphs else torch.compile(model)
            if mask is not None and cache.max_len > P + N:  # key padding over every slot of the cache
                mask = torch.cat([mask, mask.new_ones(B, cache.max_len - P - N)], 1)
        else:
            cache = base_transformer(model).new_cache(P + N) if use_cache else None

        def padding(upto: int) -> torch.Tensor | None:  # key padding for attention over `upto` slots
            return None if mask is None else mask if static else mask[:, :upto]

        n_out = N
        fast = decode_weights(model, keep=not was_training, packed=packed) if cpu_decode else nullcontext()
        with fast, autocast(device):
            # on CPU: one flat step over the blocks (llmlab.model.decode.DecodeStep) where the model allows
            stepper = decode_step(model, P + N) if cpu_decode and use_cache and not static else None
            for t in range(N):
                if stepper is not None and t > 0:
                    logits = stepper(seq[:, P + t - 1 : P + t], next_pos + (t - 1), padding(P + t), cache)
                elif use_cache and t > 0:
                    if t == 1 and static:  # any cache length, one compiled step
                        cache.mark_dynamic()
                        if graphs:
                            cache.mark_static()
                        if mask is not None:
                            torch._dynamo.mark_dynamic(mask, 1)
                    if graphs:  # the last step's outputs are consumed: the graph may overwrite them
                        torch.compiler.cudagraph_mark_step_begin()
                    # a fresh (B, 1) column: the same strides whatever the buffer's length
                    logits = step_model(seq[:, P + t - 1 : P + t].clone(memory_format=torch.contiguous_format),
                                        attention_mask=padding(P + t),
                                        position_ids=next_pos + (t - 1), cache=cache, last_only=True)
                else:  # the prefill, or the whole sequence again without a cache
                    logits = model(seq[:, : P + t], attention_mask=padding(P + t), cache=cache, last_only=True)
                nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
                if stop is not None:
                    nxt = nxt.masked_fill(finished, pad)
                    resp_mask[:, t] = ~finished
                seq[:, P + t] = nxt
                if on_tokens is not None:
                    on_tokens(nxt)
                if stop is not None:
                    finished |= torch.isin(nxt, stop)
                    if ((t + 1) % check_every == 0 or t == N - 1) and bool(finished.all()):
                        # columns after the step where the last sequence stopped hold only padding
                        n_out = int(resp_mask[:, : t + 1].any(0).nonzero().max()) + 1
                        break
        if stop is None:
            resp_mask.fill_(True)
    model.train(was_training)
    # clones outside inference mode: ordinary tensors that training code may use with autograd
    return GenerationOutput(seq[:, : P + n_out].clone(), P, resp_mask[:, :n_out].long(), prompt_mask.clone(),
                            prompt_tokens_cut=cut, new_tokens_allowed=N)


def graph_cache(model: nn.Module, batch: int, slots: int, device: torch.device) -> StaticKVCache:
    """compile=True's cache on CUDA. A CUDA graph replays reads and writes at the addresses it recorded,
    so caches are kept with the model (until it is freed; the GRAPH_CACHES most recent sizes) and
    reused, emptied, by the next call of the same batch size and rounded length (GRAPH_SLOTS): repeated
    generation (chat turns, RL rollouts and evaluations) replays recorded graphs instead of recording
    one per call."""
    slots = -(-slots // GRAPH_SLOTS) * GRAPH_SLOTS
    kept = _graph_caches.setdefault(model, OrderedDict())
    key = (batch, slots, device)
    cache = kept.pop(key, None)
    if cache is None:
        cache = StaticKVCache(base_transformer(model).config.n_layers, slots, device)
        while len(kept) >= GRAPH_CACHES:
            kept.popitem(last=False)
    kept[key] = cache  # the most recent last
    cache.reset()
    return cache


def generate(model: nn.Module, input_ids, max_new_tokens: int = 256, temperature: float = 0.7,
             top_k: int = 0, top_p: float = 0.9, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Token ids of prompt + continuation, (B, P + N) (left-padded when prompts differ in length;
    positions after a sequence's stop token hold pad_token_id, or eos when no pad is given).
    temperature 0 = greedy. Defaults follow the spec's inference command (0.7, top_p 0.9, 256)."""
    return generate_tokens(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                           pad_token_id, generator, use_cache).sequences
