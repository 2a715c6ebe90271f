"""Text generation with a static KV cache: prefill the (left-padded) prompts once, then one token per
step for the whole batch, each sequence stopping on its own EOS / stop tokens.

Samplers are pure functions of logits. Generation sees only token ids; the chat REPL and RL rollouts
are thin layers over `generate_tokens`.

    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=20, temperature=0)  # greedy
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.checkpoint import base_transformer
from llmlab.device import autocast, model_device

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


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, P + N): left-padded prompts, then responses (pad after a stop)
    prompt_len: int  # P: responses start at this column
    response_mask: torch.Tensor  # (B, N) 1 for generated tokens (the stop token included)
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens

    @property
    def responses(self) -> list[list[int]]:
        r = self.sequences[:, self.prompt_len:]
        return [row[m.bool()].tolist() for row, m in zip(r, self.response_mask)]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def _as_prompt_list(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return input_ids.tolist()
    if input_ids and isinstance(input_ids[0], int):
        return [list(input_ids)]
    return [list(p) for p in input_ids]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


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
) -> GenerationOutput:
    """Batched sampling. `prompts`: a (B, T) tensor or lists of token ids (different lengths are left-padded).
    Stops per sequence at any id in `eos_token_id`; bounded by max_new_tokens and the model's max_seq_len
    (prompts longer than max_seq_len - 1 are left-truncated). `on_tokens(next_ids (B,))` streams."""
    cfg = base_transformer(model).config
    device = model_device(model)
    prompts = _as_prompt_list(prompts)
    stop_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    limit = cfg.max_seq_len
    prompts = [p[-(limit - 1):] if len(p) > limit - 1 else p for p in prompts]
    ids, prompt_mask = left_pad(prompts, pad, device)
    B, P = ids.shape
    N = max(0, min(max_new_tokens, limit - P))
    padded = any(len(p) != P for p in prompts)
    mask = torch.cat([prompt_mask, torch.ones(B, N, dtype=torch.long, device=device)], 1) if padded else None
    out = torch.full((B, N), pad, dtype=torch.long, device=device)
    resp_mask = torch.zeros((B, N), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    was_training = model.training
    model.eval()
    cache = base_transformer(model).new_cache(P + N) if use_cache else None
    step_input, step_len = ids, P
    with autocast(device):
        for t in range(N):
            if use_cache:
                logits = model(step_input, attention_mask=None if mask is None else mask[:, :step_len],
                               cache=cache, last_only=True)
            else:
                seq = torch.cat([ids, out[:, :t]], 1)
                logits = model(seq, attention_mask=None if mask is None else mask[:, : P + t], last_only=True)
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            out[:, t] = nxt
            resp_mask[:, t] = (~finished).long()
            if on_tokens is not None:
                on_tokens(nxt)
            if stop is not None:
                finished = finished | torch.isin(nxt, stop)
                if bool(finished.all()):
                    out, resp_mask = out[:, : t + 1], resp_mask[:, : t + 1]
                    break
            step_input, step_len = nxt[:, None], P + t + 1
    model.train(was_training)
    return GenerationOutput(torch.cat([ids, out], 1), P, resp_mask, prompt_mask)


def generate(model: nn.Module, input_ids, max_new_tokens: int = 256, temperature: float = 0.7,
             top_k: int = 0, top_p: float = 0.9, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Token ids of prompt + continuation, (B, P + N) (left-padded when prompts differ in length;
    positions after a sequence's stop token hold pad_token_id, or eos when no pad is given).
    temperature 0 = greedy. Defaults follow the spec's inference command (0.7, top_p 0.9, 256)."""
    return generate_tokens(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                           pad_token_id, generator, use_cache).sequences
